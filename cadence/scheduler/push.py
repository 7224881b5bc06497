"""One scheduled run: evaluate the audience in chunks, decide per customer, enqueue idempotently.

:func:`push` walks the customers with a profile in id order, ``chunk_size`` at a time.
For each chunk it reads, in a handful of range queries, only what the rules need: the
profile rows (restricted in SQL to the time zones that are due, for customer-zone
schedules, and to the customers who meet the prefilter derived from the due
campaigns' audiences and channels, :mod:`cadence.scheduler.prefilter`), the per-event
stats and day buckets of the events the ruleset reads (``CompiledRuleset.aggregates``,
plus bounces), consent, and recent sends (for caps).
Every customer then goes through the same :func:`~cadence.engine.decide.decide` as an
API decision, restricted to the campaigns due for them in this tick, so caps, quiet
hours, holdouts and priority between campaigns firing together all apply; the winner
is queued with :func:`~cadence.engine.sendqueue.enqueue_sends` under the key
``campaign:customer:occurrence`` (the occurrence is the local wall-clock fire time).

Each chunk is read in one snapshot (:func:`~cadence.store.db.read_connection`: on SQLite
without the database's write lock) and decided holding nothing; then one short write
transaction re-asserts ownership of the run (so a process that lost it stops), queues the
chunk's sends and advances the run's cursor. A crash loses at most the chunk in flight,
which the next owner redoes; the idempotency keys make any overlap harmless.

Pushes and API commits (``POST /v1/decisions``, ``mode=commit``) share caps, spacing and
exclusive groups: before writing, the chunk locks the rows of the customers who got a send
(PostgreSQL: ``SELECT ... FOR UPDATE`` in id order, as the API's commit groups lock them, so
neither deadlocks the other; SQLite: the write transaction itself, ``BEGIN IMMEDIATE``,
serializes with every commit), reads their counting sends again in one statement, and
decides again each customer whose sends changed since the snapshot (a commit queued one
meanwhile). A commit that comes after waits for the lock and counts the push's send. Before
session 14 a chunk decided inside its write transaction: on SQLite every API commit waited
for the whole chunk (0.33-0.71 s p50 a chunk of 2,000, measured), and on PostgreSQL, which locked
nothing, a commit landing between the chunk's read and its insert gave a customer two
sends where the cap allowed one.

Audience-type campaigns (``Campaign.kind == "audience"``) send no message: the
members are compared with ``audience_members`` and each change is queued as an
``operation: add|remove`` send on the campaign's first channel, which the
``facebook`` (Custom Audiences, with ``audience_id``) and ``google_ads`` (Customer
Match, with ``user_list``) connectors turn into membership calls.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from cadence.clock import Clock
from cadence.engine.assignments import arm_rows, write_arms
from cadence.engine.campaign import DAY_MS, Campaign, CompiledRuleset, EvalContext
from cadence.engine.decide import decide
from cadence.engine.decision import Decision, PastSend, Scorer
from cadence.engine.decisions_service import INSERT_DECISION, decision_features, decision_row
from cadence.engine.profiles import StoredProfile
from cadence.engine.sendqueue import enqueue_params, enqueue_prepared, enqueue_sends, idempotency_key
from cadence.errors import CadenceError
from cadence.scheduler.prefilter import SqlCondition, push_prefilter
from cadence.store.db import read_connection
from cadence.store.fast import dialect_sql, dump_json, execute_many, fetch_in, is_postgres

if TYPE_CHECKING:  # only named in annotations: the learners' module loads numpy's model code
    from cadence.engine.learners import Pending

__all__ = ["DueCampaign", "LostRun", "PushLearners", "PushProfile", "PushReport", "load_profiles", "push"]

log = logging.getLogger("cadence.scheduler")

HISTORY_MS = 35 * DAY_MS
HORIZON_DAYS = 400
#: PostgreSQL's SQLSTATE for a transaction it rolled back to break a lock cycle.
DEADLOCK = "40P01"
#: How many times in a row a push decides a chunk again after its write deadlocked, before it fails.
MAX_DEADLOCK_RETRIES = 3
#: Events decide() reads whatever the rules say (a bounced address is never chosen).
ALWAYS_READ = ("Email Bounced", "Push Notification Bounced")


class PushLearners(Protocol):
    """What a push tells the learners (:class:`~cadence.engine.learning.LearnerSubscriber`): each send's
    features as decided, remembered once its chunk committed, as an API commit does."""

    def pending_decision(self, **decision: Any) -> Pending: ...

    def remember(self, decision_id: str, pending: Pending) -> None: ...


class LostRun(CadenceError):
    """Another process took this run over (this one was presumed dead): stop pushing."""


@dataclass(frozen=True)
class DueCampaign:
    """A campaign firing in this tick, with its run row and its occurrence label(s).

    ``label`` is the occurrence for every customer (campaign-zone schedules);
    ``zones`` maps each due zone to its local label (customer-zone schedules), and
    customers in other zones are not due.
    """

    campaign: Campaign
    run_id: int
    fire_ms: int
    label: str | None = None
    zones: Mapping[str, str] | None = None

    def occurrence_for(self, zone: str) -> str | None:
        """The occurrence label for a customer in ``zone``, or None when not due for them."""
        if self.zones is None:
            return self.label
        return self.zones.get(zone)


@dataclass
class PushReport:
    """What a push did so far."""

    evaluated: int = 0
    chunks: int = 0
    enqueued: dict[str, int] = field(default_factory=dict)
    audience_added: int = 0
    audience_removed: int = 0
    #: Customers decided again under the lock: their sends changed after the chunk's snapshot.
    redecided: int = 0
    seconds: float = 0.0
    cursor: int = 0

    @property
    def total_enqueued(self) -> int:
        """Sends queued, all campaigns together."""
        return sum(self.enqueued.values())


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else (value or {})


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


def load_profiles(
    conn: Connection,
    *,
    after: int,
    limit: int,
    now_ms: int,
    events: Collection[str] | None,
    zones: Collection[str] | None = None,
    include_unzoned: bool = True,
    prefilter: SqlCondition | None = None,
) -> list[StoredProfile]:
    """The next ``limit`` profiles after customer id ``after``, with their aggregates and consent.

    :param events: only these events' stats and day buckets are read (None: all).
    :param zones: only customers whose stored zone is one of these (None: everyone);
        ``include_unzoned`` adds those with no zone (they fall back to the default zone).
    :param prefilter: only customers meeting this condition (:mod:`cadence.scheduler.prefilter`).
    """
    where = "customer_id > ?"
    params: list[Any] = [after]
    if zones is not None:
        zone_list = sorted(zones)
        marks = ", ".join("?" for _ in zone_list)
        parts = [f"timezone IN ({marks})"] if zone_list else []
        if include_unzoned:
            parts.append("timezone IS NULL")
        where += " AND (" + (" OR ".join(parts) or "1 = 0") + ")"
        params.extend(zone_list)
    if prefilter is not None:
        where += f" AND {prefilter.sql}"
        params.extend(prefilter.params)
    rows = conn.exec_driver_sql(
        dialect_sql(
            conn,
            "SELECT customer_id, traits, timezone, first_seen_ms, last_seen_ms FROM profiles"
            f" WHERE {where} ORDER BY customer_id LIMIT {int(limit)}",
        ),
        tuple(params),
    ).fetchall()
    if not rows:
        return []
    lo, hi = rows[0][0], rows[-1][0]
    stats: dict[int, dict[str, tuple[int, float, int, int, float | None]]] = {}
    days: dict[int, dict[str, dict[int, tuple[int, float]]]] = {}
    stats_sql = (
        "SELECT customer_id, event, count, sum_value, first_ms, last_ms, last_value FROM profile_event_stats"
        " WHERE customer_id BETWEEN ? AND ?"
    )
    daily_sql = (
        "SELECT customer_id, event, day, count, sum_value FROM profile_daily"
        " WHERE customer_id BETWEEN ? AND ? AND day >= ?"
    )
    since_day = now_ms // DAY_MS - HORIZON_DAYS
    if events is None:
        stat_rows = conn.exec_driver_sql(dialect_sql(conn, stats_sql), (lo, hi)).fetchall()
        day_rows = conn.exec_driver_sql(dialect_sql(conn, daily_sql), (lo, hi, since_day)).fetchall()
    else:
        wanted = sorted(set(events))
        stat_rows = fetch_in(conn, stats_sql + " AND event IN_VALUES", wanted, lo, hi) if wanted else []
        day_rows = (
            fetch_in(conn, daily_sql + " AND event IN_VALUES", wanted, lo, hi, since_day) if wanted else []
        )
    for cid, event, count, total, first, last, last_value in stat_rows:
        stats.setdefault(cid, {})[event] = (count, total, first, last, last_value)
    for cid, event, day, count, total in day_rows:
        days.setdefault(cid, {}).setdefault(event, {})[day] = (count, total)
    consent: dict[int, dict[str, bool]] = {}
    for cid, channel, granted in conn.exec_driver_sql(
        dialect_sql(
            conn, "SELECT customer_id, channel, granted FROM consent WHERE customer_id BETWEEN ? AND ?"
        ),
        (lo, hi),
    ):
        consent.setdefault(cid, {})[channel] = bool(granted)
    arms: dict[int, dict[str, bool]] = {}
    for cid, campaign, held in conn.exec_driver_sql(
        dialect_sql(
            conn, "SELECT customer_id, campaign, held FROM arm_assignments WHERE customer_id BETWEEN ? AND ?"
        ),
        (lo, hi),
    ):
        arms.setdefault(cid, {})[campaign] = bool(held)
    return [
        PushProfile(
            customer_id=cid,
            traits=_json(traits),
            timezone=zone,
            stats=stats.get(cid, {}),
            days=days.get(cid, {}),
            consent=consent.get(cid, {}),
            first_seen_ms=first,
            last_seen_ms=last,
            arms=arms.get(cid, {}),
        )
        for cid, traits, zone, first, last in rows
    ]


class PushProfile(StoredProfile):
    """A :class:`~cadence.engine.profiles.StoredProfile` whose windowed aggregates bisect sorted buckets.

    Same answers as its base class; a push asks each customer several windowed
    questions, so each event's day buckets become cumulative arrays on first use.
    """

    def _series(self, event: str) -> tuple[list[int], list[int], list[float]]:
        cache: dict[str, tuple[list[int], list[int], list[float]]] = self.__dict__.setdefault("_cache", {})
        found = cache.get(event)
        if found is None:
            buckets = sorted(self.days.get(event, {}).items())
            counts, sums = [0], [0.0]
            for _day, (count, total) in buckets:
                counts.append(counts[-1] + count)
                sums.append(sums[-1] + total)
            found = cache[event] = ([day for day, _ in buckets], counts, sums)
        return found

    def _range(self, event: str, since_ms: int, until_ms: int) -> tuple[int, int, list[int], list[float]]:
        days, counts, sums = self._series(event)
        lo = bisect.bisect_left(days, since_ms // DAY_MS)
        hi = bisect.bisect_right(days, (until_ms - 1) // DAY_MS)
        return lo, hi, counts, sums

    def count(self, event: str, since_ms: int, until_ms: int) -> int:
        lo, hi, counts, _sums = self._range(event, since_ms, until_ms)
        return counts[hi] - counts[lo] if hi > lo else 0

    def sum(self, event: str, prop: str, since_ms: int, until_ms: int) -> float:
        lo, hi, _counts, sums = self._range(event, since_ms, until_ms)
        return float(sums[hi] - sums[lo]) if hi > lo else 0.0


#: A customer's counting sends as read: (due_ms, campaign, channel), sorted (compared between two reads).
HistoryRows = list[tuple[int, str, str]]

_COUNTING = "status IN ('queued', 'sending', 'sent') AND due_ms > ?"


def _history_rows(conn: Connection, lo: int, hi: int, now_ms: int) -> dict[int, HistoryRows]:
    """The counting sends (the last 35 days, and any still due) of the customers ``lo``..``hi``."""
    out: dict[int, HistoryRows] = {}
    for cid, due_ms, campaign, channel in conn.exec_driver_sql(
        dialect_sql(
            conn,
            f"SELECT customer_id, due_ms, campaign, channel FROM sends WHERE customer_id BETWEEN ? AND ? AND {_COUNTING}",
        ),
        (lo, hi, now_ms - HISTORY_MS),
    ):
        out.setdefault(cid, []).append((due_ms, campaign, channel))
    return _sorted(out)


def _sorted(by_customer: dict[int, HistoryRows]) -> dict[int, HistoryRows]:
    """Each customer's rows in order, so that two reads of the same sends compare equal."""
    for rows in by_customer.values():
        rows.sort()
    return by_customer


def _recheck(
    conn: Connection, customer_ids: Sequence[int], now_ms: int
) -> tuple[set[int], dict[int, HistoryRows]]:
    """Under the write transaction: which of ``customer_ids`` are still customers of their own, and
    their counting sends.

    One statement. On PostgreSQL the customers' rows are locked first (``FOR UPDATE``, in id
    order, as every commit group of the API locks them, so the two wait for each other instead
    of deadlocking): a commit that queues a send for one of them afterwards reads ours. A
    customer erased or merged into another since the chunk's snapshot is not: the merge moved
    their sends to the customer they became, whom the push decides (or decided) as such.
    """
    if is_postgres(conn):
        fetch_in(conn, "SELECT id FROM customers WHERE id IN_VALUES ORDER BY id FOR UPDATE", customer_ids)
    found: set[int] = set()
    out: dict[int, HistoryRows] = {}
    # ``merged_into`` is read, not filtered on: ``WHERE merged_into IS NULL`` let PostgreSQL's
    # planner walk the merged_into index (every unmerged customer) instead of the ids' primary key,
    # which made the 100,000-customer push 20% slower (67.6 s against 56.0 s, session 22).
    for cid, merged_into, due_ms, campaign, channel in fetch_in(
        conn,
        "SELECT c.id, c.merged_into, s.due_ms, s.campaign, s.channel FROM customers c LEFT JOIN sends s"
        " ON s.customer_id = c.id AND s.status IN ('queued', 'sending', 'sent') AND s.due_ms > ?"
        " WHERE c.id IN_VALUES",
        customer_ids,
        now_ms - HISTORY_MS,
    ):
        if merged_into is not None:
            continue
        found.add(cid)
        if due_ms is not None:
            out.setdefault(cid, []).append((due_ms, campaign, channel))
    return found, _sorted(out)


def _past_sends(rows: HistoryRows, ruleset: CompiledRuleset) -> list[PastSend]:
    out = []
    for due_ms, campaign, channel in rows:
        known = ruleset.campaigns.get(campaign)
        out.append(PastSend(due_ms, campaign, channel, known.exclusive if known else None))
    return out


def push_decision_id(key: str) -> str:
    """The decision id of a pushed send: derived from its idempotency key, so a resumed
    push records the same decision once and feedback joins it.

    >>> push_decision_id("newsletter:42:2026-03-05T09:00") == push_decision_id("newsletter:42:2026-03-05T09:00")
    True
    """
    return "push-" + hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def _seed(customer_id: int, occurrence: str) -> int:
    digest = hashlib.blake2b(f"{customer_id}\x00{occurrence}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def _in_audience(campaign: Campaign, profile: StoredProfile, now_ms: int) -> bool:
    """Whether a customer belongs to an audience-type campaign now (dates, audience, unless, consent)."""
    if campaign.starts_ms is not None and now_ms < campaign.starts_ms:
        return False
    if campaign.ends_ms is not None and now_ms >= campaign.ends_ms:
        return False
    ctx = EvalContext(profile=profile, now_ms=now_ms)
    if campaign.audience is not None and not campaign.audience(ctx):
        return False
    if campaign.unless is not None and campaign.unless(ctx):
        return False
    channel = campaign.channels.channels[0] if campaign.channels.channels else None
    return channel is not None and profile.consented(channel) is not False


def _claim_chunk(conn: Connection, run_ids: Sequence[int], owner: str, now_ms: int) -> int:
    """Re-assert ownership of every run (locking their rows); the cursor to continue from."""
    sql = dialect_sql(
        conn, "UPDATE scheduled_runs SET heartbeat_ms = ? WHERE id = ? AND owner = ? AND status = 'running'"
    )
    for run_id in run_ids:
        if conn.exec_driver_sql(sql, (now_ms, run_id, owner)).rowcount != 1:
            raise LostRun(f"run {run_id} is no longer owned by {owner}")
    cursors = fetch_in(conn, "SELECT cursor FROM scheduled_runs WHERE id IN_VALUES", list(run_ids))
    return min(int(c[0]) for c in cursors)


#: A pushed decision's row: :data:`~cadence.engine.decisions_service.INSERT_DECISION` once per id.
_INSERT_PUSH_DECISION = INSERT_DECISION + " ON CONFLICT (id) DO NOTHING"


def _push_rows(
    customer_id: int,
    profile: StoredProfile,
    wanted: Mapping[str, tuple[str, int]],
    decision: Decision,
    now_ms: int,
    learners: PushLearners | None = None,
) -> tuple[int, tuple[Any, ...], tuple[Any, ...], tuple[str, Pending] | None]:
    """A pushed send's run id, decision row, send row (:func:`~cadence.engine.sendqueue.enqueue_params`'
    shape) and, with learners, its decision id and features for the learners to remember once committed.

    The features are stored with the decision, as an API commit stores them, so a restart
    registers the send exactly as it was made.
    """
    assert decision.campaign is not None
    assert decision.channel is not None and decision.send_at_ms is not None
    occurrence, run_id = wanted[decision.campaign]
    key = idempotency_key(decision.campaign, customer_id, occurrence)
    decision_id = push_decision_id(key)
    inputs: dict[str, Any] = {"traits": _jsonable(dict(profile.traits)), "zone": profile.timezone}
    learned: tuple[str, Pending] | None = None
    pending = decision_features(learners, decision, profile, customer_id, now_ms)
    if pending is not None:
        inputs["features"] = pending.stored()
        learned = (decision_id, pending)
    decided = decision_row(
        decision_id,
        customer_id,
        now_ms,
        decision,
        dump_json({"push": {"occurrence": occurrence, "run_id": run_id}}),
        dump_json(inputs),
        pending,
    )
    [send] = enqueue_params(
        [
            {
                "key": key,
                "decision_id": decision_id,
                "campaign": decision.campaign,
                "customer_id": customer_id,
                "channel": decision.channel,
                "due_ms": decision.send_at_ms,
                "template": decision.template,
                "variables": _jsonable(decision.variables),
            }
        ],
        now_ms=now_ms,
    )
    return run_id, decided, send, learned


def _read_cursor(conn: Connection, run_ids: Sequence[int], owner: str) -> int:
    """The cursor to continue from, read in the chunk's snapshot; :class:`LostRun` when a run is not ours."""
    rows = fetch_in(
        conn, "SELECT cursor, owner, status FROM scheduled_runs WHERE id IN_VALUES", list(run_ids)
    )
    if len(rows) != len(run_ids) or any(o != owner or st != "running" for _c, o, st in rows):
        raise LostRun(f"runs {list(run_ids)} are no longer owned by {owner}")
    return min(int(c) for c, _o, _st in rows)


def push(
    *,
    engine: Engine,
    ruleset: CompiledRuleset,
    due: Sequence[DueCampaign],
    owner: str,
    clock: Clock,
    available_channels: Collection[str],
    scorer: Scorer | None = None,
    learners: PushLearners | None = None,
    chunk_size: int = 2000,
    opt_in_channels: Collection[str] = (),
    on_chunk: Callable[[PushReport], None] | None = None,
    use_prefilter: bool = True,
) -> PushReport:
    """Push the campaigns in ``due`` (one tick, runs already claimed by ``owner``) to their audience.

    Returns when every customer is done (the runs are then ``done``); raises
    :class:`LostRun` when another process took a run over. ``on_chunk`` is called after
    each committed chunk (progress logs and metrics; tests use it to crash mid-push).
    ``use_prefilter`` narrows the customers read with :func:`~cadence.scheduler.prefilter.push_prefilter`
    (customers it leaves out could not have been sent anything; they are not counted as evaluated).
    ``learners`` remember each send once its chunk committed, so a send nobody answers is
    learned as a no at its horizon, as one an API commit queued is (before, the live learners
    knew a pushed send only once feedback joined it, and learned only the answered ones; a
    restart registered them all from the stored decisions).
    """
    started = time.perf_counter()
    report = PushReport()
    run_ids = [d.run_id for d in due]
    default_zone = ruleset.settings.default_zone
    messages = [d for d in due if d.campaign.kind == "message"]
    audiences = [d for d in due if d.campaign.kind == "audience"]
    events = {a.event for a in ruleset.aggregates} | set(ALWAYS_READ)
    zones: set[str] | None = None
    include_unzoned = False
    if all(d.zones is not None for d in due):
        zones = set()
        for d in due:
            zones.update(d.zones or {})
        include_unzoned = default_zone in zones
    names = ", ".join(d.campaign.name for d in due)

    def decide_one(
        profile: StoredProfile, wanted: dict[str, tuple[str, int]], rows: HistoryRows, now: int
    ) -> Decision:
        """decide() for one customer among the campaigns due for them, with these sends as history."""
        return decide(
            ruleset=ruleset,
            profile=profile,
            now_ms=now,
            history=_past_sends(rows, ruleset),
            available_channels=available_channels,
            opt_in_channels=opt_in_channels,
            scorer=scorer,
            campaigns=wanted,
            seed=_seed(profile.customer_id, next(iter(wanted.values()))[0]),
            explain=False,
        )

    # A push allocates millions of short-lived objects; without this every full collection
    # would also walk the whole long-lived heap of the server (about half the push's time).
    gc.freeze()
    deadlocks = 0
    try:
        while True:
            now = clock.now_ms()
            prefilter = (
                push_prefilter([d.campaign for d in due], now_ms=now, dialect=engine.dialect.name)
                if use_prefilter
                else None
            )
            # 1. Read the chunk in one snapshot, without the write lock (SQLite) or row locks.
            with read_connection(engine) as rconn:
                cursor = _read_cursor(rconn, run_ids, owner)
                profiles = load_profiles(
                    rconn,
                    after=cursor,
                    limit=chunk_size,
                    now_ms=now,
                    events=events,
                    zones=zones,
                    include_unzoned=include_unzoned,
                    prefilter=prefilter,
                )
                seen = (
                    _history_rows(rconn, profiles[0].customer_id, profiles[-1].customer_id, now)
                    if profiles
                    else {}
                )
            if not profiles:
                with engine.begin() as conn:
                    if _claim_chunk(conn, run_ids, owner, now) != cursor:
                        continue  # not ours to finish from this snapshot (see below): read again
                    conn.exec_driver_sql(
                        dialect_sql(
                            conn,
                            "UPDATE scheduled_runs SET status = 'done', finished_ms = ?, heartbeat_ms = ?"
                            " WHERE id = ? AND owner = ?",
                        ),
                        [(now, now, run_id, owner) for run_id in run_ids],
                    )
                break
            hi = profiles[-1].customer_id
            # 2. Decide every customer of the chunk from that snapshot, holding nothing.
            evaluated = 0
            per_run: dict[int, list[int]] = {run_id: [0, 0] for run_id in run_ids}  # evaluated, enqueued
            adds: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
            outs: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
            chosen: dict[int, tuple[StoredProfile, dict[str, tuple[str, int]], Decision]] = {}
            arms: list[tuple[str, int, bool, int]] = []

            for profile in profiles:
                zone = profile.timezone or default_zone
                wanted: dict[str, tuple[str, int]] = {}
                for d in messages:
                    occurrence = d.occurrence_for(zone)
                    if occurrence is not None:
                        wanted[d.campaign.name] = (occurrence, d.run_id)
                        per_run[d.run_id][0] += 1
                for d in audiences:
                    occurrence = d.occurrence_for(zone)
                    if occurrence is None:
                        continue
                    per_run[d.run_id][0] += 1
                    name = d.campaign.name
                    target = adds if _in_audience(d.campaign, profile, now) else outs
                    variables = d.campaign.template.variables(EvalContext(profile=profile, now_ms=now))
                    target.setdefault(name, []).append(
                        (profile.customer_id, occurrence, _jsonable(variables))
                    )
                if not wanted:
                    continue
                evaluated += 1
                decision = decide_one(profile, wanted, seen.get(profile.customer_id, []), now)
                # Held out or not, sent or not: the arms drawn are what a holdout lift counts.
                arms.extend(arm_rows(decision, profile.customer_id, now))
                if decision.action == "send" and decision.campaign in wanted:
                    chosen[profile.customer_id] = (profile, wanted, decision)
            # The rows to write, built before the lock (JSON and all); those decided again are rebuilt.
            rows_of = {cid: _push_rows(cid, *chosen[cid], now, learners) for cid in chosen}
            # 3. Write under the lock, briefly: ownership, the sending customers' sends read again
            #    (locked first on PostgreSQL) and those whose sends changed decided again, the writes.
            redone: list[int] = []
            redecided = 0
            try:
                with engine.begin() as conn:
                    if _claim_chunk(conn, run_ids, owner, now) != cursor:
                        # Only this owner moves the cursor; should it have moved anyway, the chunk was
                        # decided from a stale position: drop it and read again (nothing written).
                        continue
                    if chosen:
                        found, fresh = _recheck(conn, sorted(chosen), now)
                        for cid in list(chosen):
                            if cid not in found:  # erased or merged meanwhile: nobody to send to
                                del chosen[cid]
                                redone.append(cid)
                                continue
                            rows = fresh.get(cid, [])
                            if rows == seen.get(cid, []):
                                continue
                            # A send queued meanwhile (an API commit, say): decide again from what is there now.
                            redecided += 1
                            redone.append(cid)
                            profile, wanted, _old = chosen[cid]
                            decision = decide_one(profile, wanted, rows, now)
                            if decision.action == "send" and decision.campaign in wanted:
                                chosen[cid] = (profile, wanted, decision)
                            else:
                                del chosen[cid]
                    for cid in redone:
                        if cid in chosen:
                            rows_of[cid] = _push_rows(cid, *chosen[cid], now, learners)
                        else:
                            del rows_of[cid]
                    execute_many(conn, _INSERT_PUSH_DECISION, [r[1] for r in rows_of.values()])
                    new = enqueue_prepared(conn, [r[2] for r in rows_of.values()])
                    write_arms(conn, arms)
                    for run_id, _decision, _send, _learned in rows_of.values():
                        per_run[run_id][1] += 1
                    added_total = removed_total = 0
                    for d in audiences:
                        added, removed = _sync_audience(
                            conn, d, adds.get(d.campaign.name, []), outs.get(d.campaign.name, []), now
                        )
                        added_total += added
                        removed_total += removed
                        per_run[d.run_id][1] += added + removed
                    conn.exec_driver_sql(
                        dialect_sql(
                            conn,
                            "UPDATE scheduled_runs SET cursor = ?, evaluated = evaluated + ?, enqueued = enqueued + ?,"
                            " heartbeat_ms = ? WHERE id = ? AND owner = ?",
                        ),
                        [(hi, ev, enq, now, run_id, owner) for run_id, (ev, enq) in per_run.items()],
                    )
            except DBAPIError as exc:
                # PostgreSQL broke a lock cycle (another writer locked a customer of the chunk, then
                # one we hold) and rolled the chunk back: nothing was written, so read and decide it again.
                if getattr(exc.orig, "sqlstate", None) != DEADLOCK or deadlocks >= MAX_DEADLOCK_RETRIES:
                    raise
                deadlocks += 1
                log.warning("push %s: chunk after customer %d deadlocked; deciding it again", names, cursor)
                continue
            deadlocks = 0
            if learners is not None:  # committed: the learners may now count these sends
                for _run, _decision, _send, learned in rows_of.values():
                    if learned is not None:
                        learners.remember(*learned)
            report.evaluated += evaluated
            report.redecided += redecided
            report.audience_added += added_total
            report.audience_removed += removed_total
            for d in due:
                report.enqueued[d.campaign.name] = (
                    report.enqueued.get(d.campaign.name, 0) + per_run[d.run_id][1]
                )
            report.chunks += 1
            report.cursor = hi
            report.seconds = time.perf_counter() - started
            log.info(
                "push %s: %d customers evaluated, %d sends queued (%d new in this chunk, %d decided again),"
                " up to customer %d",
                names,
                report.evaluated,
                report.total_enqueued,
                new,
                redecided,
                hi,
            )
            if on_chunk is not None:
                on_chunk(report)
    finally:
        gc.unfreeze()
    report.seconds = time.perf_counter() - started
    return report


def _sync_audience(
    conn: Connection,
    due: DueCampaign,
    members: Sequence[tuple[int, str, dict[str, Any]]],
    others: Sequence[tuple[int, str, dict[str, Any]]],
    now_ms: int,
) -> tuple[int, int]:
    """Queue the membership changes of one chunk and record the new membership; (added, removed)."""
    campaign = due.campaign
    name = campaign.name
    ids = [m[0] for m in members] + [o[0] for o in others]
    if not ids:
        return 0, 0
    stored = {
        row[0]
        for row in fetch_in(
            conn,
            "SELECT customer_id FROM audience_members WHERE campaign = ? AND customer_id IN_VALUES",
            ids,
            name,
        )
    }
    channel = campaign.channels.channels[0]
    rows: list[dict[str, Any]] = []
    added = [m for m in members if m[0] not in stored]
    removed = [o for o in others if o[0] in stored]
    for op, changes in (("add", added), ("remove", removed)):
        for cid, occurrence, variables in changes:
            rows.append(
                {
                    "key": idempotency_key(name, cid, f"{occurrence}:{op}"),
                    "campaign": name,
                    "customer_id": cid,
                    "channel": channel,
                    "due_ms": now_ms,
                    "template": campaign.template.name or None,
                    "variables": {**variables, "operation": op},
                }
            )
    enqueue_sends(conn, rows, now_ms=now_ms)
    if added:
        conn.exec_driver_sql(
            dialect_sql(
                conn,
                "INSERT INTO audience_members (campaign, customer_id, added_ms, run_id) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (campaign, customer_id) DO NOTHING",
            ),
            [(name, m[0], now_ms, due.run_id) for m in added],
        )
    if removed:
        conn.exec_driver_sql(
            dialect_sql(conn, "DELETE FROM audience_members WHERE campaign = ? AND customer_id = ?"),
            [(name, o[0]) for o in removed],
        )
    return len(added), len(removed)
