"""Database engines and schema migrations, built by factories (never at import time)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from cadence.errors import StorageError
from cadence.store.driver import (
    MIGRATIONS,
    WRITE_LOCK_TIMEOUT,
    SQLiteWriteLock,
    _LockingConnection,
    begin_sqlite_write,
    configure_sqlite,
    postgres_connect_args,
    script_heads,
)

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "MIGRATIONS",
    "WRITE_LOCK_TIMEOUT",
    "SQLiteWriteLock",
    "begin_write",
    "create_db_engine",
    "is_postgres",
    "migrate",
    "pending_migrations",
    "read_connection",
]

#: The scripts' heads read as text (kept under its old name: tests and tools use it).
_script_heads = script_heads


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
        if parsed.get_backend_name() == "postgresql":
            options["connect_args"] = postgres_connect_args(parsed.query)
    options.update(kwargs)
    engine = create_engine(url, **options)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            configure_sqlite(dbapi_conn, write_lock)

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front: no deadlock-prone lock upgrades. A connection
            # marked read-only (execution option ``cadence_readonly``) reads one snapshot without it.
            readonly = conn.get_execution_options().get("cadence_readonly")
            if readonly:
                conn.exec_driver_sql("BEGIN")
                return
            begin_sqlite_write(
                conn.connection.dbapi_connection
            )  # the file's write lock, then BEGIN IMMEDIATE

    return engine


def begin_write(raw: Any) -> None:
    """Begin a write transaction on a DBAPI connection cadence's engine opened (outside SQLAlchemy).

    On SQLite: the file's write lock, then ``BEGIN IMMEDIATE``, as every write transaction of
    the engine begins; ``commit()`` or ``rollback()`` on the connection lets the next writer
    in. On PostgreSQL (psycopg, not in autocommit) the first statement begins it: nothing to do.
    """
    if isinstance(raw, sqlite3.Connection):
        begin_sqlite_write(raw)


def read_connection(engine: Engine) -> Connection:
    """A connection of ``engine`` for reading only: on SQLite, without the database's write lock.

    Every transaction cadence begins on SQLite takes the write lock first (``BEGIN
    IMMEDIATE``), which every decision commit of every worker waits for; a transaction of
    this connection begins with a plain ``BEGIN`` instead and reads one snapshot of the
    database (WAL: neither waits for a writer nor holds one up). It must not write: a write
    would bypass cadence's lock and meet SQLite's busy handler. On PostgreSQL it is an
    ordinary connection. Use it as ``with read_connection(engine) as conn: ...``.
    """
    return engine.connect().execution_options(cadence_readonly=True)


def is_postgres(engine: Engine) -> bool:
    """True when ``engine`` talks to PostgreSQL."""
    return engine.dialect.name == "postgresql"


def _alembic_config(engine: Engine) -> Config:
    from alembic.config import Config  # alembic is imported only when migrating

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def _at_heads(engine: Engine) -> bool:
    """True when the database is known to be at every head of the migration scripts.

    A quick check without Alembic, so that a command on a current database starts fast;
    False whenever it cannot tell (no version table yet, a script it cannot read).
    """
    heads = script_heads()
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
    # Applied: the current revisions and everything they build on (not only the current ones).
    applied = {rev.revision for rev in script.iterate_revisions(tuple(current), "base")} if current else set()
    return [rev.revision for rev in script.walk_revisions() if rev.revision not in applied]
