"""Run the comparison and show it: a rich table, a Markdown table and a PNG chart."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from cadence.sim.policies import default_policies
from cadence.sim.population import SHAPES, make_population
from cadence.sim.world import RunResult, run_policy

__all__ = [
    "Comparison",
    "PolicySummary",
    "compare",
    "markdown_table",
    "rich_table",
    "run_population",
    "summarise",
    "write_chart",
]

START = date(2026, 3, 2)  # a Monday; the US (Mar 8) and EU (Mar 29) DST changes fall inside


@dataclass
class PolicySummary:
    """One policy's results, averaged over every (population, seed) run."""

    policy: str
    runs: list[RunResult] = field(default_factory=list)

    def _mean(self, fn: Callable[[RunResult], float]) -> float:
        return sum(fn(r) for r in self.runs) / len(self.runs) if self.runs else 0.0

    @property
    def ctr(self) -> float:
        """Mean click-through rate (clicks per message)."""
        return self._mean(lambda r: r.ctr)

    @property
    def unsubscribe_rate(self) -> float:
        """Mean share of customers who opted out of at least one channel."""
        return self._mean(lambda r: r.unsubscribe_rate)

    @property
    def email_unsubscribe_rate(self) -> float:
        """Mean share of customers who opted out of email."""
        return self._mean(lambda r: r.email_unsubscribed_customers / r.customers)

    @property
    def clicks(self) -> float:
        """Mean clicks per run."""
        return self._mean(lambda r: r.clicks)

    @property
    def sends_per_customer_day(self) -> float:
        """Mean messages per customer per day."""
        return self._mean(lambda r: r.sends / r.customers / r.days)

    @property
    def decisions_per_second(self) -> float:
        """Decisions per second of wall time spent deciding (all runs pooled)."""
        seconds = sum(r.decide_seconds for r in self.runs)
        return sum(r.decisions for r in self.runs) / seconds if seconds else float("inf")


@dataclass
class Comparison:
    """Every policy's summary, plus per-population clicks-vs-oracle shares."""

    customers: int
    days: int
    seeds: Sequence[int]
    shapes: Sequence[str]
    policies: dict[str, PolicySummary]

    def share_of_oracle(self, policy: str) -> float:
        """Total clicks as a share of the oracle's, pooled over every run."""
        oracle = sum(r.clicks for r in self.policies["oracle"].runs)
        mine = sum(r.clicks for r in self.policies[policy].runs)
        return mine / oracle if oracle else 0.0


def run_population(
    shape: str,
    seed: int,
    *,
    customers: int,
    days: int,
    policies: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Every policy (or those named, and always the oracle) on one fresh ``shape`` population of ``seed``."""
    population = make_population(shape, customers, seed)
    out = []
    for policy in default_policies(seed=seed):
        name = policy.name  # type: ignore[attr-defined]
        if policies is not None and name not in policies and name != "oracle":
            continue
        result = run_policy(policy, population, days=days, seed=seed, start=START)  # type: ignore[arg-type]
        result.population = shape
        result.seed = seed
        out.append(result)
        if progress is not None:
            progress(f"{shape} seed {seed}: {name} CTR {result.ctr:.2%}, clicks {result.clicks}")
    return out


def summarise(
    results: Sequence[RunResult], *, customers: int, days: int, seeds: Sequence[int], shapes: Sequence[str]
) -> Comparison:
    """Group runs by policy (in the order first seen) into a :class:`Comparison`."""
    summaries: dict[str, PolicySummary] = {}
    for result in results:
        summaries.setdefault(result.policy, PolicySummary(result.policy)).runs.append(result)
    return Comparison(customers=customers, days=days, seeds=seeds, shapes=shapes, policies=summaries)


def compare(
    *,
    customers: int,
    days: int,
    seeds: Sequence[int] = (1,),
    shapes: Sequence[str] = tuple(SHAPES),
    policies: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Run every policy on every (shape, seed) population and summarise."""
    results = [
        r
        for shape in shapes
        for seed in seeds
        for r in run_population(
            shape, seed, customers=customers, days=days, policies=policies, progress=progress
        )
    ]
    return summarise(results, customers=customers, days=days, seeds=seeds, shapes=shapes)


COLUMNS = (
    "policy",
    "CTR",
    "clicks",
    "% of oracle clicks",
    "unsubscribed",
    "email unsub",
    "msgs/cust/day",
    "decisions/s",
)


def _row(cmp: Comparison, s: PolicySummary) -> tuple[str, ...]:
    dps = s.decisions_per_second
    return (
        s.policy,
        f"{s.ctr:.2%}",
        f"{s.clicks:,.0f}",
        f"{cmp.share_of_oracle(s.policy):.0%}",
        f"{s.unsubscribe_rate:.1%}",
        f"{s.email_unsubscribe_rate:.1%}",
        f"{s.sends_per_customer_day:.2f}",
        "-" if dps == float("inf") else f"{dps:,.0f}",
    )


def rich_table(cmp: Comparison) -> object:
    """The comparison as a ``rich.table.Table``."""
    from rich.table import Table

    table = Table(
        title=f"{cmp.customers:,} customers x {cmp.days} days, populations {', '.join(cmp.shapes)}, "
        f"seeds {', '.join(map(str, cmp.seeds))}"
    )
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "policy" else "right")
    for s in cmp.policies.values():
        table.add_row(*_row(cmp, s), style="bold green" if s.policy == "cadence" else None)
    return table


def markdown_table(cmp: Comparison) -> str:
    """The comparison as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_row(cmp, s)) + " |" for s in cmp.policies.values()]
    return "\n".join(lines)


def write_chart(cmp: Comparison, path: Path) -> Path:
    """A PNG with three panels: CTR, clicks as share of the oracle's, customers unsubscribed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cmp.policies)
    colors = ["#2a9d8f" if n == "cadence" else "#264653" if n == "oracle" else "#a8a8a8" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = (
        ("CTR", [cmp.policies[n].ctr * 100 for n in names], "%"),
        ("clicks, % of oracle", [cmp.share_of_oracle(n) * 100 for n in names], "%"),
        ("customers unsubscribed", [cmp.policies[n].unsubscribe_rate * 100 for n in names], "%"),
    )
    for ax, (title, values, unit) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(
                f"{v:.1f}{unit}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
            )
    fig.suptitle(
        f"cadence simulator: {cmp.customers:,} customers x {cmp.days} days ({', '.join(cmp.shapes)})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
