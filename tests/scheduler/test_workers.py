"""``cadence serve --workers N``: one leader among the workers, and a new one when it is killed (SQLite and PostgreSQL)."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy import Engine, text

from cadence.api.security import create_key
from cadence.engine.loop import LEADER_LOCK_ID

ROOT = Path(__file__).resolve().parents[2]
RULES = """
campaign newsletter {
  audience true
  send template "news"
  channel email
  schedule every day at 09:00
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(url: str, rules: Path, port: int, workers: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CADENCE_DATABASE_URL": url,
        "CADENCE_RULES_PATHS": orjson.dumps([str(rules)]).decode(),
        "CADENCE_PORT": str(port),
        "CADENCE_ENGINE_POLL_SECONDS": "0.2",
        "CADENCE_LOG_LEVEL": "WARNING",
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cadence", "serve", "--workers", str(workers)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _ask(port: int, key: str) -> dict[str, Any] | None:
    """One request on a fresh connection (so the kernel may hand it to any worker)."""
    try:
        with httpx.Client(timeout=5) as client:
            r = client.get(
                f"http://127.0.0.1:{port}/v1/jobs", headers={"X-API-Key": key, "Connection": "close"}
            )
    except httpx.HTTPError:
        return None
    return dict(r.json()) if r.status_code == 200 else None


def _leader_locks(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text(
                    "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND ((classid::bigint << 32) | objid::bigint) = :k"
                    # this test's database: another test's server may lead its own on the same cluster
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"k": LEADER_LOCK_ID},
            )
            or 0
        )


def _workers_seen(port: int, key: str, want: int, deadline: float) -> dict[int, bool]:
    """Ask until ``want`` distinct workers answered; their pid -> leader (latest answer)."""
    seen: dict[int, bool] = {}
    while time.monotonic() < deadline and len(seen) < want:
        answer = _ask(port, key)
        if answer is not None:
            seen[int(answer["pid"])] = bool(answer["leader"])
        else:
            time.sleep(0.2)
    return seen


def test_serve_workers_elect_one_leader_and_another_takes_over(db_engine: Engine, tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "news.cadence").write_text(RULES)
    url = db_engine.url.render_as_string(hide_password=False)
    port = _free_port()
    postgres = db_engine.dialect.name == "postgresql"
    key = create_key(db_engine, name="test", scopes=["admin"])
    proc = _serve(url, rules, port, workers=2, log=tmp_path / "serve.log")
    try:
        # Starting takes a few seconds per worker (longer on a loaded machine).
        seen = _workers_seen(port, key, 2, time.monotonic() + 120)
        assert len(seen) == 2, (
            f"two workers should answer, saw {seen}: " + (tmp_path / "serve.log").read_text()
        )
        # Leadership settles within a poll or two; then exactly one worker leads.
        deadline = time.monotonic() + 10
        while sum(seen.values()) != 1 and time.monotonic() < deadline:
            seen.update(_workers_seen(port, key, 2, time.monotonic() + 5))
        assert sum(seen.values()) == 1, seen
        assert not postgres or _leader_locks(db_engine) == 1
        [leader] = [pid for pid, leads in seen.items() if leads]
        [follower] = [pid for pid, leads in seen.items() if not leads]

        os.kill(leader, signal.SIGKILL)
        killed = time.monotonic()
        took_over = None
        while time.monotonic() - killed < 20:
            answer = _ask(port, key)
            if answer is not None and answer["pid"] == follower and answer["leader"]:
                took_over = time.monotonic() - killed
                break
            time.sleep(0.1)
        assert took_over is not None, "no worker took over within 20 s"
        assert took_over < 10
        assert not postgres or _leader_locks(db_engine) == 1
        # The parent started a replacement worker, which follows.
        later = _workers_seen(port, key, 2, time.monotonic() + 120)
        assert leader not in later and later.get(follower) is True
        assert sum(later.values()) == 1, later
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0
    if not postgres:  # the file lock was released with its holder: anyone can take it now
        database = db_engine.url.database
        with open(f"{database}.leader-{LEADER_LOCK_ID:x}", "ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    # Released on shutdown: the server ends a closed session's backend (and its locks)
    # asynchronously, so allow it a moment.
    deadline = time.monotonic() + 10
    while _leader_locks(db_engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leader_locks(db_engine) == 0
