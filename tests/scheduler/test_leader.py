"""One leader: the advisory lock on PostgreSQL, and a real SIGKILL of the process in the middle of a push."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from cadence.clock import FixedClock
from cadence.engine.leader import Leadership
from cadence.store.db import create_db_engine
from cadence.store.schema.scheduler import scheduled_runs
from tests.scheduler.conftest import MONDAY, Rules, make_scheduler, runs, sent_keys
from tests.scheduler.test_push import DAILY, HOUR, Seed, readers

LOCK = 0x0CADE999


def test_only_one_process_leads_on_postgres(db_engine: Engine) -> None:
    first = Leadership(db_engine, lock_id=LOCK, role="test")
    other_engine = create_db_engine(str(db_engine.url.render_as_string(hide_password=False)))
    second = Leadership(other_engine, lock_id=LOCK, role="test")
    try:
        assert first.acquire()
        if db_engine.dialect.name == "postgresql":
            assert not second.acquire()
            first.release()
            assert second.acquire() and second.held
        else:
            assert second.acquire()  # SQLite served by one process: it does it all
    finally:
        first.release()
        second.release()
        other_engine.dispose()


def test_sqlite_shared_by_workers_has_one_leader_by_file_lock(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CADENCE_WORKERS", "2")  # what `cadence serve --workers 2` sets for its workers
    first = Leadership(sqlite_engine, lock_id=LOCK, role="test")
    other_engine = create_db_engine(str(sqlite_engine.url))
    second = Leadership(other_engine, lock_id=LOCK, role="test")
    try:
        assert first.acquire() and first.held
        assert not second.acquire() and not second.held
        assert first.acquire()  # still ours
        first.release()
        assert not first.held
        assert second.acquire() and second.held
        assert not first.acquire()
    finally:
        first.release()
        second.release()
        other_engine.dispose()


CHILD = textwrap.dedent(
    """
    import sys, time
    from cadence.channels import CHANNELS
    from cadence.clock import FixedClock
    from cadence.dsl.loader import load_source
    from cadence.scheduler.service import PushScheduler, SchedulerConfig
    from cadence.store.db import create_db_engine

    url, now, rules = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read()
    ruleset = load_source(rules).raise_for_errors()
    scheduler = PushScheduler(
        engine=create_db_engine(url), clock=FixedClock(now), rules=lambda: ruleset,
        available_channels=CHANNELS, config=SchedulerConfig(chunk_size=10, lease_ms=60_000), owner="doomed",
        on_chunk=lambda report: time.sleep(0.2),
    )
    scheduler.tick()
    """
)


def test_sigkill_of_the_leader_mid_push_leaves_no_gap_and_no_duplicate(
    db_engine: Engine, seed: Seed, tmp_path: Path
) -> None:
    seed(readers(200))
    rules = Rules(DAILY)
    clock = FixedClock(MONDAY)
    make_scheduler(db_engine, rules, clock).tick()  # the job exists
    (tmp_path / "rules.cadence").write_text(DAILY)
    (tmp_path / "child.py").write_text(CHILD)
    fire = MONDAY + 8 * HOUR
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "child.py"),
            db_engine.url.render_as_string(hide_password=False),
            str(fire),
            str(tmp_path / "rules.cadence"),
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with db_engine.connect() as conn:
                cursor = conn.scalar(select(scheduled_runs.c.cursor))
            if cursor and cursor >= 30:
                break
            assert child.poll() is None, "the push finished before it could be killed"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    [run] = runs(db_engine)
    assert run.status == "running" and run.owner == "doomed" and 30 <= run.cursor < 200
    partial = sent_keys(db_engine)
    assert len(partial) == run.cursor  # every committed chunk, nothing of the chunk in flight

    clock.set(fire + 61_000)  # the lease has run out
    successor = make_scheduler(db_engine, rules, clock, owner="successor", chunk_size=10, lease_ms=60_000)
    [report] = successor.tick()
    assert report.evaluated == 200 - run.cursor
    keys = sent_keys(db_engine)
    assert len(keys) == len(set(keys)) == 200
    assert keys[: len(partial)] == partial
    [run] = runs(db_engine)
    assert (run.status, run.owner, run.evaluated) == ("done", "successor", 200)
