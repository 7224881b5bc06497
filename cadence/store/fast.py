"""Hot-path SQL helpers: driver-level statements for the engine loop's bulk work.

SQLAlchemy Core builds and binds a parameter object per row, which dominates the
cost of the engine loop's upserts and ``IN`` look-ups. These helpers write the SQL
once per dialect (the same text on SQLite and PostgreSQL, but for placeholders) and
hand rows to the DBAPI's ``executemany`` (psycopg pipelines it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import Connection, Table

__all__ = [
    "array_literal",
    "ask_in",
    "dialect_insert",
    "dialect_sql",
    "driver_sql",
    "dump_json",
    "execute_in",
    "execute_many",
    "fetch_in",
    "fetch_rows",
    "index_scans",
    "is_postgres",
    "rows_of",
    "send",
    "write_rows",
]


def is_postgres(conn: Connection) -> bool:
    """True on PostgreSQL."""
    return conn.dialect.name == "postgresql"


def dialect_sql(conn: Connection, sql: str) -> str:
    """Write statements with ``?`` and ``:json`` markers; adapt them to the dialect.

    ``?::json`` marks a JSON parameter of a ``jsonb`` column: ``CAST(%s AS JSONB)`` on PostgreSQL,
    plain on SQLite; ``?::jsontext`` one of a ``json`` column (kept as its text): ``CAST(%s AS JSON)``.
    """
    return driver_sql(sql, postgres=is_postgres(conn))


def driver_sql(sql: str, *, postgres: bool) -> str:
    """:func:`dialect_sql` for a driver connection: ``%s`` placeholders on PostgreSQL, ``?`` on SQLite.

    >>> driver_sql("SELECT ?::json, ?::jsontext, ?", postgres=True)
    'SELECT CAST(%s AS JSONB), CAST(%s AS JSON), %s'
    >>> driver_sql("SELECT ?::json, ?::jsontext, ?", postgres=False)
    'SELECT ?, ?, ?'
    """
    if postgres:
        return (
            sql.replace("?::jsontext", "CAST(%s AS JSON)")
            .replace("?::json", "CAST(%s AS JSONB)")
            .replace("?", "%s")
        )
    return sql.replace("?::jsontext", "?").replace("?::json", "?")


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


def send(conn: Connection, sql: str, params: Any = (), *, many: bool = False) -> None:
    """Run a statement (``%s`` placeholders on PostgreSQL) whose result nobody reads.

    Inside a transaction it goes straight to the driver's cursor, past SQLAlchemy's result
    handling: in psycopg's pipeline mode (the engine loop's batches) it is sent without
    waiting for the server, and an error surfaces at the next read or at the commit.
    ``many``: ``params`` is a sequence of parameter rows (``executemany``).
    """
    if not conn.in_transaction():
        conn.exec_driver_sql(sql, list(params) if many else params)
        return
    cursor = conn.connection.cursor()
    try:
        if many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
    finally:
        cursor.close()


@contextmanager
def index_scans(conn: Connection) -> Iterator[None]:
    """On PostgreSQL, plan the block's statements without sequential scans (for the transaction's rest
    the setting returns to its default; after an error the transaction rolls back, setting and all).

    The engine loop's look-ups and merges each touch a few rows of tables that a catch-up after a
    large import grows faster than autovacuum analyses them. Planned with the statistics of a small
    table, ``WHERE customer_id = ANY(...)`` scanned all of ``profile_daily`` or ``identities`` once per
    batch (200,000 events: about 1.5 s of the server's CPU, measured). In pipeline mode the two
    settings are sent without waiting.
    """
    if not is_postgres(conn):
        yield
        return
    send(conn, "SET LOCAL enable_seqscan = off")
    yield
    send(conn, "SET LOCAL enable_seqscan TO DEFAULT")


def execute_many(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """Run ``sql`` (with ``?`` placeholders) once per row, in one round of the driver."""
    if rows:
        send(conn, dialect_sql(conn, sql), list(rows), many=True)


def _in_values(conn: Connection, sql: str, values: list[Any]) -> tuple[str, Any]:
    if is_postgres(conn):
        kinds = set(map(type, values))
        if kinds == {int} or kinds == {str}:  # one literal: psycopg dumps a list element by element
            kind = "bigint" if kinds == {int} else "text"
            return dialect_sql(conn, sql.replace("IN_VALUES", f"= ANY(?::{kind}[])")), array_literal(
                kind, values
            )
        return dialect_sql(conn, sql.replace("IN_VALUES", "= ANY(?)")), values
    return sql.replace("IN_VALUES", "IN (SELECT value FROM json_each(?))"), dump_json(values)


def fetch_in(conn: Connection, sql: str, values: Iterable[Any], *params: Any) -> list[Any]:
    """Run ``sql`` whose last condition is ``... IN_VALUES`` over ``values``.

    The marker ``IN_VALUES`` becomes ``IN (SELECT value FROM json_each(?))`` on SQLite
    and ``= ANY(?)`` on PostgreSQL, so any number of values is one parameter.
    """
    values = list(values)
    if not values:
        return []
    text, arg = _in_values(conn, sql, values)
    return fetch_rows(conn, text, (*params, arg), adapted=True)


def ask_in(conn: Connection, sql: str, values: Iterable[Any], *params: Any) -> Any:
    """:func:`fetch_in` in two steps: send the query now, take its rows later with :func:`rows_of`.

    On PostgreSQL in psycopg's pipeline mode nothing waits here, so queries asked one after the
    other cost their caller one wait, not one each. On SQLite the rows are read at once.
    """
    values = list(values)
    if not values or not is_postgres(conn):
        return fetch_in(conn, sql, values, *params)
    text, arg = _in_values(conn, sql, values)
    cursor = conn.connection.cursor()
    cursor.execute(text, (*params, arg))
    return cursor


def rows_of(asked: Any) -> list[Any]:
    """The rows of a query :func:`ask_in` sent (waiting for them if need be)."""
    if isinstance(asked, list):
        return asked
    try:
        return list(asked.fetchall())
    finally:
        asked.close()


def execute_in(conn: Connection, sql: str, values: Iterable[Any], *params: Any) -> None:
    """Run a statement (``DELETE``, ``UPDATE``) whose last condition is ``... IN_VALUES``, once.

    The same marker as :func:`fetch_in`; nothing is run when ``values`` is empty.
    """
    values = list(values)
    if values:
        text, arg = _in_values(conn, sql, values)
        send(conn, text, (*params, arg))


def fetch_rows(conn: Connection, sql: str, params: Sequence[Any] = (), *, adapted: bool = False) -> list[Any]:
    """Run a query with ``?`` placeholders on the driver's cursor: plain tuples, no Row objects.

    The loop reads thousands of rows per batch; SQLAlchemy's result rows cost more than
    the query. The statement runs on the connection's transaction. ``adapted`` says the
    placeholders are already the dialect's.
    """
    cursor = conn.connection.cursor()
    try:
        cursor.execute(sql if adapted else dialect_sql(conn, sql), tuple(params))
        return list(cursor.fetchall())
    finally:
        cursor.close()


def iter_rows(conn: Connection, sql: str, params: Sequence[Any] = (), *, chunk: int = 5_000) -> Iterator[Any]:
    """:func:`fetch_rows`, handed out ``chunk`` rows at a time, for results read once and then dropped.

    SQLite's cursor steps through the result as it is read; psycopg's client-side cursor holds
    the whole result, so on PostgreSQL only the Python tuples are made a chunk at a time.
    """
    cursor = conn.connection.cursor()
    try:
        cursor.execute(dialect_sql(conn, sql), tuple(params))
        while rows := cursor.fetchmany(chunk):
            yield from rows
    finally:
        cursor.close()


#: PostgreSQL array element types for :func:`write_rows` columns; ``jsonb`` goes as text.
_ARRAY_TYPES = {"jsonb": "text"}
_INT_KINDS = frozenset({"bigint", "integer", "smallint"})
_FLOAT_KINDS = frozenset({"float8", "double precision", "real"})
_STR_OR_NONE = frozenset({str, type(None)})


def _quoted(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if "\\" in text or '"' in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text + '"'


def array_literal(kind: str, values: Sequence[Any]) -> str:
    """``values`` as a PostgreSQL array literal of ``kind`` elements (``None`` is ``NULL``).

    psycopg builds array parameters in Python, element by element, which cost more than
    the engine loop's own work; one string per column, cast by the statement
    (``%s::bigint[]``), is what the server parses from psycopg's text format anyway.
    Text elements are always quoted (so ``"NULL"`` stays a string); floats keep their
    exact value (``repr``; ``inf`` and ``nan`` are valid input too).

    >>> array_literal("bigint", [1, None, 3]), array_literal("boolean", [True, False])
    ('{1,NULL,3}', '{t,f}')
    >>> print(array_literal("text", ['a"b', "c\\\\d", None, "NULL", "x,{y}"]))
    {"a\\"b","c\\\\d",NULL,"NULL","x,{y}"}
    >>> array_literal("float8", [0, 2.5, None])
    '{0.0,2.5,NULL}'
    """
    kinds = set(map(type, values))
    if kind in _INT_KINDS:
        if kinds == {int}:  # the common case, joined at C speed
            return "{" + ",".join(map(str, values)) + "}"
        items = ["NULL" if v is None else str(int(v)) for v in values]
    elif kind in _FLOAT_KINDS:
        if kinds == {float}:
            return "{" + ",".join(map(repr, values)) + "}"
        items = ["NULL" if v is None else repr(float(v)) for v in values]
    elif kind == "boolean":
        items = ["NULL" if v is None else ("t" if v else "f") for v in values]
    else:
        if kinds == {str} or kinds == _STR_OR_NONE:
            # Escaped all at once, at C speed; PostgreSQL text holds no NUL: a safe separator when absent.
            nulls = type(None) in kinds
            joined = "\x00".join([v or "" for v in values] if nulls else values)
            if joined.count("\x00") == len(values) - 1:
                if '"' in joined or "\\" in joined:
                    joined = joined.replace("\\", "\\\\").replace('"', '\\"')
                if not nulls:
                    return '{"' + joined.replace("\x00", '","') + '"}'
                items = [
                    "NULL" if v is None else '"' + text + '"'
                    for v, text in zip(values, joined.split("\x00"), strict=True)
                ]
                return "{" + ",".join(items) + "}"
        items = ["NULL" if v is None else _quoted(v) for v in values]
    return "{" + ",".join(items) + "}"


def write_rows(
    conn: Connection,
    into: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Sequence[Any]],
    tail: str = "",
    *,
    fixed: Sequence[tuple[str, str]] = (),
) -> None:
    """``INSERT INTO {into} (columns) ... {tail}`` for many rows, as cheaply as each dialect allows.

    ``columns`` are ``(name, postgresql_type)`` pairs (``bigint``, ``integer``,
    ``float8``, ``text``, ``boolean``, ``jsonb`` given as JSON text). ``fixed`` are
    ``(name, sql)`` pairs: columns every row sets to the same SQL expression (written
    for the connection's dialect), which is not sent per row. ``tail`` is what follows
    the rows (``ON CONFLICT ... DO UPDATE SET ... = excluded....``).
    PostgreSQL gets one statement whose rows come from ``unnest`` of one array per
    column, each sent as one array literal (:func:`array_literal`: no per-row round
    trip, parse or bind); SQLite gets ``executemany``, which runs in-process anyway
    (rows may be tuples or lists).
    On PostgreSQL a conflict target must not repeat within ``rows``: aggregate them first.
    """
    if not rows:
        return
    names = ", ".join([name for name, _ in columns] + [name for name, _ in fixed])
    if not is_postgres(conn):
        _sqlite_write_rows(conn, into, names, len(columns), rows, tail, fixed)
        return
    arrays = ", ".join(f"%s::{_ARRAY_TYPES.get(kind, kind)}[]" for _, kind in columns)
    picks = ", ".join(
        [f"r.{name}::jsonb" if kind == "jsonb" else f"r.{name}" for name, kind in columns]
        + [sql for _, sql in fixed]
    )
    rnames = ", ".join(name for name, _ in columns)
    sql = f"INSERT INTO {into} ({names}) SELECT {picks} FROM unnest({arrays}) AS r({rnames}) {tail}"
    literals = tuple(
        array_literal(kind, column)
        for (_, kind), column in zip(columns, zip(*rows, strict=True), strict=True)
    )
    send(conn, sql, literals)


def _sqlite_write_rows(
    conn: Connection,
    into: str,
    names: str,
    width: int,
    rows: Sequence[Sequence[Any]],
    tail: str,
    fixed: Sequence[tuple[str, str]],
) -> None:
    """:func:`write_rows` on SQLite: ``executemany``, on the driver's cursor when a transaction is open.

    The driver binds lists as well as tuples, so the rows are not copied. Multi-row
    ``VALUES`` ran a quarter fewer instructions, but a statement that writes many rows and
    may abort keeps a statement journal: tens of thousands of page writes to a temporary
    file per 20,000 events, which cost more than they saved (measured).
    """
    marks = ", ".join(["?"] * width + [sql for _, sql in fixed])
    sql = f"INSERT INTO {into} ({names}) VALUES ({marks}) {tail}"
    if conn.in_transaction():
        cursor = conn.connection.cursor()
        try:
            cursor.executemany(sql, rows)
        finally:
            cursor.close()
        return
    # Without an open transaction the statement goes through SQLAlchemy, which begins one.
    batch = rows if isinstance(rows, list) and isinstance(rows[0], tuple) else list(map(tuple, rows))
    conn.exec_driver_sql(sql, batch)
