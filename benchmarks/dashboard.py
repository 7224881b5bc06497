"""Dashboard: page load time with millions of stored touchpoints.

A SQLite database is filled to the size a shop with N stored touchpoints has: N
touchpoint events in the event log (a year, N/10 customers), and the aggregates the
engine loop would have derived from them at that scale (attribution credits for every
model and window per day, channel and campaign; coalition and path tallies; the open
journeys of the last 90 days; campaign day counts; the send queue with its sent and
suppressed rows; identities and one profile per looked-up customer). Rows are written
in bulk rather than through the engine loop, which has its own benchmark: what is
measured here is reading.

Each page is requested through the app in-process (routing, auth with a ``?key=``
link, queries, template rendering; no network), once to warm up, then 7 times; the
median and the slowest are reported against the 300 ms goal.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
from sqlalchemy import Engine

from cadence.store.schema.dashboard import FEEDBACK_KINDS

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000
GOAL_MS = 300.0
CHANNELS = ("email", "sms", "push", "paid_search", "paid_social", "organic_search", "referral", "display")
MODELS = (
    "first_touch",
    "last_touch",
    "last_non_direct",
    "linear",
    "time_decay",
    "position",
    "shapley_simplified",
)
WINDOWS = (1, 7, 14, 30, 60, 90)


def _chunks(rows: Iterator[tuple[object, ...]], size: int = 50_000) -> Iterator[list[tuple[object, ...]]]:
    chunk: list[tuple[object, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _insert(engine: Engine, sql: str, rows: Iterator[tuple[object, ...]]) -> int:
    n = 0
    for chunk in _chunks(rows):
        with engine.begin() as conn:
            conn.exec_driver_sql(sql, chunk)
        n += len(chunk)
    return n


def fill(engine: Engine, *, touchpoints: int, today: int, seed: int = 3) -> dict[str, int]:
    """Write a database of ``touchpoints`` stored touchpoints and its aggregates; return row counts."""
    rng = random.Random(seed)
    customers = max(1000, touchpoints // 10)
    campaigns = [f"campaign_{i}" for i in range(50)]
    start_ms = (today - 364) * DAY_MS
    counts: dict[str, int] = {}

    def events() -> Iterator[tuple[object, ...]]:
        for i in range(touchpoints):
            channel = CHANNELS[i % len(CHANNELS)]
            payload = orjson.dumps(
                {"properties": {"channel": channel, "campaign": campaigns[i % 50]}}
            ).decode()
            ts = start_ms + (i * 365 * DAY_MS) // touchpoints
            yield (f"m{i}", "track", "Message Clicked", f"u{i % customers}", None, ts, ts, "api", payload)

    counts["events"] = _insert(
        engine,
        "INSERT INTO events (message_id, type, event, user_id, anonymous_id, ts_ms, received_ms, source, payload) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        events(),
    )
    counts["customers"] = _insert(
        engine,
        "INSERT INTO customers (id, created_ms) VALUES (?, ?)",
        ((c + 1, start_ms) for c in range(customers)),
    )
    counts["identities"] = _insert(
        engine,
        "INSERT INTO identities (kind, value, customer_id, first_seen_ms) VALUES ('user', ?, ?, ?)",
        ((f"u{c}", c + 1, start_ms) for c in range(customers)),
    )
    # One profile (with day buckets for a year) for the customer the benchmark looks up.
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO profiles (customer_id, first_seen_ms, last_seen_ms, event_count, traits, trait_events, "
            "timezone, updated_event_id) VALUES (1, ?, ?, 500, ?, '{}', 'Europe/Berlin', 0)",
            (
                start_ms,
                today * DAY_MS,
                orjson.dumps({"first_name": "Ada", "email": "ada@example.com"}).decode(),
            ),
        )
        names = ("Message Sent", "Email Opened", "Message Clicked", "Order Completed", "Page Viewed")
        conn.exec_driver_sql(
            "INSERT INTO profile_event_stats (customer_id, event, count, sum_value, first_ms, last_ms, last_value) "
            "VALUES (1, ?, 100, 0, ?, ?, NULL)",
            [(e, start_ms, today * DAY_MS) for e in names],
        )
        conn.exec_driver_sql(
            "INSERT INTO profile_daily (customer_id, event, day, count, sum_value) VALUES (1, ?, ?, 1, 0)",
            [(e, d) for e in names for d in range(today - 364, today + 1)],
        )
    # Credit rows: each day's conversions touch up to 120 (channel, campaign) pairs.
    pairs = [(ch, cp) for ch in CHANNELS for cp in campaigns]
    per_day = max(10, min(120, touchpoints // 80_000))

    def credits() -> Iterator[tuple[object, ...]]:
        for day in range(today - 364, today + 1):
            todays = rng.sample(pairs, per_day)
            for model in MODELS:
                for w in WINDOWS:
                    for ch, cp in todays:
                        yield ("default", model, w, day, ch, cp, rng.random() * 5, rng.random() * 300)
                    yield ("default", model, w, day, "", "", rng.random() * 3, rng.random() * 100)

    counts["attribution_credits"] = _insert(
        engine,
        "INSERT INTO attribution_credits (spec, model, window_days, day, channel, campaign, conversions, value) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        credits(),
    )

    def coalitions() -> Iterator[tuple[object, ...]]:
        for w in WINDOWS:
            for mask in range(1, 1 << len(CHANNELS)):
                key = "+".join(sorted(c for i, c in enumerate(CHANNELS) if mask >> i & 1))
                yield ("default", w, key, rng.random() * 1000 + 10, rng.random() * 100)

    counts["attribution_coalitions"] = _insert(
        engine,
        "INSERT INTO attribution_coalitions (spec, window_days, channels, journeys, conversions) VALUES (?, ?, ?, ?, ?)",
        coalitions(),
    )

    def paths() -> Iterator[tuple[object, ...]]:
        seen: set[tuple[int, str]] = set()
        for _ in range(touchpoints // 200):
            w = rng.choice(WINDOWS)
            path = ">".join(rng.choice(CHANNELS) for _ in range(rng.randint(1, 6)))
            if (w, path) not in seen:
                seen.add((w, path))
                yield ("default", w, path, rng.random() * 20)

    counts["attribution_paths"] = _insert(
        engine,
        "INSERT INTO attribution_paths (spec, window_days, path, conversions) VALUES (?, ?, ?, ?)",
        paths(),
    )
    # Open journeys: the touches of the last 90 days not yet followed by a conversion.
    open_touches = touchpoints * 90 // 365 // 2

    def touches() -> Iterator[tuple[object, ...]]:
        for i in range(open_touches):
            ts = today * DAY_MS - (i * 90 * DAY_MS) // max(1, open_touches)
            yield ("default", i % customers + 1, ts, CHANNELS[i % len(CHANNELS)], campaigns[i % 50], i)

    counts["attribution_touches"] = _insert(
        engine,
        "INSERT INTO attribution_touches (spec, customer_id, ts_ms, channel, campaign, event_id) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        touches(),
    )
    camp_channels = [(cp, CHANNELS[i % 3]) for i, cp in enumerate(campaigns)]

    def daily() -> Iterator[tuple[object, ...]]:
        for day in range(today - 364, today + 1):
            for cp, ch in camp_channels:
                yield (day, cp, ch, *(rng.randint(0, touchpoints // 5000 + 1) for _ in FEEDBACK_KINDS))

    counts["campaign_daily"] = _insert(
        engine,
        f"INSERT INTO campaign_daily (day, campaign, channel, {', '.join(FEEDBACK_KINDS)}) "
        f"VALUES (?, ?, ?, {', '.join('?' for _ in FEEDBACK_KINDS)})",
        daily(),
    )
    n_sends = touchpoints // 10

    def queue() -> Iterator[tuple[object, ...]]:
        for i in range(n_sends):
            cp, ch = camp_channels[i % len(camp_channels)]
            status = "suppressed" if i % 100 == 0 else ("failed" if i % 250 == 1 else "sent")
            ts = start_ms + (i * 365 * DAY_MS) // n_sends
            yield (f"k{i}", cp, i % customers + 1, ch, "{}", ts, status, 1, ts, ts)

    counts["sends"] = _insert(
        engine,
        "INSERT INTO sends (idempotency_key, campaign, customer_id, channel, variables, due_ms, status, attempts, "
        "created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        queue(),
    )
    return counts


def _time_pages(client: object, key: str) -> list[tuple[str, float, float]]:
    pages = [
        ("attribution (4 rule models, 30 days)", "/ui/attribution"),
        (
            "attribution (+ shapley, markov; reused for 5 min)",
            "/ui/attribution?model=last_touch&model=shapley&model=markov",
        ),
        ("campaigns (30 days)", "/ui/campaigns"),
        (
            "campaigns (a year)",
            "/ui/campaigns?from=" + time.strftime("%Y-%m-%d", time.gmtime(time.time() - 364 * 86400)),
        ),
        ("decisions (customer lookup)", "/ui/decisions?customer=u0"),
        ("rules (cached check)", "/ui/rules"),
    ]
    out = []
    for name, url in pages:
        sep = "&" if "?" in url else "?"
        target = f"{url}{sep}key={key}"
        response = client.get(target)  # type: ignore[attr-defined]
        assert response.status_code == 200, (url, response.status_code)
        times = []
        for _ in range(7):
            started = time.perf_counter()
            response = client.get(target)  # type: ignore[attr-defined]
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
        out.append((name, statistics.median(times), max(times)))
    return out


def run(*, quick: bool, postgres_url: str | None) -> str:
    """Fill a database, time every page, and return the Markdown section."""
    from fastapi.testclient import TestClient

    from cadence.api.app import create_app
    from cadence.api.security import create_key
    from cadence.runtime import open_runtime
    from cadence.settings import Settings
    from cadence.store.db import create_db_engine, migrate

    touchpoints = 200_000 if quick else 10_000_000
    with tempfile.TemporaryDirectory() as tmpdir:
        settings = Settings(
            database_url=f"sqlite:///{tmpdir}/cadence.db",
            rules_paths=[ROOT / "rules"],
            disable_plugin_autoload=True,
            engine_enabled=False,
            _env_file=None,  # type: ignore[call-arg]
        )
        engine = create_db_engine(settings.database_url)
        migrate(engine)
        started = time.perf_counter()
        counts = fill(engine, touchpoints=touchpoints, today=int(time.time() * 1000) // DAY_MS)
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        fill_s = time.perf_counter() - started
        size_mb = Path(f"{tmpdir}/cadence.db").stat().st_size / 1e6
        runtime = open_runtime(settings, engine=engine)
        key = create_key(engine, name="bench", scopes=["admin"])
        app = create_app(runtime=runtime, background=False)
        with TestClient(app) as client:
            first_rules = time.perf_counter()
            assert client.get(f"/ui/rules?key={key}").status_code == 200
            first_rules_ms = (time.perf_counter() - first_rules) * 1000
            cold = time.perf_counter()
            assert client.get(f"/ui/attribution?model=shapley&model=markov&key={key}").status_code == 200
            cold_tally_ms = (time.perf_counter() - cold) * 1000
            timings = _time_pages(client, key)
        engine.dispose()
    lines = [
        "## Dashboard",
        "",
        f"SQLite holding {counts['events']:,} stored touchpoints (events; {size_mb:,.0f} MB, filled in {fill_s:.0f} s) "
        f"and the aggregates derived at that scale: {counts['attribution_credits']:,} attribution credit rows, "
        f"{counts['attribution_touches']:,} open-journey touches, {counts['attribution_paths']:,} path tallies, "
        f"{counts['campaign_daily']:,} campaign day counts, {counts['sends']:,} send-queue rows, "
        f"{counts['identities']:,} identities. Each page through the app in-process (auth, queries, "
        "rendering), median and slowest of 7 after a warm-up.",
        "",
        "| page | median (ms) | slowest (ms) | goal |",
        "|---|---:|---:|---|",
    ]
    for name, median, worst in timings:
        lines.append(f"| {name} | {median:.0f} | {worst:.0f} | < {GOAL_MS:.0f} ms |")
    lines.append(
        f"| rules, first view (checks and runs the rule tests once per ruleset) | {first_rules_ms:.0f} | | |"
    )
    lines.append(f"| attribution, shapley and markov solved afresh (every 5 min) | {cold_tally_ms:.0f} | | |")
    return "\n".join(lines) + "\n"
