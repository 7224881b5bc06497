"""Database connections through the driver alone, without SQLAlchemy (short start-up).

Importing SQLAlchemy and its PostgreSQL dialect is about 0.4 s of CPU, near half of a
command's start-up; ``cadence import`` needs none of it on a database that is already at
the migration scripts' heads. :func:`driver_target` opens such a database with
``sqlite3`` or psycopg directly, set up as :func:`cadence.store.db.create_db_engine` sets
up its connections (the same SQLite pragmas and write lock); when it cannot tell that the
database is current, or the URL is not a plain one it knows, it returns None and the
caller takes the SQLAlchemy path (which migrates, and reports errors as before).

The SQLite write lock (:class:`SQLiteWriteLock`) and the migration scripts' heads
(:func:`script_heads`) live here so that both paths share them.
"""

from __future__ import annotations

import ast
import fcntl
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MIGRATIONS",
    "DriverTarget",
    "SQLiteWriteLock",
    "begin_sqlite_write",
    "configure_sqlite",
    "driver_target",
    "script_heads",
]

MIGRATIONS = Path(__file__).with_name("migrations")
#: Page cache of every cadence SQLite connection, in KiB (see :func:`configure_sqlite`).
SQLITE_CACHE_KIB = 65_536

#: How long a thread waits for its own process's turn to write before leaving it to SQLite's busy timeout.
WRITE_LOCK_TIMEOUT = 30.0


class SQLiteWriteLock:
    """One writer at a time on an SQLite file, across threads and processes, woken as soon as it frees.

    SQLite's own busy handler makes a writer that finds the database locked sleep and
    retry in growing steps (up to 100 ms each), so it can sleep long after the lock came
    free: under two ``cadence serve`` workers committing decisions, waits of 50 ms to 2.8 s
    were measured. Every write transaction of cadence (``BEGIN IMMEDIATE``) first takes
    this lock: a mutex among the process's threads, then an exclusive ``flock`` on
    ``<database>.write-lock``, which the kernel hands to the next waiter the moment the
    holder releases it (at commit or rollback, or when its process dies). SQLite's lock
    and busy timeout stay underneath for writers that do not take it (another program).

    One per database file and process (:meth:`for_path`): two engines on one file in one
    process share it, so a thread that nests a write in another write times out on the
    mutex (and gets SQLite's "database is locked", as before) instead of blocking on itself.

    It also moves WAL checkpoints off the write path: cadence's connections run with
    ``wal_autocheckpoint=0`` (SQLite's automatic checkpoint runs inside the ``COMMIT``
    that crosses 1,000 pages, 30-130 ms measured for 4-8 MB on this kind of disk, while
    every other writer waits), and after each commit :meth:`committed` looks at the WAL's
    size: past :attr:`checkpoint_bytes` it wakes a thread of its own (started on demand,
    gone after half a minute without work) that runs a ``PASSIVE`` checkpoint on a
    connection of its own, which neither takes the write lock nor blocks writers.
    """

    #: The WAL size that starts a background checkpoint (SQLite's automatic one: 1,000 pages of 4 KiB).
    checkpoint_bytes = 4 * 1024 * 1024
    #: The checkpoint thread ends after this many seconds without work (a later commit starts another).
    checkpointer_idle = 30.0

    _registry: dict[tuple[int, str], SQLiteWriteLock] = {}
    _registry_lock = threading.Lock()

    def __init__(self, path: str, *, timeout: float = WRITE_LOCK_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._mutex = threading.Lock()
        self._fd: int | None = None
        self.pid = os.getpid()
        self.database = path.removesuffix(".write-lock")
        self._checkpointing = False
        self._next_checkpoint = 0.0
        self._wake = threading.Event()
        self._checkpointer_running = False
        #: Background checkpoints run, and their total time (seconds).
        self.checkpoints = 0
        self.checkpoint_seconds = 0.0
        #: How many write transactions waited for the lock, and for how long in all (seconds).
        self.waits = 0
        self.waited = 0.0

    @classmethod
    def for_path(cls, database: str) -> SQLiteWriteLock:
        """This process's lock for the SQLite file ``database`` (created on first use, also after a fork)."""
        path = os.path.realpath(database) + ".write-lock"
        key = (os.getpid(), path)
        with cls._registry_lock:
            lock = cls._registry.get(key)
            if lock is None:
                lock = cls._registry[key] = cls(path)
            return lock

    def acquire(self) -> bool:
        """Wait for the lock; False (not held) when this process's mutex or the lock file is unavailable."""
        if not self._mutex.acquire(blocking=False):
            started = time.perf_counter()
            if not self._mutex.acquire(timeout=self.timeout):
                return False
            self.waits += 1
            self.waited += time.perf_counter() - started
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                started = time.perf_counter()
                fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocks until the holder releases it
                self.waits += 1
                self.waited += time.perf_counter() - started
        except OSError:
            self._mutex.release()
            return False
        return True

    def try_acquire(self) -> bool:
        """Take the lock if it is free now, without waiting; False when another writer holds it."""
        if not self._mutex.acquire(blocking=False):
            return False
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by another process
            self._mutex.release()
            return False
        return True

    def committed(self) -> None:
        """After a commit: start a background checkpoint if the WAL grew past :attr:`checkpoint_bytes`."""
        now = time.monotonic()
        if self._checkpointing or now < self._next_checkpoint:
            return
        # The WAL's size at most every 50 ms: os.stat lets go of the GIL, and getting it back can take a
        # switch interval (5 ms) when the event loop is busy.
        self._next_checkpoint = now + 0.05
        try:
            size = os.stat(self.database + "-wal").st_size
        except OSError:
            return
        if size < self.checkpoint_bytes:
            return
        with self._registry_lock:
            if self._checkpointing:
                return
            self._checkpointing = True
            # At most every 0.2 s: a checkpoint a reader kept from finishing leaves the WAL as large.
            self._next_checkpoint = time.monotonic() + 0.2
            self._wake.set()
            start = not self._checkpointer_running
            self._checkpointer_running = True
        if start:  # Thread.start() waits for the thread to run: only when none is waiting for work
            threading.Thread(target=self._checkpointer, name="cadence-wal-checkpoint", daemon=True).start()

    def _checkpointer(self) -> None:
        """Checkpoint whenever woken; end after :attr:`checkpointer_idle` seconds without work."""
        while True:
            if not self._wake.wait(timeout=self.checkpointer_idle):
                with self._registry_lock:
                    if not self._wake.is_set():
                        self._checkpointer_running = False
                        return
                continue
            self._wake.clear()
            self._checkpoint()

    def _checkpoint(self) -> None:
        started = time.perf_counter()
        try:
            conn = sqlite3.connect(self.database, timeout=0, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            pass  # another process is checkpointing, or the file went away: the next commit tries again
        finally:
            self.checkpoints += 1
            self.checkpoint_seconds += time.perf_counter() - started
            self._checkpointing = False

    def release(self) -> None:
        """Let the next writer in (only by the thread that acquired it)."""
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()


class _LockingConnection(sqlite3.Connection):
    """An SQLite connection that releases its :class:`SQLiteWriteLock` when its transaction ends."""

    write_lock: SQLiteWriteLock | None = None
    holds_lock = False

    def lock_for_write(self) -> None:
        """Take the write lock (before ``BEGIN IMMEDIATE``), unless it is already held."""
        lock = self.write_lock
        if lock is not None and not self.holds_lock:
            if (
                lock.pid != os.getpid()
            ):  # a connection from before a fork: this process's lock, not the parent's
                lock = self.write_lock = SQLiteWriteLock.for_path(lock.database)
            self.holds_lock = lock.acquire()

    def try_lock_for_write(self) -> bool:
        """Take the write lock if it is free now (or already held); False when another writer holds it."""
        lock = self.write_lock
        if lock is None:
            return False
        if not self.holds_lock:
            if lock.pid != os.getpid():  # a connection from before a fork
                lock = self.write_lock = SQLiteWriteLock.for_path(lock.database)
            self.holds_lock = lock.try_acquire()
        return self.holds_lock

    def unlock(self) -> None:
        """Release the write lock if this connection holds it."""
        if self.holds_lock:
            self.holds_lock = False
            assert self.write_lock is not None
            self.write_lock.release()

    def commit(self) -> None:
        """Commit, then let the next writer in (and checkpoint in the background when the WAL is large)."""
        held = self.holds_lock
        try:
            super().commit()
        finally:
            self.unlock()
        if held:
            assert self.write_lock is not None
            self.write_lock.committed()

    def rollback(self) -> None:
        """Roll back, then let the next writer in."""
        try:
            super().rollback()
        finally:
            self.unlock()

    def close(self) -> None:
        """Close (rolling back what is open), then let the next writer in."""
        try:
            super().close()
        finally:
            self.unlock()


def configure_sqlite(dbapi_conn: sqlite3.Connection, write_lock: SQLiteWriteLock | None) -> None:
    """Set up a new SQLite connection as cadence uses them (every connection, on both paths)."""
    # Let the caller, not pysqlite, decide when transactions begin.
    dbapi_conn.isolation_level = None
    if isinstance(dbapi_conn, _LockingConnection):
        dbapi_conn.write_lock = write_lock
        # Checkpoints run in the background, off the commit (see SQLiteWriteLock).
        dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")
        # When a writer starts the WAL over after a checkpoint, the file is cut back to nothing, so
        # its size tells how much is waiting for the next checkpoint.
        dbapi_conn.execute("PRAGMA journal_size_limit=0")
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    # 64 MiB of page cache (default 2 MiB): the engine loop's upserts land all over the
    # profile tables, and a page re-read from the OS costs a system call each time.
    cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cur.close()


def begin_sqlite_write(dbapi_conn: Any) -> None:
    """``BEGIN IMMEDIATE`` on an SQLite connection, after taking its write lock (if it has one)."""
    locking = isinstance(dbapi_conn, _LockingConnection)
    if locking:
        dbapi_conn.lock_for_write()  # the kernel wakes us when the writer before us is done
    try:
        dbapi_conn.execute("BEGIN IMMEDIATE")
    except BaseException:
        if locking:
            dbapi_conn.unlock()
        raise


def sqlite_connect(path: str) -> sqlite3.Connection:
    """A connection to the SQLite file ``path``, as ``create_db_engine`` makes them."""
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, factory=_LockingConnection)
    try:
        configure_sqlite(conn, SQLiteWriteLock.for_path(path))
    except BaseException:
        conn.close()
        raise
    return conn


_REVISION = re.compile(r"^revision(?:\s*:\s*str)?\s*=\s*[\"']([^\"']+)[\"']\s*$", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision\b[^=]*=\s*(.+?)\s*$", re.MULTILINE)
_DEPENDS_ON = re.compile(r"^depends_on\b[^=]*=\s*(.+?)\s*$", re.MULTILINE)


def script_heads() -> frozenset[str] | None:
    """The heads of the migration scripts, read as text (importing Alembic takes a while).

    None when a script does not look as expected; the caller then asks Alembic.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in sorted((MIGRATIONS / "versions").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        revision = _REVISION.search(text)
        down = _DOWN_REVISION.search(text)
        depends = _DEPENDS_ON.search(text)
        if revision is None or down is None or (depends is not None and depends.group(1) != "None"):
            return None
        try:
            value = ast.literal_eval(down.group(1))
        except (ValueError, SyntaxError):
            return None
        if isinstance(value, str):
            value = (value,)
        if value is not None and not (
            isinstance(value, tuple | list) and all(isinstance(v, str) for v in value)
        ):
            return None
        revisions.add(revision.group(1))
        parents.update(value or ())
    return frozenset(revisions - parents) or None


@dataclass(frozen=True)
class DriverTarget:
    """A database reached through its driver: :meth:`connect` gives a new DB-API connection.

    The caller closes each connection it opens. A PostgreSQL connection starts a
    transaction with its first statement (psycopg's default); an SQLite one is in
    autocommit mode until :func:`begin_sqlite_write`.
    """

    url: str
    postgres: bool
    connect: Callable[[], Any]
    #: The SQLite file (None on PostgreSQL).
    sqlite_path: str | None = None


#: URL prefixes the driver path takes; anything else goes through SQLAlchemy.
_POSTGRES_PREFIXES = ("postgresql://", "postgres://", "postgresql+psycopg://")
#: Characters that SQLAlchemy and the driver may read differently in a URL: such a URL takes SQLAlchemy's path.
_SQLITE_SPECIAL = re.compile(r"[?#%]")


def _target(url: str) -> DriverTarget | None:
    """A target for ``url`` when it is a plain SQLite file or PostgreSQL URL, else None.

    >>> _target("sqlite:///./c.db").sqlite_path
    './c.db'
    >>> _target("postgresql+psycopg://u@h:5/db").postgres
    True
    >>> [_target(u) for u in ("sqlite://", "sqlite:///:memory:", "sqlite:///c.db?mode=ro", "mysql://x/y")]
    [None, None, None, None]
    """
    import functools

    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path or path == ":memory:" or path.startswith("file:") or _SQLITE_SPECIAL.search(path):
            return None
        return DriverTarget(url, False, functools.partial(sqlite_connect, path), sqlite_path=path)
    for prefix in _POSTGRES_PREFIXES:
        if url.startswith(prefix):
            conninfo = "postgresql://" + url[len(prefix) :]
            return DriverTarget(url, True, functools.partial(_pg_connect, conninfo))
    return None


#: Settings of every PostgreSQL session cadence opens, unless its URL sets libpq ``options``
#: itself (``?options=-c%20jit%3Don`` turns JIT back on). JIT compiles a query whose estimated
#: cost passes ``jit_above_cost``, at every execution: the scheduled push's prefilter (a few
#: hundred ms of work, 26 times for 100,000 customers) spent about 600 ms more a call compiling,
#: 29 s of the server's time against 8.5 s without it. Every query cadence runs is bounded by
#: an index or a batch; none runs long enough to earn a compilation back.
POSTGRES_OPTIONS = "-c jit=off"


def postgres_connect_args(query: Mapping[str, Any]) -> dict[str, str]:
    """The connection arguments :data:`POSTGRES_OPTIONS` adds to a URL with ``query`` parameters.

    >>> postgres_connect_args({})
    {'options': '-c jit=off'}
    >>> postgres_connect_args({"options": "-c jit=on"})
    {}
    """
    return {} if "options" in query else {"options": POSTGRES_OPTIONS}


def _pg_connect(conninfo: str) -> Any:
    from urllib.parse import parse_qs, urlsplit

    import psycopg

    return psycopg.connect(conninfo, **postgres_connect_args(parse_qs(urlsplit(conninfo).query)))


def driver_target(url: str) -> DriverTarget | None:
    """A :class:`DriverTarget` for ``url`` when the database there is at the migration scripts' heads.

    None when the URL is not a plain SQLite file or PostgreSQL URL, the SQLite file does not
    exist, the database cannot be reached, or it is not known to be current: the caller then
    opens it through SQLAlchemy (which applies migrations, and reports what is wrong).
    """
    target = _target(url)
    if target is None:
        return None
    if target.sqlite_path is not None and not os.path.exists(target.sqlite_path):
        return None
    heads = script_heads()
    if heads is None:
        return None
    try:
        conn = target.connect()
        try:
            current = {row[0] for row in conn.execute("SELECT version_num FROM alembic_version").fetchall()}
        finally:
            conn.close()
    except Exception:  # noqa: BLE001 - any failure: the SQLAlchemy path says what is wrong
        return None
    return target if current == heads else None
