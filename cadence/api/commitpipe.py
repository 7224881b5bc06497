"""PostgreSQL commits recorded in groups on the event loop, without a thread and without blocking.

A commit over HTTP used to be queued for a worker thread, which ran its group's transaction
(:class:`~cadence.api.routers.decisions.DecisionGroups`) and handed the answers back: three
switches of the interpreter lock between the event loop and that thread per commit (queued ->
group start, the group, group end -> answered), each up to a switch interval (5 ms) when the
loop is busy, and most of a commit's tail on a loaded machine. :class:`CommitPipeline` runs
the same group transaction on the event loop instead, as the preview batcher runs its check
(:mod:`cadence.api.previewbatch`): on a connection of its own in libpq's pipeline and
non-blocking modes, its socket watched by the loop. A group takes two round trips:

1. ``BEGIN``; the group's customers' rows locked in one statement (id order, as every group
   locks them: two workers' groups wait for each other instead of deadlocking); their sends
   and profile stamps read in one statement after the locks (a send another worker's
   transaction queued for one of them meanwhile is counted);
2. the decisions, made on the loop from those rows (:func:`~cadence.engine.decisions_service.decide_group`),
   written as one prepared ``INSERT`` each, their sends and holdout-arm assignments likewise,
   and ``COMMIT``, all sent together.

The learners hear of the decisions, and each request is answered, only once ``COMMIT`` returned.
A group holds one commit per customer (a later commit of a customer waits for the next group,
which reads the sends the earlier one queued): caps and spacing hold as with one transaction
per commit. At most one group is in flight per process: the busier the loop, the larger the group.

Anything else is handed back (``redo``: the thread path, which reads and decides it in its own
transaction): a commit whose cached entry no longer matches the check (its profile is reloaded
there), and every commit of a group whose statements failed (a lock wait that deadlocked, a
broken connection) before ``COMMIT`` was sent; the failed transaction rolled back (its connection
is closed) and wrote nothing, so each commit is then recorded exactly once. A group whose
connection broke after ``COMMIT`` was sent may or may not have committed: its requests are
answered with the error, not recorded again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cadence.api.loopconn import LoopConnection
from cadence.engine.assignments import ASSIGN_ARMS
from cadence.engine.decision_state import CHECK_GROUP_PG, CHECK_SESSION_PG, HISTORY_MS, DecisionState
from cadence.engine.decisions_service import (
    INSERT_DECISION,
    AfterCommit,
    DecidedGroup,
    DecisionRequestSpec,
    decide_group,
)
from cadence.engine.sendqueue import ENQUEUE_SENDS_SQL
from cadence.store.fast import array_literal, driver_sql

__all__ = ["CommitPipeline", "InDoubtError"]

log = logging.getLogger("cadence.api.commits")

#: How a commit's answer (its decision's body) or exception gets back to its request.
Settle = Callable[[Any], None]
#: Hands a commit to the ordinary (thread) path, which decides and records it on its own.
Redo = Callable[[], None]

_ON_CONFLICT = " ON CONFLICT (idempotency_key) DO NOTHING"

_LOCK = (
    b"cadence_commit_lock",
    "SELECT id FROM customers WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE",
)
_CHECK = (b"cadence_commit_check", CHECK_GROUP_PG)


def _numbered(sql: str) -> str:
    """``%s`` placeholders as libpq's ``$1, $2, ...``.

    >>> _numbered("INSERT INTO t VALUES (%s, CAST(%s AS JSON))")
    'INSERT INTO t VALUES ($1, CAST($2 AS JSON))'
    """
    parts = sql.split("%s")
    return "".join(part + (f"${n}" if n < len(parts) else "") for n, part in enumerate(parts, start=1))


_DECISION = (b"cadence_commit_decision", _numbered(driver_sql(INSERT_DECISION, postgres=True)))
_ARM = (b"cadence_commit_arm", _numbered(driver_sql(ASSIGN_ARMS, postgres=True)))
# Without ON CONFLICT: a send whose key is taken fails the group's transaction (which then rolls back
# and each commit is recorded on its own), instead of committing a decision without its send.
assert ENQUEUE_SENDS_SQL.endswith(_ON_CONFLICT)
_SEND = (
    b"cadence_commit_send",
    _numbered(driver_sql(ENQUEUE_SENDS_SQL.removesuffix(_ON_CONFLICT), postgres=True)),
)


class InDoubtError(RuntimeError):
    """The connection broke after ``COMMIT`` was sent: the group may or may not have committed."""


def _param(value: Any) -> bytes | None:
    """A parameter in PostgreSQL's text format.

    >>> [_param(v) for v in (None, "a", 3, True)]
    [None, b'a', b'3', b'true']
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


@dataclass
class _Commit:
    customer_id: int
    spec: DecisionRequestSpec
    settle: Settle
    redo: Redo


@dataclass
class _Group:
    commits: list[_Commit]
    #: 1: lock and check sent (or the writes, before COMMIT); 2: COMMIT sent.
    phase: int = 1
    results: list[Any] = field(default_factory=list)
    decided: DecidedGroup | None = None
    hooks: AfterCommit = field(default_factory=list)


class CommitPipeline(LoopConnection):
    """Record PostgreSQL commits of cached customers in groups on the event loop (see the module)."""

    statements = (_LOCK, _CHECK, _DECISION, _SEND, _ARM)
    # Generic plans, as the preview batcher's: left to itself, the plan cache plans the check anew at
    # every group wherever its custom plans look cheaper than the generic one (on the benchmark's own
    # data at the end of a run: 0.29-0.35 ms of PostgreSQL's CPU an execution against 0.07-0.17 ms
    # generic); whether it does depended on the statistics when the connection made its first plans.
    settings = CHECK_SESSION_PG
    pipeline = True
    what = "a commit group"

    def __init__(self, state: DecisionState, *, max_group: int = 64) -> None:
        super().__init__(state)
        self.max_group = max_group
        #: Groups committed, commits they recorded, and commits handed to the thread path.
        self.groups = 0
        self.recorded = 0
        self.redone = 0
        self._pending: list[_Commit] = []
        self._inflight: _Group | None = None

    def submit(self, customer_id: int, spec: DecisionRequestSpec, settle: Settle, redo: Redo) -> None:
        """Queue the commit ``spec`` of ``customer_id``; ``settle`` gets its answer once committed.

        Called on the event loop; ``settle`` is called there (with the decision's body, or an
        exception), or ``redo`` instead (see the module), exactly once.
        """
        self._queue(_Commit(customer_id, spec, settle, redo))

    def close(self) -> None:
        """Close the connection (at shutdown): queued commits and an unsent group go to the thread path."""
        group, self._inflight = self._inflight, None
        waiting, self._pending = self._pending, []
        self._drop()
        if group is not None:
            self._abandon(group, in_doubt=group.phase == 2)
        self._redo(waiting)

    # -- one group at a time
    def _take(self) -> list[_Commit]:
        """The next group: queued commits in order, one per customer, at most ``max_group``."""
        group: list[_Commit] = []
        rest: list[_Commit] = []
        seen: set[int] = set()
        for commit in self._pending:
            if len(group) < self.max_group and commit.customer_id not in seen:
                seen.add(commit.customer_id)
                group.append(commit)
            else:
                rest.append(commit)
        self._pending = rest
        return group

    def _send(self) -> None:
        self._scheduled = False
        if self._inflight is not None or not self._pending:
            return
        group = _Group(self._take())
        self._inflight = group
        try:
            pgconn = self._connection().pgconn
            ids = array_literal("bigint", sorted(c.customer_id for c in group.commits)).encode()
            since = min(c.spec.now_ms for c in group.commits) - HISTORY_MS
            pgconn.send_query_params(b"BEGIN", None)
            pgconn.send_query_prepared(_LOCK[0], [ids])
            pgconn.send_query_prepared(_CHECK[0], [ids, str(since).encode()])
            pgconn.pipeline_sync()
            self._watch(pgconn)
        except Exception:  # noqa: BLE001 - nothing was written: each commit goes the thread path
            log.warning("a commit group failed to send; recording each on its own", exc_info=True)
            self._fail()

    def _readable(self) -> None:
        from psycopg.pq import ExecStatus

        group, conn = self._inflight, self._conn
        if group is None or conn is None:
            return
        try:
            pgconn = conn.pgconn
            pgconn.consume_input()
            while True:
                if pgconn.is_busy():
                    return  # more of the answer to come
                res = pgconn.get_result()
                if res is None:  # the end of one statement's results
                    continue
                if res.status == ExecStatus.PIPELINE_SYNC:
                    break
                group.results.append(res)
            self._loop.remove_reader(self._fd)
        except Exception:  # noqa: BLE001 - the connection broke
            log.warning("a commit group's connection failed", exc_info=True)
            self._fail()
            return
        if group.phase == 1:
            self._checked(group)
        else:
            self._committed(group)

    def _checked(self, group: _Group) -> None:
        """The locks are held and the check read: decide the group, send its writes and ``COMMIT``."""
        from psycopg.pq import ExecStatus

        try:
            begin, locked, checked = group.results
            if begin.status != ExecStatus.COMMAND_OK or locked.status != ExecStatus.TUPLES_OK:
                raise RuntimeError(
                    f"locking a commit group failed: {(locked.error_message or begin.error_message)!r}"
                )
            if checked.status != ExecStatus.TUPLES_OK:
                raise RuntimeError(f"checking a commit group failed: {checked.error_message!r}")
            by_customer = self._by_customer(checked)
            decided = group.decided = decide_group(
                [c.spec for c in group.commits], by_customer, state=self.state, after_commit=group.hooks
            )
            group.results = []
            pgconn = self._conn.pgconn
            for row in decided.rows:
                pgconn.send_query_prepared(_DECISION[0], [_param(v) for v in row])
            for send in decided.sends:
                pgconn.send_query_prepared(_SEND[0], [_param(v) for v in send])
            for arm in decided.arms:
                pgconn.send_query_prepared(_ARM[0], [_param(v) for v in arm])
            pgconn.send_query_params(b"COMMIT", None)
            group.phase = 2  # from here the server may commit whatever we hear back
            pgconn.pipeline_sync()
            self._watch(pgconn)
        except Exception:  # noqa: BLE001
            # Before COMMIT: whatever reached the server rolls back with the connection, so each commit
            # goes the thread path; after it, the group is in doubt (answered with the error).
            log.warning("a commit group failed", exc_info=True)
            self._fail()

    def _committed(self, group: _Group) -> None:
        from psycopg.pq import ExecStatus

        decided = group.decided
        assert decided is not None
        *writes, commit = group.results
        failed = [r for r in writes if r.status != ExecStatus.COMMAND_OK]
        sends = writes[len(decided.rows) : len(decided.rows) + len(decided.sends)]
        if (
            failed
            or len(writes) != len(decided.rows) + len(decided.sends) + len(decided.arms)
            or any(r.command_tuples != 1 for r in sends)
            or commit.status != ExecStatus.COMMAND_OK
            or commit.command_status != b"COMMIT"
        ):
            # An error ended the transaction (the statements after it were not run; COMMIT with them):
            # nothing was recorded.
            message = failed[0].error_message if failed else commit.error_message
            log.warning("a commit group's writes failed (%r); recording each on its own", message)
            group.phase = 1
            self._fail()
            return
        self._inflight = None
        self.groups += 1
        self.recorded += len(decided.rows)
        self.state.grouped += len(decided.rows)
        # The next group's statements first, so that PostgreSQL locks and reads while this one is answered.
        self._send()
        for hook in group.hooks:  # committed: the learners hear of the decisions now
            try:
                hook()
            except Exception:  # noqa: BLE001 - the decisions are recorded; answer them anyway
                log.exception("telling the learners about a committed decision failed")
        decided.mark_queued()
        redo = []
        for commit, body in zip(group.commits, decided.bodies, strict=True):
            if body is None:
                redo.append(commit)
            else:
                commit.settle(body)
        self._redo(redo)

    def _fail(self) -> None:
        group, self._inflight = self._inflight, None
        self._drop()
        if group is not None:
            self._abandon(group, in_doubt=group.phase == 2)
        self._send_later()

    def _abandon(self, group: _Group, *, in_doubt: bool) -> None:
        """A group that did not commit goes to the thread path; one that may have committed is answered an error."""
        if not in_doubt:
            self._redo(group.commits)
            return
        error = InDoubtError(
            "the connection broke after COMMIT was sent: the commit may or may not be recorded"
        )
        for commit in group.commits:
            commit.settle(error)

    def _redo(self, commits: list[_Commit]) -> None:
        self.redone += len(commits)
        for commit in commits:
            try:
                commit.redo()
            except Exception as exc:  # noqa: BLE001 - every commit must be answered
                commit.settle(exc)
