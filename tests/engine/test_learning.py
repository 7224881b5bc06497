"""Learner snapshots and the engine-loop subscriber: restart keeps what was learned; pin and roll back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from cadence.cli import app
from cadence.engine.learning import (
    LearnerSubscriber,
    UnknownSnapshot,
    list_snapshots,
    load_snapshot,
    pin_snapshot,
    unpin,
)
from cadence.engine.loop import LoggedEvent

T0 = 1_780_000_000_000
HOUR = 3_600_000


def feedback(i: int, event: str, decision_id: str, ts_ms: int) -> LoggedEvent:
    return LoggedEvent(
        id=i,
        message_id=f"m{i}",
        type="track",
        event=event,
        user_id="u1",
        anonymous_id=None,
        customer_id=1,
        ts_ms=ts_ms,
        source="api",
        payload={"properties": {"decision_id": decision_id, "channel": "email"}},
    )


def teach(sub: LearnerSubscriber, start: int, n: int) -> list[LoggedEvent]:
    events = []
    for k in range(n):
        did = f"d{start + k}"
        ts = T0 + (start + k) * HOUR
        sub.record(
            decision_id=did,
            customer_id=1,
            traits={"plan": "pro"},
            zone="UTC",
            campaign="c",
            channel="email",
            send_at_ms=ts,
            arm=None,
            now_ms=ts,
        )
        events.append(feedback(2 * (start + k) + 1, "Email Delivered", did, ts))
        if k % 2 == 0:
            events.append(feedback(2 * (start + k) + 2, "Email Link Clicked", did, ts + 60_000))
    return events


def test_snapshot_restart_replays_only_the_rest(db_engine: Engine) -> None:
    sub = LearnerSubscriber(snapshot_every=10**9)
    first = teach(sub, 0, 20)
    with db_engine.begin() as conn:
        sub.apply(conn, first)
        assert sub.snapshot(conn, now_ms=T0) == 1
    rest = teach(sub, 20, 10)
    with db_engine.begin() as conn:
        sub.apply(conn, rest)
    # A restart loads the snapshot, reports its position, and gets the same state by replay.
    restarted = LearnerSubscriber()
    with db_engine.begin() as conn:
        position = restarted.start(conn, checkpoint=0)
        assert position == first[-1].id
        for k in range(20, 30):  # the decisions made after the snapshot are recorded again
            ts = T0 + k * HOUR
            restarted.record(
                decision_id=f"d{k}",
                customer_id=1,
                traits={"plan": "pro"},
                zone="UTC",
                campaign="c",
                channel="email",
                send_at_ms=ts,
                arm=None,
                now_ms=ts,
            )
        restarted.apply(conn, [e for e in rest if e.id > position])
    assert np.array_equal(restarted.learner.engagement.mean, sub.learner.engagement.mean)
    assert restarted.learner.customers[1].clicks == sub.learner.customers[1].clicks == 15


def test_pin_rollback_and_list(db_engine: Engine) -> None:
    sub = LearnerSubscriber()
    with db_engine.begin() as conn:
        sub.apply(conn, teach(sub, 0, 4))
        sub.snapshot(conn, now_ms=T0)
        sub.apply(conn, teach(sub, 4, 40))
        sub.learner.advance(T0 + 1000 * HOUR)
        sub.snapshot(conn, now_ms=T0 + HOUR)
    with db_engine.begin() as conn:
        snaps = list_snapshots(conn, name=sub.name)
        assert [s.version for s in snaps] == [2, 1]
        assert snaps[0].labels > snaps[1].labels and "engagement_auc" in snaps[0].quality
        pin_snapshot(conn, name=sub.name, version=1)
        with pytest.raises(UnknownSnapshot, match="no snapshot 9"):
            pin_snapshot(conn, name=sub.name, version=9)
    fresh = LearnerSubscriber()
    with db_engine.begin() as conn:
        fresh.start(conn, 0)
        assert fresh.pinned is not None and fresh.scorer() is fresh.pinned
        assert fresh.pinned.labels == snaps[1].labels and fresh.learner.labels == snaps[0].labels
        unpin(conn, name=sub.name)
        fresh.start(conn, 0)
        assert fresh.scorer() is fresh.learner
        assert load_snapshot(conn, name=sub.name, version=2) is not None


def test_models_cli(sqlite_engine: Engine) -> None:
    runner = CliRunner()
    url = str(sqlite_engine.url)
    assert "no snapshots" in runner.invoke(app, ["--database-url", url, "models", "list"]).output
    sub = LearnerSubscriber()
    with sqlite_engine.begin() as conn:
        sub.snapshot(conn, now_ms=T0)
    out = runner.invoke(app, ["--database-url", url, "models", "list"])
    assert out.exit_code == 0 and "learner 'learners'" in out.output
    out = runner.invoke(app, ["--database-url", url, "models", "rollback", "1"])
    assert out.exit_code == 0 and "rolled back to version 1" in out.output
    out = runner.invoke(app, ["--database-url", url, "models", "pin", "7"])
    assert out.exit_code != 0


def test_simulate_cli_writes_a_chart(tmp_path: Path) -> None:
    chart = tmp_path / "sim.png"
    out = CliRunner().invoke(
        app, ["simulate", "-n", "60", "-d", "4", "-p", "balanced", "--chart", str(chart), "--markdown"]
    )
    assert out.exit_code == 0, out.output
    assert "| cadence |" in out.output and "| oracle |" in out.output
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(app, ["simulate", "-p", "nowhere"])
    assert bad.exit_code != 0


def test_the_cli_names_the_learner_as_the_subscriber_does() -> None:
    from cadence.cli.models import NAME
    from cadence.engine.learning import LearnerSubscriber

    assert LearnerSubscriber.name == NAME
