"""Paired comparison of LearnerConfig arms in the simulator: same worlds, several sets of Thompson draws.

One run of the learner varies with its posterior draws more than most changes move it, so
arms are compared on the same (population, world seed) with the same draw sets: draw ``k``
remaps every decision's seed (draw 0 is the learner as the simulator runs it). Prints one
JSON line per run: clicks, share of the oracle's clicks, customers unsubscribed, messages per
customer-day, and the true click and unsubscribe probabilities of the sends made (read from
the simulator's hidden values here, for measuring only; the learner never sees them).

    PYTHONPATH=$PWD python scripts/compare_learners.py \\
        '{"base": {}, "fit": {"hazard_fit": true}}' --populations balanced --draws 0,1,2 -n 3000 -d 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from typing import Any

from cadence.engine.decide import BulkScores, OptionGroup
from cadence.engine.learners import DecisionLearner, LearnerConfig
from cadence.sim.policies import CadencePolicy, OraclePolicy
from cadence.sim.population import make_population
from cadence.sim.report import START
from cadence.sim.world import (
    CustomerState,
    click_probability,
    local_hour,
    run_policy,
    unsubscribe_probability,
)


class _DrawLearner(DecisionLearner):
    """The learner with every decision's seed remapped by ``draw`` (other posterior draws, same learner)."""

    draw = 0

    def score_options(
        self, *, profile: Any, groups: Sequence[OptionGroup], now_ms: int, seed: int
    ) -> BulkScores:
        """As the learner's, with the seed remapped."""
        if self.draw:
            seed = (seed * 31 + self.draw * 1_000_000_007) & 0x7FFFFFFF
        return super().score_options(profile=profile, groups=groups, now_ms=now_ms, seed=seed)


class _Probe(CadencePolicy):
    """cadence, plus the true click and unsubscribe probabilities of each send it makes."""

    def __init__(self, config: LearnerConfig, draw: int) -> None:
        super().__init__(config=config)
        learner = _DrawLearner(config)
        learner.draw = draw
        self.learner = learner
        self.true_click = self.true_unsub = 0.0
        self.made = 0

    def decide(self, state: CustomerState, now_ms: int) -> tuple[str, int] | None:
        """The policy's choice; its true probabilities are noted."""
        out = super().decide(state, now_ms)
        if out is not None:
            channel, at = out
            c = state.customer
            hour, load = local_hour(at, c.zone), state.load(at)
            self.true_click += click_probability(c, channel, hour, load)
            self.true_unsub += unsubscribe_probability(c, channel, hour, load)
            self.made += 1
        return out


def _oracle(shape: str, seed: int, n: int, days: int) -> int:
    result = run_policy(
        OraclePolicy(10.0), make_population(shape, n, seed), days=days, seed=seed, start=START
    )
    return result.clicks


def _one(job: tuple[str, dict[str, Any], str, int, int, int, int]) -> dict[str, Any]:
    arm, kwargs, shape, seed, draw, n, days = job
    config = LearnerConfig(horizon_ms=24 * 3_600_000, **kwargs)
    cpu0 = time.process_time()
    probe = _Probe(config, draw)
    r = run_policy(probe, make_population(shape, n, seed), days=days, seed=seed, start=START)
    made = max(probe.made, 1)
    return {
        "arm": arm,
        "population": shape,
        "seed": seed,
        "draw": draw,
        "clicks": r.clicks,
        "unsubscribed": round(r.unsubscribed_customers / n, 4),
        "msgs_per_customer_day": round(r.sends / n / days, 4),
        "true_click": round(probe.true_click / made, 4),
        "true_unsub": round(probe.true_unsub / made, 5),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    """Run every (arm, population, draw) on ``--procs`` processes; one JSON line per run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arms", help='JSON: {"name": {LearnerConfig field: value}}')
    ap.add_argument("--populations", default="balanced,email_heavy,mobile_first")
    ap.add_argument("--draws", default="0,1,2")
    ap.add_argument("--seed", type=int, default=1, help="world and population seed")
    ap.add_argument("-n", "--customers", type=int, default=3000)
    ap.add_argument("-d", "--days", type=int, default=20)
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args()
    arms: dict[str, dict[str, Any]] = json.loads(args.arms)
    shapes = args.populations.split(",")
    draws = [int(x) for x in args.draws.split(",")]
    jobs = [
        (arm, kw, shape, args.seed, draw, args.customers, args.days)
        for shape in shapes
        for draw in draws
        for arm, kw in arms.items()
    ]
    with multiprocessing.get_context("spawn").Pool(args.procs) as pool:
        oracle = dict(
            zip(
                shapes,
                pool.starmap(_oracle, [(s, args.seed, args.customers, args.days) for s in shapes]),
                strict=True,
            )
        )
        for res in pool.imap_unordered(_one, jobs):
            res["share_of_oracle"] = round(res["clicks"] / oracle[res["population"]], 4)
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
