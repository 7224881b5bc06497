"""Database engines and schema migrations, built by factories (never at import time)."""

from __future__ import annotations

import ast
import fcntl
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from cadence.errors import StorageError

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "SQLiteWriteLock",
    "begin_write",
    "create_db_engine",
    "is_postgres",
    "migrate",
    "pending_migrations",
]

MIGRATIONS = Path(__file__).with_name("migrations")


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def normalise_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs given without a driver.

    >>> normalise_url("postgresql://u@h/db")
    'postgresql+psycopg://u@h/db'
    >>> normalise_url("sqlite:///x.db")
    'sqlite:///x.db'
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


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


def create_db_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` tuned for cadence's workload.

    SQLite runs in WAL mode with ``synchronous=NORMAL`` (a committed transaction
    survives a process crash), foreign keys on, a busy timeout so the engine loop and
    the API can share the file, and a 64 MiB page cache per connection. On an SQLite
    file every write transaction first takes the file's :class:`SQLiteWriteLock`.
    """
    url = normalise_url(url)
    parsed = make_url(url)
    options: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
    if parsed.get_backend_name() == "sqlite":
        options["connect_args"] = {"check_same_thread": False, "timeout": 30}
        write_lock = None
        if parsed.database in (None, "", ":memory:"):
            options["poolclass"] = StaticPool
        elif not parsed.database.startswith("file:") and not parsed.query.get("uri"):
            write_lock = SQLiteWriteLock.for_path(parsed.database)
            options["connect_args"]["factory"] = _LockingConnection
    else:
        options["pool_pre_ping"] = True
        options["pool_size"] = 10
        options["max_overflow"] = 20
    options.update(kwargs)
    engine = create_engine(url, **options)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, decide when transactions begin.
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
            cur.execute("PRAGMA cache_size=-65536")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front: no deadlock-prone lock upgrades. A connection
            # marked read-only (execution option ``cadence_readonly``) reads one snapshot without it.
            readonly = conn.get_execution_options().get("cadence_readonly")
            if readonly:
                conn.exec_driver_sql("BEGIN")
                return
            raw = conn.connection.dbapi_connection
            locking = isinstance(raw, _LockingConnection)
            if locking:
                raw.lock_for_write()  # the kernel wakes us when the writer before us is done
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                if locking:
                    raw.unlock()
                raise

    return engine


def begin_write(raw: Any) -> None:
    """Begin a write transaction on a DBAPI connection cadence's engine opened (outside SQLAlchemy).

    On SQLite: the file's write lock, then ``BEGIN IMMEDIATE``, as every write transaction of
    the engine begins; ``commit()`` or ``rollback()`` on the connection lets the next writer
    in. On PostgreSQL (psycopg, not in autocommit) the first statement begins it: nothing to do.
    """
    if not isinstance(raw, sqlite3.Connection):
        return
    if not isinstance(raw, _LockingConnection):
        raw.execute("BEGIN IMMEDIATE")
        return
    raw.lock_for_write()  # the kernel wakes us when the writer before us is done
    try:
        raw.execute("BEGIN IMMEDIATE")
    except BaseException:
        raw.unlock()
        raise


def is_postgres(engine: Engine) -> bool:
    """True when ``engine`` talks to PostgreSQL."""
    return engine.dialect.name == "postgresql"


def _alembic_config(engine: Engine) -> Config:
    from alembic.config import Config  # alembic is imported only when migrating

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


_REVISION = re.compile(r"^revision(?:\s*:\s*str)?\s*=\s*[\"']([^\"']+)[\"']\s*$", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision\b[^=]*=\s*(.+?)\s*$", re.MULTILINE)
_DEPENDS_ON = re.compile(r"^depends_on\b[^=]*=\s*(.+?)\s*$", re.MULTILINE)


def _script_heads() -> frozenset[str] | None:
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


def _at_heads(engine: Engine) -> bool:
    """True when the database is known to be at every head of the migration scripts.

    A quick check without Alembic, so that a command on a current database starts fast;
    False whenever it cannot tell (no version table yet, a script it cannot read).
    """
    heads = _script_heads()
    if heads is None:
        return False
    try:
        with engine.connect() as conn:
            current = {row[0] for row in conn.exec_driver_sql("SELECT version_num FROM alembic_version")}
    except SQLAlchemyError:
        return False
    return current == heads


def migrate(engine: Engine, revision: str = "heads") -> None:
    """Apply Alembic migrations up to ``revision`` (all heads by default)."""
    if revision == "heads" and _at_heads(engine):
        return
    from alembic import command

    try:
        command.upgrade(_alembic_config(engine), revision)
    except Exception as exc:  # noqa: BLE001 - any driver error becomes one clear message
        raise StorageError(f"could not migrate {engine.url!r}: {exc}") from exc


def pending_migrations(engine: Engine) -> list[str]:
    """Revisions not yet applied to the database behind ``engine``."""
    if _at_heads(engine):
        return []
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(engine))
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    heads = set(script.get_heads())
    if heads <= current:
        return []
    pending = []
    for rev in script.walk_revisions():
        if rev.revision not in current:
            pending.append(rev.revision)
    return pending
