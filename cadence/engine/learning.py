"""Learner state over time: snapshots in the database and the engine-loop subscriber.

:class:`LearnerSubscriber` is the engine loop's learner: it joins feedback events
(``properties.decision_id``) to the decisions they answer and teaches the
:class:`~cadence.engine.learners.DecisionLearner`; it snapshots the learner with the
event-log position it reflects, and on start loads the latest snapshot so the loop
replays only the events after it. A restart therefore does not change what the
learners know.

Snapshots are versioned per learner name. Pinning one (``cadence models pin``)
makes :meth:`LearnerSubscriber.scorer` serve that frozen version while the live
learner keeps learning; rolling back pins an older version; unpinning resumes the
live one.
"""

from __future__ import annotations

import logging
import pickle
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select, update

from cadence.channels import Feedback, decision_id_problem, feedback_kind
from cadence.clock import now_ms as wall_ms
from cadence.engine.identity import canonical_of
from cadence.engine.learners import DecisionLearner, LearnerConfig, Pending, learned_differences
from cadence.engine.loop import LoggedEvent, lock_batches
from cadence.engine.sendqueue import REACHED, UNSENT, settle_reached
from cadence.errors import CadenceError
from cadence.store.db import read_connection
from cadence.store.fast import dialect_insert
from cadence.store.schema.core import customers, erasures
from cadence.store.schema.decisions import decisions, learner_scrubs, learner_snapshots
from cadence.store.schema.sends import sends

__all__ = [
    "LearnerSubscriber",
    "SnapshotInfo",
    "UnknownSnapshot",
    "list_snapshots",
    "load_snapshot",
    "pin_snapshot",
    "save_snapshot",
    "scrub_snapshots",
    "snapshot_marker",
    "snapshot_position",
    "unpin",
]

SNAPSHOT_FORMAT = 1
log = logging.getLogger("cadence.learners")


class UnknownSnapshot(CadenceError):
    """No snapshot with that name and version."""


@dataclass(frozen=True)
class SnapshotInfo:
    """One stored snapshot, without its state."""

    name: str
    version: int
    position: int
    created_ms: int
    labels: int
    quality: dict[str, float | None]  # None: not defined yet (an AUC without both labels)
    pinned: bool
    size_bytes: int


def _dump(learner: DecisionLearner) -> bytes:
    return zlib.compress(pickle.dumps((SNAPSHOT_FORMAT, learner), protocol=pickle.HIGHEST_PROTOCOL), 3)


def _load(blob: bytes) -> DecisionLearner:
    # Snapshots are written by cadence itself into its own database: trusted input.
    fmt, learner = pickle.loads(zlib.decompress(blob))  # noqa: S301
    if fmt != SNAPSHOT_FORMAT or not isinstance(learner, DecisionLearner):
        raise CadenceError(f"learner snapshot format {fmt!r} is not supported (expected {SNAPSHOT_FORMAT})")
    return learner


def save_snapshot(
    conn: Connection,
    *,
    name: str,
    learner: DecisionLearner,
    now_ms: int,
    same_position: bool = False,
    state: bytes | None = None,
) -> int:
    """Store ``learner`` as the next version of ``name``; returns the version.

    ``now_ms`` is when the snapshot is made (the wall clock: ``created_ms``, which `cadence models
    list` shows), not the time of the last event learned. ``quality`` stores ``null`` for a
    measure not defined yet (see :meth:`DecisionLearner.recent_quality`).
    ``same_position``: when the newest snapshot is at the learner's log position and not pinned,
    rewrite it instead (an erasure's: a batch of erasures took one snapshot each at one position,
    and compaction, which keeps the newest few, then dropped every earlier one, every rollback point).
    ``state``: the learner already pickled (:meth:`LearnerSubscriber.prepare_snapshot`).
    """
    blob = state if state is not None else _dump(learner)
    newest = conn.execute(
        select(learner_snapshots.c.version, learner_snapshots.c.position, learner_snapshots.c.pinned)
        .where(learner_snapshots.c.name == name)
        .order_by(learner_snapshots.c.version.desc())
        .limit(1)
    ).first()
    if same_position and newest is not None and newest.position == learner.position and not newest.pinned:
        conn.execute(
            learner_snapshots.update()
            .where(learner_snapshots.c.name == name, learner_snapshots.c.version == newest.version)
            .values(
                created_ms=now_ms,
                labels=learner.labels,
                quality=learner.recent_quality(),
                state=blob,
            )
        )
        return int(newest.version)
    version = int(newest.version if newest is not None else 0) + 1
    conn.execute(
        learner_snapshots.insert().values(
            name=name,
            version=version,
            position=learner.position,
            created_ms=now_ms,
            labels=learner.labels,
            quality=learner.recent_quality(),
            state=blob,
            pinned=False,
        )
    )
    return version


def list_snapshots(conn: Connection, *, name: str) -> list[SnapshotInfo]:
    """Every snapshot of ``name``, newest first."""
    rows = conn.execute(
        select(
            learner_snapshots.c.name,
            learner_snapshots.c.version,
            learner_snapshots.c.position,
            learner_snapshots.c.created_ms,
            learner_snapshots.c.labels,
            learner_snapshots.c.quality,
            learner_snapshots.c.pinned,
            func.length(learner_snapshots.c.state),
        )
        .where(learner_snapshots.c.name == name)
        .order_by(learner_snapshots.c.version.desc())
    )
    return [
        SnapshotInfo(
            name=r[0],
            version=r[1],
            position=r[2],
            created_ms=r[3],
            labels=r[4],
            quality=dict(r[5] or {}),
            pinned=bool(r[6]),
            size_bytes=int(r[7] or 0),
        )
        for r in rows
    ]


def load_snapshot(
    conn: Connection, *, name: str, version: int | None = None, pinned: bool = False
) -> DecisionLearner | None:
    """A stored learner: ``version``, else the pinned one (``pinned=True``), else the latest."""
    query = select(learner_snapshots.c.state).where(learner_snapshots.c.name == name)
    if version is not None:
        query = query.where(learner_snapshots.c.version == version)
    elif pinned:
        query = query.where(learner_snapshots.c.pinned.is_(True))
    blob = conn.execute(query.order_by(learner_snapshots.c.version.desc()).limit(1)).scalar()
    if blob is None:
        if version is not None:
            raise UnknownSnapshot(f"no snapshot {version} of learner {name!r} (see `cadence models list`)")
        return None
    return _load(bytes(blob))


def snapshot_marker(conn: Connection, *, name: str) -> tuple[int | None, int | None]:
    """The latest and the pinned version of ``name`` (None where there is none): which snapshots a load finds."""
    snaps = learner_snapshots.c
    latest = conn.scalar(select(func.max(snaps.version)).where(snaps.name == name))
    pinned = conn.scalar(select(snaps.version).where(snaps.name == name, snaps.pinned.is_(True)))
    return latest, pinned


def snapshot_position(conn: Connection, *, name: str, version: int | None) -> int | None:
    """The event-log position ``version`` of ``name`` reflects (None without that snapshot)."""
    if version is None:
        return None
    snaps = learner_snapshots.c
    position = conn.scalar(select(snaps.position).where(snaps.name == name, snaps.version == version))
    return None if position is None else int(position)


def pin_snapshot(conn: Connection, *, name: str, version: int) -> None:
    """Serve ``version`` of ``name`` (frozen) until unpinned; rolling back is pinning an older version."""
    exists = conn.execute(
        select(learner_snapshots.c.id).where(
            learner_snapshots.c.name == name, learner_snapshots.c.version == version
        )
    ).first()
    if exists is None:
        raise UnknownSnapshot(f"no snapshot {version} of learner {name!r} (see `cadence models list`)")
    conn.execute(update(learner_snapshots).where(learner_snapshots.c.name == name).values(pinned=False))
    conn.execute(
        update(learner_snapshots)
        .where(learner_snapshots.c.name == name, learner_snapshots.c.version == version)
        .values(pinned=True)
    )


def unpin(conn: Connection, *, name: str) -> None:
    """Serve the live learner again."""
    conn.execute(update(learner_snapshots).where(learner_snapshots.c.name == name).values(pinned=False))


#: The columns of a ``decisions`` row a learner registers a decision from.
#: How far before its previous look (wall clock) a learner looks for the sends other processes
#: queued: a send's ``queued_ms`` is taken before its transaction commits (a commit group, a
#: push's chunk), so a row can become visible a little after a look that began later.
OTHERS_OVERLAP_MS = 10_000

_REGISTERED = (
    decisions.c.id,
    decisions.c.customer_id,
    decisions.c.campaign,
    decisions.c.channel,
    decisions.c.send_at_ms,
    decisions.c.arm,
    decisions.c.decided_at_ms,
    decisions.c.inputs,
    decisions.c.outcome,
)
#: Whether a send of the decision is not sent (queued, or held back by the dispatcher; a feedback
#: event's look-up reads it with the row).
_UNSENT = (
    select(sends.c.id)
    .where(sends.c.decision_id == decisions.c.id, sends.c.status.in_(UNSENT))
    .limit(1)
    .correlate(decisions)
    .exists()
    .label("unsent")
)


def _position(row: Any) -> int:
    """The log position a stored decision's features were computed at (-1: not stored, an older row)."""
    return -1 if row.learner_position is None else int(row.learner_position)


def _waiting_order(row: Any) -> tuple[int, int, str]:
    """The order a learner registers the decisions a look read: by position, then as they were made."""
    return _position(row), int(row.decided_at_ms), str(row.id)


#: The decision ids already reported as joining no decision (bounded: each is logged once per process).
_REPORTED_IDS: set[str] = set()


def _unjoined(event_id: int, decision_id: object, why: str) -> None:
    """Log, once per value, that a feedback event's ``properties.decision_id`` joins no decision
    (the API's answer already warned about a wrong shape; an import or a webhook only here)."""
    key = repr(decision_id)[:100]
    if key in _REPORTED_IDS or len(_REPORTED_IDS) >= 1000:
        return
    _REPORTED_IDS.add(key)
    log.warning(
        "event %d: properties.decision_id %s joins no decision (%s): the learners do not learn from it "
        "(said once per value)",
        event_id,
        key,
        why,
    )


class LearnerSubscriber:
    """The engine loop's learner: feedback in, snapshots out.

    Decisions are registered with :meth:`record` when they are committed (the API
    does this); feedback events that name an unknown ``decision_id`` are ignored.
    """

    name = "learners"
    in_memory = True  # the loop trusts start()'s position, not the stored checkpoint

    def __init__(
        self,
        runtime: Any = None,
        *,
        config: LearnerConfig | None = None,
        snapshot_every: int | None = None,
        snapshot_min_seconds: float | None = None,
        max_recall: int = 200_000,
        others_every: float = 1.0,
    ) -> None:
        settings = getattr(runtime, "settings", None)
        if config is None and settings is not None:
            config = settings.learner.to_config()
        self.config = config or LearnerConfig()
        # Relearning would lose what the retained log no longer holds.
        self._log_complete = getattr(settings, "event_retention_days", None) is None
        self.learner = DecisionLearner(self.config)
        self.pinned: DecisionLearner | None = None
        # Given here (tests), else the settings' (CADENCE_LEARNER_SNAPSHOT_EVENTS, _SECONDS).
        self.snapshot_every = (
            snapshot_every
            if snapshot_every is not None
            else getattr(settings, "learner_snapshot_events", 10_000)
        )
        self.max_recall = max_recall
        self._since_snapshot = 0
        #: Merged-away customer -> the customer it joined, as far as this learner knows
        #: (:meth:`fold_merged`, :meth:`apply`): a stored decision registered again (a restart's
        #: recall and replay, a late feedback) is the customer's it now belongs to.
        self._parents: dict[int, int] = {}
        #: Seconds between looks for the sends other processes queued (:meth:`_others`).
        self.others_every = others_every
        self._others_at = -float("inf")  # monotonic time of the last look
        self._others_ms: int | None = None  # its wall-clock time
        self._others_id: int | None = None  # the last ``sends.id`` a look read (None: not started)
        #: Decision id -> wall ms when this learner registered it (its own commits, recall, the
        #: looks), for as long as a look may still read its send: registered once, learned once.
        self._seen: dict[str, int] = {}
        #: The decisions a look read that wait for the log position their features were computed
        #: at (``decisions.learner_position``), in that order: see :meth:`_others`.
        self._waiting: deque[Any] = deque()
        # A snapshot pickles every customer's statistics (about a second at 20k customers):
        # on a fast replay, taking one every 10k events would cost more than the learning.
        self.snapshot_min_seconds = (
            snapshot_min_seconds
            if snapshot_min_seconds is not None
            else getattr(settings, "learner_snapshot_seconds", 30.0)
        )
        self._last_snapshot = time.monotonic()
        # Learning from the start of the log: (decisions registered up to this decided_at_ms,
        # the last one to register), see _backfill_decisions.
        self._backfill: tuple[int, int] | None = None
        # Replaying the log after a start: (stored decisions read up to this learner position, the
        # last position to read), see _replayed.
        self._replay: tuple[int, int] | None = None
        #: The snapshots :meth:`start` loaded, as :func:`snapshot_marker` gives them (None: not started).
        self.loaded_marker: tuple[int | None, int | None] | None = None
        #: The last erasure these learners know of (see :meth:`_forget_erased`).
        self._erasures = 0
        #: The learners forgot customers another process erased (before a batch, or on an idle
        #: poll): a snapshot is owed at once.
        self._erasure_owed = False
        #: True while a process whose loop does not lead applies the log to these learners
        #: (:meth:`~cadence.engine.loop.EngineLoop.follow_in_memory`): snapshots are the leader's.
        self.following = False

    def scorer(self) -> DecisionLearner:
        """What decisions should be scored with: the pinned snapshot if any, else the live learner."""
        return self.pinned or self.learner

    def start(self, conn: Connection, checkpoint: int) -> int:
        """Load the latest snapshot (and the pinned one); return the position it reflects.

        A snapshot takes the configured values of
        :data:`~cadence.engine.learners.DECISION_TIME_FIELDS`. When it was
        learned with other values of a field that shapes learning (the horizon, the label delay,
        the engagement events, a model choice), the learner starts afresh and learns again
        from the start of the event log, registering the stored decisions as the replay
        reaches the time each was made; unless events were deleted by retention, when the
        snapshot is kept as it is. A pinned snapshot is served as pinned either way.

        The decisions the live learners registered after the position it reflects are registered
        again where they were (``decisions.learner_position``) as the loop replays the log: see
        :meth:`_replayed`.
        """
        # Read in the transaction that loads them: a follower compares it with the stored one (see
        # cadence.api.routers.jobs) and reloads only when the leader stored or pinned another since.
        self.loaded_marker = snapshot_marker(conn, name=self.name)
        # The snapshots loaded forget every customer erased so far (below).
        self._erasures = _erasure_mark(conn)
        latest = self._adopted(load_snapshot(conn, name=self.name), what="latest", relearn=self._log_complete)
        self._backfill = None
        self._waiting.clear()
        if latest is None:
            self.learner = DecisionLearner(self.config)
            last = conn.scalar(
                select(func.max(decisions.c.decided_at_ms)).where(
                    decisions.c.action == "send", decisions.c.learner_position.is_(None)
                )
            )
            if last is not None:
                self._backfill = (-(2**62), int(last))
        else:
            self.learner = latest
            self.recall(conn)
        position = self.learner.position
        last = conn.scalar(
            select(func.max(decisions.c.learner_position)).where(decisions.c.learner_position.is_not(None))
        )
        self._replay = None if last is None or last < position else (position - 1, int(last))
        # Merges the snapshot does not reflect (made after it, or by the leader while this process
        # followed): the live learner folded them when they happened.
        self.fold_merged(conn)
        if self._replay is not None:  # those the live learners registered where the snapshot was taken
            for row in self._replayed(conn, position):
                self._register_again(row, replayed=True)
        # What was queued before is recall's (or the backfill's, or the snapshot's, learned): the
        # sends a look would read again, visible now, are not registered by the looks.
        self._others_ms = wall = wall_ms()
        self._others_id = int(conn.scalar(select(func.coalesce(func.max(sends.c.id), 0))) or 0)
        self._seen.update(
            dict.fromkeys(
                conn.execute(
                    select(sends.c.decision_id).where(
                        sends.c.queued_ms > wall - OTHERS_OVERLAP_MS, sends.c.decision_id.is_not(None)
                    )
                ).scalars(),
                wall,
            )
        )
        self.pinned = self._adopted(
            load_snapshot(conn, name=self.name, pinned=True), what="pinned", relearn=False
        )
        _forget_noted(conn, self.learner, self.pinned)
        return self.learner.position

    def refresh_pinned(self, conn: Connection) -> bool:
        """Serve the snapshot pinned now, or the live learner if none is; whether that changed.

        ``cadence models pin``, ``rollback`` and ``unpin`` write the pin in the database. A process
        that does not lead loaded it with the rest (:meth:`start`); the one that leads, whose live
        learner must not be reloaded, takes only the pin (the ``follow`` job). Before, the leading
        process, the only one of a default ``cadence serve``, served a rollback only after a restart.
        """
        loaded = self.loaded_marker
        if loaded is None:  # not started: start() loads the pin with the rest
            return False
        marker = snapshot_marker(conn, name=self.name)
        if marker[1] == loaded[1]:
            return False
        pinned = None
        if marker[1] is not None:
            pinned = self._adopted(
                load_snapshot(conn, name=self.name, pinned=True), what="pinned", relearn=False
            )
            _forget_noted(conn, pinned)
        self.pinned = pinned
        self.loaded_marker = (loaded[0], marker[1])
        log.info(
            "learner %r: serving %s",
            self.name,
            f"the pinned snapshot {marker[1]}" if pinned is not None else "the live learner",
        )
        return True

    def _adopted(self, stored: DecisionLearner | None, *, what: str, relearn: bool) -> DecisionLearner | None:
        """``stored`` with the configured decision-time values; None to learn again from the log."""
        if stored is None:
            return None
        changed = learned_differences(stored.config, self.config)
        if not changed:
            stored.reconfigure(self.config)
            return stored
        if relearn:
            log.warning(
                "the %s learner snapshot was learned with other %s: learning again from the event log",
                what,
                ", ".join(changed),
            )
            return None
        log.warning(
            "the %s learner snapshot was learned with other %s; it is kept as learned (%s)",
            what,
            ", ".join(changed),
            "pinned" if what == "pinned" else "events were deleted by retention, relearning would lose them",
        )
        return stored

    def recall(self, conn: Connection) -> int:
        """Register again the sent decisions the snapshot does not know, whose labels are not yet due.

        These were committed after the snapshot was taken (by this process before a
        restart, or by another worker). Without this, a decision that never gets a
        feedback event would never be learned as a "no" after a restart; decisions that
        do get feedback are also re-registered by :meth:`_known`. Each is registered with
        the features stored when it was made. Bounded to the ``max_recall`` latest decisions.
        Not those whose learners had read the log as far as the snapshot or further when they
        were made: the replay registers each where it was (:meth:`_replayed`).
        Returns how many were registered.
        """
        learner = self.learner
        horizon = learner.config.horizon_ms
        rows = conn.execute(
            select(*_REGISTERED)
            .where(
                decisions.c.action == "send",
                decisions.c.channel.is_not(None),
                decisions.c.send_at_ms > learner.clock_ms - horizon,
                decisions.c.learner_position.is_(None) | (decisions.c.learner_position < learner.position),
            )
            .order_by(decisions.c.decided_at_ms.desc(), decisions.c.id.desc())
            .limit(self.max_recall)
        ).all()
        count = 0
        for row in reversed(rows):  # oldest first, as they were committed
            count += self._register_again(row)
        return count

    def _register_again(self, row: Any, *, replayed: bool = False) -> bool:
        """Register a stored decision this learner does not know; whether it did.

        Not one that bounced or failed, which teaches nothing, unless ``replayed``: a replay
        registers each decision as the live learners did, when it was made, and meets its bounce
        in the log as they did (a provisional label may have been learned before it).
        """
        outcome = row.outcome or {}
        if row.id in self.learner.pending or (not replayed and ("bounced" in outcome or "failed" in outcome)):
            return False
        self._register(row)
        return True

    def _replayed(self, conn: Connection, upto: int) -> deque[Any]:
        """The stored decisions the live learners registered after reading the log up to ``upto`` at
        the latest, and after the last read: in the order of their positions.

        A live learner registers a decision once it is committed, after the events it has read by
        then; its features' position is stored with it (``decisions.learner_position``). The
        replay after a start registers each there: before the first event after its position. By
        its time instead (``at``), one made as of hours before events already logged was
        registered before them, so its labels reached the models in another order than they did
        live, and every option's value moved across a restart (an outside check: 286 of 287
        options, with 6% of decisions going back in time).
        """
        assert self._replay is not None
        done, last = self._replay
        upto = min(upto, last)
        rows: deque[Any] = deque()
        if upto > done:
            rows.extend(
                conn.execute(
                    select(*_REGISTERED, decisions.c.learner_position)
                    .where(
                        decisions.c.learner_position > done,
                        decisions.c.learner_position <= upto,
                        decisions.c.action == "send",
                        decisions.c.channel.is_not(None),
                        decisions.c.send_at_ms.is_not(None),
                    )
                    .order_by(decisions.c.learner_position, decisions.c.decided_at_ms, decisions.c.id)
                )
            )
        self._replay = None if upto >= last else (upto, last)
        return rows

    def record(self, **decision: Any) -> dict[str, Any]:
        """Remember a committed decision (see :meth:`DecisionLearner.record_decision`).

        Returns its features as the ``decisions`` row's ``inputs["features"]`` keeps them, so
        that a restart (or another worker's leader) registers the decision exactly as made.
        """
        self._seen[decision["decision_id"]] = wall_ms()  # before its row is written: no look read it
        return self.learner.record_decision(**decision).stored()

    def pending_decision(self, **decision: Any) -> Pending:
        """A decision's features, as :meth:`record` computes them, without remembering it yet.

        ``decision`` as :meth:`DecisionLearner.pending_decision` takes it (no ``decision_id``).
        The caller hands the result to :meth:`remember` once the decision is committed.
        """
        return self.learner.pending_decision(**decision)

    def remember(self, decision_id: str, pending: Pending) -> None:
        """Register a committed decision from :meth:`pending_decision` (with the learner in use now)."""
        if decision_id in self._seen:  # a look registered it first, from the stored features (see _others)
            return
        self._seen[decision_id] = wall_ms()
        self.learner.remember(decision_id, pending)

    def _register(self, row: Any) -> None:
        """Register a stored decision: its stored features, or (older rows) features computed now."""
        self._seen[row.id] = wall_ms()
        inputs = row.inputs or {}
        stored = inputs.get("features")
        customer_id = self._root(row.customer_id)
        if isinstance(stored, dict):
            self.learner.remember(
                row.id,
                Pending.restored(
                    stored,
                    customer_id=customer_id,
                    sent_ms=row.send_at_ms,
                    channel=row.channel,
                    campaign=row.campaign,
                    arm=row.arm,
                ),
            )
            return
        self.learner.record_decision(
            decision_id=row.id,
            customer_id=customer_id,
            traits=inputs.get("traits") or {},
            zone=inputs.get("zone"),
            campaign=row.campaign,
            channel=row.channel,
            send_at_ms=row.send_at_ms,
            arm=row.arm,
            now_ms=row.decided_at_ms,
        )

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        """Learn from each feedback event in ``batch``.

        After ``snapshot_every`` events, at least ``snapshot_min_seconds`` since the last snapshot,
        a snapshot is owed (:meth:`snapshot_owed`): the engine loop takes it once the batch has
        committed, outside its transaction (:meth:`prepare_snapshot`).

        Before the batch, the learners forget the customers another process erased since they last
        looked (:meth:`_forget_erased`): where that process's learners forgot them, before any later
        event (see :meth:`~cadence.engine.loop.EngineLoop.erase`). A follower's are loaded again
        instead (:meth:`erasure_unmet`). Having forgotten any, they owe a snapshot at once, as the
        erasing process's learners take one (:meth:`erasure_done`): a restart before the next one
        loaded the snapshot before the erasure and replayed a log without the customer's events, and
        knew otherwise than the live learners (``cadence customers erase`` beside a running server)."""
        if batch and not self.following and self._forget_erased(conn):
            self._erasure_owed = True
        if self._backfill is not None and batch:
            self._backfill_decisions(conn, batch[-1].ts_ms)
        elif batch:
            self._others(conn)
        waiting = self._waiting
        replayed = self._replayed(conn, batch[-1].id) if batch and self._replay is not None else deque()
        merges = self._merges_in(conn, batch) if batch else []
        folded = 0  # merges[:folded] are folded: each before the first event after the one that made it
        for event in batch:
            while folded < len(merges) and merges[folded][0] < event.id:
                _at, loser, parent = merges[folded]
                self._fold([(loser, parent)])
                folded += 1
            while replayed and replayed[0].learner_position < event.id:
                self._register_again(replayed.popleft(), replayed=True)
            while waiting and _position(waiting[0]) < event.id:
                self._register_again(waiting.popleft())
            self.learner.advance(event.ts_ms)
            kind = feedback_kind(event.event)
            if kind is Feedback.OPENED and event.properties.get("machine_open") is True:
                kind = None  # a privacy proxy's open (Apple Mail's): says nothing of the customer
            decision_id = event.properties.get("decision_id")
            if kind is not None and isinstance(decision_id, str):
                zone = self._known(conn, decision_id, kind, event.ts_ms, event.event or kind.value, event.id)
                self.learner.observe(decision_id=decision_id, kind=kind, ts_ms=event.ts_ms, zone=zone)
            elif kind is not None and decision_id is not None:
                _unjoined(event.id, decision_id, decision_id_problem(decision_id) or "not a string")
            self.learner.position = event.id
            self._since_snapshot += 1
        self._fold([(loser, parent) for _at, loser, parent in merges[folded:]])
        for row in replayed:
            self._register_again(row, replayed=True)
        while waiting and _position(waiting[0]) <= self.learner.position:
            self._register_again(waiting.popleft())

    def erasures_while_idle(self, engine: Engine) -> bool:
        """While the log is idle, forget the customers another process erased (one read of the
        erasures' last id) and owe a snapshot if any, as a batch would (:meth:`apply`); whether any.

        Without it a ``cadence customers erase`` beside an idle server waited for the next event:
        until then a restart replayed from the snapshot before the erasure and knew otherwise.
        Not for a follower's learners nor ones never loaded (a CLI's).
        """
        if self.following or self.loaded_marker is None:
            return False
        with read_connection(engine) as conn:
            if not self._forget_erased(conn):
                return False
        self._erasure_owed = True
        return True

    def snapshot_owed(self) -> bool:
        """Whether these learners owe a snapshot: ``snapshot_every`` events learned since the last one,
        at least ``snapshot_min_seconds`` ago, or customers another process erased forgotten since the
        last one (:meth:`apply`, :meth:`erasures_while_idle`); and not :attr:`following` (the leader's
        are the ones stored).

        The engine loop asks after each batch it committed and while the log is idle
        (:meth:`~cadence.engine.loop.EngineLoop.snapshot_in_memory`): a burst learned within
        ``snapshot_min_seconds`` of the last snapshot (or of the start) is snapshotted once that
        time has passed, not only when a later event arrives (an outside check).
        """
        if self.following:
            return False
        if self._erasure_owed:  # (see apply)
            return True
        return (
            self._since_snapshot >= self.snapshot_every
            and time.monotonic() - self._last_snapshot >= self.snapshot_min_seconds
        )

    def _others(self, conn: Connection) -> int:
        """Read the send decisions other processes committed since the last look; how many it read.

        Each ``serve --workers N`` process registers the decisions it commits (and a push its
        sends) with its own learners, and the others met them only when feedback named them:
        a send nobody answered was learned as a no by the process that made it alone, every
        answered one by all, so the other workers' learners leaned towards yes (an outside
        check: mean engagement 0.70 on the other worker against 0.32 on the committing one,
        equal again after a restart, whose recall registers them all). So before each batch a
        learner reads the sends queued since the last batch (by ``sends.id``: only the new rows)
        and, every ``others_every`` seconds, those queued since its last such look by
        ``queued_ms`` (the wall clock, from :data:`OTHERS_OVERLAP_MS` before it: a transaction
        may commit a lower id after a higher one), and registers their decisions from the
        features stored with them, as :meth:`recall` does: not one it registered already, nor a
        bounced or failed one.

        Each decision read waits in :attr:`_waiting` for the log position its features were
        computed at (``decisions.learner_position``) and is registered before the first event
        after it, as a replay registers it (:meth:`_replayed`): where the process that made it
        had read the log when it registered it, so that its labels reach the models in the same
        order in every process. Until session 25 the learners looked once a second, or first
        when a batch's last event moved the clock an hour or more: quiet hours defer a night's
        sends to the morning, a batch of the morning's clicks passed the evening's label times
        while its last event did not move the clock an hour, and the other worker learned those
        labels a batch or more later, in another order (an outside check: with ``serve --workers
        2`` the two workers valued 40 of 40 options differently, and a restart moved one's to the
        other's).
        """
        now = time.monotonic()
        wall = wall_ms()
        timed = now - self._others_at >= self.others_every or self._others_id is None
        if timed:
            since = (wall if self._others_ms is None else self._others_ms) - OTHERS_OVERLAP_MS
            self._others_at, self._others_ms = now, wall
            query = select(sends.c.id, sends.c.decision_id).where(
                sends.c.queued_ms > since, sends.c.decision_id.is_not(None)
            )
        else:  # every row past the last one read, an audience sync's too: none is read twice
            query = select(sends.c.id, sends.c.decision_id).where(sends.c.id > self._others_id)
        queued = conn.execute(query).all()
        if queued:
            self._others_id = max(self._others_id or 0, max(int(q.id) for q in queued))
        seen, pending = self._seen, self.learner.pending
        fresh = sorted({q.decision_id for q in queued if q.decision_id} - seen.keys() - pending.keys())
        read: list[Any] = []
        for start in range(0, len(fresh), 500):
            rows = conn.execute(
                select(*_REGISTERED, decisions.c.learner_position).where(
                    decisions.c.id.in_(fresh[start : start + 500]),
                    decisions.c.action == "send",
                    decisions.c.channel.is_not(None),
                    decisions.c.send_at_ms.is_not(None),
                )
            ).all()
            for row in rows:
                outcome = row.outcome or {}
                if "bounced" not in outcome and "failed" not in outcome:
                    read.append(row)
        for decision_id in fresh:  # those not registered too: read once
            seen.setdefault(decision_id, wall)
        if read:
            self._waiting = deque(sorted([*self._waiting, *read], key=_waiting_order))
        if timed:  # a decision registered before the next timed look's reach is never read again by it
            old = since - OTHERS_OVERLAP_MS
            for decision_id in [d for d, at in seen.items() if at < old]:
                del seen[decision_id]
        return len(read)

    def _backfill_decisions(self, conn: Connection, until_ms: int) -> None:
        """Register the stored decisions made up to ``until_ms`` while learning from the start of the log.

        A learner that replays the log from its start meets the decisions as a live one did:
        each is registered before the events of its time, so a send nobody clicked is
        learned as a no (feedback events alone would teach only the yeses).
        """
        assert self._backfill is not None
        done, last = self._backfill
        upto = min(until_ms, last)
        if upto > done:
            rows = conn.execute(
                select(*_REGISTERED)
                .where(
                    decisions.c.action == "send",
                    decisions.c.channel.is_not(None),
                    decisions.c.send_at_ms.is_not(None),
                    decisions.c.decided_at_ms > done,
                    decisions.c.decided_at_ms <= upto,
                    decisions.c.learner_position.is_(None),  # the others: _replayed
                )
                .order_by(decisions.c.decided_at_ms, decisions.c.id)
            ).all()
            for row in rows:
                if row.id not in self.learner.pending:
                    self._register(row)
        self._backfill = None if until_ms >= last else (max(done, upto), last)

    def _known(
        self, conn: Connection, decision_id: str, feedback: Feedback, ts_ms: int, event: str, event_id: int
    ) -> str | None:
        """Note the outcome on the stored decision; re-register it with the learner if it forgot it.

        After a restart from a snapshot, decisions committed after the snapshot are known
        only from the ``decisions`` table: they are recorded again from its stored inputs.
        Feedback that says the message reached the customer settles a send of the decision
        cadence has not sent (:func:`~cadence.engine.sendqueue.settle_reached`). Returns the customer's
        zone at decision time.
        """
        row = conn.execute(select(*_REGISTERED, _UNSENT).where(decisions.c.id == decision_id)).first()
        if row is None:
            # (a preview's id, another server's, a typo): the API could not tell at ingest
            # without a query per event, so it is said here, where the query is made anyway
            _unjoined(
                event_id, decision_id, decision_id_problem(decision_id) or "no committed decision has this id"
            )
            return None
        kind = feedback.value
        outcome = dict(row.outcome or {})
        if kind not in outcome:
            outcome[kind] = ts_ms
            conn.execute(update(decisions).where(decisions.c.id == decision_id).values(outcome=outcome))
        if row.unsent and feedback in REACHED:
            settle_reached(conn, decision_id, event=event, ts_ms=ts_ms)
        inputs = row.inputs or {}
        zone = inputs.get("zone")
        if (
            decision_id not in self.learner.pending
            and row.channel
            and row.send_at_ms is not None
            and ts_ms < row.send_at_ms + self.learner.config.horizon_ms
        ):
            self._register(row)
        return zone if isinstance(zone, str) else None

    def snapshot(
        self, conn: Connection, *, now_ms: int, same_position: bool = False, state: bytes | None = None
    ) -> int:
        """Write a snapshot now (``now_ms``: the wall clock's time); returns its version
        (``same_position``: see :func:`save_snapshot`; ``state``: the learners pickled before,
        pickled again when an erasure met here took a customer out of them)."""
        if self._forget_erased(conn):
            state = None
        self._since_snapshot = 0
        self._erasure_owed = False
        self._last_snapshot = time.monotonic()
        return save_snapshot(
            conn,
            name=self.name,
            learner=self.learner,
            now_ms=now_ms,
            same_position=same_position,
            state=state,
        )

    def prepare_snapshot(self, engine: Engine) -> bytes:
        """The first half of :meth:`write_snapshot`: forget the customers erased elsewhere (read
        without the write lock), then pickle the learners.

        Pickling takes about a second at 20,000 customers. Inside a write transaction (a batch's,
        where :meth:`apply` used to take its snapshot) it held SQLite's write lock that long and
        every commit waited (the HTTP benchmark's worst second: p99 283 ms, when the idle loop
        took a burst's snapshot mid-run). The caller holds the engine loop's lock, so no batch
        changes the learners meanwhile.
        """
        with read_connection(engine) as conn:
            self._forget_erased(conn)
        return _dump(self.learner)

    def write_snapshot(self, engine: Engine, prepared: bytes, *, now_ms: int) -> int:
        """Store what :meth:`prepare_snapshot` pickled, in a short write transaction; its version.

        The transaction takes the batches' lock, as a batch does: an erasure committed since the
        pickling that took a customer out of these learners makes :meth:`snapshot` pickle them
        again there, so the snapshot never holds a customer erased before it was written.
        """
        with engine.begin() as conn:
            lock_batches(conn)
            return self.snapshot(conn, now_ms=now_ms, state=prepared)

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        """Nothing yet: :meth:`apply` folds a merge when it reaches the event that made it.

        The loop tells its subscribers of a batch's merges before the batch's events, and (with
        the look-ahead) a batch early. Folding then taught the joined customer feedback that
        came before the merge, which a replay after a restart taught the merged-away one; so the
        learners fold where the log made the merge (``customers.merged_at_event``), live, in a
        replay and in a follower alike.
        """

    def fold_merged(self, conn: Connection) -> int:
        """Fold the customers merged at or before this learner's position into the ones they joined; how many.

        A learner loaded from a snapshot does not know the merges made since it was taken, nor
        (this process being new) which customers those before it merged: both are read here.
        Merges after the position are folded by :meth:`apply` as the replay reaches them;
        those stored before merge positions were (``merged_at_event`` NULL) are folded now.
        Folding the stats of a customer the snapshot already folded finds none: only the
        chain is learned, so a decision registered again (recall, a late feedback) belongs to
        the customer it now does.
        """
        learner, parents, losers = self.learner, self._parents, []
        # A snapshot from before every pending decision's customer had stats (see absorb).
        for p in learner.pending.values():
            learner.customer(p.customer_id)
        # Row by row, keeping only the chain: a deployment's every stitched visitor passes through
        # here (1,000,000 merged customers on SQLite: 2.1 s and 102 MB more at peak; read as a
        # list first, 3.6 s and 329 MB).
        for loser, parent in conn.execute(
            select(customers.c.id, customers.c.merged_into).where(
                customers.c.merged_into.is_not(None),
                (customers.c.merged_at_event <= learner.position) | customers.c.merged_at_event.is_(None),
            )
        ):
            parents[loser] = parent
            if loser in learner.customers:
                losers.append(loser)
        for loser in losers:
            learner.absorb(self._root(loser), loser)
        return len(losers)

    def _fold(self, merges: Sequence[tuple[int, int]]) -> int:
        """Fold each ``(loser, the customer it was merged into)``, in order; how many had stats."""
        self._parents.update(merges)
        folded = 0
        for loser, _parent in merges:
            folded += self.learner.absorb(self._root(loser), loser)
        return folded

    def _merges_in(self, conn: Connection, batch: Sequence[LoggedEvent]) -> list[tuple[int, int, int]]:
        """The merges made by events after this learner's position, up to the batch's last:
        ``(event id, loser, merged into)`` in log order. No read unless an event could have
        merged (an alias, or an event carrying both ids): on PostgreSQL a read in ``apply``
        waits for the loop's pipelined writes."""
        if not any(e.type == "alias" or (e.user_id and e.anonymous_id) for e in batch):
            return []
        rows = conn.execute(
            select(customers.c.merged_at_event, customers.c.id, customers.c.merged_into)
            .where(
                customers.c.merged_at_event > self.learner.position,
                customers.c.merged_at_event <= batch[-1].id,
                customers.c.merged_into.is_not(None),
            )
            .order_by(customers.c.merged_at_event, customers.c.id)
        ).all()
        return [(int(e), int(loser), int(parent)) for e, loser, parent in rows]

    def _root(self, customer_id: int) -> int:
        """The customer ``customer_id`` now belongs to, following the merges this learner knows."""
        return canonical_of(self._parents, customer_id)

    def erased(self, conn: Connection, customer_id: int) -> None:
        """Forget the customer in these learners; note them for the stored snapshots' scrub (in
        ``conn``'s transaction, the erasure's).

        A snapshot keeps each customer's statistics: their sends' times, clicks and click hours,
        their own effects. The shared weights hold no customer. Rewriting every snapshot here would
        hold the engine loop for seconds each (5.4 s at 100,000 customers): the leader's scrub job
        does it (:func:`scrub_snapshots`), and a start forgets the customers still to be scrubbed.
        """
        for learner in (self.learner, self.pinned):
            if learner is not None:
                learner.forget(customer_id)
        self._waiting = deque(r for r in self._waiting if self._root(r.customer_id) != customer_id)
        conn.execute(
            dialect_insert(conn, learner_scrubs)
            .values(customer_id=customer_id, erased_ms=wall_ms())
            .on_conflict_do_nothing()
        )

    def erasure_done(self, conn: Connection) -> None:
        """Snapshot the learners as the erasure left them, where the leader's learners stand.

        The shared weights keep what the erased customers' labels taught the live learners; a
        restart from an older snapshot replays a log without their events and so learned
        otherwise: every other customer's values moved across the restart (an outside check: 64
        of 64 options, none without the erasure). From this snapshot a restart knows what the
        live learners know, and so does a process that does not lead, which loads it when it meets
        the erasure (:meth:`erasure_unmet`). A worker that does not lead takes it too, having first
        applied the log as far as the leader has (:meth:`~cadence.engine.loop.EngineLoop.erase`).
        Not for learners this process never loaded (a CLI's) nor while they follow the leader's log.
        """
        if self.loaded_marker is None or self.following:
            return
        # Erasures one after another, with nothing learned between, rewrite one snapshot: one each
        # filled the kept ones with copies of one state and compaction dropped the rollback points.
        self.snapshot(conn, now_ms=wall_ms(), same_position=True)

    def erasure_unmet(self, conn: Connection) -> bool:
        """Whether another process recorded an erasure these learners have not met.

        A process that does not lead asks before it applies more of the log
        (:meth:`~cadence.engine.loop.EngineLoop.follow_in_memory`), and is loaded again if so: it may
        be behind the position where the leader's learners forgot the customers (a poll behind), and
        nothing stored says which position that was; the newest snapshot, taken by the erasing process
        in the erasure's transaction (:meth:`erasure_done`), is there.
        """
        return _erasure_mark(conn) != self._erasures

    def _forget_erased(self, conn: Connection) -> int:
        """Forget the customers erased by another process since this one last looked; how many.

        An erasure in another process (``cadence customers erase`` beside a running server, another
        worker) scrubs the stored snapshots but not these learners, which would write the
        customer's statistics into their next snapshot, and learn the labels of the customer's
        pending decisions as they fall due, which the erasing process's learners never learn. So
        before each batch and before writing a snapshot, a learner that sees an erasure it has not
        met forgets every customer it knows who is no longer stored. Until session 26 only before
        a snapshot (a follower's: never), and once time passed the two workers of ``serve --workers
        2`` valued nearly every option differently until a restart (a reproduction: 178 of 199).
        """
        mark = _erasure_mark(conn)
        if mark == self._erasures:
            return 0
        self._erasures = mark
        learners = [learner for learner in (self.learner, self.pinned) if learner is not None]
        known = sorted({cid for learner in learners for cid in learner.customers if cid >= 0})
        known.extend(sorted({p.customer_id for learner in learners for p in learner.pending.values()}))
        gone: set[int] = set()
        for start in range(0, len(known), 5000):
            chunk = known[start : start + 5000]
            stored = set(conn.execute(select(customers.c.id).where(customers.c.id.in_(chunk))).scalars())
            gone.update(cid for cid in chunk if cid not in stored)
        for cid in gone:
            for learner in learners:
                learner.forget(cid)
        return len(gone)


def _forget_noted(conn: Connection, *learners: DecisionLearner | None) -> None:
    """Forget in ``learners`` (a None is skipped) the erased customers the scrub job has not yet
    taken out of the stored snapshots they were loaded from (``learner_scrubs``)."""
    for customer_id in conn.execute(select(learner_scrubs.c.customer_id)).scalars():
        for learner in learners:
            if learner is not None:
                learner.forget(customer_id)


def _erasure_mark(conn: Connection) -> int:
    """The id of the last erasure recorded (0: none)."""
    return int(conn.scalar(select(func.coalesce(func.max(erasures.c.id), 0))) or 0)


def scrub_snapshots(engine: Engine, *, name: str = LearnerSubscriber.name) -> tuple[int, int]:
    """Forget the erased customers noted in ``learner_scrubs`` in every stored snapshot of the learner
    ``name``, then delete the notes; returns (customers, snapshots rewritten). With no note, one read.

    Each snapshot is read, rewritten without them and written back, one at a time (they are large:
    5.4 s each at 100,000 customers), outside any write transaction, so neither the engine loop nor,
    on SQLite, any writer waits for it. A snapshot is written back only if it is still the one read
    (its length, which every scrub changes): a scrub running at once elsewhere (the leader's job,
    ``cadence customers erase``) makes this one read it again. The engine loop's snapshots written
    meanwhile come from learners that forgot the customers (the erasing process's, or ones that
    met the erasure: :meth:`LearnerSubscriber._forget_erased`).
    """
    with read_connection(engine) as conn:  # (on SQLite a plain one's transaction would take the write lock)
        ids = conn.execute(select(learner_scrubs.c.customer_id)).scalars().all()
        snapshot_ids = (
            conn.execute(select(learner_snapshots.c.id).where(learner_snapshots.c.name == name))
            .scalars()
            .all()
            if ids
            else []
        )
    if not ids:
        return 0, 0
    changed = 0
    for snapshot_id in snapshot_ids:
        for _attempt in range(5):
            with read_connection(engine) as conn:
                blob = conn.scalar(
                    select(learner_snapshots.c.state).where(learner_snapshots.c.id == snapshot_id)
                )
            if blob is None:  # compacted meanwhile
                break
            old = bytes(blob)
            learner = _load(old)
            held = [cid for cid in ids if cid in learner.customers]
            if not (sum(learner.forget(cid) for cid in ids) or held):
                break
            with engine.begin() as conn:
                written = conn.execute(
                    update(learner_snapshots)
                    .where(
                        learner_snapshots.c.id == snapshot_id,
                        func.length(learner_snapshots.c.state) == len(old),
                    )
                    .values(state=_dump(learner))
                ).rowcount
            if written:
                changed += 1
                break
        else:
            raise CadenceError(
                f"learner snapshot {snapshot_id} kept changing while erased customers were scrubbed"
            )
    with engine.begin() as conn:
        conn.execute(delete(learner_scrubs).where(learner_scrubs.c.customer_id.in_(ids)))
    if changed:
        log.info("learner snapshots: %d rewritten without %d erased customers", changed, len(ids))
    return len(ids), changed
