"""A dispatcher process killed with SIGKILL mid-send: in-doubt sends are settled, never delivered twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import Engine, func, insert, select
from typer.testing import CliRunner

from cadence.cli import app
from cadence.connectors.delivery import Dispatcher, InDoubtReport
from cadence.connectors.testing import FakeProviders, connector_config
from cadence.engine.sendqueue import enqueue_send
from cadence.plugins.manager import build_connectors, make_plugin_manager
from cadence.settings import Settings
from cadence.store.schema.core import consent, customers, profiles
from cadence.store.schema.sends import sends

ROOT = Path(__file__).resolve().parents[2]


def seed(engine: Engine, n: int) -> None:
    """``n`` customers with email, phone and an SMS opt-in; an email, an SMS and a Meta event each."""
    with engine.begin() as conn:
        conn.execute(insert(customers), [{"id": i, "created_ms": 0} for i in range(1, n + 1)])
        conn.execute(
            insert(profiles),
            [
                {
                    "customer_id": i,
                    "first_seen_ms": 0,
                    "last_seen_ms": 0,
                    "event_count": 1,
                    "traits": {"email": f"c{i}@example.com", "phone": f"+1415555{i:04d}"},
                    "updated_event_id": 0,
                    "trait_events": {},
                }
                for i in range(1, n + 1)
            ],
        )
        conn.execute(
            insert(consent),
            [
                {
                    "customer_id": i,
                    "channel": "sms",
                    "granted": True,
                    "source": "t",
                    "changed_ms": 0,
                    "event_id": 0,
                }
                for i in range(1, n + 1)
            ],
        )
        for i in range(1, n + 1):
            for channel, template in (("email", "d-1"), ("sms", "Hi {email}"), ("facebook", "Purchase")):
                enqueue_send(
                    conn,
                    key=f"crash:{channel}:{i}",
                    campaign="crash",
                    customer_id=i,
                    channel=channel,
                    due_ms=0,
                    now_ms=0,
                    template=template,
                    decision_id=f"d{channel}{i}",
                )


def configured(fake: FakeProviders) -> dict[str, dict[str, object]]:
    return {
        "sendgrid": connector_config("sendgrid", fake.base_url) | {"batch_size": 5},
        "sms": connector_config("sms", fake.base_url),
        "facebook": connector_config("facebook", fake.base_url) | {"batch_size": 5},
    }


def counts(engine: Engine) -> dict[tuple[str, str], int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(sends.c.channel, sends.c.status, func.count()).group_by(sends.c.channel, sends.c.status)
        )
        return {(channel, status): n for channel, status, n in rows}


async def test_sigkill_mid_send_settles_in_doubt_sends_without_duplicates(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine, tmp_path: Path
) -> None:
    n = 20
    seed(db_engine, n)
    fake.latency = 0.05  # each provider call takes a moment: the kill lands with calls in flight
    url = db_engine.url.render_as_string(hide_password=False)
    code = "import sys; from cadence.connectors.testing import run_dispatcher; run_dispatcher(sys.argv[1], sys.argv[2])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-c", code, url, orjson.dumps(configured(fake)).decode()],
        env=env,
        stdout=subprocess.PIPE,
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 60
        while len(fake.calls) < 8:  # some batches answered, others in flight
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.002)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        if worker.stdout is not None:
            worker.stdout.close()
    fake.latency = 0.0
    crashed = counts(db_engine)
    assert sum(v for (_, status), v in crashed.items() if status == "sending") > 0, crashed

    settings = Settings(disable_plugin_autoload=True, connectors=configured(fake), _env_file=None)  # type: ignore[call-arg]
    registry = build_connectors(settings, pm=make_plugin_manager(settings), engine=db_engine, client=http)
    restarted = Dispatcher(engine=db_engine, route=registry.route, lease_ms=0)
    report = await restarted.recover_in_doubt()
    assert report != InDoubtReport()
    await restarted.drain()

    final = counts(db_engine)
    # Nothing lost: every send is sent, or dead-lettered in doubt (only SendGrid has no way to tell).
    assert sum(final.values()) == 3 * n
    assert final.get(("sms", "sent")) == n and final.get(("facebook", "sent")) == n
    in_doubt = final.get(("email", "failed"), 0)
    assert in_doubt == report.dead_lettered and final.get(("email", "sent"), 0) + in_doubt == n
    # Nothing twice: the providers saw each key at most once (Meta dropped the resent event ids).
    assert set(fake.delivered.values()) == {1}
    assert sum(1 for k in fake.delivered if k.startswith("crash:sms:")) == n

    # The operator lists them, checks the provider, and re-queues the ones it never got.
    env_db = {"CADENCE_DATABASE_URL": url, "CADENCE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    runner = CliRunner()
    listed = runner.invoke(app, ["sends", "in-doubt", "--json"], env=env_db)
    assert listed.exit_code == 0, listed.output
    rows = orjson.loads(listed.stdout)
    assert len(rows) == in_doubt and all(r["connector"] == "sendgrid" for r in rows)
    if rows:
        never_got = [r["id"] for r in rows if fake.delivered.get(r["idempotency_key"], 0) == 0]
        got = [r["id"] for r in rows if r["id"] not in never_got]
        if never_got:
            done = runner.invoke(app, ["sends", "requeue", *map(str, never_got), "--json"], env=env_db)
            assert done.exit_code == 0 and orjson.loads(done.stdout)["done"] == never_got
        if got:
            done = runner.invoke(app, ["sends", "mark-sent", *map(str, got)], env=env_db)
            assert done.exit_code == 0, done.output
        await restarted.drain()
        assert counts(db_engine).get(("email", "sent")) == n
        assert set(fake.delivered.values()) == {1} and len(fake.delivered) == 3 * n


@pytest.mark.parametrize("status", ["sent", "queued"])
def test_requeue_refuses_sends_that_are_not_dead_letters(
    status: str, sqlite_engine: Engine, tmp_path: Path
) -> None:
    with sqlite_engine.begin() as conn:
        conn.execute(insert(customers).values(id=1, created_ms=0))
        enqueue_send(conn, key="k", campaign="c", customer_id=1, channel="email", due_ms=0, now_ms=0)
        conn.execute(sends.update().values(status=status))
    url = sqlite_engine.url.render_as_string(hide_password=False)
    env_db = {"CADENCE_DATABASE_URL": url, "CADENCE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = CliRunner().invoke(app, ["sends", "requeue", "1", "999"], env=env_db)
    assert result.exit_code == 1
    assert f"status is '{status}'" in result.output and "no such send" in result.output
    with sqlite_engine.connect() as conn:
        assert conn.scalar(select(sends.c.status)) == status


def test_dead_letters_of_one_cause_are_requeued_together(db_engine: Engine) -> None:
    # After fixing a setting (or a revoked token), the sends it dead-lettered go back in one
    # command, without the ones that failed for another reason.
    with db_engine.begin() as conn:
        conn.execute(insert(customers).values(id=1, created_ms=0))
        for n, error in enumerate(
            [
                "ConfigError: CADENCE_CONNECTORS__SENDGRID__API_KEY: required by the sendgrid connector",
                "ConfigError: CADENCE_CONNECTORS__SENDGRID__API_KEY: required by the sendgrid connector",
                "PermanentFailure: HTTP 400 from api.sendgrid.com: invalid address",
            ]
        ):
            enqueue_send(conn, key=f"k{n}", campaign="c", customer_id=1, channel="email", due_ms=0, now_ms=0)
            conn.execute(
                sends.update()
                .where(sends.c.idempotency_key == f"k{n}")
                .values(status="failed", last_error=error)
            )
    url = db_engine.url.render_as_string(hide_password=False)
    env_db = {"CADENCE_DATABASE_URL": url, "CADENCE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = CliRunner().invoke(
        app, ["sends", "requeue", "--failed-with", "ConfigError", "--json"], env=env_db
    )
    assert result.exit_code == 0, result.output
    assert len(orjson.loads(result.stdout)["done"]) == 2
    with db_engine.connect() as conn:
        assert dict(conn.execute(select(sends.c.idempotency_key, sends.c.status)).all()) == {
            "k0": "queued",
            "k1": "queued",
            "k2": "failed",
        }
    nothing = CliRunner().invoke(app, ["sends", "requeue", "--failed-with", "ConfigError"], env=env_db)
    assert nothing.exit_code == 0 and "re-queued: 0" in nothing.output
