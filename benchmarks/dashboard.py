"""Dashboard: page load time with millions of stored touchpoints, on SQLite and PostgreSQL.

A database is filled to the size a shop with N stored touchpoints has: N touchpoint
events in the event log (a year, N/10 customers), and the aggregates the engine loop
would have derived from them at that scale (attribution credits for every model and
window per day, channel and campaign, and per day and channel; coalition and path
tallies; the open journeys of the last 90 days; the last 90 days of exposures the
causal model is fitted on; campaign day counts; the send queue with its sent and
suppressed rows; identities and one profile per looked-up customer; the decisions committed
in the last 30 days, N/20 of them, with the holdout-arm assignments their commits write, and
the decided customers' orders, which the holdout lift reads). Rows are written
in bulk (COPY on PostgreSQL) rather than through the engine loop, which has its own
benchmark. The materialised fits (``shapley``, ``shapley_ordered``, ``markov``,
``causal``) are then computed by the leader's refresh, timed: that is the background
cost that keeps pages from solving anything.

Each page is requested through the app in-process (routing, auth with a ``?key=``
link, queries, template rendering; no network), once to warm up, then 20 times; the
median (p50) and the 95th percentile of the server time are reported against the
300 ms goal.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
import uuid
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
    """Bulk insert (``INSERT INTO t (cols) VALUES (?, ...)``): COPY on PostgreSQL, executemany on SQLite."""
    n = 0
    if engine.dialect.name == "postgresql":
        head = sql.split(" VALUES ")[0].replace("INSERT INTO ", "")
        raw = engine.raw_connection()
        try:
            conn = raw.driver_connection
            with conn.cursor() as cur, cur.copy(f"COPY {head} FROM STDIN") as copy:  # type: ignore[union-attr]
                for row in rows:
                    copy.write_row(row)
                    n += 1
            raw.commit()
        finally:
            raw.close()
        return n
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
        "INSERT INTO identities (kind, value, customer_id, first_seen_ms) VALUES (?, ?, ?, ?)",
        (("user", f"u{c}", c + 1, start_ms) for c in range(customers)),
    )
    # One profile (with day buckets for a year) for the customer the benchmark looks up.
    with engine.begin() as conn:
        q = "%s" if engine.dialect.name == "postgresql" else "?"
        conn.exec_driver_sql(
            "INSERT INTO profiles (customer_id, first_seen_ms, last_seen_ms, event_count, traits, trait_events, "
            "timezone, updated_event_id) VALUES (1, ?, ?, 500, ?, '{}', 'Europe/Berlin', 0)".replace("?", q),
            (
                start_ms,
                today * DAY_MS,
                orjson.dumps({"first_name": "Ada", "email": "ada@example.com"}).decode(),
            ),
        )
        names = ("Message Sent", "Email Opened", "Message Clicked", "Order Completed", "Page Viewed")
        conn.exec_driver_sql(
            (
                "INSERT INTO profile_event_stats (customer_id, event, count, sum_value, first_ms, last_ms, "
                "last_value) VALUES (1, ?, 100, 0, ?, ?, NULL)"
            ).replace("?", q),
            [(e, start_ms, today * DAY_MS) for e in names],
        )
        conn.exec_driver_sql(
            "INSERT INTO profile_daily (customer_id, event, day, count, sum_value) VALUES (1, ?, ?, 1, 0)".replace(
                "?", q
            ),
            [(e, d) for e in names for d in range(today - 364, today + 1)],
        )
    # Credit rows: each day's conversions touch up to 120 (channel, campaign) pairs.
    pairs = [(ch, cp) for ch in CHANNELS for cp in campaigns]
    per_day = max(10, min(120, touchpoints // 80_000))

    by_channel: dict[tuple[str, int, int, str], list[float]] = {}
    by_campaign: dict[tuple[str, int, int, str], list[float]] = {}

    def credits() -> Iterator[tuple[object, ...]]:
        for day in range(today - 364, today + 1):
            todays = rng.sample(pairs, per_day)
            for model in MODELS:
                for w in WINDOWS:
                    for ch, cp in [*todays, ("", "")]:
                        conv, value = rng.random() * (5 if ch else 3), rng.random() * (300 if ch else 100)
                        acc = by_channel.setdefault((model, w, day, ch), [0.0, 0.0])
                        acc[0] += conv
                        acc[1] += value
                        acc = by_campaign.setdefault((model, w, day, cp), [0.0, 0.0])
                        acc[0] += conv
                        acc[1] += value
                        yield ("default", model, w, day, ch, cp, conv, value)

    counts["attribution_credits"] = _insert(
        engine,
        "INSERT INTO attribution_credits (spec, model, window_days, day, channel, campaign, conversions, value) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        credits(),
    )
    counts["attribution_channel_credits"] = _insert(
        engine,
        "INSERT INTO attribution_channel_credits (spec, model, window_days, day, channel, conversions, value) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (("default", m, w, d, ch, v[0], v[1]) for (m, w, d, ch), v in by_channel.items()),
    )
    counts["attribution_campaign_credits"] = _insert(
        engine,
        "INSERT INTO attribution_campaign_credits (spec, model, window_days, day, campaign, conversions, value) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (("default", m, w, d, cp, v[0], v[1]) for (m, w, d, cp), v in by_campaign.items()),
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
    # Exposures of the last 90 days (the causal model's input): each touch raises its
    # customer's chance to convert a little, some channels more than others.
    exposure_touches = touchpoints * 90 // 365
    lift = {ch: 0.004 * (i % 4) for i, ch in enumerate(CHANNELS)}

    def exposures() -> Iterator[tuple[object, ...]]:
        for i in range(exposure_touches):
            ts = today * DAY_MS - (i * 90 * DAY_MS) // max(1, exposure_touches)
            customer = rng.randrange(customers) + 1
            channel = CHANNELS[rng.randrange(len(CHANNELS))]
            yield ("default", customer, ts, channel, 0.0)
            if rng.random() < 0.004 + lift[channel]:
                yield ("default", customer, min(ts + rng.randrange(DAY_MS), today * DAY_MS), "", 50.0)

    counts["attribution_exposures"] = _insert(
        engine,
        "INSERT INTO attribution_exposures (spec, customer_id, ts_ms, channel, value) VALUES (?, ?, ?, ?, ?)",
        exposures(),
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
    counts.update(_fill_decisions(engine, rng, customers=customers, decisions=touchpoints // 20, today=today))
    return counts


#: The example rules' campaign with a holdout arm (10%), whose lift the attribution page measures,
#: and the other message campaigns every decision considers.
HOLDOUT_CAMPAIGN = "winback"
OTHER_CAMPAIGNS = ("welcome", "welcome_tips", "cart_rescue", "newsletter", "reengage")


def _fill_decisions(
    engine: Engine, rng: random.Random, *, customers: int, decisions: int, today: int
) -> dict[str, int]:
    """Decisions committed over the last 30 days, and the orders of 8% of the decided customers in
    those days (day buckets and last-order stats, as the profile subscriber keeps them): what the
    holdout lift reads. Each decision considers the example rules' message campaigns; half the
    customers are outside ``HOLDOUT_CAMPAIGN``'s audience (never drawn an arm: the lift reads
    all their decisions), the others are in its holdout arm (10%) or a sending arm."""
    from cadence.engine.campaign import SplitArm
    from cadence.engine.decide import split_arm, stable_share

    arms = (SplitArm("holdout", 0.1, holdout=True), SplitArm("offer_x", 0.45), SplitArm("offer_y", 0.45))
    start_ms = (today - 29) * DAY_MS
    decided: set[int] = set()
    first_arm: dict[
        int, tuple[int, bool]
    ] = {}  # customer -> (first decided ms, held): the commits' assignments

    def condition(stage: str, passed: bool) -> dict[str, object]:
        return {
            "text": 'count("Order Completed") >= 1',
            "value": int(passed),
            "passed": passed,
            "stage": stage,
        }

    def rows() -> Iterator[tuple[object, ...]]:
        for i in range(decisions):
            customer = 2 + rng.randrange(customers - 1)  # customer 1 has a hand-made profile
            decided.add(customer)
            ts = start_ms + (i * 30 * DAY_MS) // decisions
            eligible = stable_share(customer, "lapsed") < 0.5
            arm = split_arm(arms, stable_share(customer, HOLDOUT_CAMPAIGN)) if eligible else None
            held = arm is not None and arm.holdout
            if arm is not None:
                first_arm.setdefault(customer, (ts, held))
            sent = HOLDOUT_CAMPAIGN if arm is not None and not held and i % 2 else OTHER_CAMPAIGNS[i % 5]
            suppressions = [
                {"campaign": c, "reason": "audience", "detail": "count(...) is 0", "channel": None}
                for c in OTHER_CAMPAIGNS
                if c != sent
            ]
            if arm is None:
                suppressions.append(
                    {
                        "campaign": HOLDOUT_CAMPAIGN,
                        "reason": "audience",
                        "detail": "not lapsed",
                        "channel": None,
                    }
                )
            elif held:
                suppressions.append(
                    {
                        "campaign": HOLDOUT_CAMPAIGN,
                        "reason": "holdout",
                        "detail": "in holdout arm 'holdout' (10%)",
                        "channel": None,
                    }
                )
            elif sent != HOLDOUT_CAMPAIGN:
                suppressions.append(
                    {
                        "campaign": HOLDOUT_CAMPAIGN,
                        "reason": "cap",
                        "detail": "1 per 7d reached",
                        "channel": "push",
                    }
                )
            explanation = {
                "summary": f"Send {sent} by email",
                "conditions": {
                    c: [condition("audience", c == sent or (c == HOLDOUT_CAMPAIGN and arm is not None))]
                    for c in (HOLDOUT_CAMPAIGN, *OTHER_CAMPAIGNS)
                },
                "candidates": [
                    {"campaign": sent, "channel": "email", "send_at": None, "score": 0.1, "arm": None}
                ],
                "suppressions": suppressions,
                "holdout": [HOLDOUT_CAMPAIGN] if held else [],
                "notes": [],
            }
            yield (
                f"d{i}",
                customer,
                ts,
                "send",
                sent,
                "email",
                ts,
                "t",
                None,
                "h",
                orjson.dumps(explanation).decode(),
                "{}",
                "{}",
                None,
                False,
                " ".join(str(x["reason"]) for x in suppressions),
            )

    counts = {
        "decisions": _insert(
            engine,
            "INSERT INTO decisions (id, customer_id, decided_at_ms, action, campaign, channel, send_at_ms, template, "
            "arm, ruleset_hash, explanation, inputs, outcome, learner_position, explored, suppressed) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows(),
        )
    }
    counts["arm_assignments"] = _insert(
        engine,
        "INSERT INTO arm_assignments (campaign, customer_id, first_ms, held) VALUES (?, ?, ?, ?)",
        ((HOLDOUT_CAMPAIGN, c, ms, held) for c, (ms, held) in sorted(first_arm.items())),
    )
    buyers = sorted(c for c in decided if rng.random() < 0.08)
    days = {c: sorted({today - rng.randrange(30) for _ in range(rng.randint(1, 3))}) for c in buyers}
    counts["profile_daily"] = _insert(
        engine,
        "INSERT INTO profile_daily (customer_id, event, day, count, sum_value) VALUES (?, ?, ?, ?, ?)",
        ((c, "Order Completed", d, 1, 50.0) for c in buyers for d in days[c]),
    )
    _insert(
        engine,
        "INSERT INTO profile_event_stats (customer_id, event, count, sum_value, first_ms, last_ms, last_value) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            (
                c,
                "Order Completed",
                len(days[c]),
                50.0 * len(days[c]),
                days[c][0] * DAY_MS,
                days[c][-1] * DAY_MS + 3_600_000,
                50.0,
            )
            for c in buyers
        ),
    )
    # The orders as each attribution block's conversion history holds them: the lift's conversions.
    from cadence.dsl.loader import load_rules

    blocks = list(load_rules([ROOT / "rules"]).raise_for_errors().attribution) or ["default"]
    counts["attribution_history"] = _insert(
        engine,
        "INSERT INTO attribution_history (spec, customer_id, ts_ms, channel, campaign, value, event_id, closed_by) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            (spec, c, d * DAY_MS + 3_600_000, "", "", 50.0, n, n)
            for spec in blocks
            for n, (c, d) in enumerate(((c, d) for c in buyers for d in days[c]), start=1)
        ),
    )
    return counts


def _time_pages(client: object, key: str, runs: int) -> list[tuple[str, float, float]]:
    year_ago = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 364 * 86400))
    pages = [
        ("attribution (4 rule models + causal, 30 days)", "/ui/attribution"),
        (
            "attribution (shapley, shapley_ordered, markov, causal)",
            "/ui/attribution?model=shapley&model=shapley_ordered&model=markov&model=causal",
        ),
        ("attribution (a year)", f"/ui/attribution?from={year_ago}"),
        ("campaigns (30 days)", "/ui/campaigns"),
        ("campaigns (a year)", f"/ui/campaigns?from={year_ago}"),
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
        for _ in range(runs):
            started = time.perf_counter()
            response = client.get(target)  # type: ignore[attr-defined]
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
        times.sort()
        out.append((name, statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]))
    return out


def _database(kind: str, postgres_url: str | None, tmpdir: str) -> tuple[str, object]:
    """A fresh database URL (and, on PostgreSQL, the admin engine that drops it)."""
    if kind == "sqlite":
        return f"sqlite:///{tmpdir}/cadence.db", None
    from sqlalchemy import text

    from cadence.store.db import create_db_engine

    assert postgres_url
    name = "bench_dash_" + uuid.uuid4().hex[:8]
    admin = create_db_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return postgres_url.rsplit("/", 1)[0] + "/" + name, (admin, name)


def _drop(handle: object) -> None:
    if handle is None:
        return
    from sqlalchemy import text

    admin, name = handle  # type: ignore[misc]
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def measure(kind: str, *, touchpoints: int, postgres_url: str | None, runs: int) -> dict[str, object]:
    """Fill one database, refresh the materialised fits, time every page."""
    from fastapi.testclient import TestClient

    from cadence.api.app import create_app
    from cadence.api.security import create_key
    from cadence.engine.attribution.materialized import refresh_fits
    from cadence.engine.attribution.online import default_specs
    from cadence.runtime import open_runtime
    from cadence.settings import Settings
    from cadence.store.db import create_db_engine, migrate

    with tempfile.TemporaryDirectory() as tmpdir:
        url, handle = _database(kind, postgres_url, tmpdir)
        try:
            settings = Settings(
                database_url=url,
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
            cpu = time.process_time()
            refresh_started = time.perf_counter()
            fits = refresh_fits(engine, spec=default_specs()[0], windows=[30])
            refresh = {
                "wall_s": time.perf_counter() - refresh_started,
                "cpu_s": time.process_time() - cpu,
                "per_model": {f.model: f.seconds for f in fits},
            }
            runtime = open_runtime(settings, engine=engine)
            key = create_key(engine, name="bench", scopes=["admin"])
            app = create_app(runtime=runtime, background=False)
            with TestClient(app) as client:
                first_rules = time.perf_counter()
                assert client.get(f"/ui/rules?key={key}").status_code == 200
                first_rules_ms = (time.perf_counter() - first_rules) * 1000
                cpu = time.process_time()
                timings = _time_pages(client, key, runs)
                pages_cpu_s = time.process_time() - cpu
            engine.dispose()
        finally:
            _drop(handle)
    return {
        "kind": kind,
        "counts": counts,
        "fill_s": fill_s,
        "refresh": refresh,
        "first_rules_ms": first_rules_ms,
        "timings": timings,
        "pages_cpu_s": pages_cpu_s,
    }


def run(*, quick: bool, postgres_url: str | None) -> str:
    """Fill a database per engine, time every page, and return the Markdown section."""
    touchpoints = 200_000 if quick else 10_000_000
    runs = 20
    load = os.getloadavg()[0]
    results = [
        measure(kind, touchpoints=touchpoints, postgres_url=postgres_url, runs=runs)
        for kind in (("sqlite", "postgres") if postgres_url else ("sqlite",))
    ]
    counts = results[0]["counts"]
    assert isinstance(counts, dict)
    lines = [
        "## Dashboard",
        "",
        f"{counts['events']:,} stored touchpoints (events, a year) and the aggregates derived at that scale: "
        f"{counts['attribution_credits']:,} attribution credit rows ({counts['attribution_channel_credits']:,} "
        f"per channel), {counts['attribution_touches']:,} open-journey touches, {counts['attribution_paths']:,} "
        f"path tallies, {counts['attribution_exposures']:,} exposures of the last 90 days, "
        f"{counts['campaign_daily']:,} campaign day counts, {counts['sends']:,} send-queue rows, "
        f"{counts['identities']:,} identities, {counts['decisions']:,} decisions committed in the last 30 days "
        f"(one campaign with a 10% holdout arm, whose lift the attribution page measures: "
        f"{counts['arm_assignments']:,} customers assigned an arm of it). Each page through the app in-process (auth, queries, "
        f"rendering): server time, p50 and p95 of {runs} requests after a warm-up. Pages read stored "
        "aggregates and materialised fits only; the fits are refreshed by the leader in the background "
        f"(its cost is below). Load average {load:.1f} at the start.",
        "",
        "| page | "
        + " | ".join(f"{r['kind']} p50 (ms) | {r['kind']} p95 (ms)" for r in results)
        + " | goal |",
        "|---|" + "---:|---:|" * len(results) + "---|",
    ]
    names = [t[0] for t in results[0]["timings"]]  # type: ignore[union-attr]
    for i, name in enumerate(names):
        cells = " | ".join(
            f"{r['timings'][i][1]:.0f} | {r['timings'][i][2]:.0f}"  # type: ignore[index]
            for r in results
        )
        lines.append(f"| {name} | {cells} | < {GOAL_MS:.0f} ms |")
    lines.append("")
    lines.append("| background and one-off costs | " + " | ".join(str(r["kind"]) for r in results) + " |")
    lines.append("|---|" + "---:|" * len(results))
    lines.append(
        "| rules page, first view (checks and runs the rule tests once per ruleset), ms | "
        + " | ".join(f"{r['first_rules_ms']:.0f}" for r in results)
        + " |"
    )
    for model in ("shapley", "shapley_ordered", "markov", "causal"):
        lines.append(
            f"| refresh of the materialised `{model}` fit (30-day window), s | "
            + " | ".join(f"{r['refresh']['per_model'][model]:.1f}" for r in results)  # type: ignore[index]
            + " |"
        )
    lines.append(
        "| whole refresh, wall s (CPU s) | "
        + " | ".join(
            f"{r['refresh']['wall_s']:.1f} ({r['refresh']['cpu_s']:.1f})"  # type: ignore[index]
            for r in results
        )
        + " |"
    )
    lines.append("| filling the database, s | " + " | ".join(f"{r['fill_s']:.0f}" for r in results) + " |")
    return "\n".join(lines) + "\n"
