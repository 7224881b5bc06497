"""Decision quality in the simulator, and in-process decide() latency.

Quality: every policy on three differently shaped populations (balanced, email_heavy,
mobile_first) and several seeds, 30 simulated days; numbers are means over the runs
(clicks as a share of the oracle's are pooled). Latency: decide() with the learners
for one customer with 10 eligible campaigns x 4 channels x 24 slots.
"""

from __future__ import annotations

import statistics
import time
from datetime import time as dtime

from cadence.engine.campaign import (
    DAY_MS,
    Campaign,
    Cap,
    ChannelPolicy,
    CompiledRuleset,
    GlobalSettings,
    QuietHours,
    TemplateSpec,
)
from cadence.engine.decide import decide
from cadence.engine.learners import DecisionLearner
from cadence.engine.profiles_memory import MemoryProfile
from cadence.sim.report import compare, markdown_table

CHANNELS4 = ("email", "sms", "push", "webhook")


def latency(n: int) -> dict[str, float]:
    """decide() percentiles (ms): 10 eligible campaigns x 4 channels x 24 slots, with and without learners."""
    campaigns = {
        f"c{i}": Campaign(
            name=f"c{i}",
            title=f"campaign {i}",
            priority=i % 3,
            audience=None,
            template=TemplateSpec("t"),
            channels=ChannelPolicy(CHANNELS4, mode="best"),
            caps=(Cap(count=3, window_ms=7 * DAY_MS),),
            # Quiet 03:00..03:30 keeps all 24 hourly slots while exercising the quiet-hours path.
            quiet=QuietHours(start=dtime(3), end=dtime(3, 30), fallback_zone="Europe/Berlin"),
        )
        for i in range(10)
    }
    ruleset = CompiledRuleset(
        hash="bench",
        campaigns=campaigns,
        segments={},
        settings=GlobalSettings(caps=(Cap(count=2, window_ms=DAY_MS, scope="customer", calendar=True),)),
        aggregates=frozenset(),
    )
    learner = DecisionLearner()
    profile = MemoryProfile(
        customer_id=7, timezone="America/New_York", traits={"plan": "pro", "age_band": "35+"}
    )
    now = 1_780_000_000_000
    out: dict[str, float] = {}
    for label, scorer in (("learners", learner), ("no scorer", None)):
        times = []
        candidates = 0
        for i in range(n + 50):
            t0 = time.perf_counter()
            d = decide(
                ruleset=ruleset,
                profile=profile,
                now_ms=now + i * 3_600_000,
                history=[],
                available_channels=CHANNELS4,
                scorer=scorer,
                seed=i,
            )
            if i >= 50:
                times.append((time.perf_counter() - t0) * 1000)
            candidates = len(d.candidates)
        times.sort()
        out[f"{label} p50"] = statistics.median(times)
        out[f"{label} p99"] = times[int(len(times) * 0.99) - 1]
        out[f"{label} candidates"] = candidates
    return out


def run(*, quick: bool, postgres_url: str | None) -> str:
    """Run both parts and return the Markdown section."""
    customers, days, seeds = (400, 10, (1,)) if quick else (10_000, 30, (1, 2))
    cmp = compare(customers=customers, days=days, seeds=seeds)
    cad, base = cmp.policies["cadence"], cmp.policies["email 10:00"]
    heur = cmp.policies["heuristic"]
    lat = latency(300 if quick else 3000)

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    ctr_x = cad.ctr / base.ctr if base.ctr else 0.0
    unsub_x = cad.unsubscribe_rate / base.unsubscribe_rate if base.unsubscribe_rate else 0.0
    oracle_share = cmp.share_of_oracle("cadence")
    goals = [
        ("CTR vs email 10:00", f"{ctr_x:.2f}x", ">= 3x", mark(ctr_x >= 3)),
        ("customers unsubscribed vs email 10:00", f"{unsub_x:.2f}x", "<= 0.4x", mark(unsub_x <= 0.4)),
        ("clicks, share of oracle", f"{oracle_share:.0%}", ">= 80%", mark(oracle_share >= 0.8)),
        (
            "clicks vs heuristic",
            f"{cad.clicks:,.0f} vs {heur.clicks:,.0f}",
            "more",
            mark(cad.clicks > heur.clicks),
        ),
        (
            "customers unsubscribed vs heuristic",
            f"{cad.unsubscribe_rate:.1%} vs {heur.unsubscribe_rate:.1%}",
            "fewer",
            mark(cad.unsubscribe_rate < heur.unsubscribe_rate),
        ),
        (
            "decide() p99, 10 campaigns x 4 channels x 24 slots, learners",
            f"{lat['learners p99']:.2f} ms (p50 {lat['learners p50']:.2f})",
            "< 1 ms",
            mark(lat["learners p99"] < 1),
        ),
        (
            "decide() p99, same, no scorer (1 slot each)",
            f"{lat['no scorer p99']:.2f} ms (p50 {lat['no scorer p50']:.2f})",
            "-",
            "-",
        ),
    ]
    lines = [
        "## Decisions: quality in the simulator and decide() latency",
        "",
        f"{customers:,} customers x {days} days per run; populations {', '.join(cmp.shapes)}; "
        f"seeds {', '.join(map(str, seeds))} (a fresh population per seed). Policies: cadence (decide() + "
        "learners, one daily campaign, best of email/sms/push, quiet 21:00-08:00, 1 message per local "
        "day), email at 10:00 local daily (no caps), random channel and hour, a heuristic (best past "
        "channel at the usual click hour, at most 3 per 7 days) and an oracle that knows the hidden "
        "preferences and fatigue. Unsubscribed = share of customers who opted out of at least one "
        "channel. decisions/s is time inside the policy's decide; for cadence that is the whole "
        "pipeline with the learners.",
        "",
        markdown_table(cmp),
        "",
        "| goal | measured | target | |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in goals],
    ]
    if quick:
        lines += ["", "_quick run: small population and few days; numbers are not the benchmark's._"]
    return "\n".join(lines)
