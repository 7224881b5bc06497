"""Hot-path SQL helpers: driver-level statements for the engine loop's bulk work.

SQLAlchemy Core builds and binds a parameter object per row, which dominates the
cost of the engine loop's upserts and ``IN`` look-ups. These helpers write the SQL
once per dialect (the same text on SQLite and PostgreSQL, but for placeholders) and
hand rows to the DBAPI's ``executemany`` (psycopg pipelines it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy import Connection, Table

__all__ = ["dialect_insert", "dialect_sql", "dump_json", "execute_many", "fetch_in", "is_postgres"]


def is_postgres(conn: Connection) -> bool:
    """True on PostgreSQL."""
    return conn.dialect.name == "postgresql"


def dialect_sql(conn: Connection, sql: str) -> str:
    """Write statements with ``?`` and ``:json`` markers; adapt them to the dialect.

    ``?::json`` marks a JSON parameter: ``CAST(%s AS JSONB)`` on PostgreSQL, plain on SQLite.
    """
    if is_postgres(conn):
        return sql.replace("?::json", "CAST(%s AS JSONB)").replace("?", "%s")
    return sql.replace("?::json", "?")


def dump_json(value: Any) -> str:
    """JSON text for a JSON column parameter.

    >>> dump_json({"a": 1})
    '{"a":1}'
    """
    return orjson.dumps(value).decode()


def dialect_insert(conn: Connection, table: Table) -> Any:
    """``INSERT`` for ``table`` in the connection's dialect, so ``on_conflict_do_*`` is available."""
    if is_postgres(conn):  # dialect modules are imported on first use: CLI start-up stays short
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def execute_many(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """Run ``sql`` (with ``?`` placeholders) once per row, in one round of the driver."""
    if rows:
        conn.exec_driver_sql(dialect_sql(conn, sql), list(rows))


def fetch_in(conn: Connection, sql: str, values: Iterable[Any], *params: Any) -> list[Any]:
    """Run ``sql`` whose last condition is ``... IN_VALUES`` over ``values``.

    The marker ``IN_VALUES`` becomes ``IN (SELECT value FROM json_each(?))`` on SQLite
    and ``= ANY(?)`` on PostgreSQL, so any number of values is one parameter.
    """
    values = list(values)
    if not values:
        return []
    if is_postgres(conn):
        text = sql.replace("IN_VALUES", "= ANY(?)")
        arg: Any = values
    else:
        text = sql.replace("IN_VALUES", "IN (SELECT value FROM json_each(?))")
        arg = dump_json(values)
    return list(conn.exec_driver_sql(dialect_sql(conn, text), (*params, arg)).fetchall())
