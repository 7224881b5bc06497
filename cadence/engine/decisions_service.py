"""Deciding for a stored customer: read profile and history, run decide(), record and queue on commit.

The I/O edge around the pure :func:`~cadence.engine.decide.decide`: it resolves the
customer, loads the profile the engine loop keeps, reads recent sends from the send
queue as history, and, in ``commit`` mode, writes a ``decisions`` row, queues the send
(idempotently, keyed by the decision id) and, once the transaction committed, tells the
learners so that feedback carrying ``properties.decision_id`` is learned from.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any, Literal, Protocol

from sqlalchemy import Connection, event, select

from cadence.engine.assignments import ASSIGN_ARMS, arm_rows
from cadence.engine.campaign import CompiledRuleset
from cadence.engine.decide import decide
from cadence.engine.decision import Candidate, Decision, PastSend
from cadence.engine.decision_state import (
    CHECK_GROUP_PG,
    HISTORY_MS,
    DecisionInputs,
    DecisionState,
    committed_sends,
)
from cadence.engine.explanation import summarise
from cadence.engine.identity import resolve_customer
from cadence.engine.learners import Pending
from cadence.engine.learning import LearnerSubscriber
from cadence.engine.profiles import StoredProfile, load_profile
from cadence.engine.sendqueue import ENQUEUE_SENDS_SQL, enqueue_params, enqueue_sends, idempotency_key
from cadence.engine.slots import zone_named
from cadence.errors import IdentityError
from cadence.store.fast import driver_sql, dump_json
from cadence.store.schema.decisions import decisions
from cadence.store.schema.sends import sends

__all__ = [
    "AfterCommit",
    "DecidedGroup",
    "INSERT_DECISION",
    "DecisionRequestSpec",
    "GroupWriteError",
    "PreparedDecision",
    "RawTransaction",
    "commit_prepared",
    "decide_group",
    "decision_features",
    "decision_record",
    "explain",
    "get_decision",
    "history_of",
    "make_decision",
    "prepare_commit",
    "preview_from",
    "record_decision",
    "record_decisions",
]

#: One decision row; a caller that may write the same decision again appends ``ON CONFLICT (id) DO NOTHING``.
INSERT_DECISION = (
    "INSERT INTO decisions (id, customer_id, decided_at_ms, action, campaign, channel, send_at_ms, template, arm,"
    " ruleset_hash, explanation, inputs, outcome, learner_position, explored, suppressed)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?::jsontext, ?::jsontext, ?::jsontext, ?, ?, ?)"
)


def decision_row(
    decision_id: str,
    customer_id: int,
    now_ms: int,
    decision: Decision,
    explanation: str,
    inputs: str,
    pending: Pending | None,
) -> tuple[Any, ...]:
    """The parameters of :data:`INSERT_DECISION` for ``decision`` (``explanation`` and ``inputs`` as JSON text;
    no outcome yet; ``pending``: its features for the learners, which say how far they had read the log).

    What the dashboard's decision mix counts is kept beside the explanation: whether the chosen
    candidate was explored, and the suppressions' reasons (space-separated, in order).
    """
    chosen = decision.chosen()
    return (
        decision_id,
        customer_id,
        now_ms,
        decision.action,
        decision.campaign,
        decision.channel,
        decision.send_at_ms,
        decision.template,
        decision.arm,
        decision.ruleset_hash,
        explanation,
        inputs,
        "{}",
        None if pending is None else pending.position,
        chosen is not None and chosen.explored,
        " ".join(x.reason for x in decision.suppressions),
    )


#: What runs once a transaction committed (telling the learners about a decision it recorded).
AfterCommit = list[Callable[[], None]]


class RawTransaction:
    """A DBAPI connection (sqlite3 or psycopg) in a write transaction its caller began and ends.

    :func:`commit_prepared` writes through it with the driver's own cursors: SQLAlchemy's
    execution layer costs about 50 us a statement and 0.1-0.2 ms a transaction, as much
    as the writes of a commit themselves. The caller ends it with :meth:`commit` (which
    then tells the learners about the decisions recorded) or :meth:`rollback`.
    """

    __slots__ = ("after_commit", "postgres", "raw")

    def __init__(self, raw: Any, *, postgres: bool) -> None:
        self.raw = raw
        self.postgres = postgres
        #: Run by :meth:`commit` after the DBAPI commit succeeded; dropped by :meth:`rollback`.
        self.after_commit: AfterCommit = []

    def commit(self) -> None:
        """Commit; then tell the learners about the decisions it recorded (not if the commit failed)."""
        self.raw.commit()
        hooks, self.after_commit = self.after_commit, []
        for hook in hooks:
            hook()

    def rollback(self) -> None:
        """Roll back: the decisions recorded are forgotten, and the learners never hear of them."""
        self.after_commit = []
        self.raw.rollback()

    def execute(self, sql: str, params: Sequence[Any]) -> int:
        """Run ``sql`` (``?`` placeholders, ``?::json`` markers as ``dialect_sql`` reads them); the row count."""
        cur = self.raw.cursor()
        try:
            cur.execute(_raw_sql(sql, self.postgres), params)
            return int(cur.rowcount)
        finally:
            cur.close()


_RAW_SQL: dict[tuple[str, bool], str] = {}

#: :data:`~cadence.engine.decision_state.CHECK_GROUP_PG` with psycopg's named placeholders.
_CHECK_MANY_PSYCOPG = CHECK_GROUP_PG.replace("$1", "%(ids)s").replace("$2", "%(since)s")


def _raw_sql(sql: str, postgres: bool) -> str:
    """``sql`` with the driver's placeholders (:func:`~cadence.store.fast.driver_sql`, remembered).

    The decision row's documents are ``json`` columns (migration decisions_0003): cast to
    ``json``, not ``jsonb`` (the server would build the binary form only to turn it back).

    >>> _raw_sql(INSERT_DECISION, True).count("CAST(%s AS JSON)"), _raw_sql(INSERT_DECISION, False).count("CAST")
    (3, 0)
    """
    found = _RAW_SQL.get((sql, postgres))
    if found is None:
        found = _RAW_SQL[(sql, postgres)] = driver_sql(sql, postgres=postgres)
    return found


#: A write transaction: SQLAlchemy's, or a DBAPI connection's (:class:`RawTransaction`).
Transaction = Connection | RawTransaction


def _dbapi(conn: Transaction) -> Any:
    return conn.raw if isinstance(conn, RawTransaction) else conn.connection.dbapi_connection


def _is_postgres(conn: Transaction) -> bool:
    return conn.postgres if isinstance(conn, RawTransaction) else conn.dialect.name == "postgresql"


def _hooks(conn: Transaction, after_commit: AfterCommit | None) -> AfterCommit:
    """Where a decision recorded in ``conn`` leaves what must run once it committed.

    ``after_commit`` when the caller gives one (and runs it after its commit); else the
    :class:`RawTransaction`'s own list, or for a SQLAlchemy connection a list run by its
    transaction's ``commit`` event (as the commit is issued; a transaction rolled back never
    runs it). The served paths give a list or a :class:`RawTransaction`.
    """
    if after_commit is not None:
        return after_commit
    if isinstance(conn, RawTransaction):
        return conn.after_commit
    hooks: AfterCommit = []

    def run(_conn: Connection) -> None:
        for hook in hooks:
            hook()

    event.listen(conn, "commit", run, once=True)
    return hooks


def _lock_customer(conn: Connection, customer_ref: str) -> None:
    """Lock (PostgreSQL ``FOR UPDATE``) the customer a reference resolves to, until the transaction ends."""
    customer_id = resolve_customer(conn, customer_ref)
    if customer_id is not None:
        _lock_row(conn, customer_id)


def _lock_row(conn: Transaction | None, customer_id: int) -> None:
    """Lock one customer's row (PostgreSQL ``FOR UPDATE``) until the transaction ends."""
    assert conn is not None
    raw = _dbapi(conn)
    assert raw is not None
    cur = raw.cursor()
    try:
        cur.execute("SELECT id FROM customers WHERE id = %s FOR UPDATE", (customer_id,))
    finally:
        cur.close()


def history_of(
    conn: Connection, *, customer_id: int, ruleset: CompiledRuleset, now_ms: int
) -> list[PastSend]:
    """Sends queued or made for the customer in the last 35 days (and any still due)."""
    rows = conn.execute(
        select(sends.c.due_ms, sends.c.campaign, sends.c.channel).where(
            sends.c.customer_id == customer_id,
            sends.c.status.in_(("queued", "sending", "sent")),
            sends.c.due_ms > now_ms - HISTORY_MS,
        )
    )
    out = []
    for due_ms, campaign, channel in rows:
        known = ruleset.campaigns.get(campaign)
        out.append(
            PastSend(
                ts_ms=due_ms, campaign=campaign, channel=channel, exclusive=known.exclusive if known else None
            )
        )
    return out


def _iso(ms: int | None, zone: str | None, fallback: str) -> str | None:
    return None if ms is None else _iso_in(ms, zone_named(zone, fallback))


def _iso_in(ms: int | None, tz: tzinfo) -> str | None:
    """``ms`` as ISO-8601 with the offset of ``tz`` (the zone looked up once per decision): to the
    second, or to the millisecond when there are any. An immediate send is due at the decision's
    ``at``, and cut to the second it read up to 999 ms before it (an outside check).

    >>> from zoneinfo import ZoneInfo
    >>> _iso_in(1_772_701_200_000, ZoneInfo("Europe/Berlin")), _iso_in(None, ZoneInfo("UTC"))
    ('2026-03-05T10:00:00+01:00', None)
    >>> _iso_in(1_772_701_200_123, ZoneInfo("UTC"))
    '2026-03-05T09:00:00.123+00:00'
    """
    if ms is None:
        return None
    seconds, millis = divmod(ms, 1000)
    if not millis:
        return _iso_text(seconds, tz)
    at = datetime.fromtimestamp(seconds, tz=tz).replace(microsecond=millis * 1000)
    return at.isoformat(timespec="milliseconds")


@functools.lru_cache(maxsize=8192)
def _iso_text(seconds: int, tz: tzinfo) -> str:
    """``_iso_in``'s text of a whole second, kept: a decision formats each candidate's send time, and
    send times are whole hours shared by every customer of a zone (about 2 us each formatted, 0.1 us
    looked up)."""
    return datetime.fromtimestamp(seconds, tz=tz).isoformat()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


def _ranked(decision: Decision) -> list[Candidate]:
    """The candidates as the explanation lists them: the chosen option first, then the rest by score.

    Priority chooses before the score does, so the option sent may score below others (a campaign
    of higher priority worth a little against one worth more): a reader takes the first row for
    the choice (an outside check found the chosen option below another in 55 of 327 sends).

    >>> d = Decision(action="send", ruleset_hash="h", customer_id=1, decided_at_ms=0, campaign="rescue",
    ...              channel="push", send_at_ms=5, candidates=[Candidate("vip", "sms", 0, 0.222),
    ...              Candidate("rescue", "push", 5, 0.0), Candidate("vip", "email", 0, 0.3)])
    >>> [(c.campaign, c.channel) for c in _ranked(d)]
    [('rescue', 'push'), ('vip', 'email'), ('vip', 'sms')]
    """
    ranked = sorted(decision.candidates, key=lambda c: -c.score)
    if decision.action != "send":
        return ranked
    for i, c in enumerate(ranked):
        if (
            c.campaign == decision.campaign
            and c.channel == decision.channel
            and c.send_at_ms == decision.send_at_ms
            and c.arm == decision.arm
        ):
            if i:
                ranked.insert(0, ranked.pop(i))
            break
    return ranked


def explain(decision: Decision, *, zone: str | None, fallback_zone: str) -> dict[str, Any]:
    """The explanation as JSON: a summary, conditions with values, candidates with scores, suppressions, notes."""
    tz = zone_named(zone, fallback_zone)
    return {
        "summary": summarise(decision, zone=zone, fallback_zone=fallback_zone),
        "conditions": {
            name: [
                {"text": c.text, "value": _jsonable(c.value), "passed": c.passed, "stage": c.stage}
                for c in parts
            ]
            for name, parts in decision.conditions.items()
        },
        "candidates": [
            {
                "campaign": c.campaign,
                "channel": c.channel,
                "send_at": _iso_in(c.send_at_ms, tz),
                # float() first: a numpy scalar rounds ten times slower than a float
                "score": round(float(c.score), 6),
                "engagement": round(float(c.engagement), 6),
                "unsubscribe": round(float(c.unsubscribe), 6),
                "explored": c.explored,
                "arm": c.arm,
                # what the score was made from (null without the learners): see Candidate
                "draw": None if c.draw is None else round(float(c.draw), 6),
                "mean": None if c.mean is None else round(float(c.mean), 6),
            }
            for c in _ranked(decision)
        ],
        "suppressions": [
            {"campaign": s.campaign, "reason": s.reason, "detail": s.detail, "channel": s.channel}
            for s in decision.suppressions
        ],
        "holdout": list(decision.holdout),
        "notes": list(decision.notes),
    }


def make_decision(
    *,
    conn: Connection | None,
    ruleset: CompiledRuleset,
    customer_ref: str,
    now_ms: int,
    available_channels: Collection[str],
    learners: LearnerSubscriber | None,
    opt_in_channels: Collection[str] = (),
    mode: Literal["preview", "commit"] = "preview",
    context: Mapping[str, Any] | None = None,
    campaigns: Collection[str] | None = None,
    event: Mapping[str, Any] | None = None,
    decision_id: str | None = None,
    state: DecisionState | None = None,
    after_commit: AfterCommit | None = None,
) -> dict[str, Any]:
    """Decide for the customer behind ``customer_ref`` (user or anonymous id); record it on commit.

    ``conn`` is the transaction a commit writes in (required for ``commit``; a preview
    given ``state`` may pass None and reads on the cache's own connection). With
    ``state``, the profile comes from that per-process cache, checked against the
    database in the same statement that reads the sends. A committed decision is told
    to the learners only once ``conn``'s transaction commits: by the callables appended to
    ``after_commit``, which the caller runs after its commit, or (without it) by the
    transaction's commit.

    Raises :class:`~cadence.errors.IdentityError` when no customer has that id.
    """
    if mode == "commit" and conn is None:
        raise ValueError("make_decision: mode 'commit' needs conn, the transaction to record in")
    request = DecisionRequestSpec(
        ruleset=ruleset,
        customer_ref=customer_ref,
        now_ms=now_ms,
        available_channels=available_channels,
        learners=learners,
        opt_in_channels=opt_in_channels,
        mode=mode,
        context=context,
        campaigns=campaigns,
        event=event,
    )
    prepared = _prepare(request, conn=conn, state=state, decision_id=decision_id)
    if mode == "commit":
        assert conn is not None
        _record(conn, prepared, _hooks(conn, after_commit))
    return prepared.body


@dataclass(frozen=True)
class DecisionRequestSpec:
    """What one decision is asked for: the customer, the time, and what the caller allows."""

    ruleset: CompiledRuleset
    customer_ref: str
    now_ms: int
    available_channels: Collection[str]
    learners: LearnerSubscriber | None
    opt_in_channels: Collection[str] = ()
    mode: Literal["preview", "commit"] = "preview"
    context: Mapping[str, Any] | None = None
    campaigns: Collection[str] | None = None
    event: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class PreparedDecision:
    """A decision made (not yet recorded) and the inputs it was made from."""

    request: DecisionRequestSpec
    decision_id: str
    customer_id: int
    profile: StoredProfile
    history: list[PastSend]
    decision: Decision
    explanation: dict[str, Any]
    body: dict[str, Any]
    #: A sending commit's learner features, computed as it was decided (:func:`prepare_commit`); None:
    #: computed as it is recorded. Kept with the decision, so recording it again (its group rolled
    #: back) stores and registers the same features; told to the learners only once committed.
    pending: Pending | None = None


def record_decision(
    conn: Transaction,
    request: DecisionRequestSpec,
    *,
    state: DecisionState,
    decision_id: str | None = None,
    after_commit: AfterCommit | None = None,
) -> dict[str, Any]:
    """Decide the commit ``request`` in ``conn``'s transaction and record it (as :func:`make_decision`,
    ``after_commit`` included).

    On PostgreSQL the customer's row is locked before their sends are read. ``conn`` may be
    a :class:`RawTransaction`.

    Raises :class:`~cadence.errors.IdentityError` when no customer has that id.
    """
    if request.mode != "commit":
        raise ValueError("record_decision: the request's mode must be 'commit'")
    prepared = _prepare(request, conn=conn, state=state, decision_id=decision_id)
    _record(conn, prepared, _hooks(conn, after_commit))
    return prepared.body


def prepare_commit(
    request: DecisionRequestSpec, *, state: DecisionState, decision_id: str | None = None
) -> PreparedDecision:
    """Decide a commit from what the cache's own connection reads now, without a transaction.

    The decision is recorded later by :func:`commit_prepared`, which checks under the
    write lock that its inputs are still those it was made from (SQLite: so the write lock
    is held for the check and the writes, not for deciding).

    Raises :class:`~cadence.errors.IdentityError` when no customer has that id.
    """
    if request.mode != "commit":
        raise ValueError("prepare_commit: the request's mode must be 'commit'")
    return _prepare(request, conn=None, state=state, decision_id=decision_id, features=True)


def preview_from(
    request: DecisionRequestSpec, *, inputs: DecisionInputs, decision_id: str | None = None
) -> dict[str, Any]:
    """Decide the preview ``request`` from ``inputs`` read already (a batched check); nothing is written.

    The same answer :func:`make_decision` gives for the preview when its own check reads these inputs.
    """
    if request.mode != "preview":
        raise ValueError("preview_from: the request's mode must be 'preview'")
    return _prepare(request, conn=None, state=None, decision_id=decision_id, inputs=inputs).body


def commit_prepared(
    conn: Transaction,
    prepared: PreparedDecision,
    *,
    state: DecisionState,
    after_commit: AfterCommit | None = None,
) -> dict[str, Any]:
    """Record ``prepared`` in ``conn``'s transaction if its inputs still hold; else decide again in it
    (the learners hear of it once committed, as with :func:`make_decision`).

    The customer's sends and profile are read again on the transaction (which holds the
    write lock on SQLite): when the customer, the profile and the counting sends are
    exactly those the decision was made from, ``decide()`` would decide the same now (its
    randomness is seeded by the decision id), and the decision is recorded as made;
    otherwise (a send queued meanwhile, by this group or another worker, a profile
    changed) it is decided again from what the transaction reads, under the same id.
    Either way caps hold as with deciding in the transaction.
    """
    request = prepared.request
    if _is_postgres(conn):  # one commit at a time per customer, as in make_decision
        _lock_row(conn, prepared.customer_id)
    inputs = state.inputs(
        request.customer_ref, now_ms=request.now_ms, ruleset=request.ruleset, transaction=_dbapi(conn)
    )
    if (
        inputs is not None
        and inputs.customer_id == prepared.customer_id
        and (inputs.profile is prepared.profile or inputs.profile == prepared.profile)
        and inputs.history == prepared.history
    ):
        state.revalidated += 1
        _record(conn, prepared, _hooks(conn, after_commit))
        return prepared.body
    state.redecided += 1
    again = _prepare(request, conn=conn, state=state, decision_id=prepared.decision_id)
    _record(conn, again, _hooks(conn, after_commit))
    return again.body


def _prepare(
    request: DecisionRequestSpec,
    *,
    conn: Transaction | None,
    state: DecisionState | None,
    decision_id: str | None,
    inputs: DecisionInputs | None = None,
    features: bool = False,
) -> PreparedDecision:
    """Read the customer's inputs (on ``conn`` or the cache's own connection), unless given, and decide.

    With ``features``, a decision that sends also gets its learner features now (``pending``),
    right after the scoring that read the same learner state (see :func:`_pending`).
    """
    customer_ref, now_ms, ruleset, learners = (
        request.customer_ref,
        request.now_ms,
        request.ruleset,
        request.learners,
    )
    # On PostgreSQL a commit locks the customer's row before reading their sends: one commit at a
    # time per customer, so the history read includes a send another worker's commit queued a
    # moment ago (its transaction ends before ours reads). SQLite's write lock already does that.
    lock = request.mode == "commit" and conn is not None and _is_postgres(conn)
    if inputs is not None:
        customer_id, profile, history = inputs.customer_id, inputs.profile, inputs.history
    elif state is not None:
        locked = state.customer_of(customer_ref) if lock else None
        if locked is not None:
            _lock_row(conn, locked)
        raw = _dbapi(conn) if conn is not None else None
        inputs = state.inputs(customer_ref, now_ms=now_ms, ruleset=ruleset, transaction=raw)
        held = {locked}
        while lock and inputs is not None and inputs.customer_id not in held:
            # Not known before (or merged since): lock, then read again, until the customer read is
            # one locked: a merge that committed while the lock waited for it leads to the customer
            # it joined (and moved the sends to), whose commits must wait for this one too.
            _lock_row(conn, inputs.customer_id)
            held.add(inputs.customer_id)
            inputs = state.inputs(customer_ref, now_ms=now_ms, ruleset=ruleset, transaction=raw)
        if inputs is None:
            raise IdentityError(f"customer_id: no customer with user or anonymous id {customer_ref!r}")
        customer_id, profile, history = inputs.customer_id, inputs.profile, inputs.history
    else:
        if conn is None or isinstance(conn, RawTransaction):
            raise ValueError("make_decision: give conn (a SQLAlchemy connection) or state")
        if lock:
            _lock_customer(conn, customer_ref)
        found = resolve_customer(conn, customer_ref)
        if found is None:
            raise IdentityError(f"customer_id: no customer with user or anonymous id {customer_ref!r}")
        customer_id = found
        profile = load_profile(conn, customer_id, now_ms=now_ms)
        history = history_of(conn, customer_id=customer_id, ruleset=ruleset, now_ms=now_ms)
    decision_id = decision_id or secrets.token_hex(16)  # 32 hex digits, as uuid4().hex (cheaper)
    seed = int.from_bytes(hashlib.blake2b(decision_id.encode(), digest_size=4).digest(), "big")
    decision = decide(
        ruleset=ruleset,
        profile=profile,
        now_ms=now_ms,
        history=history,
        available_channels=request.available_channels,
        opt_in_channels=request.opt_in_channels,
        scorer=learners.scorer() if learners is not None else None,
        event=request.event,
        campaigns=request.campaigns,
        context=request.context,
        seed=seed,
    )
    fallback = ruleset.settings.default_zone
    tz = zone_named(profile.timezone, fallback)
    explanation = explain(decision, zone=profile.timezone, fallback_zone=fallback)
    body: dict[str, Any] = {
        "decision_id": decision_id,
        "mode": request.mode,
        "action": decision.action,
        "customer_id": customer_id,
        "campaign": decision.campaign,
        "channel": decision.channel,
        "send_at": _iso_in(decision.send_at_ms, tz),
        "template": decision.template,
        "variables": _jsonable(decision.variables),
        "arm": decision.arm,
        "ruleset_hash": decision.ruleset_hash,
        "decided_at": _iso_in(now_ms, tz),
        "explanation": explanation,
    }
    if decision.action == "none":
        body["reasons"] = [
            f"{s['campaign']}: {s['reason']}{' on ' + s['channel'] if s['channel'] else ''} ({s['detail']})"
            for s in explanation["suppressions"]
        ]
    return PreparedDecision(
        request=request,
        decision_id=decision_id,
        customer_id=customer_id,
        profile=profile,
        history=history,
        decision=decision,
        explanation=explanation,
        body=body,
        pending=decision_features(learners, decision, profile, customer_id, now_ms) if features else None,
    )


class FeatureSource(Protocol):
    """What computes a decision's features for the learners (:class:`~cadence.engine.learning.LearnerSubscriber`)."""

    def pending_decision(self, **decision: Any) -> Pending: ...


def decision_features(
    learners: FeatureSource | None,
    decision: Decision,
    profile: Any,
    customer_id: int,
    now_ms: int,
) -> Pending | None:
    """The learner's features of a decision that sends (None for any other, or without learners),
    as they are now; remembered by the learner only once the decision is committed (an API
    commit's, a scheduled push's). ``profile``: what the decision read (its traits and zone)."""
    if decision.action != "send" or learners is None:
        return None
    assert decision.campaign and decision.channel and decision.send_at_ms is not None
    return learners.pending_decision(
        customer_id=customer_id,
        traits=profile.traits,
        zone=profile.timezone,
        campaign=decision.campaign,
        channel=decision.channel,
        send_at_ms=decision.send_at_ms,
        arm=decision.arm,
        now_ms=now_ms,
    )


def _record(conn: Transaction, prepared: PreparedDecision, after_commit: AfterCommit) -> None:
    """Write the decision row and queue its send (in ``conn``'s transaction); telling the learners
    is left in ``after_commit``."""
    row, send = _record_rows(prepared, after_commit)
    arms = arm_rows(prepared.decision, prepared.customer_id, prepared.request.now_ms)
    if isinstance(conn, RawTransaction):
        conn.execute(INSERT_DECISION, row)
        for arm in arms:
            conn.execute(ASSIGN_ARMS, arm)
    else:
        postgres = _is_postgres(conn)
        conn.exec_driver_sql(_raw_sql(INSERT_DECISION, postgres), row)
        if arms:
            conn.exec_driver_sql(_raw_sql(ASSIGN_ARMS, postgres), arms)
    if send is not None:
        if isinstance(conn, RawTransaction):
            queued = conn.execute(
                ENQUEUE_SENDS_SQL, enqueue_params([send], now_ms=prepared.request.now_ms)[0]
            )
        else:
            queued = enqueue_sends(conn, [send], now_ms=prepared.request.now_ms)
        prepared.body["queued"] = queued == 1


def _record_rows(
    prepared: PreparedDecision, after_commit: AfterCommit
) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
    """The decision's row and its send (None unless it sends); what tells the learners about it
    once committed goes in ``after_commit``."""
    decision, profile, body = prepared.decision, prepared.profile, prepared.body
    decision_id, customer_id = prepared.decision_id, prepared.customer_id
    learners, now_ms = prepared.request.learners, prepared.request.now_ms
    stored_inputs: dict[str, Any] = {"traits": _jsonable(profile.traits), "zone": profile.timezone}
    # the learner's features (computed as it was decided, or now), kept so a restart learns this decision
    # exactly; the learner remembers it only once committed (a rolled-back decision must not become a label)
    pending = prepared.pending
    if pending is None:
        pending = decision_features(learners, decision, profile, customer_id, now_ms)
    if pending is not None:
        assert learners is not None
        stored_inputs["features"] = pending.stored()
        after_commit.append(functools.partial(learners.remember, decision_id, pending))
    # driver-level: SQLAlchemy's insert().values() spends about 0.6 ms building a cache key
    row = decision_row(
        decision_id,
        customer_id,
        now_ms,
        decision,
        dump_json(prepared.explanation),
        dump_json(stored_inputs),
        pending,
    )
    if decision.action != "send":
        return row, None
    assert decision.campaign and decision.channel and decision.send_at_ms is not None
    send = {
        "key": idempotency_key(decision.campaign, customer_id, decision_id),
        "campaign": decision.campaign,
        "customer_id": customer_id,
        "channel": decision.channel,
        "due_ms": decision.send_at_ms,
        "template": decision.template,
        "variables": dict(body["variables"] or {}),
        "decision_id": decision_id,
    }
    # Once committed, this process's previews check the customer again (not waiting for the notification).
    after_commit.append(functools.partial(committed_sends, customer_id))
    return row, send


#: The customers of a group of commits locked in one statement, in id order (as every group locks them).
_LOCK_MANY = "SELECT id FROM customers WHERE id = ANY(%s) ORDER BY id FOR UPDATE"


class GroupWriteError(RuntimeError):
    """A group's rows were not all written as expected (its transaction must roll back)."""


def record_decisions(
    conn: RawTransaction,
    requests: Sequence[DecisionRequestSpec],
    *,
    state: DecisionState,
    after_commit: AfterCommit | None = None,
) -> list[dict[str, Any] | IdentityError]:
    """Decide and record a group of commits in ``conn``'s transaction; each answer, or its error, in place.

    On PostgreSQL, when every request's customer is cached and no customer appears twice, the
    group takes four statements whatever its size: its customers' rows locked in one (in id
    order, as every group locks them, so two workers' groups wait for each other rather than
    deadlock), their sends and profile stamps read in one (after the locks: a send another
    worker's transaction queued for one of them is counted), and the decision rows and the
    sends written with one ``executemany`` each. A request whose cached profile changed is
    decided and recorded on its own (:func:`record_decision`, which reloads it). Otherwise
    (SQLite, an uncached or repeated customer) each request is recorded on its own, in order.
    Raises when the transaction must roll back (a statement failed, a send was not queued).
    The learners hear of the decisions once committed (``after_commit``, as :func:`make_decision`).
    """
    hooks = _hooks(conn, after_commit)

    def alone(request: DecisionRequestSpec) -> dict[str, Any] | IdentityError:
        try:
            return record_decision(conn, request, state=state, after_commit=hooks)
        except IdentityError as exc:
            return exc

    customers = [state.fresh_customer_of(r.customer_ref) for r in requests]
    known = [c for c in customers if c is not None]
    if not conn.postgres or len(known) < len(requests) or len(set(known)) < len(known) or len(requests) < 2:
        return [alone(r) for r in requests]
    cur = conn.raw.cursor()
    try:
        cur.execute(_LOCK_MANY, (known,))
        cur.execute(
            _CHECK_MANY_PSYCOPG, {"ids": known, "since": min(r.now_ms for r in requests) - HISTORY_MS}
        )
        by_customer: dict[int, list[Any]] = {}
        for customer, *rest in cur.fetchall():
            by_customer.setdefault(customer, []).append(rest)
        group = decide_group(requests, by_customer, state=state, after_commit=hooks)
        out: list[dict[str, Any] | IdentityError] = [
            body if body is not None else alone(request)
            for request, body in zip(requests, group.bodies, strict=True)
        ]
        if group.rows:
            cur.executemany(_raw_sql(INSERT_DECISION, True), group.rows)
        if group.arms:
            cur.executemany(_raw_sql(ASSIGN_ARMS, True), group.arms)
        if group.sends:
            cur.executemany(_raw_sql(ENQUEUE_SENDS_SQL, True), group.sends)
            if cur.rowcount != len(group.sends):  # a send key taken already: each decided alone tells which
                raise GroupWriteError(
                    f"{len(group.sends) - cur.rowcount} of {len(group.sends)} sends were not queued"
                )
            group.mark_queued()
        state.grouped += len(group.rows)
        return out
    finally:
        cur.close()


@dataclass
class DecidedGroup:
    """A group of commits decided from one batched check, not yet written (see :func:`decide_group`)."""

    #: Each request's answer, or None: its cached inputs did not match the check (decide it on its own).
    bodies: list[dict[str, Any] | None]
    #: The decision rows (:data:`INSERT_DECISION`'s parameters) and the sends (:data:`ENQUEUE_SENDS_SQL`'s).
    rows: list[tuple[Any, ...]]
    sends: list[tuple[Any, ...]]
    #: The holdout-arm assignments the decisions drew (:data:`~cadence.engine.assignments.ASSIGN_ARMS`').
    arms: list[tuple[Any, ...]]
    #: The answers of the decisions that send, whose ``queued`` is set once their sends are written.
    queued: list[dict[str, Any]]

    def mark_queued(self) -> None:
        """Every send was written (one row each): say so in the answers."""
        for body in self.queued:
            body["queued"] = True


def decide_group(
    requests: Sequence[DecisionRequestSpec],
    rows_by_customer: dict[int, list[Any]],
    *,
    state: DecisionState,
    after_commit: AfterCommit,
) -> DecidedGroup:
    """Decide a group of commits (distinct cached customers) from the rows of one check, nothing written.

    ``rows_by_customer`` is what :data:`~cadence.engine.decision_state.CHECK_GROUP_PG` read for the
    group's customers, after their rows were locked, with an oldest send time at or before every
    request's own. A request whose cached inputs still match it is decided now (its rows and send
    returned, telling the learners left in ``after_commit``); any other gets None in ``bodies``
    and must be decided and recorded on its own (its profile reloaded).
    """
    group = DecidedGroup(bodies=[], rows=[], sends=[], arms=[], queued=[])
    for request in requests:
        inputs = state.inputs_from(
            request.customer_ref, rows_by_customer, now_ms=request.now_ms, ruleset=request.ruleset
        )
        if inputs is None:  # changed since cached (or merged, erased)
            group.bodies.append(None)
            continue
        prepared = _prepare(request, conn=None, state=None, decision_id=None, inputs=inputs)
        row, send = _record_rows(prepared, after_commit)
        group.rows.append(row)
        group.arms.extend(arm_rows(prepared.decision, prepared.customer_id, request.now_ms))
        if send is not None:
            group.sends.append(enqueue_params([send], now_ms=request.now_ms)[0])
            group.queued.append(prepared.body)
        group.bodies.append(prepared.body)
    return group


def decision_record(row: Any, *, send_status: str | None, fallback_zone: str) -> dict[str, Any]:
    """A stored decision row as the API returns it.

    A scheduled push stores no per-customer explanation (``{"push": {occurrence, run_id}}``):
    it gets a summary that says so, as an API decision's explanation has one.
    """
    zone = (row.inputs or {}).get("zone")
    explanation = row.explanation
    if (
        isinstance(explanation, dict)
        and isinstance(explanation.get("push"), dict)
        and "summary" not in explanation
    ):
        push = explanation["push"]
        explanation = {
            "summary": f"Send {row.campaign} by {row.channel} on {_iso(row.send_at_ms, zone, fallback_zone)}:"
            f" chosen by the scheduled push of {push.get('occurrence')} (run {push.get('run_id')}), which"
            f" keeps no explanation per customer (`cadence explain {row.campaign} --customer ID` gives one"
            " as of now).",
            **explanation,
        }
    return {
        "decision_id": row.id,
        "action": row.action,
        "customer_id": row.customer_id,
        "campaign": row.campaign,
        "channel": row.channel,
        "send_at": _iso(row.send_at_ms, zone, fallback_zone),
        "template": row.template,
        "arm": row.arm,
        "ruleset_hash": row.ruleset_hash,
        "decided_at": _iso(row.decided_at_ms, zone, fallback_zone),
        "explanation": explanation,
        "outcome": {
            "send_status": send_status,
            **{k: _iso(v, zone, fallback_zone) for k, v in (row.outcome or {}).items()},
        },
    }


def get_decision(conn: Connection, *, decision_id: str, fallback_zone: str = "UTC") -> dict[str, Any] | None:
    """A recorded decision with its outcome so far, or None."""
    row = conn.execute(select(decisions).where(decisions.c.id == decision_id)).first()
    if row is None:
        return None
    status = conn.scalar(select(sends.c.status).where(sends.c.decision_id == decision_id).limit(1))
    return decision_record(row, send_status=status, fallback_zone=fallback_zone)
