"""Synthetic customers written straight into the profile tables, for tests, demos and benchmarks.

Real profiles come from the event log through the engine loop; a push only reads the
profile tables, so a benchmark of 100,000 customers can skip the replay and write
them directly (driver-level ``executemany``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from cadence.engine.campaign import DAY_MS
from cadence.engine.profiles import notify_inputs
from cadence.store.fast import dump_json, execute_many

__all__ = ["SeedCustomer", "seed_customers"]


@dataclass(frozen=True)
class SeedCustomer:
    """One customer: traits, zone, consent, and per-event times (for counts and recency)."""

    id: int
    traits: Mapping[str, Any] = field(default_factory=dict)
    timezone: str | None = None
    consent: Mapping[str, bool] = field(default_factory=dict)
    events: Mapping[str, Sequence[int]] = field(default_factory=dict)  # event -> times (ms)


def seed_customers(engine: Engine, customers: Sequence[SeedCustomer], *, now_ms: int) -> None:
    """Write customers, profiles, event stats, day buckets and consent in one transaction."""
    with engine.begin() as conn:
        execute_many(
            conn, "INSERT INTO customers (id, created_ms) VALUES (?, ?)", [(c.id, now_ms) for c in customers]
        )
        execute_many(
            conn,
            "INSERT INTO profiles (customer_id, first_seen_ms, last_seen_ms, event_count, traits, trait_events,"
            " timezone, updated_event_id) VALUES (?, ?, ?, ?, ?::json, ?::json, ?, ?)",
            [
                (
                    c.id,
                    min((t for ts in c.events.values() for t in ts), default=now_ms),
                    max((t for ts in c.events.values() for t in ts), default=now_ms),
                    sum(len(ts) for ts in c.events.values()),
                    dump_json(dict(c.traits)),
                    "{}",
                    c.timezone,
                    0,
                )
                for c in customers
            ],
        )
        notify_inputs(conn, [c.id for c in customers])  # the decision caches that listen (PostgreSQL)
        stats: list[tuple[Any, ...]] = []
        daily: list[tuple[Any, ...]] = []
        for c in customers:
            for event, times in c.events.items():
                if not times:
                    continue
                stats.append((c.id, event, len(times), 0.0, min(times), max(times), None))
                days: dict[int, int] = {}
                for t in times:
                    days[t // DAY_MS] = days.get(t // DAY_MS, 0) + 1
                daily.extend((c.id, event, day, n, 0.0) for day, n in days.items())
        execute_many(
            conn,
            "INSERT INTO profile_event_stats (customer_id, event, count, sum_value, first_ms, last_ms, last_value)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            stats,
        )
        execute_many(
            conn,
            "INSERT INTO profile_daily (customer_id, event, day, count, sum_value) VALUES (?, ?, ?, ?, ?)",
            daily,
        )
        execute_many(
            conn,
            "INSERT INTO consent (customer_id, channel, granted, source, changed_ms, event_id) VALUES (?, ?, ?, ?, ?, ?)",
            [(c.id, ch, granted, "seed", now_ms, 0) for c in customers for ch, granted in c.consent.items()],
        )
