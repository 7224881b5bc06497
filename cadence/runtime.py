"""The running pieces of one cadence process, built from settings by a factory.

A :class:`Runtime` owns the database engine and the clock; the CLI commands and the
API app both start from one, so a test can build a fresh runtime per case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from cadence.clock import Clock
from cadence.errors import StorageError
from cadence.settings import Settings
from cadence.store.db import create_db_engine, migrate, pending_migrations

__all__ = ["Runtime", "open_runtime"]


@dataclass
class Runtime:
    """Settings, the database engine, the clock, and named extensions of later parts."""

    settings: Settings
    engine: Engine
    clock: Clock = field(default_factory=Clock)
    extensions: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()


def open_runtime(
    settings: Settings,
    *,
    engine: Engine | None = None,
    clock: Clock | None = None,
    upgrade: bool = False,
) -> Runtime:
    """Open the database named by ``settings`` and check its schema is current.

    With ``upgrade=True`` pending migrations are applied first; otherwise a database
    behind the code raises :class:`StorageError` telling the operator what to run.
    """
    owned = engine is None
    engine = engine or create_db_engine(settings.database_url)
    try:
        if upgrade:
            migrate(engine)
        else:
            try:
                pending = pending_migrations(engine)
            except Exception as exc:  # noqa: BLE001 - any driver error: say where we tried
                raise StorageError(f"cannot open database {settings.database_url!r}: {exc}") from exc
            if pending:
                raise StorageError(
                    f"database {settings.database_url!r} needs migrations "
                    f"({', '.join(sorted(pending))}): run `cadence db upgrade`"
                )
    except BaseException:
        if owned:
            engine.dispose()  # do not leave pooled connections behind a failed start
        raise
    return Runtime(settings=settings, engine=engine, clock=clock or Clock())
