"""notify13_0004: every statement that changes what a decision's check reads notifies the customers it changed.

The check reads a customer's counting sends (``queued``, ``sending``, ``sent``: due time,
campaign, channel) and the profile's stamp (``event_count``, ``updated_event_id``,
``customers.merged_into``): sends and customers notify through triggers, profiles through
their writers (``cadence.engine.profiles.notify_inputs``). Each change below is committed on one connection and what the
channel ``cadence_inputs`` carried is read on another, up to a notification of the test's own
(notifications arrive in commit order). PostgreSQL only: SQLite has no triggers here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text

from cadence.engine.decision_state import CHANNEL


class Listener:
    def __init__(self, engine: Engine) -> None:
        proxied = engine.raw_connection()
        self.conn: Any = proxied.driver_connection
        proxied.detach()
        self.conn.autocommit = True
        self.conn.execute(f"LISTEN {CHANNEL}")
        self.engine = engine
        self.count = 0

    def heard(self, sql: str, params: dict[str, Any] | None = None) -> list[str]:
        """Commit ``sql`` on another connection; the payloads it notified."""
        with self.engine.begin() as conn:
            conn.execute(text(sql), params or {})
        self.count += 1
        token = f"sync:test:{self.count}"
        with self.engine.begin() as conn:
            conn.execute(text("SELECT pg_notify(:c, :t)"), {"c": CHANNEL, "t": token})
        out = []
        for notify in self.conn.notifies(timeout=10):
            if notify.payload == token:
                return out
            out.append(notify.payload)
        raise AssertionError("the test's own notification never came")


def ids(payloads: list[str]) -> set[int]:
    return {int(i) for p in payloads for i in p.split(",")}


@pytest.fixture
def listener(db_engine: Engine) -> Iterator[Listener]:
    if db_engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's triggers")
    listener = Listener(db_engine)
    with db_engine.begin() as conn:
        conn.execute(
            text("INSERT INTO customers (id, created_ms) SELECT g, 0 FROM generate_series(1, 3000) g")
        )
    yield listener
    listener.conn.close()


SEND = (
    "INSERT INTO sends (idempotency_key, campaign, customer_id, channel, connector, template, variables, "
    "due_ms, status, attempts, created_ms, updated_ms) VALUES "
)


def send_values(customer: int, status: str = "queued", key: str | None = None) -> str:
    return f"('{key or f'k{customer}'}', 'c', {customer}, 'email', 'log', 't', '{{}}', 1000, '{status}', 0, 0, 0)"


def test_sends_inserted_updated_and_deleted(listener: Listener) -> None:
    assert ids(listener.heard(SEND + ", ".join(send_values(c) for c in (1, 2, 2)[:2]))) == {1, 2}
    assert listener.heard(SEND + send_values(3, "failed")) == []  # not counting: nothing to tell
    # queued -> sending -> sent: counted all along, the check reads the same rows
    assert listener.heard("UPDATE sends SET status = 'sending', attempts = 1 WHERE customer_id = 1") == []
    assert listener.heard("UPDATE sends SET status = 'sent' WHERE customer_id = 1") == []
    assert ids(listener.heard("UPDATE sends SET status = 'failed' WHERE customer_id = 1")) == {1}
    assert ids(listener.heard("UPDATE sends SET status = 'queued' WHERE customer_id = 3")) == {
        3
    }  # counts now
    assert ids(listener.heard("UPDATE sends SET due_ms = 2000 WHERE customer_id = 2")) == {2}
    assert ids(listener.heard("UPDATE sends SET customer_id = 4 WHERE customer_id = 2")) == {2, 4}
    assert listener.heard("DELETE FROM sends WHERE customer_id = 1") == []  # failed: did not count
    assert ids(listener.heard("DELETE FROM sends WHERE customer_id = 3")) == {3}


def test_customers_merged_and_deleted(listener: Listener) -> None:
    assert ids(listener.heard("UPDATE customers SET merged_into = 8 WHERE id = 7")) == {7, 8}
    assert listener.heard("UPDATE customers SET created_ms = 1 WHERE id = 9") == []
    assert ids(listener.heard("DELETE FROM customers WHERE id IN (7, 9)")) == {7, 9}


def test_profile_writers_notify_what_they_wrote(listener: Listener, db_engine: Engine) -> None:
    """Profiles have no trigger (it cost the engine loop too much): their writers call notify_inputs."""
    from cadence.engine.profiles import notify_inputs

    with db_engine.begin() as conn:
        notify_inputs(conn, [12, 11, 12])
    assert ids(listener.heard("SELECT 1")) == {11, 12}
    with db_engine.connect() as conn:  # rolled back: nothing
        notify_inputs(conn, [13])
        conn.rollback()
    assert listener.heard("SELECT 1") == []
    with db_engine.begin() as conn:
        notify_inputs(conn, range(1, 2502))
    assert listener.heard("SELECT 1") == ["*"]


def test_many_customers_in_chunks_and_too_many_as_everyone(listener: Listener) -> None:
    payloads = listener.heard(SEND + ", ".join(send_values(c) for c in range(1, 1001)))
    assert len(payloads) == 3 and all(len(p) < 8000 for p in payloads)  # 350 ids a notification
    assert ids(payloads) == set(range(1, 1001))
    assert listener.heard("UPDATE sends SET status = 'cancelled' WHERE customer_id <= 1000") != ["*"]
    many = SEND + ", ".join(send_values(c, key=f"m{c}") for c in range(1, 2501))
    assert listener.heard(many) == ["*"]


def test_a_rolled_back_change_notifies_nothing(listener: Listener, db_engine: Engine) -> None:
    with db_engine.connect() as conn:
        conn.execute(text(SEND + send_values(1)))
        conn.rollback()
    assert listener.heard("SELECT 1") == []
