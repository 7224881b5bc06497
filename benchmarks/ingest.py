"""Ingestion throughput: ``cadence import``, ``POST /v1/batch`` over HTTP, and the engine loop.

Each is measured on SQLite and, when a server is given, on PostgreSQL, with the
same generated Segment-spec events (10% identify calls, 50,000 distinct users, a
mix of anonymous and known ids, realistic context objects).
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import text

from benchmarks._serve import process_cpu, serving
from cadence.api.security import hash_key
from cadence.engine.loop import EngineLoop
from cadence.runtime import open_runtime
from cadence.settings import Settings
from cadence.store.db import create_db_engine, migrate

KEY = "bench-key"
EVENTS = ("Product Viewed", "Product Added", "Order Completed", "Email Opened", "Email Link Clicked")


def make_calls(n: int, seed: int = 7) -> list[dict[str, object]]:
    rng = random.Random(seed)
    calls: list[dict[str, object]] = []
    for i in range(n):
        user = rng.randrange(50_000)
        base: dict[str, object] = {
            "messageId": f"bench-{seed}-{i}",
            "timestamp": f"2026-03-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
            "context": {
                "ip": "203.0.113.9",
                "campaign": {"source": "google", "medium": "cpc", "name": "spring"},
                "page": {"path": "/p", "url": "https://shop.example.com/p"},
            },
        }
        ids = {"userId": f"u{user}"} if rng.random() < 0.7 else {"anonymousId": f"a{user}"}
        if rng.random() < 0.1:
            calls.append(
                {
                    "type": "identify",
                    "userId": f"u{user}",
                    "anonymousId": f"a{user}",
                    "traits": {"email": f"u{user}@example.com", "plan": "gold"},
                    **base,
                }
            )
        else:
            calls.append(
                {
                    "type": "track",
                    "event": rng.choice(EVENTS),
                    **ids,
                    "properties": {"revenue": rng.randrange(100), "sku": f"S{rng.randrange(500)}"},
                    **base,
                }
            )
    return calls


class Database:
    """A fresh database on SQLite or PostgreSQL, dropped afterwards."""

    def __init__(self, kind: str, postgres_url: str | None, tmp: Path) -> None:
        self.kind = kind
        if kind == "sqlite":
            self.url = f"sqlite:///{tmp}/bench-{uuid.uuid4().hex[:6]}.db"
            self._admin = None
        else:
            assert postgres_url
            self.name = "bench_" + uuid.uuid4().hex[:10]
            self._admin = create_db_engine(postgres_url, isolation_level="AUTOCOMMIT")
            with self._admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{self.name}"'))
            self.url = postgres_url.rsplit("/", 1)[0] + "/" + self.name
        engine = create_db_engine(self.url)
        migrate(engine)
        engine.dispose()

    def drop(self) -> None:
        if self._admin is not None:
            with self._admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
            self._admin.dispose()


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_import(db: Database, path: Path, n: int) -> tuple[float, float, float]:
    """Run ``cadence import`` on ``path`` in a new process: (events/s, wall s, CPU s of the process)."""
    env = {**os.environ, "CADENCE_DATABASE_URL": db.url}
    cpu = _cpu_of_children()
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "cadence", "import", str(path)], env=env, check=True, stdout=subprocess.DEVNULL
    )
    wall = time.perf_counter() - started
    return n / wall, wall, _cpu_of_children() - cpu


def write_calls(path: Path, n: int, seed: int) -> None:
    """``n`` generated calls as NDJSON, written in parts so that a large file needs little memory."""
    with path.open("wb") as out:
        for part, start in enumerate(range(0, n, 100_000)):
            calls = make_calls(min(100_000, n - start), seed=seed * 1000 + part)
            out.write(b"\n".join(orjson.dumps(c) for c in calls) + b"\n")


#: The engine loop's profile path: identity stitching (always run) and these subscribers.
PROFILE_PATH = ("profiles", "consent")


#: Runs of the profile path from the same start; the median is reported (with every run): on this
#: shared machine one run's wall clock moves by a fifth from one minute to the next.
PROFILE_RUNS = 3


def bench_loop(db: Database) -> dict[str, Any]:
    """The engine loop over the imported log, from the same start each time.

    The profile path (identity, profiles, consent) runs :data:`PROFILE_RUNS` times, each on
    its own copy of ``db`` taken before (the last on ``db`` itself); every subscriber
    (attribution for every model and window, campaign statistics, learners too) once, on
    another copy. Returns the profile path's median events/s (wall clock) with this process's
    CPU seconds in that run and every run's rate, every subscriber's events/s and CPU, and
    the load average when the loop started.
    """
    from cadence.engine.loop import make_subscribers

    def run_loop(url: str, only: tuple[str, ...] | None) -> tuple[int, float, float]:
        # No rule files: attribution runs its default block (the repository's rules/, which a process
        # started in the checkout would read, has two blocks with their own channel and credit rules).
        runtime = open_runtime(Settings(database_url=url, rules_paths=[], _env_file=None))  # type: ignore[call-arg]
        subscribers = [s for s in make_subscribers(runtime) if only is None or s.name in only]
        loop = EngineLoop(runtime, subscribers)
        loop.positions()  # start-up (learner snapshots) is not the loop
        started, cpu = time.perf_counter(), time.process_time()
        done = loop.catch_up()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        runtime.close()
        return done, wall, cpu

    copies: list[str] = []

    def copy(suffix: str) -> str:
        if db.kind == "sqlite":
            url = db.url.removesuffix(".db") + f"-{suffix}.db"
            shutil.copy(db.url.removeprefix("sqlite:///"), url.removeprefix("sqlite:///"))
        else:
            assert db._admin is not None
            name = f"{db.name}_{suffix}"
            with db._admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{db.name}"'))
            url = db.url.rsplit("/", 1)[0] + "/" + name
        copies.append(url)
        return url

    load = os.getloadavg()[0]
    try:
        all_url = copy("all")
        profile_urls = [copy(f"p{k}") for k in range(1, PROFILE_RUNS)] + [db.url]
        runs = [run_loop(url, PROFILE_PATH) for url in profile_urls]
        done_all, wall_all, cpu_all = run_loop(all_url, None)
    finally:
        for url in copies:
            if db.kind == "sqlite":
                Path(url.removeprefix("sqlite:///")).unlink(missing_ok=True)
            else:
                assert db._admin is not None
                with db._admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    done, wall, cpu = sorted(runs, key=lambda r: r[0] / r[1])[len(runs) // 2]
    return {
        "events": done,
        "profile_rate": done / wall,
        "profile_cpu": cpu,
        "profile_rates": [d / w for d, w, _ in runs],
        "all_rate": done_all / wall_all,
        "all_cpu": cpu_all,
        "load": load,
    }


CLIENT = r"""
import sys, time, threading, httpx, orjson
port, path, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
calls = orjson.loads(open(path, "rb").read())
batches = [calls[i:i + 100] for i in range(0, len(calls), 100)]
errors = []
def work(mine):
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=(sys.argv[4], ""), timeout=30) as c:
        for b in mine:
            r = c.post("/v1/batch", content=orjson.dumps({"batch": b}), headers={"content-type": "application/json"})
            if r.status_code != 200:
                errors.append(r.status_code)
started = time.perf_counter()
ts = [threading.Thread(target=work, args=(batches[k::threads],)) for k in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(orjson.dumps({"seconds": time.perf_counter() - started, "errors": len(errors)}).decode())
"""


def bench_http(db: Database, calls: list[dict[str, object]], tmp: Path) -> tuple[float, int, float]:
    """(events/s, HTTP errors, server CPU s while the clients ran)."""
    env = {
        "CADENCE_DATABASE_URL": db.url,
        "CADENCE_API_KEYS": orjson.dumps(
            [{"name": "b", "sha256": hash_key(KEY), "scopes": ["ingest"]}]
        ).decode(),
        "CADENCE_RATE_LIMIT_PER_SECOND": "1000000",
        "CADENCE_RATE_LIMIT_BURST": "1000000",
        "CADENCE_ENGINE_ENABLED": "false",
    }
    with serving(env, ready_seconds=20) as (server, port):
        data = tmp / "http-calls.json"
        data.write_bytes(orjson.dumps(calls))
        cpu = process_cpu(server.pid)
        out = subprocess.run(
            [sys.executable, "-c", CLIENT, str(port), str(data), "4", KEY],
            capture_output=True,
            check=True,
            text=True,
        )
        server_cpu = process_cpu(server.pid) - cpu
        result = orjson.loads(out.stdout)
        return len(calls) / result["seconds"], int(result["errors"]), server_cpu


def _profile_cell(looped: dict[str, Any]) -> str:
    """The profile path's median rate, then every run's in the order run."""
    runs = " / ".join(f"{r:,.0f}" for r in looped["profile_rates"])
    return f"{looped['profile_rate']:,.0f} (runs {runs})"


def run_loop_only(*, quick: bool, postgres_url: str | None) -> str:
    """Only the engine loop (``CADENCE_BENCH_LOOP_ONLY=1``): for iterating on the loop (with ``--no-write``)."""
    n = 5_000 if quick else 200_000
    lines = [
        f"## Engine loop only ({n:,} imported events)",
        "",
        f"| database | profile path (events/s, median of {PROFILE_RUNS}) | its CPU (s) | every subscriber (events/s) | its CPU (s) | load |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        path = tmp / "events.ndjson"
        write_calls(path, n, seed=7)
        for kind in ("sqlite", "postgres") if postgres_url else ("sqlite",):
            db = Database(kind, postgres_url, tmp)
            try:
                bench_import(db, path, n)
                looped = bench_loop(db)
            finally:
                db.drop()
            lines.append(
                f"| {kind} | {_profile_cell(looped)} | {looped['profile_cpu']:.1f} "
                f"| {looped['all_rate']:,.0f} | {looped['all_cpu']:.1f} | {looped['load']:.1f} |"
            )
    return "\n".join([*lines, "| goal | 20,000 | | no goal | | |", ""])


def run_import_only(*, quick: bool, postgres_url: str | None) -> str:
    """Only ``cadence import`` (``CADENCE_BENCH_IMPORT_ONLY=1``): for iterating on the import."""
    n_import = 5_000 if quick else 200_000
    n_large = 20_000 if quick else 1_000_000
    lines = [
        "## Import only",
        "",
        "`cadence import`, each a whole new process (start-up included), as in the Ingestion section; "
        "CPU is the import process's user + system time; load is the 1-minute load average before each run.",
        "",
        f"| database | start-up (s, CPU s) | import {n_import:,} (events/s; wall s, CPU s; load) "
        f"| import {n_large:,} (events/s; wall s, CPU s; load) |",
        "|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        files = {"empty": (tmp / "empty.ndjson", 0), "small": (tmp / "events.ndjson", n_import)}
        files["large"] = (tmp / "large.ndjson", n_large)
        files["empty"][0].write_bytes(b"")
        write_calls(files["small"][0], n_import, seed=7)
        write_calls(files["large"][0], n_large, seed=8)
        for kind in ("sqlite", "postgres") if postgres_url else ("sqlite",):
            results = {}
            for name, (path, n) in files.items():
                db = Database(kind, postgres_url, tmp)
                try:
                    load = os.getloadavg()[0]
                    results[name] = (*bench_import(db, path, n), load)
                finally:
                    db.drop()
            _, start, start_cpu, _ = results["empty"]
            cells = [f"{start:.2f}, {start_cpu:.2f}"] + [
                f"{rate:,.0f}; {wall:.1f}, {cpu:.1f}; {load:.1f}"
                for rate, wall, cpu, load in (results["small"], results["large"])
            ]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "| goal | | 50,000 | 50,000 |", ""])


def run(*, quick: bool, postgres_url: str | None) -> str:
    if os.environ.get("CADENCE_BENCH_LOOP_ONLY"):
        return run_loop_only(quick=quick, postgres_url=postgres_url)
    if os.environ.get("CADENCE_BENCH_IMPORT_ONLY"):
        return run_import_only(quick=quick, postgres_url=postgres_url)
    n_import = 5_000 if quick else 200_000
    n_large = 20_000 if quick else 1_000_000
    n_http = 2_000 if quick else 100_000
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        path = tmp / "events.ndjson"
        write_calls(path, n_import, seed=7)
        large = tmp / "large.ndjson"
        write_calls(large, n_large, seed=8)
        empty = tmp / "empty.ndjson"
        empty.write_bytes(b"")
        for kind in ("sqlite", "postgres") if postgres_url else ("sqlite",):
            db = Database(kind, postgres_url, tmp)
            try:
                _, startup, startup_cpu = bench_import(db, empty, 0)
                imported, wall, cpu = bench_import(db, path, n_import)
                looped = bench_loop(db)
            finally:
                db.drop()
            db = Database(kind, postgres_url, tmp)
            try:
                imported_large, wall_large, cpu_large = bench_import(db, large, n_large)
            finally:
                db.drop()
            db = Database(kind, postgres_url, tmp)
            try:
                http, errors, server_cpu = bench_http(db, make_calls(n_http, seed=11), tmp)
            finally:
                db.drop()
            rows.append(
                (
                    kind,
                    (startup, startup_cpu),
                    (imported, wall, cpu),
                    (imported_large, wall_large, cpu_large),
                    (http, errors, server_cpu),
                    looped,
                )
            )
    load_after = os.getloadavg()
    lines = [
        "## Ingestion",
        "",
        f"`cadence import` of Segment-spec NDJSON events, each a whole new process (start-up included): "
        f"{n_import:,} events, and {n_large:,} events (where start-up weighs less, as in real use); "
        "start-up is the same command on an empty file (imports, settings, the migration check). "
        "CPU is the import process's user + system time (the PostgreSQL server's work is not in it). "
        f"`POST /v1/batch` with {n_http:,} events in batches of 100 from 4 client threads in another process "
        "to `cadence serve` (uvicorn, one process, engine loop off so only ingestion is measured; server CPU "
        "is the server process's while the clients ran). "
        f"The engine loop applying the imported {n_import:,} events (default batch size, one process): its "
        f"profile path (identity stitching, profiles, consent: the goal; {PROFILE_RUNS} runs from the same "
        "start, each on its own copy: the median, its CPU, and every run) and, from the same start on a copy, "
        "every subscriber (also attribution for every model and window of its default block, no rule files, "
        "the exposure store, campaign statistics, learners); CPU is this process's seconds, on PostgreSQL the server's own CPU comes on top. "
        f"Load average (1 min) before: {load_before[0]:.2f}, after: {load_after[0]:.2f} "
        "(the machine's 2 cores are shared; a load above 2 slows every number here).",
        "",
        f"| database | start-up (s, CPU s) | import {n_import:,} (events/s; wall s, CPU s) "
        f"| import {n_large:,} (events/s; wall s, CPU s) | HTTP batch (events/s; server CPU s) | HTTP errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, start, small, big, web, _ in rows:
        lines.append(
            f"| {kind} | {start[0]:.2f}, {start[1]:.2f} | {small[0]:,.0f}; {small[1]:.1f}, {small[2]:.1f} "
            f"| {big[0]:,.0f}; {big[1]:.1f}, {big[2]:.1f} | {web[0]:,.0f}; {web[2]:.1f} | {web[1]} |"
        )
    lines += [
        "| goal | | 50,000 | 50,000 | 10,000 | 0 |",
        "",
        f"| database | engine loop, profile path (events/s, median of {PROFILE_RUNS}) | its CPU (s) "
        "| engine loop, every subscriber (events/s) | its CPU (s) | load average at loop start |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, *_, looped in rows:
        lines.append(
            f"| {kind} | {_profile_cell(looped)} | {looped['profile_cpu']:.1f} "
            f"| {looped['all_rate']:,.0f} | {looped['all_cpu']:.1f} | {looped['load']:.1f} |"
        )
    lines += ["| goal | 20,000 | | no goal | | |", ""]
    return "\n".join(lines)
