"""Sends per second through the dispatcher: the outbox, and SendGrid against a local fake server.

Each run queues N sends for N customers in a fresh database, then times the
dispatcher draining the queue (claim, consent check, batching, provider call,
recording the outcome). The SendGrid case goes over real HTTP to the fake SendGrid of
``cadence.connectors.testing`` on loopback, with SendGrid's default client-side rate
limit (10 requests/s) and batches of 1,000 personalizations.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, insert, text

from cadence.connectors.delivery import Dispatcher
from cadence.connectors.testing import connector_config, serve_in_process
from cadence.engine.sendqueue import idempotency_key
from cadence.plugins.manager import build_connectors, make_plugin_manager
from cadence.settings import Settings
from cadence.store.db import create_db_engine, migrate
from cadence.store.schema.core import customers, identities, profiles
from cadence.store.schema.sends import sends

GOAL = 5000.0


def _seed(engine: Engine, n: int, campaign: str) -> None:
    with engine.begin() as conn:
        conn.execute(insert(customers), [{"id": i, "created_ms": 0} for i in range(1, n + 1)])
        conn.execute(
            insert(identities),
            [
                {"kind": "user", "value": f"u{i}", "customer_id": i, "first_seen_ms": 0}
                for i in range(1, n + 1)
            ],
        )
        conn.execute(
            insert(profiles),
            [
                {
                    "customer_id": i,
                    "first_seen_ms": 0,
                    "last_seen_ms": 0,
                    "event_count": 1,
                    "traits": {"email": f"c{i}@example.com", "first_name": "Ada"},
                    "updated_event_id": 0,
                    "trait_events": {},
                }
                for i in range(1, n + 1)
            ],
        )
        conn.execute(
            insert(sends),
            [
                {
                    "idempotency_key": idempotency_key(campaign, i, "1"),
                    "decision_id": f"d{i}",
                    "campaign": campaign,
                    "customer_id": i,
                    "channel": "email",
                    "template": "d-bench",
                    "variables": {"offer": "10%"},
                    "due_ms": 0,
                    "status": "queued",
                    "attempts": 0,
                    "created_ms": 0,
                    "updated_ms": 0,
                }
                for i in range(1, n + 1)
            ],
        )


def _engine(url: str | None, tmp: Path, name: str) -> Engine:
    if url is None:
        engine = create_db_engine(f"sqlite:///{tmp / name}.db")
    else:
        admin = create_db_engine(url, isolation_level="AUTOCOMMIT", poolclass=None)
        db = f"bench_connectors_{name}"
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{db}"'))
        admin.dispose()
        engine = create_db_engine(f"{url.rpartition('/')[0]}/{db}")
    migrate(engine)
    return engine


async def _drain(engine: Engine, connectors: dict[str, Any]) -> tuple[float, float, int]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as client:
        settings = Settings(disable_plugin_autoload=True, connectors=connectors, _env_file=None)  # type: ignore[call-arg]
        registry = build_connectors(settings, pm=make_plugin_manager(settings), engine=engine, client=client)
        dispatcher = Dispatcher(engine=engine, route=registry.route, batch_limit=5000)
        started, cpu = time.perf_counter(), time.process_time()
        report = await dispatcher.drain()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return elapsed, cpu, report.sent


def _wait_until_up(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/_fake/stats", timeout=2)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _case(label: str, n: int, url: str | None, tmp: Path, connectors: dict[str, Any]) -> list[str]:
    engine = _engine(url, tmp, label.split()[0].lower())
    try:
        # Each case its own campaign, so keys never repeat at the shared fake provider.
        _seed(engine, n, f"bench-{label.split()[0]}-{'pg' if url else 'sqlite'}")
        if url is not None:  # statistics, as autovacuum keeps them on a live database
            with engine.begin() as conn:
                conn.execute(text("ANALYZE"))
        elapsed, cpu, sent = asyncio.run(_drain(engine, connectors))
        load = os.getloadavg()[0]
    finally:
        engine.dispose()
    rate = sent / elapsed if elapsed else 0.0
    verdict = "yes" if rate >= GOAL else "no"
    db = "PostgreSQL" if url else "SQLite"
    per = cpu / sent * 1e6 if sent else 0.0
    return [
        f"| {label} | {db} | {sent:,} | {elapsed:.2f} | {rate:,.0f} | {cpu:.2f} ({per:.0f} us/msg) | {load:.1f} "
        f"| >= {GOAL:,.0f} | {verdict} |"
    ]


def run(*, quick: bool, postgres_url: str | None) -> str:
    """Measure and return the Markdown section."""
    n = 3000 if quick else 50_000
    # The fake provider runs in its own process: a real provider does not share our CPU.
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    process = context.Process(target=serve_in_process, args=(ready,), daemon=True)
    process.start()
    rows: list[str] = []
    try:
        url_of_fake = ready.get(timeout=60)
        _wait_until_up(url_of_fake)
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            sendgrid = {
                "sendgrid": connector_config("sendgrid", url_of_fake)
                | {"rate_limit_per_second": 10, "burst": 10}
            }
            for url in [None, postgres_url] if postgres_url else [None]:
                rows += _case("outbox (dry run)", n, url, tmp, {})
                rows += _case("sendgrid (fake, HTTP)", n, url, tmp, sendgrid)
        stats = httpx.get(f"{url_of_fake}/_fake/stats").json()
    finally:
        process.terminate()
        process.join(10)
    delivered = stats["delivered"]
    if stats["max_per_key"] > 1:
        raise RuntimeError("the fake SendGrid received a message twice")
    return "\n".join(
        [
            "## Connectors: sends per second",
            "",
            f"The dispatcher drains {n:,} queued email sends for {n:,} customers: claim (SKIP LOCKED on",
            "PostgreSQL), consent re-check, batching by connector and template, the provider call,",
            "and recording each outcome. SendGrid goes over real HTTP to a local fake SendGrid with",
            "batches of 1,000 personalizations and the connector's default limit of 10 requests/s.",
            "CPU is this process's (the dispatcher's) CPU time while draining; the database server",
            "and the fake provider run in their own processes. Load is the 1-minute load average",
            "after the run (the machine is shared: a load above 2 means other work competed for its 2 cores).",
            "",
            "| connector | database | messages | seconds | messages/s | CPU s (this process) | load | goal | met |",
            "|---|---|---:|---:|---:|---:|---:|---|---|",
            *rows,
            "",
            f"The fake SendGrid counted {delivered:,} deliveries, each idempotency key at most once.",
        ]
    )
