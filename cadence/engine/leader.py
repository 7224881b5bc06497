"""One leader among many processes: a PostgreSQL session advisory lock, held on its own connection.

On PostgreSQL several ``cadence serve`` processes share the database; background
work that must run once (the engine loop, the scheduler) runs only in the process
holding its lock. The lock belongs to a database session, so it is released when
the process dies or its connection drops, and another process takes over at its
next :meth:`Leadership.acquire`.

On SQLite one process usually does everything: it always leads. When several serve one
database file (``cadence serve --workers N`` sets ``CADENCE_WORKERS``), the lock is an
exclusive ``flock`` on a file beside the database (``<db>.leader-<id>``): the kernel
releases it when its holder dies, as PostgreSQL does a dead session's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from typing import IO

from sqlalchemy import Connection, Engine, text

__all__ = ["Leadership", "sqlite_shared"]

log = logging.getLogger("cadence.leader")


def sqlite_shared() -> bool:
    """True when several processes serve one SQLite file (``CADENCE_WORKERS`` above 1): leaders use a file lock.

    >>> import os; saved = os.environ.pop("CADENCE_WORKERS", None)
    >>> sqlite_shared()
    False
    >>> os.environ["CADENCE_WORKERS"] = "2"; sqlite_shared()
    True
    >>> _ = os.environ.pop("CADENCE_WORKERS") if saved is None else os.environ.update(CADENCE_WORKERS=saved)
    """
    try:
        return int(os.environ.get("CADENCE_WORKERS", "1")) > 1
    except ValueError:
        return False


class Leadership:
    """Try to take, keep and release one advisory lock.

    :param engine: the database; on anything but PostgreSQL every process leads.
    :param lock_id: the advisory lock key (one per kind of background work).
    :param role: a name for log lines ("engine", "scheduler").
    """

    def __init__(self, engine: Engine, *, lock_id: int, role: str) -> None:
        self.engine = engine
        self.lock_id = lock_id
        self.role = role
        self._conn: Connection | None = None
        self._file: IO[bytes] | None = None
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        #: SQLite shared by several processes: the lock file (None: PostgreSQL, or this process always leads).
        self.lock_path = (
            f"{database}.leader-{lock_id:x}"
            if database not in (None, "", ":memory:") and sqlite_shared()
            else None
        )
        # One object may be shared by the engine loop, the scheduler and the dispatcher
        # (one leader for all background work): their threads must not share the connection at once.
        self._mutex = threading.RLock()

    @property
    def held(self) -> bool:
        """True while this process holds the lock (always on SQLite served by one process)."""
        if self.lock_path is not None:
            return self._file is not None
        return self.engine.dialect.name != "postgresql" or self._conn is not None

    def acquire(self) -> bool:
        """Take the lock if it is free; True when this process leads (now or already)."""
        with self._mutex:
            return self._acquire()

    def _acquire(self) -> bool:
        if self.lock_path is not None:
            return self._acquire_file(self.lock_path)
        if self.held:
            if self._conn is not None and not self._alive():
                return self._acquire()
            return True
        conn = self.engine.connect()
        try:
            got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.lock_id}))
            conn.commit()
        except Exception:
            conn.close()
            raise
        if got:
            self._conn = conn
            log.info("this process is now the %s leader", self.role)
            return True
        conn.close()
        return False

    def _acquire_file(self, path: str) -> bool:
        if self._file is not None:
            return True
        handle = open(path, "ab")  # noqa: SIM115 - held open for as long as we lead
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        except BaseException:
            handle.close()
            raise
        self._file = handle
        log.info("this process is now the %s leader", self.role)
        return True

    def _alive(self) -> bool:
        """Check the lock's session still exists; forget it when the connection dropped."""
        assert self._conn is not None
        try:
            self._conn.scalar(text("SELECT 1"))
            self._conn.commit()
            return True
        except Exception:  # noqa: BLE001 - any driver error means the session (and the lock) is gone
            log.warning("lost the %s leader lock: its connection dropped", self.role)
            try:
                self._conn.close()
            finally:
                self._conn = None
            return False

    def release(self) -> None:
        """Give the lock up (no-op when not held)."""
        with self._mutex:
            if self._file is not None:
                with contextlib.suppress(OSError):  # closing releases the lock in any case
                    fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
                self._file.close()
                self._file = None
            if self._conn is not None:
                try:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.lock_id})
                    self._conn.commit()
                finally:
                    self._conn.close()
                    self._conn = None
