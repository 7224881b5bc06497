"""Learner snapshots and the engine-loop subscriber: restart keeps what was learned; pin and roll back."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from sqlalchemy import Connection, Engine, select
from sqlalchemy import event as sa_event
from typer.testing import CliRunner

from cadence.channels import Feedback
from cadence.cli import app
from cadence.clock import ms_to_datetime
from cadence.clock import now_ms as wall_ms
from cadence.engine.learners import LearnerConfig
from cadence.engine.learning import (
    LearnerSubscriber,
    SnapshotInfo,
    UnknownSnapshot,
    list_snapshots,
    load_snapshot,
    pin_snapshot,
    unpin,
)
from cadence.engine.loop import EngineLoop, LoggedEvent
from cadence.errors import ConfigError
from cadence.runtime import Runtime
from cadence.settings import load_settings
from cadence.store.db import read_connection
from cadence.store.schema.core import checkpoints, customers
from cadence.store.schema.decisions import decisions
from tests.engine.test_loop import ingest, stream
from tests.engine.test_loop_restart import retrying

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


def record(sub: LearnerSubscriber, decision_id: str, ts: int) -> dict[str, Any]:
    """Commit an email decision for customer 1 at ``ts`` to the subscriber's learner."""
    return sub.record(
        decision_id=decision_id,
        customer_id=1,
        traits={"plan": "pro"},
        zone="UTC",
        campaign="c",
        channel="email",
        send_at_ms=ts,
        arm=None,
        now_ms=ts,
    )


def teach(sub: LearnerSubscriber, start: int, n: int) -> list[LoggedEvent]:
    events = []
    for k in range(n):
        did = f"d{start + k}"
        ts = T0 + (start + k) * HOUR
        record(sub, did, ts)
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
            record(restarted, f"d{k}", ts)
        restarted.apply(conn, [e for e in rest if e.id > position])
    assert np.array_equal(restarted.learner.engagement.mean, sub.learner.engagement.mean)
    assert restarted.learner.customers[1].clicks == sub.learner.customers[1].clicks == 15


def test_an_open_teaches_the_hour_and_a_privacy_proxys_open_does_not(db_engine: Engine) -> None:
    """An ``Email Opened`` joined to a decision moves the customer's hour likelihood; one marked
    ``machine_open`` (Apple Mail's proxy fetched it; SendGrid's ``sg_machine_open``) does not."""
    learned = {}
    for machine in (False, True):
        sub = LearnerSubscriber(snapshot_every=10**9)
        record(sub, "d0", T0)
        opened = feedback(2, "Email Opened", "d0", T0 + 60_000)
        if machine:
            opened.payload["properties"]["machine_open"] = True
        with db_engine.begin() as conn:
            sub.apply(conn, [feedback(1, "Email Delivered", "d0", T0), opened])
        sub.learner.advance(T0 + 30 * HOUR)
        stats = sub.learner.customers[1]
        assert stats.clicks == 0
        learned[machine] = stats.hour_loglik
    assert learned[False] is not None and learned[True] is not None
    assert float(learned[False].max() - learned[False].min()) > 1.0  # the open's hour stands out
    assert float(np.abs(learned[True]).max()) == 0.0  # a silence, as far as the hour is concerned


def test_a_restart_knows_the_opens_the_live_learner_knew(db_engine: Engine) -> None:
    """Opens before and after a snapshot: the restarted learner's hour likelihood and open
    counts are the live one's. Which channels report opens is in the snapshot: the first send
    after it is labelled before any open of the replay, and counts."""

    def opens(start: int, n: int, sub: LearnerSubscriber) -> list[LoggedEvent]:
        events = []
        for k in range(start, start + n):
            ts = T0 + k * 5 * HOUR
            record(sub, f"d{k}", ts)
            events.append(feedback(3 * k + 1, "Email Delivered", f"d{k}", ts))
            if k % 3 != 1 and k not in (12, 13):  # the first sends after the snapshot: not opened
                events.append(feedback(3 * k + 2, "Email Opened", f"d{k}", ts + 60_000))
        return events

    sub = LearnerSubscriber(snapshot_every=10**9)
    first = opens(0, 12, sub)
    with db_engine.begin() as conn:
        sub.apply(conn, first)
        assert sub.snapshot(conn, now_ms=T0) == 1
    rest = opens(12, 12, sub)
    with db_engine.begin() as conn:
        sub.apply(conn, rest)
    restarted = LearnerSubscriber()
    with db_engine.begin() as conn:
        position = restarted.start(conn, checkpoint=0)
        for k in range(12, 24):
            record(restarted, f"d{k}", T0 + k * 5 * HOUR)
        restarted.apply(conn, [e for e in rest if e.id > position])
    live, again = sub.learner.customers[1], restarted.learner.customers[1]
    assert live.open_counts is not None and live.open_counts[1].sum() >= 10
    assert again.open_counts is not None and np.array_equal(again.open_counts, live.open_counts)
    assert again.hour_loglik is not None and live.hour_loglik is not None
    assert np.array_equal(again.hour_loglik, live.hour_loglik)


def test_a_following_process_owes_no_snapshot(db_engine: Engine) -> None:
    sub = LearnerSubscriber(snapshot_every=1, snapshot_min_seconds=0)
    sub.following = True  # as EngineLoop.follow_in_memory sets it: the leader's snapshots are the stored ones
    with db_engine.begin() as conn:
        sub.apply(conn, teach(sub, 0, 3))
    assert not sub.snapshot_owed()
    sub.following = False
    with db_engine.begin() as conn:
        sub.apply(conn, teach(sub, 3, 1))
        assert list_snapshots(conn, name=sub.name) == []  # apply stores none: the loop does, after the commit
    assert sub.snapshot_owed()


def test_a_batch_snapshot_is_written_after_the_batch_commits_not_inside_it(runtime: Runtime) -> None:
    """Pickling the learners takes about a second at 20,000 customers; inside the batch's
    transaction it held SQLite's write lock (every decision commit waited) and the batches' lock.
    The loop stores the snapshot a batch made owed in a transaction of its own, after the batch's:
    when the snapshot is written, another connection already sees the batch committed."""
    ingest(runtime, *stream()[:20])
    learners = LearnerSubscriber(runtime, snapshot_every=10, snapshot_min_seconds=0)
    loop = EngineLoop(runtime, [learners])
    committed_then: list[int] = []

    def executed(_conn: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO learner_snapshots"):
            with read_connection(runtime.engine) as other, other.begin():
                stored = other.execute(
                    select(checkpoints.c.position).where(checkpoints.c.name == "identity")
                ).scalar()
            committed_then.append(stored or 0)

    sa_event.listen(runtime.engine, "before_cursor_execute", executed)
    try:
        loop.catch_up()
    finally:
        sa_event.remove(runtime.engine, "before_cursor_execute", executed)
    assert committed_then == [20], "the snapshot was written inside the batch's transaction"
    with runtime.engine.connect() as conn:
        [snap] = list_snapshots(conn, name=learners.name)
    assert snap.position == loop.positions()["learners"] == 20 and not learners.snapshot_owed()


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


def test_models_list_says_when_each_snapshot_was_made_and_an_auc_not_defined_yet(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends nobody clicked: the engagement AUC has no positive label to rank, nor the unsubscribe
    AUC an unsubscribe, so both read ``-`` (not 0.000, a perfectly wrong model); and the snapshot the
    loop takes is dated when it was made, not at its events' (here simulated, in 2026-05) times."""
    db_engine = runtime.engine
    sub = LearnerSubscriber(snapshot_every=12, snapshot_min_seconds=0)
    silent = [e for e in teach(sub, 0, 12) if e.event == "Email Delivered"]
    with db_engine.begin() as conn:
        sub.apply(conn, silent[:-1])
        sub.learner.advance(T0 + 1000 * HOUR)
        assert sub.learner.labels >= 11
        sub.apply(conn, silent[-1:])  # the 12th event: a snapshot is owed
    assert sub.snapshot_owed()
    before = wall_ms()
    loop = EngineLoop(runtime, [sub])
    assert loop.snapshot_in_memory(owed_only=True) == 1  # as the loop takes it after the batch
    with db_engine.connect() as conn:
        [snap] = list_snapshots(conn, name=sub.name)
    assert before <= snap.created_ms <= wall_ms()
    assert snap.quality["engagement_auc"] is None and snap.quality["unsubscribe_auc"] is None
    assert snap.quality["engagement_logloss"] is not None
    url = db_engine.url.render_as_string(hide_password=False)
    # The CLI's console took its width when first imported (80 columns under the whole suite).
    monkeypatch.setattr("cadence.cli.models.console", Console(width=200))
    out = CliRunner().invoke(app, ["--database-url", url, "models", "list"])
    assert out.exit_code == 0, out.output
    [row] = [line for line in out.output.splitlines() if re.match(r"\W+1\W", line)]
    cells = [cell.strip() for cell in re.split(r"[│┃|]", row) if cell.strip()]
    # version, created (UTC), log position, labels, engagement AUC, log loss, unsub AUC, size
    assert cells[1] == ms_to_datetime(snap.created_ms).strftime("%Y-%m-%d %H:%M")
    assert (cells[4], cells[6]) == ("-", "-") and cells[5] != "-"


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


def test_the_weekender_world_reads_at_its_weekend_hour_at_weekends() -> None:
    """In the ``weekender`` population a customer with a weekend hour clicks a message sent at that
    hour far more on Saturdays and Sundays than on weekdays; the other populations have no weekends."""
    from datetime import date

    from cadence.sim.population import make_population
    from cadence.sim.world import CustomerState, local_weekend, run_policy

    people = [c for c in make_population("weekender", 2000, seed=2) if c.weekend_hour is not None]
    people = [c for c in people if 10 <= c.weekend_hour <= 20 and abs(c.weekend_hour - c.preferred_hour) > 4]
    assert len(people) > 300 and not any(c.weekend_hour for c in make_population("balanced", 600, seed=2))
    clicks = {False: 0, True: 0}
    sends = {False: 0, True: 0}

    class AtTheWeekendHour:
        name = "weekend hour"

        def decide(self, state: CustomerState, now_ms: int) -> tuple[str, int] | None:
            c = state.customer
            at = now_ms + round((c.weekend_hour - 7) * HOUR)  # decided at 07:00 local
            sends[local_weekend(at, c.zone)] += 1
            return "email", at

        def feedback(
            self, state: CustomerState, channel: str, kind: Feedback, sent_ms: int, ts_ms: int
        ) -> None:
            if kind is Feedback.CLICKED:
                clicks[local_weekend(sent_ms, state.customer.zone)] += 1

    people = [replace(c, id=i) for i, c in enumerate(people)]
    run_policy(AtTheWeekendHour(), people, days=28, seed=1, start=date(2026, 3, 2))
    weekday, weekend = clicks[False] / sends[False], clicks[True] / sends[True]
    assert weekend > 1.6 * weekday, (clicks, sends)


def test_the_cli_names_the_learner_as_the_subscriber_does() -> None:
    from cadence.cli.models import NAME
    from cadence.engine.learning import LearnerSubscriber

    assert LearnerSubscriber.name == NAME


def _store_decisions(conn: Connection, sub: LearnerSubscriber, n: int) -> list[LoggedEvent]:
    """n committed email decisions for customer 1 an hour apart, stored as the API stores them;
    returns their feedback: every other one reported delivered (some providers never report it), every
    third clicked."""
    conn.execute(customers.insert().values(id=1, created_ms=T0))
    events = []
    for k in range(n):
        did, ts = f"d{k}", T0 + k * HOUR
        stored = record(sub, did, ts)
        conn.execute(
            decisions.insert().values(
                id=did,
                customer_id=1,
                decided_at_ms=ts,
                action="send",
                campaign="c",
                channel="email",
                send_at_ms=ts,
                ruleset_hash="h",
                explanation={},
                inputs={"features": stored, "zone": "UTC", "traits": {"plan": "pro"}},
                outcome={},
            )
        )
        if k % 2 == 0:
            events.append(feedback(2 * k + 1, "Email Delivered", did, ts + 1000))
        if k % 3 == 0:
            events.append(feedback(2 * k + 2, "Email Link Clicked", did, ts + 60_000))
    # A last event two days on: every label is due.
    events.append(feedback(2 * n + 1, "Page Viewed", "none", T0 + (n + 48) * HOUR))
    return events


def test_a_snapshot_takes_new_decision_values_and_relearns_for_a_new_horizon(db_engine: Engine) -> None:
    sub = LearnerSubscriber(snapshot_every=10**9)
    with db_engine.begin() as conn:
        events = _store_decisions(conn, sub, 30)
        sub.apply(conn, events)
        sub.snapshot(conn, now_ms=T0)
    learned = sub.learner
    assert learned.labels == 60  # 30 sends, each an engagement and an unsubscribe label

    # A value read only when deciding: the snapshot is kept, with the new value.
    dearer = LearnerSubscriber(config=replace(LearnerConfig(), unsubscribe_cost=25.0))
    with db_engine.begin() as conn:
        assert dearer.start(conn, checkpoint=0) == events[-1].id
    assert dearer.learner.config.unsubscribe_cost == 25.0
    assert np.array_equal(dearer.learner.engagement.mean, learned.engagement.mean)

    # A horizon shapes the labels: learn again from the log, the stored decisions included, so
    # the 10 sends with no feedback event at all are learned as noes too.
    config = replace(LearnerConfig(), horizon_ms=12 * HOUR, label_delay_ms=None)
    relearn = LearnerSubscriber(config=config, snapshot_every=10**9)
    with db_engine.begin() as conn:
        assert relearn.start(conn, checkpoint=0) == 0
        relearn.apply(conn, events)
    assert relearn.learner.config.horizon_ms == 12 * HOUR and relearn.learner.labels == 60
    # ... exactly as a learner with that configuration learns it live.
    live = LearnerSubscriber(config=config, snapshot_every=10**9)
    for k in range(30):
        ts = T0 + k * HOUR
        record(live, f"d{k}", ts)
    with db_engine.begin() as conn:
        live.apply(conn, events)
    assert np.allclose(relearn.learner.engagement.mean, live.learner.engagement.mean)
    assert relearn.learner.customers[1].clicks == live.learner.customers[1].clicks == 10


def test_learner_settings_reach_the_loops_learner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADENCE_LEARNER__UNSUBSCRIBE_COST", "4.5")
    monkeypatch.setenv("CADENCE_LEARNER__HORIZON_HOURS", "72")
    monkeypatch.setenv("CADENCE_LEARNER__ENGAGEMENT_EVENTS", '["opened", "clicked"]')
    monkeypatch.setenv("CADENCE_LEARNER__IGNORE_TRAITS", '["city"]')
    monkeypatch.setenv("CADENCE_LEARNER__HOUR_OPEN_WEIGHT", "0.5")
    settings = load_settings(database_url="sqlite:///unused.db")
    sub = LearnerSubscriber(SimpleNamespace(settings=settings))
    assert sub.config.unsubscribe_cost == 4.5 and sub.config.horizon_ms == 72 * HOUR
    assert sub.config.hour_open_weight == 0.5
    assert sub.config.label_delay_ms == 6 * HOUR
    assert sub.config.engagement_events == {Feedback.OPENED, Feedback.CLICKED}
    # The names given are ignored besides those that identify a person.
    assert {"city", "email", "phone"} <= sub.config.ignored_traits
    assert "device" not in sub.config.ignored_traits
    # Everything not exposed stays as LearnerConfig's defaults.
    assert sub.config.hazard_fit is LearnerConfig().hazard_fit


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("CADENCE_LEARNER__LABEL_DELAY_HOURS", "60", "label_delay_hours (60.0) must be shorter"),
        ("CADENCE_LEARNER__UNSUBSCRIBE_COST", "-1", "CADENCE_LEARNER__UNSUBSCRIBE_COST"),
        ("CADENCE_LEARNER__ENGAGEMENT_EVENTS", '["bounced"]', "CADENCE_LEARNER__ENGAGEMENT_EVENTS"),
        ("CADENCE_LEARNER__PRIOR", "1", "CADENCE_LEARNER__PRIOR"),
    ],
)
def test_bad_learner_settings_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_settings(database_url="sqlite:///unused.db")


def test_a_restart_folds_the_merges_the_snapshot_does_not_reflect(db_engine: Engine) -> None:
    """A visitor (2) with sends and clicks is merged into a user (1) after the learner's snapshot.

    The live learner folded the visitor into the user when the loop applied the merge; one loaded
    from that snapshot was never told of it and kept the visitor apart, with the visitor's pending
    decisions, whose feedback then taught the visitor (an outside check: the same option of a
    merged customer valued 0.707 before a restart and 0.636 after).
    """

    def event(i: int, name: str, did: str, cid: int, ts: int, kind: str = "track") -> LoggedEvent:
        return feedback(i, name, did, ts)._replace(customer_id=cid, type=kind)

    def decide(sub: LearnerSubscriber, k: int, cid: int) -> None:
        ts = T0 + k * HOUR
        sub.record(
            decision_id=f"d{k}", customer_id=cid, traits={"plan": "pro"}, zone="UTC", campaign="c",
            channel="email", send_at_ms=ts, arm=None, now_ms=ts,
        )  # fmt: skip

    with db_engine.begin() as conn:
        conn.execute(customers.insert(), [{"id": 1, "created_ms": T0}, {"id": 2, "created_ms": T0}])
    live = LearnerSubscriber(snapshot_every=10**9)
    for k in range(8):
        decide(live, k, cid=2)  # the visitor's; d6 and d7 still wait for their feedback
    before = [event(k + 1, "Email Link Clicked", f"d{k}", 2, T0 + k * HOUR + 60_000) for k in range(0, 6, 2)]
    with db_engine.begin() as conn:
        live.apply(conn, before)
        live.snapshot(conn, now_ms=T0)
        # what the loop's identity stitching writes when it resolves the alias (event 100)
        conn.execute(customers.update().where(customers.c.id == 2).values(merged_into=1, merged_at_event=100))
    for k in range(10, 14):
        decide(live, k, cid=1)
    after = [event(100, "alias", "", 1, T0 + 8 * HOUR, kind="alias")]
    after += [
        event(101 + k, "Email Link Clicked", f"d{k}", 1, T0 + k * HOUR + 60_000) for k in (6, 7, 10, 12)
    ]
    with db_engine.begin() as conn:
        live.apply(conn, after)
    want = live.learner.customers[1]
    assert 2 not in live.learner.customers and want.clicks == 7

    restarted = LearnerSubscriber()
    with db_engine.begin() as conn:
        restarted.start(conn, checkpoint=0)
        for k in range(10, 14):  # what recall() registers again from the decisions table
            decide(restarted, k, cid=1)
        restarted.apply(conn, after)
    got = restarted.learner.customers[1]
    assert 2 not in restarted.learner.customers
    assert (got.clicks, got.channel_sends, got.channel_clicks, sorted(got.sends)) == (
        want.clicks,
        want.channel_sends,
        want.channel_clicks,
        sorted(want.sends),
    )


def test_stored_decisions_registered_again_belong_to_the_customer_their_customer_joined(
    db_engine: Engine,
) -> None:
    """A restart without a snapshot learns from the log and registers the stored decisions as it goes.

    Decision rows keep the customer they were made for; one merged since is registered for the
    customer it joined, so its feedback teaches that customer, as it did the live learner.
    """
    sub = LearnerSubscriber(snapshot_every=10**9)
    with db_engine.begin() as conn:
        events = _store_decisions(conn, sub, 6)  # customer 1's
        conn.execute(customers.insert().values(id=2, created_ms=T0))
        conn.execute(customers.update().where(customers.c.id == 1).values(merged_into=2))
    restarted = LearnerSubscriber(snapshot_every=10**9)
    with db_engine.begin() as conn:
        assert restarted.start(conn, checkpoint=0) == 0
        restarted.apply(conn, events)
    assert {p.customer_id for p in restarted.learner.pending.values()} <= {2}
    assert 1 not in restarted.learner.customers and restarted.learner.customers[2].clicks == 2


def test_a_burst_soon_after_the_start_is_snapshotted_while_the_log_is_idle(runtime: Runtime) -> None:
    """Snapshots were owed only when a batch arrived: a burst of ``snapshot_every`` events within
    ``snapshot_min_seconds`` of the start (an outside check: 10,000 in the first 30 s) took none
    until the next event, or the hourly job. The idle loop takes it once the time has passed."""
    quick = retrying(runtime, poll=0.02, quarantine_after=0)
    ingest(quick, *stream()[:20])
    learners = LearnerSubscriber(quick, snapshot_every=10, snapshot_min_seconds=1.0)
    loop = EngineLoop(quick, [learners])
    started = time.monotonic()
    loop.start()
    try:
        loop.wait_applied(timeout=20)
        with runtime.engine.connect() as conn:
            early = list_snapshots(conn, name=learners.name)
        if time.monotonic() - started < 1.0:  # (a slow machine may have applied it later)
            assert early == [], "the burst came too soon after the start for a snapshot"
        deadline = time.monotonic() + 10
        taken: list[SnapshotInfo] = []
        while not taken and time.monotonic() < deadline:
            time.sleep(0.05)
            with runtime.engine.connect() as conn:
                taken = list_snapshots(conn, name=learners.name)
    finally:
        loop.stop()
    assert [(s.version, s.position) for s in taken] == [(1, 20)]
    assert learners.snapshot_owed() is False
