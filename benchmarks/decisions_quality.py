"""Decision quality in the simulator: cadence against email at 10:00, a heuristic and an oracle.

Every policy runs on three differently shaped populations (balanced, email_heavy,
mobile_first) and two seeds (a fresh population and world per seed), 10,000 customers x
30 simulated days each. The (population, seed) runs go to two worker processes; each
run is deterministic for its seed, so the numbers do not depend on the machine's load
(only the decisions/s column does). Numbers are means over the runs; clicks as a share
of the oracle's are pooled (total clicks over total oracle clicks).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from pathlib import Path

from cadence.sim.population import SHAPES
from cadence.sim.report import Comparison, markdown_table, run_population, summarise
from cadence.sim.world import RunResult

WORKERS = 2


def _run(job: tuple[str, int, int, int]) -> tuple[list[RunResult], float]:
    shape, seed, customers, days = job
    cpu0 = time.process_time()
    results = run_population(shape, seed, customers=customers, days=days)
    return results, time.process_time() - cpu0


def _load() -> str:
    path = Path("/proc/loadavg")
    return path.read_text().split()[0] if path.exists() else "?"


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def goal_rows(cmp: Comparison) -> list[tuple[str, str, str, str]]:
    """(goal, measured, target, met) for cadence in ``cmp``."""
    cad, base, heur = cmp.policies["cadence"], cmp.policies["email 10:00"], cmp.policies["heuristic"]
    ctr_x = cad.ctr / base.ctr if base.ctr else 0.0
    unsub_x = cad.unsubscribe_rate / base.unsubscribe_rate if base.unsubscribe_rate else 0.0
    share = cmp.share_of_oracle("cadence")
    return [
        ("CTR vs email 10:00", f"{ctr_x:.2f}x", ">= 3x", _mark(ctr_x >= 3)),
        ("customers unsubscribed vs email 10:00", f"{unsub_x:.2f}x", "<= 0.4x", _mark(unsub_x <= 0.4)),
        ("clicks, share of oracle (pooled)", f"{share:.0%}", ">= 80%", _mark(share >= 0.8)),
        (
            "clicks vs heuristic",
            f"{cad.clicks:,.0f} vs {heur.clicks:,.0f}",
            "more",
            _mark(cad.clicks > heur.clicks),
        ),
        (
            "customers unsubscribed vs heuristic",
            f"{cad.unsubscribe_rate:.1%} vs {heur.unsubscribe_rate:.1%}",
            "fewer",
            _mark(cad.unsubscribe_rate < heur.unsubscribe_rate),
        ),
    ]


def per_population(results: Sequence[RunResult], *, customers: int, days: int, seeds: Sequence[int]) -> str:
    """One row per population: cadence's numbers against each goal, over that population's seeds."""
    lines = [
        "| population | CTR vs email 10:00 (>= 3x) | unsubscribed vs email 10:00 (<= 0.4x) "
        "| share of oracle clicks (>= 80%) | clicks vs heuristic (more) | unsubscribed vs heuristic (fewer) "
        "| cadence msgs/cust/day (oracle) |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in dict.fromkeys(r.population for r in results):
        cmp = summarise(
            [r for r in results if r.population == shape],
            customers=customers,
            days=days,
            seeds=seeds,
            shapes=[shape],
        )
        goals = {g[0]: g for g in goal_rows(cmp)}

        def cell(name: str, goals: dict[str, tuple[str, str, str, str]] = goals) -> str:
            _, measured, _, met = goals[name]
            return measured if met == "met" else f"{measured} ({met})"

        cad, oracle = cmp.policies["cadence"], cmp.policies["oracle"]
        lines.append(
            f"| {shape} | {cell('CTR vs email 10:00')} | {cell('customers unsubscribed vs email 10:00')} "
            f"| {cell('clicks, share of oracle (pooled)')} | {cell('clicks vs heuristic')} "
            f"| {cell('customers unsubscribed vs heuristic')} "
            f"| {cad.sends_per_customer_day:.2f} ({oracle.sends_per_customer_day:.2f}) |"
        )
    return "\n".join(lines)


def run(*, quick: bool, postgres_url: str | None) -> str:
    """Run every (population, seed) in parallel and return the Markdown section."""
    customers, days, seeds = (400, 10, (1,)) if quick else (10_000, 30, (1, 2))
    shapes = tuple(SHAPES)
    jobs = [(shape, seed, customers, days) for shape in shapes for seed in seeds]
    load_before = _load()
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
        answers = pool.map(_run, jobs, chunksize=1)
    wall = time.perf_counter() - t0
    results = [r for rs, _ in answers for r in rs]
    cpu = sum(c for _, c in answers)
    cmp = summarise(results, customers=customers, days=days, seeds=seeds, shapes=shapes)
    lines = [
        "## Decisions: quality in the simulator",
        "",
        f"{customers:,} customers x {days} days per run; populations {', '.join(shapes)}; seeds "
        f"{', '.join(map(str, seeds))} (a fresh population and world per seed), {len(jobs)} runs over "
        f"{WORKERS} processes. Policies: cadence (decide() + learners, one daily campaign, best of "
        "email/sms/push, quiet 21:00-08:00, 1 message per local day), email at 10:00 local daily (no caps), "
        "random channel and hour, a heuristic (best past channel at the usual click hour, at most 3 per 7 "
        "days) and an oracle that knows the hidden preferences and fatigue. Unsubscribed = share of "
        "customers who opted out of at least one channel. Means over the runs; shares of the oracle's "
        "clicks pooled. The numbers are deterministic per seed; decisions/s is time inside the policy's "
        "decide (for cadence, the whole pipeline with the learners) and depends on the machine's load.",
        "",
        markdown_table(cmp),
        "",
        "| goal (all runs) | measured | target | |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in goal_rows(cmp)],
        "",
        "Per population (means over its seeds):",
        "",
        per_population(results, customers=customers, days=days, seeds=seeds),
        "",
        f"Wall time {wall:,.0f} s, CPU time of the runs {cpu:,.0f} s; machine load average {load_before} "
        f"before, {_load()} after (2 shared cores).",
    ]
    if quick:
        lines += ["", "_quick run: small population and few days; numbers are not the benchmark's._"]
    return "\n".join(lines)
