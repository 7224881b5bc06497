"""Compaction deletes derived state and changes no decision, rule-read profile value or attribution."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, func, insert, select

from cadence.channels import CHANNELS
from cadence.cli import main
from cadence.clock import FixedClock
from cadence.dsl.loader import load_source
from cadence.engine.attribution.online import ONLINE_MODELS, WINDOWS_DAYS, query_attribution
from cadence.engine.campaign import CompiledRuleset, EvalContext
from cadence.engine.decisions_service import make_decision
from cadence.engine.events import parse_call
from cadence.engine.ingest import record_events
from cadence.engine.loop import EngineLoop
from cadence.engine.profiles import load_profile
from cadence.runtime import Runtime
from cadence.scheduler.compaction import CompactionPolicy, compact_derived_state
from cadence.scheduler.needs import RuleNeeds, rule_needs
from cadence.store.schema.attribution import attribution_touches
from cadence.store.schema.core import events, profile_daily, profiles
from cadence.store.schema.decisions import learner_snapshots
from cadence.store.schema.scheduler import scheduled_runs
from cadence.store.schema.sends import sends

DAY = 86_400_000
T0 = 1_735_689_600_000  # 2025-01-01
NOW = T0 + 700 * DAY
RULES = """
event purchased = "Order Completed"
event viewed = "Page Viewed"
segment engaged "opened lately" = count(email.opened within 30d) > 0
segment spenders "spent before" = sum(purchased.revenue between 120d and 30d ago) >= 50
campaign winback {
    audience spenders and not engaged
    send     template "wb" with { clicks: count(email.clicked within 60d), orders: count(purchased) }
    channel  email
    cap      1 per 14d
}
campaign news {
    audience engaged or count(viewed within 7d) >= 2
    send     template "news"
    channel  best of [email, sms]
    cap      2 per 7d
}
attribution orders {
    conversion purchased value event.revenue
    window     30d
    model      linear
}
"""
WINDOWS = {
    "email.opened": [30],
    "Order Completed": [120, 30, 0],
    "email.clicked": [60],
    "Page Viewed": [7, 3],
}  # the windows the rules read, and shorter ones


def _rules() -> tuple[CompiledRuleset, RuleNeeds]:
    result = load_source(RULES)
    ruleset = result.raise_for_errors()
    return ruleset, rule_needs([s.module for s in result.scopes], ruleset)


def _events(n_customers: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    out: list[dict[str, Any]] = []

    def add(user: str | None, ts: int, **fields: Any) -> None:
        who = {"userId": user} if user else {}
        out.append({"messageId": f"m{len(out)}", "timestamp": ts / 1000, **who, **fields})

    for c in range(n_customers):
        user = f"u{c}"
        add(user, T0, type="identify", traits={"email": f"{user}@example.com"})
        add(user, T0 + DAY, type="track", event="Consent Granted", properties={"channel": "email"})
        for _ in range(40):
            ts = T0 + rng.randrange(700 * DAY)
            kind = rng.choice(["open", "click", "page", "order", "utm"])
            if kind == "open":
                add(user, ts, type="track", event="Email Opened", properties={"channel": "email"})
            elif kind == "click":
                add(
                    user,
                    ts,
                    type="track",
                    event="Message Clicked",
                    properties={"channel": "email", "campaign": "x"},
                )
            elif kind == "page":
                add(user, ts, type="page", properties={"url": "https://shop.example.com/"})
            elif kind == "order":
                add(
                    user,
                    ts,
                    type="track",
                    event="Order Completed",
                    properties={"revenue": rng.choice([20, 60])},
                )
            else:
                add(
                    user,
                    ts,
                    type="page",
                    context={"campaign": {"source": "google", "medium": "cpc", "name": "spring"}},
                )
    return out


def _ingest(runtime: Runtime, calls: list[dict[str, Any]]) -> None:
    batch = [parse_call(c, received_ms=NOW) for c in calls]
    record_events(engine=runtime.engine, batch=batch)
    EngineLoop(runtime).catch_up()


def _observe(runtime: Runtime, ruleset: CompiledRuleset) -> dict[str, Any]:
    """Everything rules, decisions and attribution read, at NOW and a few days later."""
    out: dict[str, Any] = {}
    with runtime.engine.connect() as conn:
        ids = list(conn.scalars(select(profiles.c.customer_id).order_by(profiles.c.customer_id)))
        for now in (NOW, NOW + 3 * DAY):
            for cid in ids:
                profile = load_profile(conn, cid, now_ms=now)
                ctx = EvalContext(profile=profile, now_ms=now)
                values: list[Any] = [s.condition(ctx) for s in ruleset.segments.values()]
                for c in ruleset.campaigns.values():
                    values += [c.audience(ctx) if c.audience else None, c.template.variables(ctx)]
                for event, windows in WINDOWS.items():
                    for w in windows:
                        since = now - w * DAY if w else 0
                        values += [
                            profile.count(event, since, now + 1),
                            profile.sum(event, "revenue", since, now + 1),
                        ]
                out[f"profile {cid} {now}"] = values
                decision = make_decision(
                    conn=conn,
                    ruleset=ruleset,
                    customer_ref=_user(conn, cid),
                    now_ms=now,
                    available_channels=CHANNELS,
                    learners=None,
                    decision_id=f"d{cid}",
                )
                out[f"decision {cid} {now}"] = decision
        for spec in ("orders",):
            for w in sorted({*WINDOWS_DAYS, 30}):
                out[f"attribution {spec} {w}"] = query_attribution(
                    conn, spec=spec, models=list(ONLINE_MODELS), window_days=w
                )
    return out


def _user(conn: Any, customer_id: int) -> str:
    from cadence.engine.identity import identities_of

    return next(str(value) for kind, value in identities_of(conn, customer_id) if kind == "user")


def _count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)


def _seed_queue_and_snapshots(engine: Engine) -> None:
    with engine.begin() as conn:
        cid = conn.scalar(select(func.min(profiles.c.customer_id)))
        rows = []
        for i, (status, age_days) in enumerate(
            [("sent", 200), ("failed", 150), ("expired", 120), ("sent", 10), ("queued", 300), ("sent", 30)]
        ):
            t = NOW - age_days * DAY
            rows.append(
                {
                    "idempotency_key": f"k{i}",
                    "campaign": "news",
                    "customer_id": cid,
                    "channel": "email",
                    "variables": {},
                    "due_ms": t,
                    "status": status,
                    "attempts": 1,
                    "created_ms": t,
                    "updated_ms": t,
                }
            )
        conn.execute(insert(sends), rows)
        conn.execute(
            insert(scheduled_runs),
            [
                {"campaign": "news", "occurrence": f"o{d}", "fire_ms": NOW - d * DAY, "status": "done"}
                for d in (300, 200, 100, 1)
            ]
            + [{"campaign": "old", "occurrence": "o", "fire_ms": NOW - 500 * DAY, "status": "done"}],
        )
        conn.execute(
            insert(learner_snapshots),
            [
                {
                    "name": "learners",
                    "version": v,
                    "position": v,
                    "created_ms": NOW,
                    "labels": 0,
                    "quality": {},
                    "state": b"x",
                    "pinned": v == 1,
                }
                for v in range(1, 9)
            ],
        )


@pytest.fixture
def attributed(runtime: Runtime) -> Runtime:
    ruleset, _needs = _rules()
    runtime.extensions["rules"] = type("Holder", (), {"current": ruleset})()
    _ingest(runtime, _events(12))
    # A journey stitched from an anonymous visitor: its touches from long before the
    # customer's newest one become unreachable (no window reaches back that far).
    _ingest(
        runtime,
        [
            {
                "type": "page",
                "messageId": "a1",
                "anonymousId": "anon-z",
                "timestamp": (T0 + 5 * DAY) / 1000,
                "context": {"campaign": {"source": "google", "medium": "cpc", "name": "z"}},
            }
        ],
    )
    _ingest(
        runtime,
        [
            {
                "type": "page",
                "messageId": "a2",
                "userId": "u0",
                "timestamp": (T0 + 690 * DAY) / 1000,
                "context": {"campaign": {"source": "google", "medium": "cpc", "name": "z"}},
            }
        ],
    )
    _ingest(
        runtime,
        [
            {
                "type": "identify",
                "messageId": "a3",
                "userId": "u0",
                "anonymousId": "anon-z",
                "timestamp": (T0 + 691 * DAY) / 1000,
            }
        ],
    )
    _seed_queue_and_snapshots(runtime.engine)
    return runtime


def test_compaction_changes_no_decision_profile_value_or_attribution(attributed: Runtime) -> None:
    runtime = attributed
    engine = runtime.engine
    ruleset, needs = _rules()
    assert needs.window_days("Order Completed") is None  # count(purchased): all of history
    assert needs.window_days("email.opened") == 30 and needs.cap_ms == 14 * DAY
    policy = CompactionPolicy(profile_days=30, sends_days=30, snapshots_kept=3)
    clock = FixedClock(NOW)
    before = _observe(runtime, ruleset)
    counts = {
        t.name: _count(engine, t)
        for t in (profile_daily, attribution_touches, sends, scheduled_runs, learner_snapshots, events)
    }

    dry = compact_derived_state(engine=engine, clock=clock, policy=policy, needs=needs, dry_run=True)
    assert {
        t.name: _count(engine, t)
        for t in (profile_daily, attribution_touches, sends, scheduled_runs, learner_snapshots, events)
    } == counts
    report = compact_derived_state(engine=engine, clock=clock, policy=policy, needs=needs)
    assert report.deleted == dry.deleted
    assert report.deleted["profile_daily"] > 0
    assert report.deleted["attribution_touches"] >= 1
    assert report.deleted["sends"] == 3  # finished and older than 30 days; the queued one stays
    # news: the runs 300, 200 and 100 days old go; its latest and the only run of "old" stay.
    assert report.deleted["scheduled_runs"] == 3
    assert report.deleted["learner_snapshots"] == 4  # 7 unpinned, 3 kept; the pinned one stays
    assert report.deleted["events"] == 0  # no retention asked for
    assert _count(engine, profile_daily) == counts["profile_daily"] - report.deleted["profile_daily"]
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(sends).where(sends.c.status == "queued")) == 1
        assert conn.scalar(select(func.count()).where(learner_snapshots.c.pinned.is_(True))) == 1
        oldest = dict(
            conn.execute(
                select(profile_daily.c.event, func.min(profile_daily.c.day)).group_by(profile_daily.c.event)
            ).all()
        )
    # The longest bounded window is 120 days (spenders); buckets read over all history stay.
    cutoff = NOW // DAY - needs.longest_days() - 2
    assert oldest["email.opened"] >= cutoff and oldest["Page Viewed"] >= cutoff
    assert oldest["Order Completed"] < cutoff - 300

    after = _observe(runtime, ruleset)
    assert after == before

    again = compact_derived_state(engine=engine, clock=clock, policy=policy, needs=needs)
    assert again.total == 0


def test_rules_that_cannot_be_analysed_keep_every_bucket(attributed: Runtime) -> None:
    engine = attributed.engine
    buckets = _count(engine, profile_daily)
    report = compact_derived_state(
        engine=engine,
        clock=FixedClock(NOW),
        policy=CompactionPolicy(profile_days=1),
        needs=RuleNeeds(everything=True),
    )
    assert report.deleted["profile_daily"] == 0 and _count(engine, profile_daily) == buckets


def test_event_retention_deletes_only_applied_events(attributed: Runtime) -> None:
    engine = attributed.engine
    with engine.connect() as conn:
        total = conn.scalar(select(func.count()).select_from(events))
        old = conn.scalar(select(func.count()).select_from(events).where(events.c.ts_ms < NOW - 100 * DAY))
    _ruleset, needs = _rules()
    report = compact_derived_state(
        engine=engine, clock=FixedClock(NOW), policy=CompactionPolicy(event_retention_days=100), needs=needs
    )
    # The learner snapshots seeded above reflect positions 1..8: nothing after them may go.
    assert 0 < report.deleted["events"] <= 8
    assert _count(engine, events) == total - report.deleted["events"]
    assert report.deleted["events"] <= old


def _table(out: str) -> dict[str, int]:
    rows = re.findall(r"│\s*([a-z_]+)\s*│\s*([\d,]+)\s*│", out)
    return {name: int(count.replace(",", "")) for name, count in rows}


def test_cadence_db_compact_prints_what_it_would_delete_then_deletes_it(
    attributed: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.cadence").write_text(RULES)
    url = attributed.engine.url.render_as_string(hide_password=False)
    monkeypatch.setenv("CADENCE_DATABASE_URL", url)
    monkeypatch.setenv("CADENCE_RULES_PATHS", orjson.dumps([str(rules)]).decode())
    monkeypatch.setenv("CADENCE_COMPACTION_SENDS_DAYS", "30")
    monkeypatch.setenv("COLUMNS", "120")
    outputs = []
    for args in (["db", "compact", "--dry-run"], ["db", "compact"], ["db", "compact"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code in (0, None)
        outputs.append(capsys.readouterr().out)
    dry, done, again = (_table(o) for o in outputs)
    assert "would delete" in outputs[0] and "deleted" in outputs[1]
    assert set(dry) == {
        "profile_daily",
        "attribution_touches",
        "sends",
        "scheduled_runs",
        "learner_snapshots",
        "events",
    }
    assert dry == done and done["learner_snapshots"] == 2 and done["sends"] >= 3
    assert sum(again.values()) == 0
