"""A scheduled push to a large audience, from evaluation to the outbox.

The database holds N customers (profiles, per-event stats and day buckets, consent;
written directly, as the engine loop would have left them) in six time zones. Two
campaigns fire in the same tick (09:00 Berlin): a win-back whose audience reads
windowed counts (about 60% of customers qualify; 5% opted out of email) with caps,
quiet hours and a 10% holdout, and a lower-priority digest for recent openers. The
scheduler plans the run, claims it and pushes it: the customers the SQL prefilter keeps
(:mod:`cadence.scheduler.prefilter`) are evaluated by ``decide()`` and the winners are
queued (chunks of 2,000). Meanwhile the dispatcher
delivers what is queued to the dry-run outbox connector, as it does in ``cadence
serve``. Timed: until the push is done, and until the last send is in the outbox.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import Engine, func, select, text

from cadence.channels import CHANNELS
from cadence.clock import FixedClock
from cadence.connectors.delivery import Dispatcher
from cadence.dsl.loader import load_source
from cadence.plugins.manager import build_connectors, make_plugin_manager
from cadence.scheduler.occurrences import ms
from cadence.scheduler.seed import SeedCustomer, seed_customers
from cadence.scheduler.service import PushScheduler, SchedulerConfig
from cadence.settings import Settings
from cadence.store.db import create_db_engine, migrate
from cadence.store.schema.connectors import outbox
from cadence.store.schema.sends import sends

GOAL_SECONDS = 60.0
DAY = 86_400_000
T0 = ms("2026-03-02T00:00")
ZONES = ("Europe/Berlin", "Europe/London", "America/New_York", "Asia/Kolkata", "Australia/Sydney", None)

RULES = """
event opened = "Email Opened"
event purchased = "Order Completed"

segment lapsed "Bought before, not lately, still reading" =
    count(purchased) > 0 and not purchased within 60d and count(opened within 30d) > 0

campaign winback "Win back" {
    audience  lapsed
    send      template "offer" with { first_name: customer.first_name ?? "there" }
    channel   email
    cap       1 per 14d
    quiet     21:00..08:00 in customer.timezone ?? "Europe/Berlin" then defer
    priority  5
    split     holdout 10%, a 45%, b 45% template "offer_b"
    schedule  every day at 09:00 in "Europe/Berlin"
}

campaign digest "Digest" {
    audience  count(opened within 30d) > 0
    send      template "digest"
    channel   email
    cap       2 per 7d
    priority  1
    schedule  every day at 09:00 in "Europe/Berlin"
}
"""


def make_customers(n: int, seed: int = 3) -> list[SeedCustomer]:
    rng = random.Random(seed)
    out = []
    for i in range(1, n + 1):
        events: dict[str, list[int]] = {}
        if rng.random() < 0.8:
            events["Email Opened"] = [T0 - rng.randrange(1, 25) * DAY for _ in range(rng.randrange(1, 4))]
        if rng.random() < 0.8:
            events["Order Completed"] = [T0 - rng.randrange(61, 300) * DAY]
        out.append(
            SeedCustomer(
                id=i,
                traits={"email": f"c{i}@example.com", "first_name": f"C{i}"},
                timezone=ZONES[i % len(ZONES)],
                consent={"email": rng.random() > 0.05},
                events=events,
            )
        )
    return out


def _engine(kind: str, postgres_url: str | None, tmp: Path) -> tuple[Engine, str | None]:
    if kind == "sqlite":
        engine = create_db_engine(f"sqlite:///{tmp}/push.db")
        migrate(engine)
        return engine, None
    assert postgres_url
    name = f"bench_push_{int(time.time())}"
    admin = create_db_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=None)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    engine = create_db_engine(f"{postgres_url.rpartition('/')[0]}/{name}")
    migrate(engine)
    return engine, name


def _drop(postgres_url: str | None, name: str | None) -> None:
    if postgres_url and name:
        admin = create_db_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=None)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


async def _dispatch_until(engine: Engine, pushed: threading.Event) -> int:
    """Deliver due sends as they are queued (as `cadence serve` does) until the push is over and drained."""
    settings = Settings(disable_plugin_autoload=True, _env_file=None)  # type: ignore[call-arg]
    registry = build_connectors(settings, pm=make_plugin_manager(settings), engine=engine)
    dispatcher = Dispatcher(engine=engine, route=registry.route, batch_limit=5000)
    sent = 0
    while True:
        finished = pushed.is_set()
        report = await dispatcher.dispatch_once()
        sent += report.sent
        if report.claimed == 0:
            if finished:
                break
            await asyncio.sleep(0.1)
    await registry.aclose()
    return sent


def bench(kind: str, n: int, postgres_url: str | None, tmp: Path) -> dict[str, float]:
    engine, name = _engine(kind, postgres_url, tmp)
    try:
        seed_customers(engine, make_customers(n), now_ms=T0)
        ruleset = load_source(RULES).raise_for_errors()
        clock = FixedClock(T0)
        scheduler = PushScheduler(
            engine=engine,
            clock=clock,
            rules=lambda: ruleset,
            available_channels=CHANNELS,
            config=SchedulerConfig(chunk_size=2000),
        )
        scheduler.tick()  # registers the jobs
        clock.set(T0 + 8 * 3_600_000)  # 09:00 Berlin
        pushed = threading.Event()
        delivered: list[int] = []
        dispatcher = threading.Thread(
            target=lambda: delivered.append(asyncio.run(_dispatch_until(engine, pushed)))
        )
        started, cpu = time.perf_counter(), time.process_time()
        dispatcher.start()
        try:
            [report] = scheduler.tick()
        finally:
            pushed.set()
            push_seconds = time.perf_counter() - started
            dispatcher.join()
        total_seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
        sent = delivered[0]
        with engine.connect() as conn:
            queued = conn.scalar(select(func.count()).select_from(sends)) or 0
            in_outbox = conn.scalar(select(func.count()).select_from(outbox)) or 0
        assert queued == report.total_enqueued == sent == in_outbox, (
            queued,
            report.total_enqueued,
            sent,
            in_outbox,
        )
        return {
            "evaluated": report.evaluated,
            "queued": queued,
            "winback": report.enqueued.get("winback", 0),
            "push": push_seconds,
            "total": total_seconds,
            "cpu": cpu_seconds,
        }
    finally:
        engine.dispose()
        _drop(postgres_url, name)


def run(*, quick: bool, postgres_url: str | None) -> str:
    n = 5_000 if quick else 100_000
    lines = [
        "## Scheduled push (benchmarks/push.py)",
        "",
        "A scheduled tick with two campaigns (win-back with windowed counts, caps, quiet hours and a",
        f"holdout; a digest) over {n:,} customers: plan and claim the run, read the customers the SQL",
        "prefilter keeps (some due campaign's audience and channels could accept them), evaluate each",
        "with `decide()` and queue the winners in chunks of 2,000 (push), while the dispatcher delivers",
        "what is queued to the dry-run outbox, as in `cadence serve`. *Push* ends with the last chunk",
        "queued; *total* when the last send is in the outbox. Goal: evaluation to outbox (total, wall",
        "clock) under 60 s. CPU is this process's CPU time (the database server's is not in it).",
        "",
        "| database | customers | evaluated by `decide()` | sends queued | push (s) | total to outbox (s) |"
        " CPU of this process (s) | customers/s | goal | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp_dir:
        for kind in ("sqlite", "postgres") if postgres_url else ("sqlite",):
            r = bench(kind, n, postgres_url, Path(tmp_dir))
            total = r["total"]
            label = "SQLite" if kind == "sqlite" else "PostgreSQL"
            lines.append(
                f"| {label} | {n:,} | {int(r['evaluated']):,} | {int(r['queued']):,} | {r['push']:.1f} |"
                f" {total:.1f} | {r['cpu']:.1f} | {n / r['push']:,.0f} | < {GOAL_SECONDS:.0f} s |"
                f" {'yes' if total < GOAL_SECONDS else 'no'} |"
            )
    return "\n".join(lines) + "\n"
