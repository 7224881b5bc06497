"""``cadence serve`` killed with SIGKILL mid-stream: nothing acknowledged is lost, nothing counted twice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import Engine, func, select

from cadence.api.security import hash_key
from cadence.store.schema.core import checkpoints, events, profiles

KEY = "test-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(url: str, port: int, tmp: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CADENCE_DATABASE_URL": url,
        "CADENCE_API_KEYS": orjson.dumps(
            [{"name": "t", "sha256": hash_key(KEY), "scopes": ["admin"]}]
        ).decode(),
        "CADENCE_ENGINE_POLL_SECONDS": "0.05",
        "CADENCE_RATE_LIMIT_PER_SECOND": "100000",
        "CADENCE_RATE_LIMIT_BURST": "100000",
        "CADENCE_CONFIG": str(tmp / "none.toml"),
    }
    with (tmp / "server.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cadence", "serve", "--port", str(port)],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    # a fresh `cadence serve` spends about 4 s of CPU before it is ready (river, scipy, migrations):
    # allow for a machine that is busy with other test workers
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
        if proc.poll() is not None:
            raise RuntimeError((tmp / "server.log").read_text())
    proc.kill()
    raise RuntimeError("server did not become ready")


def post_batches(port: int, start: int, acknowledged: list[str], stop: threading.Event) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=(KEY, ""), timeout=5) as client:
        n = start
        while not stop.is_set():
            batch = [
                {
                    "type": "track",
                    "userId": f"u{(n + i) % 50}",
                    "event": "Tick",
                    "messageId": f"m{n + i}",
                    "properties": {"value": 1},
                }
                for i in range(100)
            ]
            try:
                response = client.post("/v1/batch", json={"batch": batch})
            except httpx.TransportError:
                return
            if response.status_code == 200:
                acknowledged.extend(e["messageId"] for e in batch)
            n += 100


@pytest.mark.slow
def test_sigkill_during_ingest_loses_nothing_and_counts_nothing_twice(
    db_engine: Engine, tmp_path: Path
) -> None:
    url = db_engine.url.render_as_string(hide_password=False)
    port = free_port()
    server = start_server(url, port, tmp_path)
    acknowledged: list[str] = []
    stop = threading.Event()
    sender = threading.Thread(target=post_batches, args=(port, 0, acknowledged, stop))
    sender.start()
    deadline = time.monotonic() + 60  # the kill lands while batches stream in, however slow the machine
    while len(acknowledged) < 300 and time.monotonic() < deadline and sender.is_alive():
        time.sleep(0.05)
    time.sleep(0.3)
    server.send_signal(signal.SIGKILL)
    server.wait()
    stop.set()
    sender.join()
    assert len(acknowledged) >= 100

    server = start_server(url, port, tmp_path)
    try:
        deadline = time.monotonic() + 60
        with db_engine.connect() as conn:
            newest = conn.scalar(select(func.max(events.c.id)))
            while time.monotonic() < deadline:
                done = conn.scalar(select(checkpoints.c.position).where(checkpoints.c.name == "profiles"))
                conn.rollback()
                if done == newest:
                    break
                time.sleep(0.1)
            stored = set(conn.scalars(select(events.c.message_id)))
            counted = conn.scalar(select(func.sum(profiles.c.event_count)))
            logged = conn.scalar(select(func.count()).select_from(events))
    finally:
        server.terminate()
        server.wait(10)
    assert set(acknowledged) <= stored
    assert counted == logged
