"""Plain bulk inserts (``write_rows`` without a conflict clause: array literals and ``unnest`` on
PostgreSQL, ``executemany`` on SQLite): every value comes back as written."""

from __future__ import annotations

import math

from sqlalchemy import Engine, select

from cadence.engine.profiles import _STATS_COLUMNS
from cadence.store.fast import write_rows
from cadence.store.schema.core import identities, profile_event_stats, profiles

# what a text encoding (array literal, COPY text) must escape
AWKWARD = [
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "back\\slash",
    'quote"d',
    "100%s %d",
    "\\N",
    "NULL",
    "ümlaut",
]


def test_text_with_copy_specials_and_nulls_comes_back_as_written(db_engine: Engine) -> None:
    rows = [("user", value, i + 1, 1000 + i) for i, value in enumerate(AWKWARD)]
    with db_engine.begin() as conn:
        write_rows(
            conn,
            "identities",
            (("kind", "text"), ("value", "text"), ("customer_id", "bigint"), ("first_seen_ms", "bigint")),
            rows,
        )
        # a nullable text column, JSON text holding escapes, and a column set by an SQL expression
        write_rows(
            conn,
            "profiles",
            (
                ("customer_id", "bigint"),
                ("first_seen_ms", "bigint"),
                ("last_seen_ms", "bigint"),
                ("event_count", "bigint"),
                ("timezone", "text"),
                ("updated_event_id", "bigint"),
                ("trait_events", "jsonb"),
            ),
            [(1, 5, 6, 2, None, 9, '{"a\\tb": "x\\\\y\\n"}'), (2, 5, 6, 1, "Europe/Berlin", 10, "{}")],
            fixed=(("traits", "'{}'::jsonb" if db_engine.dialect.name == "postgresql" else "'{}'"),),
        )
    with db_engine.connect() as conn:
        stored = sorted(conn.execute(select(identities.c.value, identities.c.customer_id)).all())
        got = {r.customer_id: r for r in conn.execute(select(profiles))}
    assert stored == sorted((value, i + 1) for i, value in enumerate(AWKWARD))
    assert got[1].timezone is None and got[2].timezone == "Europe/Berlin"
    assert got[1].trait_events == {"a\tb": "x\\y\n"} and got[2].traits == {}
    assert (got[1].event_count, got[1].updated_event_id) == (2, 9)


def test_floats_keep_their_exact_values(db_engine: Engine) -> None:
    values = [0.1, 1e-300, -0.0, 2.5e300, 7, float("inf")]
    rows = [(i, "E", 1, v, 1, 2, None if i % 2 else v) for i, v in enumerate(values)]
    with db_engine.begin() as conn:
        write_rows(
            conn,
            "profile_event_stats",
            _STATS_COLUMNS,  # the loop's own column types
            rows,
        )
    with db_engine.connect() as conn:
        got = dict(
            conn.execute(select(profile_event_stats.c.customer_id, profile_event_stats.c.sum_value)).all()
        )
        last = dict(
            conn.execute(select(profile_event_stats.c.customer_id, profile_event_stats.c.last_value)).all()
        )
    assert [got[i] for i in range(len(values))] == [float(v) for v in values]
    assert math.copysign(1, got[2]) == -1 or db_engine.dialect.name == "sqlite"  # SQLite may drop the sign
    assert [last[i] for i in range(len(values))] == [
        None if i % 2 else float(v) for i, v in enumerate(values)
    ]


def test_a_bulk_insert_on_a_connection_without_a_transaction_is_committed_by_commit(
    db_engine: Engine,
) -> None:
    with db_engine.connect() as conn:
        write_rows(
            conn,
            "identities",
            (("kind", "text"), ("value", "text"), ("customer_id", "bigint"), ("first_seen_ms", "bigint")),
            [("user", "late", 1, 1)],
        )
        conn.commit()
    with db_engine.connect() as conn:
        assert conn.scalar(select(identities.c.customer_id).where(identities.c.value == "late")) == 1
