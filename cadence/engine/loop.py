"""The engine loop: consume the event log in order, update derived state, checkpoint.

Each :class:`Subscriber` keeps a piece of derived state (identity, profiles, consent,
learners, attribution). The loop reads events after the lowest subscriber position,
resolves each event's customer, and hands every subscriber the events it has not yet
seen, inside one transaction that also advances that subscriber's checkpoint. A crash
therefore rolls back state and checkpoint together, and a restart resumes exactly
where the last commit left off: replaying yields the same state.

Subscribers whose state lives in memory (river learners) snapshot it with the log
position it reflects and report that position from :meth:`Subscriber.start`; the
loop replays the log after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection

__all__ = ["LoggedEvent", "Subscriber"]


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """An event from the log, with the canonical customer it belongs to (at processing time)."""

    id: int
    message_id: str
    type: str
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    customer_id: int
    ts_ms: int
    source: str
    payload: dict[str, Any]

    @property
    def properties(self) -> dict[str, Any]:
        """``payload["properties"]`` (track, page, screen), else empty."""
        return self.payload.get("properties") or {}

    @property
    def traits(self) -> dict[str, Any]:
        """``payload["traits"]`` (identify, group) merged over ``context.traits``."""
        context = self.payload.get("context") or {}
        return {**(context.get("traits") or {}), **(self.payload.get("traits") or {})}

    @property
    def context(self) -> dict[str, Any]:
        """``payload["context"]``, else empty."""
        return self.payload.get("context") or {}


class Subscriber(Protocol):
    """A consumer of the event log. Implementations must be deterministic: the same
    events in the same order give the same state."""

    #: Unique, stable: it names the subscriber's checkpoint row.
    name: str

    def start(self, conn: Connection, checkpoint: int) -> int:
        """Load state; return the last event id it reflects.

        ``checkpoint`` is the position the loop stored for this subscriber (0 if none).
        Database-backed subscribers return it unchanged; in-memory ones load their
        latest snapshot and return the position stored with it.
        """
        ...

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        """Apply ``batch`` (ascending ids, all unseen) inside the loop's transaction."""
        ...

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        """Customer ``loser`` was stitched into ``winner``: fold its state into the winner's."""
        ...

    def erased(self, conn: Connection, customer_id: int) -> None:
        """Customer ``customer_id`` was erased: remove or correct everything that counted them."""
        ...
