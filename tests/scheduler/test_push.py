"""Scheduled pushes over simulated time: once per occurrence, restarts, misfires, races, zones."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, select

from cadence.channels import CHANNELS
from cadence.clock import FixedClock
from cadence.engine.decisions_service import get_decision
from cadence.engine.learning import LearnerSubscriber
from cadence.scheduler.push import PushReport
from cadence.scheduler.seed import SeedCustomer
from cadence.scheduler.service import PushScheduler
from cadence.store.schema.decisions import decisions
from cadence.store.schema.scheduler import audience_members, scheduled_jobs
from cadence.store.schema.sends import sends
from tests.conftest import holding_write_lock
from tests.scheduler.conftest import MONDAY, Rules, customers, make_scheduler, runs, send_rows, sent_keys

HOUR = 3_600_000
DAY = 24 * HOUR

DAILY = """
event opened = "Email Opened"
campaign daily "Daily digest" {
    audience count(opened within 30d) > 0
    send template "digest"
    channel email
    schedule every day at 09:00 in "Europe/Berlin"
}
"""

Seed = Callable[[Sequence[SeedCustomer]], None]


def readers(n: int, *, start: int = 1, zone: str | None = None) -> list[SeedCustomer]:
    return customers(n, start=start, timezone=zone, events={"Email Opened": [MONDAY - 2 * DAY]})


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way catches it."""


def test_daily_campaign_over_a_week_sends_each_day_once(db_engine: Engine, seed: Seed) -> None:
    seed(readers(12) + customers(5, start=100))  # 12 readers, 5 who never opened
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, Rules(DAILY), clock)
    while clock.now_ms() < MONDAY + 7 * DAY:
        scheduler.tick()
        clock.advance(HOUR)
    rows = send_rows(db_engine)
    per_customer = Counter(r.customer_id for r in rows)
    assert set(per_customer) == set(range(1, 13))
    assert set(per_customer.values()) == {7}
    # One send a day, at 09:00 Berlin (08:00 UTC in March), keyed by the local occurrence.
    assert sorted({r.due_ms for r in rows}) == [MONDAY + d * DAY + 8 * HOUR for d in range(7)]
    assert "daily:1:2026-03-02T09:00" in {r.idempotency_key for r in rows}
    done = runs(db_engine)
    # The 5 who never opened fail the SQL prefilter (count(opened within 30d) > 0): never evaluated.
    assert [(r.status, r.evaluated, r.enqueued) for r in done] == [("done", 12, 12)] * 7


def test_pushed_sends_are_recorded_decisions_that_feedback_can_join(db_engine: Engine, seed: Seed) -> None:
    seed(readers(3))
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, Rules(DAILY), clock)
    scheduler.tick()  # registers the job
    clock.set(MONDAY + 8 * HOUR)
    scheduler.tick()
    scheduler.tick()  # the same occurrence again records nothing new
    with db_engine.connect() as conn:
        queued = conn.execute(select(sends.c.decision_id, sends.c.customer_id, sends.c.channel)).all()
        recorded = {
            r.id: r
            for r in conn.execute(select(decisions.c.id, decisions.c.customer_id, decisions.c.channel))
        }
    assert len(queued) == 3 and len(recorded) == 3
    for decision_id, customer_id, channel in queued:
        assert decision_id is not None
        assert (recorded[decision_id].customer_id, recorded[decision_id].channel) == (customer_id, channel)
    # As GET /v1/decisions/{id} reads it: a summary that says the push chose it, beside what it stored.
    with db_engine.connect() as conn:
        read = get_decision(conn, decision_id=queued[0].decision_id)
    assert read is not None and read["explanation"]["summary"].startswith(
        f"Send daily by {queued[0].channel} on "
    )
    assert "scheduled push" in read["explanation"]["summary"] and "occurrence" in read["explanation"]["push"]


def test_the_learners_remember_pushed_sends_as_a_restart_registers_them(
    db_engine: Engine, seed: Seed
) -> None:
    """A pushed send nobody answers is learned as a no, live as after a restart (before, the live
    learners knew a pushed send only once feedback joined it: they learned the clicked ones alone,
    and a restart, which registers every stored decision, moved every value)."""
    seed(readers(4))
    live = LearnerSubscriber()
    with db_engine.begin() as conn:
        live.start(conn, 0)
        live.snapshot(conn, now_ms=MONDAY)  # a restart then registers the later decisions from the table
    clock = FixedClock(MONDAY)
    scheduler = PushScheduler(
        engine=db_engine,
        clock=clock,
        rules=lambda: Rules(DAILY).current,
        available_channels=CHANNELS,
        scorer=live.scorer,
        learners=lambda: live,
    )
    scheduler.tick()  # registers the job
    clock.set(MONDAY + 8 * HOUR)
    scheduler.tick()
    with db_engine.connect() as conn:
        pushed = list(conn.scalars(select(sends.c.decision_id)))
    assert len(pushed) == 4
    assert set(pushed) <= set(live.learner.pending)

    restarted = LearnerSubscriber()
    with db_engine.begin() as conn:
        restarted.start(conn, 0)
    for decision_id in pushed:
        assert restarted.learner.pending[decision_id].stored() == live.learner.pending[decision_id].stored()
    for learner in (live.learner, restarted.learner):
        learner.advance(MONDAY + 7 * DAY)  # past every horizon: four noes
    assert live.learner.labels == restarted.learner.labels > 0
    assert not live.learner.pending and not restarted.learner.pending
    assert np.array_equal(live.learner.engagement.mean, restarted.learner.engagement.mean)


def test_a_restart_mid_push_finishes_without_duplicates_or_gaps(db_engine: Engine, seed: Seed) -> None:
    seed(readers(45))
    clock = FixedClock(MONDAY)
    rules = Rules(DAILY)
    make_scheduler(db_engine, rules, clock).tick()  # registers the job
    clock.set(MONDAY + 8 * HOUR)

    def crash_after_two(report: PushReport) -> None:
        if report.chunks == 2:
            raise Killed

    first = make_scheduler(db_engine, rules, clock, owner="first", chunk_size=10)
    first.on_chunk = crash_after_two
    with pytest.raises(Killed):
        first.tick()
    assert len(sent_keys(db_engine)) == 20
    [run] = runs(db_engine)
    assert (run.status, run.owner, run.cursor) == ("running", "first", 20)

    # A new process within the lease leaves the run alone (its owner may be alive)...
    second = make_scheduler(db_engine, rules, clock, owner="second", chunk_size=10, lease_ms=60_000)
    clock.advance(30_000)
    assert second.tick() == []
    # ...and takes it over once the owner stopped heart-beating for longer than the lease.
    clock.advance(31_000)
    [report] = second.tick()
    assert report.evaluated == 25
    keys = sent_keys(db_engine)
    assert len(keys) == len(set(keys)) == 45
    [run] = runs(db_engine)
    assert (run.status, run.owner, run.evaluated, run.enqueued) == ("done", "second", 45, 45)
    # Later ticks, by either process, never repeat the run.
    clock.advance(HOUR)
    assert second.tick() == [] and first.tick() == []
    assert len(sent_keys(db_engine)) == 45


def test_a_process_that_lost_its_run_stops_and_nothing_is_sent_twice(db_engine: Engine, seed: Seed) -> None:
    seed(readers(30))
    rules = Rules(DAILY)
    slow_clock = FixedClock(MONDAY)
    make_scheduler(db_engine, rules, slow_clock).tick()
    slow_clock.set(MONDAY + 8 * HOUR)
    fast_clock = FixedClock(MONDAY + 8 * HOUR + 5 * 60_000)  # the other process thinks the first is dead
    slow = make_scheduler(db_engine, rules, slow_clock, owner="slow", chunk_size=10, lease_ms=60_000)
    fast = make_scheduler(db_engine, rules, fast_clock, owner="fast", chunk_size=10, lease_ms=60_000)
    taken: list[PushReport] = []

    def steal(report: PushReport) -> None:
        if report.chunks == 1 and not taken:
            taken.extend(fast.tick())

    slow.on_chunk = steal
    assert slow.tick() == []  # it lost the run after its first chunk
    assert taken and taken[0].evaluated == 20
    keys = sent_keys(db_engine)
    assert len(keys) == len(set(keys)) == 30
    [run] = runs(db_engine)
    assert (run.status, run.owner) == ("done", "fast")


def race_two_schedulers(
    db_engine: Engine, seed: Seed, customers: int, *, before_tick: Callable[[Any], None]
) -> None:
    """Two schedulers (owners ``a`` and ``b``, on two engines on PostgreSQL) tick at once for a due run.

    ``customers`` readers are seeded and the daily run planned; each scheduler's thread calls
    ``before_tick(scheduler)`` and then ticks; neither may fail.
    """
    seed(readers(customers))
    rules = Rules(DAILY)
    clock = FixedClock(MONDAY)
    make_scheduler(db_engine, rules, clock).tick()
    clock.set(MONDAY + 8 * HOUR)
    other_engine = (
        create_engine(db_engine.url, poolclass=None) if db_engine.dialect.name == "postgresql" else db_engine
    )
    a = make_scheduler(db_engine, rules, clock, owner="a", chunk_size=25)
    b = make_scheduler(other_engine, rules, clock, owner="b", chunk_size=25)
    errors: list[BaseException] = []

    def run(s: Any) -> None:
        try:
            before_tick(s)
            s.tick()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if other_engine is not db_engine:
        other_engine.dispose()
    assert not errors


def test_two_processes_racing_never_double_send(db_engine: Engine, seed: Seed) -> None:
    barrier = threading.Barrier(2)
    race_two_schedulers(db_engine, seed, 300, before_tick=lambda _s: barrier.wait())
    keys = sent_keys(db_engine)
    assert len(keys) == len(set(keys)) == 300
    [run_row] = runs(db_engine)
    assert run_row.status == "done" and run_row.evaluated == 300


@pytest.mark.parametrize(
    ("misfire", "expected"),
    [("run_once", ["skipped", "skipped", "done"]), ("skip", ["skipped", "skipped", "skipped"])],
)
def test_runs_missed_during_downtime_follow_the_misfire_policy(
    db_engine: Engine, seed: Seed, misfire: str, expected: list[str]
) -> None:
    seed(readers(3))
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, Rules(DAILY), clock, misfire=misfire, grace_ms=HOUR)
    scheduler.tick()
    clock.set(MONDAY + 2 * DAY + 12 * HOUR)  # down from Monday 00:00 to Wednesday 12:00
    scheduler.tick()
    assert [r.status for r in runs(db_engine)] == expected
    assert len(sent_keys(db_engine)) == (3 if misfire == "run_once" else 0)
    late = [r for r in runs(db_engine) if r.status == "done"]
    assert all(r.late_ms == 4 * HOUR for r in late)  # Wednesday 08:00 UTC, run at 12:00
    # A run late by less than the grace time simply runs.
    clock.set(MONDAY + 3 * DAY + 8 * HOUR + 30 * 60_000)
    scheduler.tick()
    assert runs(db_engine)[-1].status == "done"


def test_customer_zone_schedule_pushes_each_customer_at_their_local_time(
    db_engine: Engine, seed: Seed
) -> None:
    seed(
        readers(2, start=1, zone="Europe/Berlin")
        + readers(2, start=10, zone="America/New_York")
        + readers(2, start=20, zone="Asia/Kolkata")
        + readers(2, start=30)  # no zone: the ruleset's default (UTC)
    )
    text = DAILY.replace('in "Europe/Berlin"', "in customer.timezone")
    clock = FixedClock(MONDAY - DAY)
    scheduler = make_scheduler(db_engine, Rules(text), clock)
    while clock.now_ms() <= MONDAY + DAY:
        scheduler.tick()
        clock.advance(15 * 60_000)
    rows = [r for r in send_rows(db_engine) if MONDAY <= r.due_ms < MONDAY + DAY]
    due = {r.customer_id: r.due_ms for r in rows}
    assert due == {
        1: MONDAY + 8 * HOUR,
        2: MONDAY + 8 * HOUR,
        10: MONDAY + 14 * HOUR,
        11: MONDAY + 14 * HOUR,
        20: MONDAY + 3 * HOUR + 30 * 60_000,
        21: MONDAY + 3 * HOUR + 30 * 60_000,
        30: MONDAY + 9 * HOUR,
        31: MONDAY + 9 * HOUR,
    }
    assert all(r.idempotency_key.endswith("2026-03-02T09:00") for r in rows)
    # Only ticks where some customer's local time matched left a run behind.
    assert all(r.evaluated == 2 for r in runs(db_engine) if r.fire_ms >= MONDAY)


def test_campaigns_firing_in_the_same_tick_compete_per_customer(db_engine: Engine, seed: Seed) -> None:
    seed(readers(4))
    text = (
        DAILY
        + """
campaign promo "Promo" {
    send template "promo"
    channel email
    priority 3
    schedule every day at 09:00 in "Europe/Berlin"
}
"""
    )
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, Rules(text), clock)
    scheduler.tick()
    clock.set(MONDAY + 8 * HOUR)
    [report] = scheduler.tick()
    assert report.enqueued == {"daily": 0, "promo": 4}
    assert Counter(r.customer_id for r in send_rows(db_engine)) == {1: 1, 2: 1, 3: 1, 4: 1}


def test_rules_edited_between_ticks_change_the_jobs(db_engine: Engine, seed: Seed) -> None:
    seed(readers(2))
    rules = Rules(DAILY)
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, rules, clock)
    scheduler.tick()
    rules.set(DAILY.replace("09:00", "18:00"))
    clock.set(MONDAY + 8 * HOUR)  # 09:00 Berlin: no longer the schedule
    assert scheduler.tick() == []
    clock.set(MONDAY + 17 * HOUR)
    assert len(scheduler.tick()) == 1
    rules.set(DAILY.replace("campaign daily", "campaign other"))
    clock.set(MONDAY + DAY)
    scheduler.tick()
    clock.set(MONDAY + DAY + 8 * HOUR)
    scheduler.tick()
    with db_engine.connect() as conn:
        jobs = {r.campaign: r for r in conn.execute(select(scheduled_jobs))}
    assert jobs["daily"].removed_ms == MONDAY + DAY
    assert jobs["other"].removed_ms is None
    assert [(r.campaign, r.occurrence) for r in runs(db_engine)] == [
        ("daily", "2026-03-02T17:00Z"),
        ("other", "2026-03-03T08:00Z"),
    ]


def test_queued_sends_of_an_ended_campaign_expire(db_engine: Engine, seed: Seed) -> None:
    seed(readers(2))
    text = DAILY.replace(
        "channel email", 'channel email\n    quiet 08:00..12:00 in "Europe/Berlin"\n    ends 2026-03-02T12:00'
    )
    rules = Rules(text)
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, rules, clock)
    scheduler.tick()
    clock.set(MONDAY + 8 * HOUR)
    scheduler.tick()
    assert scheduler.expire_sends() == 0
    assert {r.due_ms for r in send_rows(db_engine)} == {MONDAY + 11 * HOUR}  # deferred past quiet hours
    clock.set(MONDAY + 12 * HOUR)
    assert scheduler.expire_sends() == 2
    assert {r.status for r in send_rows(db_engine)} == {"expired"}


def test_audience_campaign_syncs_the_membership_difference(db_engine: Engine, seed: Seed) -> None:
    from dataclasses import replace

    from cadence.engine.campaign import ChannelPolicy

    seed(readers(3) + customers(2, start=10))
    base = Rules(DAILY.replace("channel email", "channel facebook"))
    assert base.current is not None
    campaign = replace(
        base.current.campaigns["daily"], kind="audience", channels=ChannelPolicy(("facebook",))
    )
    base.current = replace(base.current, campaigns={"daily": campaign})
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, base, clock)
    scheduler.tick()
    clock.set(MONDAY + 8 * HOUR)
    scheduler.tick()
    first = send_rows(db_engine)
    assert sorted((r.customer_id, r.variables["operation"]) for r in first) == [
        (1, "add"),
        (2, "add"),
        (3, "add"),
    ]
    # Customer 2 opts out of facebook and a new reader (50) arrives: next day, only the changes go.
    seed([SeedCustomer(id=50, events={"Email Opened": [MONDAY]})])
    with db_engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO consent (customer_id, channel, granted, source, changed_ms, event_id)"
            " VALUES (2, 'facebook', false, 'test', 0, 0)"
        )
    clock.set(MONDAY + DAY + 8 * HOUR)
    scheduler.tick()
    later = send_rows(db_engine)[len(first) :]
    assert sorted((r.customer_id, r.variables["operation"]) for r in later) == [(2, "remove"), (50, "add")]
    with db_engine.connect() as conn:
        members = sorted(conn.scalars(select(audience_members.c.customer_id)))
    assert members == [1, 3, 50]


SYNCED = """
event opened = "Email Opened"
campaign readers_fb "Readers, on Facebook" {
    audience  count(opened within 30d) > 0
    sync      audience to facebook with { audience_id: "aud-1" }
    schedule  every day at 09:00 in "Europe/Berlin"
}
"""


def test_a_compiled_sync_campaign_syncs_membership_through_the_push(db_engine: Engine, seed: Seed) -> None:
    seed(readers(2) + customers(2, start=10))  # 2 readers, 2 who never opened
    rules = Rules(SYNCED)
    assert rules.current is not None and rules.current.campaigns["readers_fb"].kind == "audience"
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, rules, clock)
    scheduler.tick()  # registers the job
    clock.set(MONDAY + 8 * HOUR)
    [report] = scheduler.tick()
    assert (report.audience_added, report.audience_removed) == (2, 0)
    first = send_rows(db_engine)
    assert sorted((r.customer_id, r.channel, r.template) for r in first) == [
        (1, "facebook", None),
        (2, "facebook", None),
    ]
    assert [r.variables for r in first] == [{"audience_id": "aud-1", "operation": "add"}] * 2
    # The next day nothing changed: nothing is queued again.
    clock.set(MONDAY + DAY + 8 * HOUR)
    scheduler.tick()
    assert len(send_rows(db_engine)) == 2
    with db_engine.connect() as conn:
        assert sorted(conn.scalars(select(audience_members.c.customer_id))) == [1, 2]


def test_enqueue_sends_counts_only_new_keys(db_engine: Engine, seed: Seed) -> None:
    from cadence.engine.sendqueue import enqueue_sends

    seed(customers(3))
    rows = [
        {
            "key": f"c:{i}:o",
            "campaign": "c",
            "customer_id": i,
            "channel": "email",
            "due_ms": MONDAY,
            "variables": {"n": i},
        }
        for i in (1, 2, 3)
    ]
    with db_engine.begin() as conn:
        assert enqueue_sends(conn, rows[:2], now_ms=MONDAY) == 2
        assert enqueue_sends(conn, rows, now_ms=MONDAY) == 1
    assert [r.variables for r in send_rows(db_engine)] == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_two_schedulers_that_both_saw_a_due_run_claim_it_once(db_engine: Engine, seed: Seed) -> None:
    """The candidates are read without the lock: both see the run; the claim under the lock decides."""
    both_looked = threading.Barrier(2, timeout=60)
    won: list[tuple[str, bool]] = []

    def claim_after_both_looked(s: Any) -> Callable[[int, int, int], bool]:
        claim = s._claim

        def wrapped(run_id: int, fire_ms: int, now: int) -> bool:
            both_looked.wait()  # each read the run as pending before either claims it
            got = claim(run_id, fire_ms, now)
            won.append((s.owner, got))
            return got

        return wrapped

    race_two_schedulers(
        db_engine, seed, 60, before_tick=lambda s: setattr(s, "_claim", claim_after_both_looked(s))
    )
    assert sorted(got for _, got in won) == [False, True]  # both tried; exactly one claimed
    winner = next(owner for owner, got in won if got)
    keys = sent_keys(db_engine)
    assert len(keys) == len(set(keys)) == 60
    [run_row] = runs(db_engine)
    assert (run_row.status, run_row.owner, run_row.evaluated) == ("done", winner, 60)


def test_an_idle_tick_reads_without_the_write_lock(
    db_engine: Engine, seed: Seed, write_locks: list[str]
) -> None:
    """Between fire times a tick (jobs, plan, due runs) and the expiry of ended campaigns only read.

    On SQLite they neither take the write lock nor wait for it: another connection holds it
    (``BEGIN IMMEDIATE``) while they run. A fire time still claims and pushes under it.
    """
    seed(readers(3))
    text = DAILY.replace("channel email", "channel email\n    ends 2026-03-09T00:00")
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, Rules(text), clock)
    scheduler.tick()  # registers the job
    clock.set(MONDAY + 2 * HOUR)
    write_locks.clear()
    holding = (
        holding_write_lock(db_engine) if db_engine.dialect.name == "sqlite" else contextlib.nullcontext()
    )
    with holding:
        assert scheduler.tick() == []
        assert scheduler.expire_sends() == 0  # not ended yet
        clock.set(MONDAY + 7 * DAY + HOUR)
        assert scheduler.expire_sends() == 0  # ended, with nothing queued
        clock.set(MONDAY + 2 * HOUR)
    assert write_locks == []
    assert runs(db_engine) == []
    clock.set(MONDAY + 8 * HOUR)
    [report] = scheduler.tick()
    assert report.total_enqueued == 3 and (write_locks or db_engine.dialect.name != "sqlite")
    assert [(r.status, r.owner) for r in runs(db_engine)] == [("done", "a")]
    clock.set(MONDAY + 9 * HOUR)
    write_locks.clear()
    assert scheduler.tick() == [] and write_locks == []


HELD = """
event opened = "Email Opened"
campaign held "Held back" {
    audience count(opened within 30d) > 0
    send template "digest"
    channel email
    split holdout 30%, main 70%
    schedule every day at 09:00 in "Europe/Berlin"
}
"""


def test_a_push_records_the_arm_of_every_customer_it_split_held_out_or_sent(
    db_engine: Engine, seed: Seed
) -> None:
    # A push records a decision for each send only: its held-out customers were in no lift.
    from cadence.engine.assignments import holdout_lifts
    from cadence.engine.decide import split_arm, stable_share
    from cadence.store.schema.decisions import arm_assignments

    seed(readers(40) + customers(5, start=100))  # 5 outside the audience draw no arm
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, Rules(HELD), clock)
    scheduler.tick()  # registers the job
    for day in range(2):  # two days' pushes: the first assignment stays
        clock.set(MONDAY + day * DAY + 8 * HOUR)
        scheduler.tick()
    campaign = Rules(HELD).current.campaigns["held"]  # type: ignore[union-attr]
    expected = {c: bool(split_arm(campaign.split, stable_share(c, "held")).holdout) for c in range(1, 41)}
    with db_engine.connect() as conn:
        got = {r.customer_id: (r.held, r.first_ms) for r in conn.execute(select(arm_assignments))}
        sent = set(conn.scalars(select(sends.c.customer_id)))
        lifts = holdout_lifts(conn, since_ms=MONDAY, until_ms=MONDAY + 3 * DAY)
    assert {c: held for c, (held, _ms) in got.items()} == expected
    assert {ms for _held, ms in got.values()} == {MONDAY + 8 * HOUR}  # the first day's push
    assert sent == {c for c, held in expected.items() if not held}
    n_held = sum(expected.values())
    assert 0 < n_held < 40
    assert [(r["campaign"], r["treated"], r["held_out"]) for r in lifts] == [("held", 40 - n_held, n_held)]
