"""Diagnostics for decision quality in the simulator (reads the world's hidden values: measuring only).

Four modes, all for ``cadence.sim`` populations:

- ``trait``: a *trait oracle*, which knows the population-level expectations given the
  observable traits (E[affinity | traits], E[hour factor | rhythm], E[fatigue],
  E[unsubscribe]) but not each customer's own noise, and acts as the oracle does (the
  best expected value net of the unsubscribe cost, sent when positive). Its share of
  the oracle's clicks says how much population learning alone can give. Two partial
  oracles split the oracle's knowledge: ``knows taste`` (each customer's own affinities and
  hour, with the population's fatigue and unsubscribe propensity) and ``knows risk`` (the
  customer's own fatigue and unsubscribe propensity, with the traits' expected tastes).
  Each policy's chosen sends are traced per day: the share of decisions sent, the true
  click probability of the sends, the share on the best channel, the true hour factor.
  ``--no-cadence`` leaves cadence out (the rest is fast).
- ``ab``: cadence under several ``LearnerConfig`` overrides, each over the same worlds
  with several Thompson draw seeds (a paired design): shares of the oracle's clicks,
  customers unsubscribed, messages per customer-day, and the mean true click and
  unsubscribe probabilities of the sends made. Arms start from the simulator's
  configuration (``sim_learner_config()``: the server's defaults with a 24 h horizon);
  give every field that differs.
- ``calib``: cadence's calibration on the sends it made: the learners' predicted click and
  unsubscribe probabilities of each chosen send (the candidate's posterior-mean parts)
  against the world's true ones, by day, by recent load and by the send hour's true
  factor (selected sends only: a send the learner held back is not in it).
- ``shadow``: the oracle, the Bayes learner of ``scripts/bayes_bound.py`` (``mean``) and cadence
  on the same world, traced per day (share sent, true click probability of the sends, clicks a
  customer-day, best channel, best allowed hour, true hour factor, unsubscribes); then cadence's
  run again with the Bayes learner shadowing it (fed the same feedback, deciding on the same
  state): per decision, whether both, one or neither would send, and for each side's option
  cadence's posterior-mean click and unsubscribe predictions (``learner.score`` over every
  channel and allowed hour), the Bayes posterior's and the truth. ``--out P`` writes each
  run's rows to ``P.<shape>.<seed>.<draw>.json``.

    PYTHONPATH=$PWD python scripts/quality_diag.py trait --customers 3000 --days 20
    PYTHONPATH=$PWD python scripts/quality_diag.py ab --customers 3000 --days 20 \
        --arm base='{}' --arm fast='{"label_delay_ms": 14400000}' --draws 0,1,2
    PYTHONPATH=$PWD python scripts/quality_diag.py calib --customers 1500 --days 15
    PYTHONPATH=$PWD python scripts/quality_diag.py shadow --customers 3000 --days 20 --shapes mobile_first
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from cadence.channels import Feedback
from cadence.engine.learners import LearnerConfig
from cadence.sim.policies import (
    ALLOWED_HOURS,
    CadencePolicy,
    HeuristicPolicy,
    OraclePolicy,
    _local_ms,
    sim_learner_config,
)
from cadence.sim.population import RHYTHMS, SHAPES, Customer, make_population
from cadence.sim.report import START
from cadence.sim.world import (
    UNSUB_LOAD,
    CustomerState,
    RunResult,
    click_probability,
    hour_factor,
    local_hour,
    run_policy,
    unsubscribe_probability,
)


class TraitOracle:
    """Acts as the oracle on the population's expectations given the traits (not the individual noise)."""

    name = "trait oracle"
    #: What it knows of each customer beyond the traits: nothing, "taste" or "risk" (see PartialOracle).
    knows = ""

    def __init__(self, shape: str, unsubscribe_cost: float = 10.0) -> None:
        self.shape = SHAPES[shape]
        self.cost = unsubscribe_cost
        rng = random.Random(7)
        # E[hour factor at local hour h | rhythm]: Monte Carlo over the preferred hour and width.
        self.hf: dict[str, list[float]] = {}
        for rhythm, mean in RHYTHMS.items():
            acc = [0.0] * 24
            n = 20_000
            for _ in range(n):
                m = (mean + rng.gauss(0, 1.5)) % 24
                w = rng.uniform(1.5, 3.0)
                for h in range(24):
                    d = abs(h - m) % 24
                    d = min(d, 24 - d)
                    acc[h] += 0.2 + 0.8 * math.exp(-(d * d) / (2 * w * w))
            self.hf[rhythm] = [a / n for a in acc]
        # E[exp(-fatigue * load)] per load 0..30.
        self.fat = [
            statistics.fmean(
                math.exp(-self.shape.fatigue * math.exp(g) * k)
                for g in (random.Random(k * 31 + i).gauss(0, 0.5) for i in range(4000))
            )
            for k in range(31)
        ]
        self.unsub_mean = self.shape.unsubscribe * math.exp(0.6**2 / 2)

    def expected_affinity(self, c: Customer, ch: str) -> float:
        """E[affinity | traits, available channels] (the 0.6 cap ignored)."""
        young = c.traits["age_band"] == "18-34"
        device = c.traits["device"]
        shift = {
            "email": (-0.5 if young else 0.3) + (0.3 if device == "desktop" else 0.0),
            "sms": (0.4 if young else -0.2),
            "push": (0.5 if device == "mobile" else -0.4) + (0.2 if young else 0.0),
        }[ch]
        fav = 1 + 0.8 / len(c.available) if ch in c.available else 1.0
        return self.shape.affinity[ch] * math.exp(shift + 0.6**2 / 2) * fav

    def decide(self, state: CustomerState, now_ms: int) -> tuple[str, int] | None:
        """The best value, when positive: what :attr:`knows` true, the rest expected given the traits."""
        c = state.customer
        taste, risk = self.knows == "taste", self.knows == "risk"
        hf_pop = self.hf[c.traits["rhythm"]]
        local = datetime.fromtimestamp(now_ms / 1000, tz=ZoneInfo(c.zone))
        best: tuple[float, str, int] | None = None
        mult = {"email": 1.0, "sms": 1.6, "push": 1.2}
        for hour in ALLOWED_HOURS:
            at = _local_ms(c.zone, local.year, local.month, local.day, hour)
            load = state.load(at)
            hf = hour_factor(c, hour) if taste else hf_pop[hour]
            fat = math.exp(-c.fatigue * load) if risk else self.fat[min(load, 30)]
            for ch in c.available:
                if ch in c.opted_out:
                    continue
                aff = c.affinity[ch] if taste else self.expected_affinity(c, ch)
                base = c.unsubscribe[ch] if risk else self.unsub_mean * mult[ch]
                v = aff * hf * fat - self.cost * min(1.0, base * (1 + UNSUB_LOAD * load) * (1.5 - hf))
                if best is None or v > best[0]:
                    best = (v, ch, at)
        if best is None or best[0] <= 0:
            return None
        return best[1], best[2]

    def feedback(self, state: CustomerState, channel: str, kind: Feedback, sent_ms: int, ts_ms: int) -> None:
        """Learns nothing."""


class PartialOracle(TraitOracle):
    """The oracle with only part of its knowledge: the rest at the population's expectation given the traits.

    ``taste``: knows each customer's own channel affinities and hour curve (what clicks can
    teach), with the population's fatigue and unsubscribe propensity; ``risk``: knows each
    customer's own fatigue and unsubscribe propensity (what a policy can hardly learn: a
    customer unsubscribes once a channel), with the traits' expected affinities and hours.
    """

    def __init__(self, shape: str, knows: str, unsubscribe_cost: float = 10.0) -> None:
        super().__init__(shape, unsubscribe_cost)
        self.knows = knows
        self.name = f"knows {knows}"


class Traced:
    """Wraps a policy: per day, the true click probability of each chosen send and the oracle's best."""

    def __init__(self, inner: Any, days: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.days = days
        self.p_sent = [0.0] * days  # sum of the true click probability of sends, per day
        self.u_sent = [0.0] * days  # sum of the true unsubscribe probability of sends, per day
        self.n_sent = [0] * days
        self.n_dec = [0] * days
        self.best_ch = [0] * days  # sends on the customer's best available channel
        self.hf = [0.0] * days
        self.best_hour = [0] * days  # sends at the allowed hour the customer likes best
        self.unsubs = [0] * days  # unsubscribes, by the day of the send that caused them
        self.day0: dict[str, int] = {}

    def _day(self, c: Customer, now_ms: int) -> int:
        base = self.day0.get(c.zone)
        if base is None:
            base = self.day0[c.zone] = _local_ms(c.zone, START.year, START.month, START.day, 7)
        return min(self.days - 1, max(0, round((now_ms - base) / 86_400_000)))

    def decide(self, state: CustomerState, now_ms: int) -> tuple[str, int] | None:
        """The inner policy's choice, traced."""
        choice = self.inner.decide(state, now_ms)
        c = state.customer
        d = self._day(c, now_ms)
        self.n_dec[d] += 1
        if choice is not None:
            ch, at = choice
            h = local_hour(at, c.zone)
            self.p_sent[d] += click_probability(c, ch, h, state.load(at))
            self.u_sent[d] += unsubscribe_probability(c, ch, h, state.load(at))
            self.n_sent[d] += 1
            usable = [x for x in c.available if x not in c.opted_out]
            self.best_ch[d] += ch == max(usable, key=lambda x: c.affinity[x])
            self.hf[d] += hour_factor(c, h)
            self.best_hour[d] += hour_factor(c, h) >= max(hour_factor(c, x) for x in ALLOWED_HOURS) - 1e-9
        return choice

    def feedback(self, state: CustomerState, channel: str, kind: Feedback, sent_ms: int, ts_ms: int) -> None:
        """Passed on (unsubscribes counted by the day of their send)."""
        if kind is Feedback.UNSUBSCRIBED:
            c = state.customer
            self._day(c, sent_ms)
            day = int((sent_ms - self.day0[c.zone]) // 86_400_000)
            self.unsubs[min(self.days - 1, max(0, day))] += 1
        self.inner.feedback(state, channel, kind, sent_ms, ts_ms)

    def trace(self) -> dict[str, list[float]]:
        """Per day: share of decisions sent, mean true p(click) of the sends, best channel, hour factor."""
        n = [max(1, x) for x in self.n_sent]
        return {
            "sent": [s / max(1, k) for s, k in zip(self.n_sent, self.n_dec, strict=True)],
            "p": [p / k for p, k in zip(self.p_sent, n, strict=True)],
            "best": [b / k for b, k in zip(self.best_ch, n, strict=True)],
            "hf": [h / k for h, k in zip(self.hf, n, strict=True)],
            "best_hour": [h / k for h, k in zip(self.best_hour, n, strict=True)],
            "unsub": [u / max(1, k) for u, k in zip(self.unsubs, self.n_dec, strict=True)],
            "clicks_pcd": [p / max(1, k) for p, k in zip(self.p_sent, self.n_dec, strict=True)],
        }


class Calibrated:
    """Wraps cadence: per chosen send, its predicted and true click and unsubscribe probabilities."""

    def __init__(self, inner: CadencePolicy, days: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.traced = Traced(inner, days)
        #: (day, load, true hour factor, predicted click, true click, predicted unsub, true unsub)
        self.rows: list[tuple[int, int, float, float, float, float, float]] = []

    def decide(self, state: CustomerState, now_ms: int) -> tuple[str, int] | None:
        """The inner policy's choice, with the learners' predictions of it recorded."""
        choice = self.inner.decide(state, now_ms)
        d = self.inner.last_decision
        if choice is None or d is None:
            return choice
        ch, at = choice
        cand = next(x for x in d.candidates if x.channel == ch and x.send_at_ms == at)
        c = state.customer
        h = local_hour(at, c.zone)
        load = state.load(at)
        hf = hour_factor(c, h)
        self.rows.append(
            (
                self.traced._day(c, now_ms),
                load,
                hf,
                cand.engagement,
                click_probability(c, ch, h, load),
                cand.unsubscribe,
                unsubscribe_probability(c, ch, h, load),
            )
        )
        return choice

    def feedback(self, state: CustomerState, channel: str, kind: Feedback, sent_ms: int, ts_ms: int) -> None:
        """Passed on."""
        self.inner.feedback(state, channel, kind, sent_ms, ts_ms)

    def table(self) -> list[str]:
        """Per day, load and hour factor: sends, mean predicted and true probabilities, their ratio."""
        out = []
        for name, pos, key in (
            ("day", 0, lambda v: min(int(v), 28) // 2 * 2),
            ("load", 1, lambda v: min(int(v), 7)),
            ("hour factor", 2, lambda v: min(0.8, int(v * 5) / 5)),
        ):
            agg: dict[Any, list[float]] = defaultdict(lambda: [0.0] * 5)
            for row in self.rows:
                a = agg[key(row[pos])]
                a[0] += 1
                for i, x in enumerate(row[3:]):
                    a[1 + i] += x
            for k in sorted(agg):
                n, pe, te, pu, tu = agg[k]
                out.append(
                    f"  {name} {k}: sends {int(n)} click pred {pe / n:.4f} true {te / n:.4f} "
                    f"| unsub pred {pu / n:.5f} true {tu / n:.5f} (x{pu / max(tu, 1e-12):.2f})"
                )
        return out


class Shadow:
    """Cadence on its own trajectory, with the Bayes ``mean`` learner shadowing it on the same state.

    The shadow learns from cadence's sends (its posterior update holds for any policy's data) and,
    at every decision, says what it would do; cadence's posterior-mean predictions (``learner.score``
    over every channel and allowed hour) and the world's true values are recorded for both choices.
    One row per decision: (day, cadence's (channel, hour) or None, Bayes's, and per choice the
    cadence-predicted click and unsubscribe, Bayes-predicted, true).
    """

    def __init__(self, inner: CadencePolicy, shape: str, days: int, particles: int = 400) -> None:
        from bayes_bound import BayesLearner

        self.inner = inner
        self.name = inner.name
        self.bayes = BayesLearner(shape, particles=particles)
        self.traced = Traced(inner, days)
        self.rows: list[dict[str, Any]] = []

    def _cadence_preds(self, state: CustomerState, now_ms: int) -> dict[tuple[str, int], tuple[float, float]]:
        from cadence.engine.decision import Candidate

        c = state.customer
        profile = self.inner.profiles[c.id]
        local = datetime.fromtimestamp(now_ms / 1000, tz=ZoneInfo(c.zone))
        cands = [
            Candidate("daily_pick", ch, _local_ms(c.zone, local.year, local.month, local.day, h), 0.0)
            for ch in c.available
            if ch not in c.opted_out
            for h in ALLOWED_HOURS
        ]
        if not cands:
            return {}
        scored = self.inner.learner.score(profile=profile, candidates=cands, now_ms=now_ms, seed=1)
        return {
            (x.channel, round(local_hour(x.send_at_ms, c.zone))): (x.engagement, x.unsubscribe)
            for x in scored
        }

    def _bayes_preds(self, state: CustomerState, now_ms: int, ch: str, at: int) -> tuple[float, float]:
        import numpy as np
        from bayes_bound import CH_INDEX, UNSUB_MULT

        post = self.bayes._posterior(state.customer)
        h = local_hour(at, state.customer.zone)
        load = state.load(at)
        hf = post.hour_factor(np.array([h]))[:, 0]
        i = CH_INDEX[ch]
        p = post.aff[:, i] * hf * np.exp(-post.fat * load)
        u = np.minimum(1.0, post.unsub * UNSUB_MULT[i] * (1 + UNSUB_LOAD * load) * (1.5 - hf))
        w = post.weights()
        return float(w @ p), float(w @ u)

    def decide(self, state: CustomerState, now_ms: int) -> tuple[str, int] | None:
        """Cadence's choice (traced); the shadow's choice and both sides' predictions recorded."""
        choice = self.traced.decide(state, now_ms)
        b = self.bayes.decide(state, now_ms)
        c = state.customer
        row: dict[str, Any] = {"day": self.traced._day(c, now_ms)}
        if choice is not None or b is not None:
            preds = self._cadence_preds(state, now_ms)
            # Cadence's own best option by its posterior-mean value, and what it knows of the customer.
            if preds:
                (bch, bh), (bp, bu) = max(preds.items(), key=lambda kv: kv[1][0] - 10 * kv[1][1])
                st = self.inner.learner.customer(c.id)
                eff = st.effect
                row["cad_best"] = {
                    "ch": bch,
                    "hour": bh,
                    "cad": (bp, bu),
                    "true": (click_probability(c, bch, bh, state.load(now_ms)), 0.0),
                    "sends": dict(st.channel_sends),
                    "clicks": dict(st.channel_clicks),
                    "effect": None if eff is None else [float(x) for x in eff[0][:3]],
                }
            for key, ch_at in (("cad", choice), ("bay", b)):
                if ch_at is None:
                    row[key] = None
                    continue
                ch, at = ch_at
                h = local_hour(at, c.zone)
                load = state.load(at)
                row[key] = {
                    "ch": ch,
                    "hour": h,
                    "load": load,
                    "cad": preds.get((ch, round(h)), (math.nan, math.nan)),
                    "bay": self._bayes_preds(state, now_ms, ch, at),
                    "true": (click_probability(c, ch, h, load), unsubscribe_probability(c, ch, h, load)),
                    "best_ch": ch
                    == max((x for x in c.available if x not in c.opted_out), key=lambda x: c.affinity[x]),
                    "hf": hour_factor(c, h),
                }
        else:
            row["cad"] = row["bay"] = None
        self.rows.append(row)
        return choice

    def feedback(self, state: CustomerState, channel: str, kind: Feedback, sent_ms: int, ts_ms: int) -> None:
        """Both learn from cadence's sends."""
        self.traced.feedback(state, channel, kind, sent_ms, ts_ms)
        self.bayes.feedback(state, channel, kind, sent_ms, ts_ms)


def _shadow_job(job: tuple[str, int, int, int, int]) -> dict[str, Any]:
    shape, seed, customers, days, draw = job
    from bayes_bound import BayesLearner

    sys.path.insert(0, str(Path(__file__).parent))
    pop = make_population(shape, customers, seed)
    out: dict[str, Any] = {"shape": shape, "seed": seed, "draw": draw}
    r = run_policy(OraclePolicy(10.0), pop, days=days, seed=seed, start=START)
    out["oracle"] = {**_summ(r)}
    t = Traced(BayesLearner(shape), days)
    r = run_policy(t, pop, days=days, seed=seed, start=START)  # type: ignore[arg-type]
    out["bayes"] = {**_summ(r), "trace": t.trace()}
    sh = Shadow(_draw_policy(sim_learner_config(), draw), shape, days)
    r = run_policy(sh, pop, days=days, seed=seed, start=START)  # type: ignore[arg-type]
    out["cadence"] = {**_summ(r), "trace": sh.traced.trace()}
    out["rows"] = sh.rows
    return out


def _shadow_report(r: dict[str, Any], days: int) -> list[str]:
    """Per-day traces of both policies on their own runs, then cadence's decisions against the shadow's."""
    o = r["oracle"]["clicks"]
    out = [
        f"== {r['shape']} seed {r['seed']} draw {r['draw']} (oracle {o} clicks, unsub {r['oracle']['unsub']:.1%})"
    ]
    for name in ("bayes", "cadence"):
        x = r[name]
        out.append(
            f"  {name:8s} clicks {x['clicks']:6d} ({x['clicks'] / o:5.1%}) unsub {x['unsub']:.1%} "
            f"msgs/cust/day {x['mpd']:.3f} CTR {x['ctr']:.2%}"
        )
    for key in ("sent", "p", "clicks_pcd", "best", "best_hour", "hf", "unsub"):
        out.append(f"  per day: {key}")
        for name in ("bayes", "cadence"):
            out.append(f"    {name:8s} " + " ".join(f"{v:.3f}" for v in r[name]["trace"][key]))
    out.append("  on cadence's run, per decision: cadence (C) vs the Bayes shadow (B); value = p - 10u")

    def val(pu: Any) -> float:
        return pu[0] - 10 * pu[1]

    for lo, hi in ((0, 1), (1, 3), (3, 7), (7, 14), (14, days)):
        rows = [x for x in r["rows"] if lo <= x["day"] < hi]
        n = max(1, len(rows))
        cats: dict[str, list[dict[str, Any]]] = {"both": [], "C only": [], "B only": [], "neither": []}
        for x in rows:
            k = (
                "both"
                if x["cad"] and x["bay"]
                else "C only"
                if x["cad"]
                else "B only"
                if x["bay"]
                else "neither"
            )
            cats[k].append(x)
        out.append(
            f"  days {lo}-{hi - 1}: decisions {len(rows)}; "
            + ", ".join(f"{k} {len(v) / n:.1%}" for k, v in cats.items())
        )
        both = cats["both"]
        if both:
            same_ch = statistics.fmean(x["cad"]["ch"] == x["bay"]["ch"] for x in both)
            same_h = statistics.fmean(abs(x["cad"]["hour"] - x["bay"]["hour"]) < 0.5 for x in both)
            out.append(
                f"    both: same channel {same_ch:.1%}, same hour {same_h:.1%}; true value C "
                f"{statistics.fmean(val(x['cad']['true']) for x in both):+.4f} B {statistics.fmean(val(x['bay']['true']) for x in both):+.4f}; "
                f"true p C {statistics.fmean(x['cad']['true'][0] for x in both):.4f} B {statistics.fmean(x['bay']['true'][0] for x in both):.4f}; "
                f"best ch C {statistics.fmean(x['cad']['best_ch'] for x in both):.1%} B {statistics.fmean(x['bay']['best_ch'] for x in both):.1%}; "
                f"hf C {statistics.fmean(x['cad']['hf'] for x in both):.3f} B {statistics.fmean(x['bay']['hf'] for x in both):.3f}"
            )
            for who in ("cad", "bay"):
                xs = [x[who] for x in both]
                out.append(
                    f"      {who}'s option: p pred C {statistics.fmean(v['cad'][0] for v in xs):.4f} B {statistics.fmean(v['bay'][0] for v in xs):.4f} true {statistics.fmean(v['true'][0] for v in xs):.4f}"
                    f" | u pred C {statistics.fmean(v['cad'][1] for v in xs):.5f} B {statistics.fmean(v['bay'][1] for v in xs):.5f} true {statistics.fmean(v['true'][1] for v in xs):.5f}"
                )
        for k, who in (("C only", "cad"), ("B only", "bay")):
            xs = [x[who] for x in cats[k]]
            if not xs:
                continue
            out.append(
                f"    {k} ({len(xs)}), the option sent: p pred C {statistics.fmean(v['cad'][0] for v in xs):.4f} "
                f"B {statistics.fmean(v['bay'][0] for v in xs):.4f} true {statistics.fmean(v['true'][0] for v in xs):.4f}"
                f" | u pred C {statistics.fmean(v['cad'][1] for v in xs):.5f} B {statistics.fmean(v['bay'][1] for v in xs):.5f} "
                f"true {statistics.fmean(v['true'][1] for v in xs):.5f} | true value {statistics.fmean(val(v['true']) for v in xs):+.4f} "
                f"C-pred value {statistics.fmean(val(v['cad']) for v in xs):+.4f} B-pred value {statistics.fmean(val(v['bay']) for v in xs):+.4f} "
                f"load {statistics.fmean(v['load'] for v in xs):.2f}"
            )
    return out


def _calib_job(job: tuple[str, int, int, int, str]) -> dict[str, Any]:
    shape, seed, customers, days, overrides = job
    pop = make_population(shape, customers, seed)
    pol = Calibrated(CadencePolicy(config=replace(sim_learner_config(), **json.loads(overrides))), days)
    r = run_policy(pol, pop, days=days, seed=seed, start=START)  # type: ignore[arg-type]
    return {"shape": shape, "seed": seed, **_summ(r), "table": pol.table()}


def _summ(r: RunResult) -> dict[str, Any]:
    return {
        "clicks": r.clicks,
        "sends": r.sends,
        "unsub": r.unsubscribe_rate,
        "mpd": r.sends / r.customers / r.days,
        "ctr": r.ctr,
    }


def _trait_job(job: tuple[str, int, int, int, bool]) -> dict[str, Any]:
    shape, seed, customers, days, cadence = job
    pop = make_population(shape, customers, seed)
    out: dict[str, Any] = {"shape": shape, "seed": seed}
    cfg = sim_learner_config()
    for pol in (
        OraclePolicy(10.0),
        TraitOracle(shape),
        PartialOracle(shape, "taste"),
        PartialOracle(shape, "risk"),
        HeuristicPolicy(),
        *([CadencePolicy(config=cfg)] if cadence else []),
    ):
        t = Traced(pol, days)
        cpu = time.process_time()
        r = run_policy(t, pop, days=days, seed=seed, start=START)  # type: ignore[arg-type]
        out[pol.name] = {**_summ(r), "trace": t.trace(), "cpu": time.process_time() - cpu}
    return out


def _ab_job(job: tuple[str, int, int, int, str, str, int]) -> dict[str, Any]:
    shape, seed, customers, days, arm, overrides, draw = job
    pop = make_population(shape, customers, seed)
    cfg = replace(sim_learner_config(), **json.loads(overrides))
    pol = Traced(_draw_policy(cfg, draw), days)
    cpu = time.process_time()
    r = run_policy(pol, pop, days=days, seed=seed, start=START)  # type: ignore[arg-type]
    sent = max(1, sum(pol.n_sent))
    return {
        "shape": shape,
        "seed": seed,
        "arm": arm,
        "draw": draw,
        **_summ(r),
        "true_click": sum(pol.p_sent) / sent,  # mean true probabilities of the sends made
        "true_unsub": sum(pol.u_sent) / sent,
        "trace": pol.trace(),
        "cpu": time.process_time() - cpu,
    }


def _draw_policy(cfg: LearnerConfig, draw: int) -> CadencePolicy:
    pol = CadencePolicy(config=cfg)
    if draw:
        pol.draw_seed = draw  # type: ignore[attr-defined]
    return pol


def _oracle_job(job: tuple[str, int, int, int]) -> dict[str, Any]:
    shape, seed, customers, days = job
    pop = make_population(shape, customers, seed)
    out = {"shape": shape, "seed": seed}
    for pol in (OraclePolicy(10.0), HeuristicPolicy()):
        r = run_policy(pol, pop, days=days, seed=seed, start=START)  # type: ignore[arg-type]
        out[pol.name] = _summ(r)  # type: ignore[assignment]
    return out


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    """Command line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["trait", "ab", "calib", "shadow"])
    ap.add_argument("--customers", type=int, default=3000)
    ap.add_argument("--days", type=int, default=20)
    ap.add_argument("--shapes", default="balanced,email_heavy,mobile_first")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--draws", default="0,1,2")
    ap.add_argument("--arm", action="append", default=[])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--no-cadence", action="store_true", help="trait: the oracles and the heuristic only")
    ap.add_argument(
        "--prev",
        action="append",
        default=[],
        help="ab: an earlier run's --out file; its runs of the same worlds, size, arms and draws are reused",
    )
    a = ap.parse_args()
    shapes = a.shapes.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    load0 = _load()
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    if a.mode == "shadow":
        draws = [int(d) for d in a.draws.split(",")]
        jobs_s = [(s, seed, a.customers, a.days, dr) for s in shapes for seed in seeds for dr in draws]
        with ctx.Pool(a.workers, maxtasksperchild=1) as pool:
            for r in pool.imap(_shadow_job, jobs_s, chunksize=1):
                print("\n".join(_shadow_report(r, a.days)), flush=True)
                if a.out:
                    with open(f"{a.out}.{r['shape']}.{r['seed']}.{r['draw']}.json", "w") as f:
                        json.dump(r, f)
    elif a.mode == "calib":
        ov = a.arm[0].split("=", 1)[1] if a.arm else "{}"
        jobs_c = [(s, seed, a.customers, a.days, ov) for s in shapes for seed in seeds]
        with ctx.Pool(a.workers) as pool:
            for r in pool.map(_calib_job, jobs_c, chunksize=1):
                print(
                    f"== {r['shape']} seed {r['seed']}: clicks {r['clicks']} unsub {r['unsub']:.1%} "
                    f"msgs/cust/day {r['mpd']:.3f}"
                )
                print("\n".join(r["table"]))
    elif a.mode == "trait":
        jobs_t = [(s, seed, a.customers, a.days, not a.no_cadence) for s in shapes for seed in seeds]
        with ctx.Pool(a.workers) as pool:
            res = pool.map(_trait_job, jobs_t, chunksize=1)
        for r in res:
            o = r["oracle"]["clicks"]
            print(f"== {r['shape']} seed {r['seed']} (oracle {o} clicks)")
            names = [n for n in r if n not in ("shape", "seed")]
            for name in names:
                x = r[name]
                print(
                    f"  {name:13s} clicks {x['clicks']:6d} ({x['clicks'] / o:5.1%}) unsub {x['unsub']:.1%} "
                    f"msgs/cust/day {x['mpd']:.3f} CTR {x['ctr']:.2%} cpu {x['cpu']:.0f}s"
                )
            for key in ("sent", "p", "best", "hf"):
                print(f"  per day: {key}")
                for name in names:
                    tr = r[name]["trace"][key]
                    print(f"    {name:13s} " + " ".join(f"{v:.3f}" for v in tr))
    else:
        arms = [x.split("=", 1) for x in a.arm] or [["base", "{}"]]
        draws = [int(d) for d in a.draws.split(",")]
        base_jobs = [(s, seed, a.customers, a.days) for s in shapes for seed in seeds]
        # Runs kept in earlier --out files: a run is deterministic per world, size, arm (by its name:
        # give a changed arm a new name) and draw, so the same code need not run it again.
        prev: dict[tuple[str, int, str, int], dict[str, Any]] = {}
        prev_orc: dict[tuple[str, int], dict[str, Any]] = {}
        for path in a.prev:
            with open(path) as f:
                old = json.load(f)
            if (old.get("customers"), old.get("days")) != (a.customers, a.days):
                continue
            prev.update({(r["shape"], r["seed"], r["arm"], r["draw"]): r for r in old["res"]})
            prev_orc.update({(o["shape"], o["seed"]): o for o in old["oracle"]})
        wanted = [(s, seed, arm, dr) for (s, seed, _, _) in base_jobs for dr in draws for arm, _ in arms]
        res = [prev[k] for k in wanted if k in prev]
        overrides = dict(arms)
        jobs = [(s, seed, a.customers, a.days, arm, overrides[arm], dr) for (s, seed, arm, dr) in wanted]
        jobs = [j for j in jobs if (j[0], j[1], j[4], j[6]) not in prev]
        todo = [j for j in base_jobs if (j[0], j[1]) not in prev_orc]
        with ctx.Pool(a.workers, maxtasksperchild=1) as pool:  # a fresh process per run
            oracle = pool.map_async(_oracle_job, todo, chunksize=1)
            for r in pool.imap_unordered(_ab_job, jobs, chunksize=1):
                res.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)  # progress, one run a line
            orc = [*oracle.get(), *(prev_orc[(j[0], j[1])] for j in base_jobs if (j[0], j[1]) in prev_orc)]
        ref = {(o["shape"], o["seed"]): o for o in orc}
        by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in res:
            by[(r["arm"], r["shape"])].append(r)
        print(f"{a.customers} x {a.days}, seeds {seeds}, draws {draws}")
        for s in shapes:
            o = sum(ref[(s, seed)]["oracle"]["clicks"] for seed in seeds)
            h = [ref[(s, seed)]["heuristic"] for seed in seeds]
            print(
                f"== {s}: oracle {o / len(seeds):.0f} clicks; heuristic "
                f"{statistics.fmean(x['clicks'] for x in h) / o * len(seeds):.1%} "
                f"unsub {statistics.fmean(x['unsub'] for x in h):.1%}"
            )
            for arm, _ in arms:
                rs = by[(arm, s)]
                shares = [r["clicks"] / ref[(s, r["seed"])]["oracle"]["clicks"] for r in rs]
                print(
                    f"  {arm:14s} share {statistics.fmean(shares):.1%} "
                    f"(sd {statistics.pstdev(shares):.1%}; {' '.join(f'{x:.1%}' for x in shares)}) "
                    f"unsub {statistics.fmean(r['unsub'] for r in rs):.1%} "
                    f"mpd {statistics.fmean(r['mpd'] for r in rs):.3f} "
                    f"ctr {statistics.fmean(r['ctr'] for r in rs):.2%} "
                    f"true p(click) {statistics.fmean(r['true_click'] for r in rs):.3f} "
                    f"p(unsub) {statistics.fmean(r['true_unsub'] for r in rs):.4f} "
                    f"cpu {statistics.fmean(r['cpu'] for r in rs):.0f}s"
                )
        print("== pooled over populations (mean of per-population shares; paired diff vs first arm)")
        first = arms[0][0]
        for arm, _ in arms:
            diffs = []
            shares_all = []
            for s in shapes:
                for r in by[(arm, s)]:
                    o = ref[(s, r["seed"])]["oracle"]["clicks"]
                    twin = next(
                        x for x in by[(first, s)] if x["seed"] == r["seed"] and x["draw"] == r["draw"]
                    )
                    diffs.append((r["clicks"] - twin["clicks"]) / o)
                    shares_all.append(r["clicks"] / o)
            print(
                f"  {arm:14s} share {statistics.fmean(shares_all):.1%}  diff vs {first} "
                f"{statistics.fmean(diffs):+.1%} (sd of diffs {statistics.pstdev(diffs):.1%}, n={len(diffs)})"
            )
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"res": res, "oracle": orc, "customers": a.customers, "days": a.days}, f)
    print(
        f"wall {time.perf_counter() - t0:.0f}s; load {load0} -> {_load()}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
