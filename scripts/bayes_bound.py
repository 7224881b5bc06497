"""How well can any learner do in the simulator? A Bayes learner that knows the generative model.

A diagnostic (measuring only), beside ``scripts/quality_diag.py``. ``BayesLearner`` knows how
``cadence.sim.population`` draws customers (the shape's medians, the traits' shifts, the noise
spreads, the favourite channel's lift, the hour curve, fatigue and unsubscribe propensities),
but not each customer's own draw: it keeps, per customer, particles drawn from that prior given
the customer's traits, and weighs them by the exact likelihood of every outcome seen (each
send clicked or not, unsubscribed or not, at its channel, local hour and recent load). It then
acts as the oracle does on the posterior: the best expected value net of the unsubscribe cost,
sent when positive (``--policy mean``), or on one particle drawn by weight (``--policy thompson``);
``--ucb K`` adds K posterior standard deviations of the click probability to each value (optimism:
more sends to customers it is unsure of).

No practical learner knows the model this well, so ``mean`` is about the best a learner can do
that values each send as the oracle does (clicks minus 10 x unsubscribes, send by send). Where
its share of the oracle's clicks stays under the goal's 80%, better learning alone cannot reach
the goal: only sending more than that value says, for more clicks and more unsubscribes.

    PYTHONPATH=$PWD python scripts/bayes_bound.py --customers 3000 --days 20 --shapes balanced
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from cadence.channels import Feedback
from cadence.sim.policies import ALLOWED_HOURS, OraclePolicy, _local_ms
from cadence.sim.population import RHYTHMS, SHAPES, SIM_CHANNELS, Customer, make_population
from cadence.sim.report import START
from cadence.sim.world import UNSUB_LOAD, CustomerState, run_policy

sys.path.insert(0, str(Path(__file__).parent))
from quality_diag import TraitOracle  # noqa: E402

HOURS = np.array(list(ALLOWED_HOURS), dtype=float)
CH_INDEX = {ch: i for i, ch in enumerate(SIM_CHANNELS)}
UNSUB_MULT = np.array([1.0, 1.6, 1.2])  # email, sms, push: as make_population draws them


class _Posterior:
    """One customer's particles and their log weights."""

    __slots__ = ("aff", "pref", "width", "fat", "unsub", "logw", "pending", "rng")

    def __init__(self, c: Customer, shape: Any, k: int, rng: np.random.Generator) -> None:
        young = c.traits["age_band"] == "18-34"
        device = c.traits["device"]
        shift = np.array(
            [
                (-0.5 if young else 0.3) + (0.3 if device == "desktop" else 0.0),
                (0.4 if young else -0.2),
                (0.5 if device == "mobile" else -0.4) + (0.2 if young else 0.0),
            ]
        )
        base = np.array([shape.affinity[ch] for ch in SIM_CHANNELS])
        aff = np.minimum(0.6, base * np.exp(shift + rng.normal(0, 0.6, size=(k, 3))))
        avail = [CH_INDEX[ch] for ch in c.available]
        fav = np.array(avail)[rng.integers(0, len(avail), size=k)]
        aff[np.arange(k), fav] = np.minimum(0.6, aff[np.arange(k), fav] * 1.8)
        self.aff = aff
        self.pref = (RHYTHMS[c.traits["rhythm"]] + rng.normal(0, 1.5, size=k)) % 24
        self.width = rng.uniform(1.5, 3.0, size=k)
        self.fat = shape.fatigue * np.exp(rng.normal(0, 0.5, size=k))
        self.unsub = shape.unsubscribe * np.exp(rng.normal(0, 0.6, size=k))
        self.logw = np.zeros(k)
        self.pending: list[list[Any]] = []  # [sent_ms, channel index, hour, load, clicked, unsubscribed]
        self.rng = rng

    def hour_factor(self, hours: np.ndarray) -> np.ndarray:
        d = np.abs(hours[None, :] - self.pref[:, None]) % 24
        d = np.minimum(d, 24 - d)
        return 0.2 + 0.8 * np.exp(-(d * d) / (2 * self.width[:, None] ** 2))

    def settle(self, now_ms: int) -> None:
        """Weigh the particles by every outcome that can no longer change (unsubscribes come within 6 h)."""
        keep = []
        for item in self.pending:
            sent_ms, ch, hour, load, clicked, unsubscribed = item
            if now_ms - sent_ms < 6 * 3_600_000 + 60_000:
                keep.append(item)
                continue
            hf = self.hour_factor(np.array([hour]))[:, 0]
            p = self.aff[:, ch] * hf * np.exp(-self.fat * load)
            u = np.minimum(1.0, self.unsub * UNSUB_MULT[ch] * (1 + UNSUB_LOAD * load) * (1.5 - hf))
            self.logw += np.log(np.clip(p if clicked else 1 - p, 1e-12, None))
            self.logw += np.log(np.clip(u if unsubscribed else 1 - u, 1e-12, None))
        self.pending = keep
        self.logw -= self.logw.max()

    def weights(self) -> np.ndarray:
        w = np.exp(self.logw)
        return w / w.sum()


class BayesLearner:
    """The oracle's rule on a per-customer posterior under the true generative model."""

    def __init__(
        self,
        shape: str,
        *,
        particles: int = 400,
        thompson: bool = False,
        ucb: float = 0.0,
        cost: float = 10.0,
    ) -> None:
        self.shape = SHAPES[shape]
        self.k = particles
        self.thompson = thompson
        self.ucb = ucb  # optimism: the posterior mean plus this many posterior sd of the click probability
        self.cost = cost
        self.name = "bayes (thompson)" if thompson else f"bayes (ucb {ucb:g})" if ucb else "bayes (mean)"
        self.post: dict[int, _Posterior] = {}

    def _posterior(self, c: Customer) -> _Posterior:
        post = self.post.get(c.id)
        if post is None:
            post = self.post[c.id] = _Posterior(
                c, self.shape, self.k, np.random.default_rng(c.id * 7919 + 17)
            )
        return post

    def decide(self, state: CustomerState, now_ms: int) -> tuple[str, int] | None:
        c = state.customer
        post = self._posterior(c)
        post.settle(now_ms)
        local = datetime.fromtimestamp(now_ms / 1000, tz=ZoneInfo(c.zone))
        ats = [_local_ms(c.zone, local.year, local.month, local.day, int(h)) for h in HOURS]
        loads = np.array([state.load(at) for at in ats], dtype=float)
        hf = post.hour_factor(HOURS)  # (k, hours)
        fat = np.exp(-post.fat[:, None] * loads[None, :])  # (k, hours)
        w = post.weights()
        if self.thompson:
            pick = post.rng.choice(len(w), p=w)
            w = np.zeros_like(w)
            w[pick] = 1.0
        best: tuple[float, str, int] | None = None
        for ch in c.available:
            if ch in c.opted_out:
                continue
            i = CH_INDEX[ch]
            p = post.aff[:, i : i + 1] * hf * fat
            u = np.minimum(
                1.0, post.unsub[:, None] * UNSUB_MULT[i] * (1 + UNSUB_LOAD * loads[None, :]) * (1.5 - hf)
            )
            value = w @ (p - self.cost * u)
            if self.ucb:
                mean_p = w @ p
                value = value + self.ucb * np.sqrt(np.maximum(w @ (p * p) - mean_p * mean_p, 0.0))
            j = int(np.argmax(value))
            if best is None or value[j] > best[0]:
                best = (float(value[j]), ch, ats[j])
        if best is None or best[0] <= 0:
            return None
        return best[1], best[2]

    def feedback(self, state: CustomerState, channel: str, kind: Feedback, sent_ms: int, ts_ms: int) -> None:
        post = self._posterior(state.customer)
        if kind is Feedback.DELIVERED:
            hour = datetime.fromtimestamp(sent_ms / 1000, tz=ZoneInfo(state.customer.zone))
            post.pending.append(
                [sent_ms, CH_INDEX[channel], hour.hour + hour.minute / 60, state.load(sent_ms), False, False]
            )
            return
        for item in post.pending:
            if item[0] == sent_ms and item[1] == CH_INDEX[channel]:
                if kind is Feedback.CLICKED:
                    item[4] = True
                elif kind is Feedback.UNSUBSCRIBED:
                    item[5] = True


def _job(job: tuple[str, int, int, int, int, str, float]) -> dict[str, Any]:
    shape, seed, customers, days, particles, policy, ucb = job
    pop = make_population(shape, customers, seed)
    out: dict[str, Any] = {"shape": shape, "seed": seed}
    pols: list[Any] = [OraclePolicy(10.0), TraitOracle(shape)]
    if policy in ("mean", "both"):
        pols.append(BayesLearner(shape, particles=particles, ucb=ucb))
    if policy in ("thompson", "both"):
        pols.append(BayesLearner(shape, particles=particles, thompson=True))
    for pol in pols:
        cpu = time.process_time()
        r = run_policy(pol, pop, days=days, seed=seed, start=START)
        out[pol.name] = {
            "clicks": r.clicks,
            "sends": r.sends,
            "unsub": r.unsubscribe_rate,
            "net": r.clicks - 10 * r.unsubscribes,  # what every policy here maximises, send by send
            "mpd": r.sends / r.customers / r.days,
            "cpu": round(time.process_time() - cpu, 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--customers", type=int, default=3000)
    ap.add_argument("--days", type=int, default=20)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--shapes", default="balanced,email_heavy,mobile_first")
    ap.add_argument("--particles", type=int, default=400)
    ap.add_argument("--policy", choices=("mean", "thompson", "both"), default="mean")
    ap.add_argument(
        "--ucb", type=float, default=0.0, help="optimism in posterior sd of the click probability"
    )
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    jobs = [
        (shape, int(seed), args.customers, args.days, args.particles, args.policy, args.ucb)
        for seed in args.seeds.split(",")
        for shape in args.shapes.split(",")
    ]
    with multiprocessing.Pool(args.jobs) as pool:
        for out in pool.imap(_job, jobs):
            oracle = out["oracle"]["clicks"]
            for name, r in out.items():
                if isinstance(r, dict):
                    share = r["clicks"] / oracle if oracle else math.nan
                    print(
                        f"{out['shape']:<13} seed {out['seed']} {name:<18} clicks {r['clicks']:>7,} "
                        f"({share:6.1%} of the oracle's)  msgs/customer-day {r['mpd']:.3f}  "
                        f"unsubscribed {r['unsub']:.1%}  net {r['net']:,}  cpu {r['cpu']} s",
                        flush=True,
                    )
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
