"""Fixtures shared by every suite: fresh databases on SQLite and on PostgreSQL.

The PostgreSQL variant uses ``CADENCE_TEST_POSTGRES_URL`` (``make test`` starts a
throw-away cluster and sets it). Without it the variant is skipped, unless
``CADENCE_REQUIRE_POSTGRES=1`` (set by ``make test`` and CI) turns that into a failure.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from cadence.runtime import Runtime, open_runtime
from cadence.settings import Settings
from cadence.store.db import create_db_engine, migrate

POSTGRES_URL = os.environ.get("CADENCE_TEST_POSTGRES_URL")
REQUIRE_POSTGRES = os.environ.get("CADENCE_REQUIRE_POSTGRES") == "1"

os.environ.setdefault("CADENCE_DISABLE_PLUGIN_AUTOLOAD", "1")


def _postgres_engine() -> Iterator[Engine]:
    if not POSTGRES_URL:
        if REQUIRE_POSTGRES:
            pytest.fail("CADENCE_REQUIRE_POSTGRES=1 but CADENCE_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL configured (set CADENCE_TEST_POSTGRES_URL)")
    name = "t_" + uuid.uuid4().hex[:12]
    admin = create_db_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", poolclass=None)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, _ = POSTGRES_URL.rpartition("/")
    engine = create_db_engine(f"{base}/{name}", pool_size=5, max_overflow=10)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_engine(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[Engine]:
    """A migrated, empty database; every test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        engine = create_db_engine(f"sqlite:///{tmp_path}/cadence.db")
        migrate(engine)
        yield engine
        engine.dispose()
    else:
        gen = _postgres_engine()
        engine = next(gen)
        migrate(engine)
        yield engine
        for _ in gen:
            pass


@pytest.fixture
def sqlite_engine(tmp_path: os.PathLike[str]) -> Iterator[Engine]:
    """A migrated SQLite database, for tests that are about logic rather than storage."""
    engine = create_db_engine(f"sqlite:///{tmp_path}/cadence.db")
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def settings(tmp_path: os.PathLike[str]) -> Settings:
    """Settings that touch nothing outside ``tmp_path``."""
    return Settings(
        database_url=f"sqlite:///{tmp_path}/cadence.db",
        rules_paths=[],
        disable_plugin_autoload=True,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
def runtime(db_engine: Engine, settings: Settings) -> Iterator[Runtime]:
    """A runtime on ``db_engine`` (both databases)."""
    rt = open_runtime(settings.model_copy(update={"database_url": str(db_engine.url)}), engine=db_engine)
    yield rt


@pytest.fixture
def write_locks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every acquisition of cadence's SQLite write lock from here on (the database file each names)."""
    from cadence.store import driver

    taken: list[str] = []
    acquire = driver.SQLiteWriteLock.acquire

    def counted(self: driver.SQLiteWriteLock) -> bool:
        taken.append(self.path)
        return acquire(self)

    monkeypatch.setattr(driver.SQLiteWriteLock, "acquire", counted)
    return taken


@contextlib.contextmanager
def holding_write_lock(engine: Engine) -> Iterator[None]:
    """Another connection holds SQLite's write lock (``BEGIN IMMEDIATE``, open) for the block.

    A transaction of cadence's that wants the write lock meanwhile waits for SQLite's busy
    timeout (30 s) and fails with "database is locked"; one that reads a snapshot does not wait.
    """
    assert engine.dialect.name == "sqlite" and engine.url.database
    holder = sqlite3.connect(engine.url.database, timeout=0, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
        holder.execute("ROLLBACK")
    finally:
        holder.close()
