"""The two ProfileView implementations agree where they should (day buckets aside)."""

from __future__ import annotations

from sqlalchemy import Engine, insert

from cadence.engine.profiles import load_profile
from cadence.engine.profiles_memory import MemoryProfile, ProfileEvent
from cadence.store.schema.core import consent, customers, profile_daily, profile_event_stats, profiles

DAY = 86_400_000
NOW = 20_000 * DAY + 12 * 3_600_000  # noon UTC


def test_database_profile_reads_the_aggregate_tables(db_engine: Engine) -> None:
    purchases = [(NOW - 40 * DAY, 30.0), (NOW - 3 * DAY, 50.0), (NOW - 3 * DAY + 60_000, 20.0)]
    with db_engine.begin() as conn:
        conn.execute(insert(customers).values(id=5, created_ms=0))
        conn.execute(
            insert(profiles).values(
                customer_id=5,
                first_seen_ms=0,
                last_seen_ms=NOW,
                event_count=3,
                traits={"tier": "gold"},
                timezone="Europe/Berlin",
                updated_event_id=3,
            )
        )
        conn.execute(
            insert(profile_event_stats).values(
                customer_id=5,
                event="Order Completed",
                count=3,
                sum_value=100.0,
                first_ms=purchases[0][0],
                last_ms=purchases[-1][0],
                last_value=20.0,
            )
        )
        conn.execute(
            insert(profile_daily).values(
                customer_id=5, event="Order Completed", day=purchases[0][0] // DAY, count=1, sum_value=30.0
            )
        )
        conn.execute(
            insert(profile_daily).values(
                customer_id=5, event="Order Completed", day=purchases[1][0] // DAY, count=2, sum_value=70.0
            )
        )
        conn.execute(
            insert(consent).values(
                customer_id=5, channel="email", granted=True, source="x", changed_ms=0, event_id=1
            )
        )
        conn.execute(
            insert(consent).values(
                customer_id=5, channel="sms", granted=False, source="x", changed_ms=0, event_id=2
            )
        )
    with db_engine.connect() as conn:
        db = load_profile(conn, 5, now_ms=NOW)
    memory = MemoryProfile(
        5,
        traits={"tier": "gold"},
        timezone="Europe/Berlin",
        events=[ProfileEvent("Order Completed", t, {"revenue": v}) for t, v in purchases],
        consent={"email": True, "sms": False},
    )
    for view in (db, memory):
        assert view.customer_id == 5 and view.traits == {"tier": "gold"} and view.timezone == "Europe/Berlin"
        assert view.count("Order Completed", 0, NOW + 1) == 3
        assert view.count("Order Completed", NOW - 10 * DAY, NOW + 1) == 2
        assert view.count("Order Completed", NOW - 100 * DAY, NOW - 10 * DAY) == 1
        assert view.sum("Order Completed", "revenue", NOW - 10 * DAY, NOW + 1) == 70.0
        assert view.sum("Order Completed", "revenue", 0, NOW + 1) == 100.0
        assert view.last_at("Order Completed") == purchases[-1][0]
        assert view.first_at("Order Completed") == purchases[0][0]
        assert view.count("Never", 0, NOW) == 0 and view.last_at("Never") is None
        assert (view.consented("email"), view.consented("sms"), view.consented("push")) == (True, False, None)
    # a window edge inside a day: the database counts the whole UTC day, memory is exact
    edge = purchases[1][0] + 30_000
    assert memory.count("Order Completed", edge, NOW + 1) == 1
    assert db.count("Order Completed", edge, NOW + 1) == 2
