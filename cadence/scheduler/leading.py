"""Background work that only the leader does: the dispatcher gated on the leader lock.

In ``cadence serve --workers N`` (or several ``cadence serve`` processes on one
PostgreSQL database) every process builds the same background pieces, but one
:class:`~cadence.engine.leader.Leadership` decides which process runs them: the
engine loop, the scheduler and, through :func:`dispatch_while_leading`, the
dispatcher. The others serve the API. On SQLite every process leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

__all__ = ["AlwaysLeads", "dispatch_while_leading"]

log = logging.getLogger("cadence.leader")


class _Leads(Protocol):
    def acquire(self) -> bool: ...


class AlwaysLeads:
    """A leadership that is always held: one process does everything."""

    def acquire(self) -> bool:
        """Always True."""
        return True


class _Runs(Protocol):
    async def run(self, *, stop: asyncio.Event, poll_seconds: float = 0.5) -> Any: ...


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


async def dispatch_while_leading(
    dispatcher: _Runs,
    *,
    leadership: _Leads,
    stop: asyncio.Event,
    poll_seconds: float = 1.0,
) -> None:
    """Run ``dispatcher`` while this process holds ``leadership``, until ``stop`` is set.

    A follower checks every ``poll_seconds`` whether the lock came free (the leader
    died); on taking it over it dispatches (the dispatcher first settles the sends the
    old leader left in doubt, see :meth:`Dispatcher.recover_in_doubt`). Losing the lock (its connection dropped)
    stops the dispatcher after its round in flight.
    """
    while not stop.is_set():
        if not await asyncio.to_thread(leadership.acquire):
            await _wait(stop, poll_seconds)
            continue
        leading = asyncio.Event()

        async def watch(leading: asyncio.Event = leading) -> None:
            while not stop.is_set():
                await _wait(stop, poll_seconds)
                if stop.is_set() or not await asyncio.to_thread(leadership.acquire):
                    break
            leading.set()  # tells the dispatcher to stop

        watcher = asyncio.create_task(watch())
        try:
            await dispatcher.run(stop=leading)
        finally:
            leading.set()
            await watcher
