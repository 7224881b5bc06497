"""The fast ingestion paths: validation of odd values, ordered bulk appends, dedupe within a group."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, select

from cadence.engine.events import parse_call
from cadence.engine.ingest import append_events, record_events
from cadence.errors import EventError
from cadence.store.schema.core import events

BASE: dict[str, Any] = {"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m1"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"context": []}, "context"),
        ({"context": ""}, "context"),
        ({"integrations": 0}, "integrations"),
        ({"properties": ["a"]}, "properties"),
        ({"event": "   "}, "event"),
        ({"event": ""}, "event"),
        ({"event": "x" * 201}, "event"),
        ({"event": 5}, "event"),
        ({"userId": True, "anonymousId": None}, "userId"),
        ({"userId": "", "anonymousId": ""}, "userId"),
        ({"anonymousId": "a" * 201}, "anonymousId"),
        ({"messageId": "m" * 101}, "messageId"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"timestamp": True}, "timestamp"),
        ({"originalTimestamp": "2026-01-01T00:00:00Z", "sentAt": "soon"}, "sentAt"),
        ({"type": "follow"}, "type"),
        ({"type": "page", "name": "n" * 201}, "name"),  # wider than the event column
    ],
)
def test_odd_values_are_rejected_with_their_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(EventError) as caught:
        parse_call({**BASE, **change}, received_ms=0, prefix="batch.3.")
    assert caught.value.field == f"batch.3.{field}"


def test_values_that_need_normalising_are_normalised() -> None:
    event = parse_call(
        {
            **BASE,
            "userId": 42,
            "anonymousId": "",
            "messageId": "",
            "context": {},
            "timestamp": " 2026-01-01T00:00:00.250+01:00 ",
        },
        received_ms=0,
    )
    assert (event.user_id, event.anonymous_id) == ("42", None)
    assert event.message_id.startswith("auto-")
    assert "context" not in event.payload
    assert event.ts_ms == 1767222000250  # 2025-12-31T23:00:00.250Z


def test_epoch_and_naive_timestamps() -> None:
    assert parse_call({**BASE, "timestamp": 1767225600.5}, received_ms=0).ts_ms == 1767225600500
    assert parse_call({**BASE, "timestamp": "2026-01-01T00:00:00"}, received_ms=0).ts_ms == 1767225600000


def test_a_large_group_keeps_its_order_and_drops_duplicates(db_engine: Engine) -> None:
    # More rows than one SQLite statement takes, with repeats inside the group and of a stored event.
    record_events(engine=db_engine, batch=[parse_call({**BASE, "messageId": "m7"}, received_ms=1)])
    ids = [f"m{i}" for i in range(2_500)] + ["m3", "m2499"]
    batch = [parse_call({**BASE, "messageId": m}, received_ms=1) for m in ids]
    with db_engine.begin() as conn:
        result = append_events(conn, batch)
    assert (result.accepted, result.duplicates) == (2_499, 3)
    with db_engine.connect() as conn:
        stored = conn.execute(select(events.c.message_id).order_by(events.c.id)).scalars().all()
    assert stored == ["m7"] + [f"m{i}" for i in range(2_500) if i != 7]


def test_payload_round_trips_with_unicode_and_numbers(db_engine: Engine) -> None:
    properties = {"name": "Crème brûlée ☕", "big": 2**53 + 1, "ratio": 0.1, "nested": {"list": [1, None]}}
    record_events(engine=db_engine, batch=[parse_call({**BASE, "properties": properties}, received_ms=1)])
    with db_engine.connect() as conn:
        payload = conn.execute(select(events.c.payload)).scalar_one()
    assert payload["properties"] == properties
