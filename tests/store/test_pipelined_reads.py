"""The engine loop's reads in psycopg's pipeline mode: queries asked one after the other each get
their own rows back, and :func:`index_scans` turns sequential scans off only for its block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine

from cadence.store.fast import ask_in, fetch_rows, index_scans, is_postgres, rows_of, write_rows

IDENTITY_COLUMNS = (
    ("kind", "text"),
    ("value", "text"),
    ("customer_id", "bigint"),
    ("first_seen_ms", "bigint"),
)


@contextmanager
def pipelined(conn: Connection) -> Iterator[None]:
    """Pipeline mode on PostgreSQL (as the engine loop's batches run), nothing on SQLite."""
    if not is_postgres(conn):
        yield
        return
    with conn.connection.driver_connection.pipeline():  # type: ignore[union-attr]
        yield


def test_queries_asked_at_once_each_return_their_own_rows(db_engine: Engine) -> None:
    rows = [("user", f"u{i}", i % 3 + 1, 1000 + i) for i in range(9)]
    with db_engine.begin() as conn, pipelined(conn):
        write_rows(conn, "identities", IDENTITY_COLUMNS, rows)
        query = "SELECT value FROM identities WHERE customer_id IN_VALUES"
        first, second, none = (
            ask_in(conn, query, [1]),
            ask_in(conn, query, [2, 3]),
            ask_in(conn, query, []),
        )
        assert sorted(v for (v,) in rows_of(second)) == sorted(r[1] for r in rows if r[2] != 1)
        assert sorted(v for (v,) in rows_of(first)) == sorted(r[1] for r in rows if r[2] == 1)
        assert rows_of(none) == []


def test_index_scans_turns_sequential_scans_off_for_its_block_only(db_engine: Engine) -> None:
    with db_engine.begin() as conn:
        postgres = is_postgres(conn)
        setting = "SHOW enable_seqscan" if postgres else "SELECT 'on'"
        with pipelined(conn):
            with index_scans(conn):
                inside = fetch_rows(conn, setting)
            after = fetch_rows(conn, setting)
    assert (inside, after) == ([("off" if postgres else "on",)], [("on",)])
