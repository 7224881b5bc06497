"""Record every decision (full content) of a sim run and of a rich multi-campaign scenario."""
# Usage (the same file before and after a change, then compare):
#   PYTHONPATH=<tree> python scripts/decision_digest.py out.json
#   python scripts/decision_digest_compare.py before.json after.json
# The warm and cold shapes are benchmarks/decisions.py's (known customer, goal's shape).

from __future__ import annotations

import hashlib
import json
import random
import sys
from datetime import time as dtime
from pathlib import Path
from typing import Any

import cadence.sim.policies as pol
from benchmarks.decisions import CHANNELS4, bench_ruleset, warm_customer
from cadence.channels import Feedback
from cadence.engine import decide as dmod
from cadence.engine.campaign import (
    DAY_MS,
    Campaign,
    Cap,
    ChannelPolicy,
    CompiledRuleset,
    ConditionResult,
    GlobalSettings,
    QuietHours,
    SplitArm,
    TemplateSpec,
    Trigger,
)
from cadence.engine.decision import PastSend
from cadence.engine.learners import DecisionLearner, LearnerConfig
from cadence.engine.profiles_memory import MemoryProfile
from cadence.sim.population import make_population
from cadence.sim.report import START
from cadence.sim.world import run_policy

records = []
real = dmod.decide


def r9(x):
    return float(x)


def dump(d):
    return [
        d.action,
        d.campaign,
        d.channel,
        d.send_at_ms,
        d.template,
        d.arm,
        sorted(d.variables.items()) if d.variables else [],
        [
            [
                c.campaign,
                c.channel,
                c.send_at_ms,
                r9(c.score),
                r9(c.engagement),
                r9(c.unsubscribe),
                bool(c.explored),
                c.arm,
            ]
            for c in d.candidates
        ],
        [[s.campaign, s.reason, s.detail, s.channel] for s in d.suppressions],
        list(d.holdout),
        list(d.notes),
        {k: [repr(x) for x in v] for k, v in d.conditions.items()},
    ]


def sent(learner, d, did, cid, prof, now, history, camps):
    """Register a send decision with the learner, add it to the customer's history, deliver it."""
    learner.record_decision(
        decision_id=did,
        customer_id=cid,
        traits=prof.traits,
        zone=prof.timezone,
        campaign=d.campaign,
        channel=d.channel,
        send_at_ms=d.send_at_ms,
        arm=d.arm,
        now_ms=now,
    )
    history.append(
        PastSend(
            ts_ms=d.send_at_ms, campaign=d.campaign, channel=d.channel, exclusive=camps[d.campaign].exclusive
        )
    )
    learner.observe(decision_id=did, kind=Feedback.DELIVERED, ts_ms=d.send_at_ms)


def wrapped(**kw):
    d = real(**kw)
    records.append(dump(d))
    return d


pol.decide = wrapped
out = {}
for shape in ("balanced", "email_heavy"):
    records.clear()
    cust = make_population(shape, 300, 3)
    p = pol.CadencePolicy(config=pol.LearnerConfig(horizon_ms=24 * 3_600_000))
    res = run_policy(p, cust, days=10, seed=3, start=START)
    out[f"sim-{shape}"] = {
        "clicks": res.clicks,
        "sends": res.sends,
        "unsub": res.unsubscribes,
        "decisions": list(records),
    }

# Rich scenario: 10 campaigns with caps, quiet hours, exclusive groups, variants, spacing.
CH = ("email", "sms", "push", "webhook")
camps = {}
for i in range(10):
    split = ()
    learn = False
    if i == 3:
        split = (
            SplitArm("hold", 0.1, holdout=True),
            SplitArm("a", 0.45, template="ta"),
            SplitArm("b", 0.45, template="tb"),
        )
        learn = True
    if i == 5:
        split = (SplitArm("x", 0.5), SplitArm("y", 0.5))
    camps[f"c{i}"] = Campaign(
        name=f"c{i}",
        title=f"c{i}",
        priority=i % 3,
        audience=None,
        template=TemplateSpec("t"),
        channels=ChannelPolicy(CH if i != 7 else ("sms", "email"), mode="best" if i != 7 else "ordered"),
        caps=(Cap(count=3, window_ms=7 * DAY_MS),)
        + ((Cap(count=1, window_ms=DAY_MS, channel="sms"),) if i % 2 else ()),
        quiet=QuietHours(start=dtime(21 + i % 2), end=dtime(8), fallback_zone="Europe/Berlin")
        if i % 3
        else QuietHours(
            start=dtime(3),
            end=dtime(3, 30),
            fallback_zone="Europe/Berlin",
            action="drop" if i == 6 else "defer",
        ),
        exclusive="grp" if i in (2, 4, 8) else None,
        split=split,
        learn_variants=learn,
    )
rules = CompiledRuleset(
    hash="r",
    campaigns=camps,
    segments={},
    settings=GlobalSettings(
        caps=(Cap(count=2, window_ms=DAY_MS, scope="customer", calendar=True),), min_spacing_ms=3 * 3_600_000
    ),
    aggregates=frozenset(),
)
learner = DecisionLearner()
rng = random.Random(5)
zones = ["America/New_York", "Europe/Berlin", "Asia/Kolkata", "Australia/Sydney", None]
now0 = 1_772_400_000_000
hist = {}
recs = []
for step in range(1500):
    cid = rng.randrange(60)
    now = now0 + step * 20 * 60_000
    prof = MemoryProfile(
        customer_id=cid,
        timezone=zones[cid % 5],
        traits={"plan": ["pro", "free"][cid % 2], "age": cid % 40},
        consent={"sms": False} if cid % 7 == 0 else None,
    )
    h = [x for x in hist.get(cid, []) if x.ts_ms > now - 8 * DAY_MS]
    d = real(
        ruleset=rules,
        profile=prof,
        now_ms=now,
        history=h,
        available_channels=CH,
        scorer=learner,
        seed=step,
        opt_in_channels=("webhook",) if cid % 3 == 0 else (),
    )
    recs.append(dump(d))
    if d.action == "send":
        did = f"d{step}"
        sent(learner, d, did, cid, prof, now, h, camps)
        if rng.random() < 0.3:
            learner.observe(
                decision_id=did, kind=Feedback.CLICKED, ts_ms=d.send_at_ms + 60_000, zone=prof.timezone
            )
    hist[cid] = h
    learner.advance(now)
out["rich"] = {"decisions": recs}
# no scorer
recs = []
for step in range(300):
    cid = rng.randrange(60)
    prof = MemoryProfile(customer_id=cid, timezone=zones[cid % 5], traits={"plan": "pro"})
    d = real(
        ruleset=rules,
        profile=prof,
        now_ms=now0 + step * 3_600_000,
        history=hist.get(cid, []),
        available_channels=CH,
    )
    recs.append(dump(d))
out["noscorer"] = {"decisions": recs}

# rich2: every cap scope, zero caps, triggers, audience/unless, ends inside the window
# (unequal slot lists), fixed-zone quiet hours, and several learner configurations.


class Pred:
    def __init__(self, source, fn):
        self.source = source
        self.fn = fn

    def __call__(self, ctx):
        return self.fn(ctx)

    def explain(self, ctx):
        return [ConditionResult(text=self.source, value=self.fn(ctx), passed=self.fn(ctx))]


camps2 = {}
chlists = [CH, ("email", "push"), ("sms", "email", "push"), CH, ("push", "webhook", "email")]
for i in range(12):
    split = ()
    learn = False
    if i in (1, 6):
        split = (
            SplitArm("hold", 0.15, holdout=True),
            SplitArm("a", 0.3, template="ta"),
            SplitArm("b", 0.3, template="tb"),
            SplitArm("c", 0.25),
        )
        learn = True
    if i == 9:
        split = (SplitArm("x", 0.5, template="tx"), SplitArm("y", 0.5))
        learn = True
    caps = [Cap(count=2, window_ms=5 * DAY_MS)]
    if i == 2:
        caps.append(Cap(count=0, window_ms=DAY_MS, channel="push"))
    if i == 4:
        caps.append(Cap(count=1, window_ms=3 * DAY_MS, calendar=True))
    if i == 5:
        caps.append(Cap(count=1, window_ms=2 * DAY_MS, scope="group"))
    if i == 8:
        caps.append(Cap(count=1, window_ms=12 * 3_600_000, channel="email"))
    quiet = None
    if i % 4 == 1:
        quiet = QuietHours(start=dtime(20), end=dtime(9), fallback_zone="Asia/Tokyo", use_customer_zone=False)
    elif i % 4 == 2:
        quiet = QuietHours(
            start=dtime(22, 30), end=dtime(7, 15), fallback_zone="America/Los_Angeles", action="drop"
        )
    elif i % 4 == 3:
        quiet = QuietHours(start=dtime(12), end=dtime(14), fallback_zone="UTC")
    trig = Trigger(event="Cart Abandoned", delay_ms=2 * 3_600_000) if i == 7 else None
    aud = Pred("plan = pro", lambda ctx: ctx.profile.traits.get("plan") == "pro") if i == 10 else None
    unless = Pred("age > 30", lambda ctx: (ctx.profile.traits.get("age") or 0) > 30) if i == 11 else None
    camps2[f"k{i}"] = Campaign(
        name=f"k{i}",
        title=f"k{i}",
        priority=(i * 7) % 3,
        audience=aud,
        unless=unless,
        template=TemplateSpec("t", variables=(lambda ctx: {"id": ctx.profile.customer_id})),
        trigger=trig,
        channels=ChannelPolicy(chlists[i % 5], mode="ordered" if i in (3, 11) else "best"),
        caps=tuple(caps),
        quiet=quiet,
        exclusive=("g1" if i in (5, 6, 9) else ("g2" if i in (0, 10) else None)),
        split=split,
        learn_variants=learn,
        starts_ms=(now0 + 2 * DAY_MS if i == 10 else None),
        ends_ms=(
            now0 + 5 * DAY_MS + 7 * 3_600_000
            if i == 0
            else (now0 + 9 * DAY_MS + 1_800_000 if i == 4 else None)
        ),
    )
rules2 = CompiledRuleset(
    hash="r2",
    campaigns=camps2,
    segments={},
    settings=GlobalSettings(
        caps=(
            Cap(count=1, window_ms=DAY_MS, scope="channel", channel="sms"),
            Cap(count=3, window_ms=3 * DAY_MS, scope="channel"),
            Cap(count=5, window_ms=7 * DAY_MS, scope="customer", calendar=True),
            Cap(count=3, window_ms=DAY_MS, scope="group"),
        ),
        min_spacing_ms=2 * 3_600_000,
        default_zone="Europe/London",
    ),
    aggregates=frozenset(),
)

configs = {
    "default": LearnerConfig(),
    "flags": LearnerConfig(
        explore_unsubscribe=True,
        time_draw=True,
        hour_explore=True,
        explore_volume=True,
        click_value=2.0,
        beta=1.5,
        hour_pop_draw=False,
    ),
    "nohours": LearnerConfig(probit_hours=False, hour_model=False, unsubscribe_cost=3.0),
}
zones2 = [
    "America/New_York",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Australia/Sydney",
    None,
    "America/Los_Angeles",
    "Pacific/Chatham",
]
for cname, cfg in configs.items():
    learner = DecisionLearner(cfg)
    rng = random.Random(11)
    hist = {}
    recs = []
    for step in range(700):
        cid = rng.randrange(50)
        now = now0 + step * 37 * 60_000 + rng.randrange(3) * 60_000 * 7
        prof = MemoryProfile(
            customer_id=cid,
            timezone=zones2[cid % 7],
            traits={"plan": ["pro", "free", "team"][cid % 3], "age": cid % 45, "vip": cid % 4 == 0},
            consent={"email": False} if cid % 11 == 0 else ({"sms": True} if cid % 5 == 0 else None),
        )
        h = [x for x in hist.get(cid, []) if x.ts_ms > now - 8 * DAY_MS]
        ev = (
            {"event": "Cart Abandoned", "ts_ms": now - rng.randrange(4) * 3_600_000}
            if rng.random() < 0.3
            else None
        )
        d = real(
            ruleset=rules2,
            profile=prof,
            now_ms=now,
            history=h,
            available_channels=CH[:3] if cid % 6 == 0 else CH,
            scorer=learner,
            seed=step * 31 + 7,
            event=ev,
            opt_in_channels=("sms",),
            campaigns=None if step % 9 else [f"k{j}" for j in range(0, 12, 2)],
        )
        recs.append(dump(d))
        if d.action == "send":
            did = f"e{step}"
            sent(learner, d, did, cid, prof, now, h, camps2)
            r = rng.random()
            if r < 0.35:
                learner.observe(
                    decision_id=did, kind=Feedback.CLICKED, ts_ms=d.send_at_ms + 60_000, zone=prof.timezone
                )
            elif r < 0.38:
                learner.observe(decision_id=did, kind=Feedback.UNSUBSCRIBED, ts_ms=d.send_at_ms + 90_000)
        hist[cid] = h
        learner.advance(now)
    out[f"rich2-{cname}"] = {"decisions": recs}
# warm: the benchmark's known customer with 11 past and queued sends
wl, wprofile, wnow, whistory = warm_customer()


def warm_call(i: int) -> Any:
    at = wnow + i * 7 * 60_000
    history = whistory(at)
    return real(
        ruleset=bench_ruleset(),
        profile=wprofile,
        now_ms=at,
        history=history,
        available_channels=CHANNELS4,
        scorer=wl,
        seed=i,
    )


out["warm"] = {"decisions": [dump(warm_call(i)) for i in range(0, 400, 3)]}
# cold benchmark shape

br = bench_ruleset()
bl = DecisionLearner()
bp = MemoryProfile(customer_id=7, timezone="America/New_York", traits={"plan": "pro", "age_band": "35+"})
out["cold"] = {
    "decisions": [
        dump(
            real(
                ruleset=br,
                profile=bp,
                now_ms=1_780_000_000_000 + i * 3_600_000,
                history=[],
                available_channels=CHANNELS4,
                scorer=bl,
                seed=i,
            )
        )
        for i in range(200)
    ]
}
Path(sys.argv[1]).write_text(json.dumps(out))
for k, v in out.items():
    print(
        k,
        {kk: vv for kk, vv in v.items() if kk != "decisions"},
        len(v["decisions"]),
        hashlib.sha256(json.dumps(v["decisions"]).encode()).hexdigest()[:16],
    )
