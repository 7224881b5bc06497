"""The scheduler inside the app: APScheduler jobs follow the rule files, GET /v1/jobs, ``cadence jobs``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.cli import main
from cadence.clock import FixedClock
from cadence.runtime import Runtime
from cadence.scheduler.service import SchedulerService
from cadence.store.schema.scheduler import scheduled_jobs
from tests.scheduler.conftest import MONDAY

RULE = """
campaign daily "Daily digest" {
    send template "digest"
    channel email
    schedule every day at 09:00 in "Europe/Berlin"
}
"""


def write(path: Path, text: str, bump: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(time.time_ns() + bump * 1_000_000_000,) * 2)


def wait_for(condition: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_rule_files_edited_while_serving_change_the_jobs(runtime: Runtime, tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    write(rules / "daily.cadence", RULE, 0)
    runtime.clock = FixedClock(MONDAY)
    runtime.settings = runtime.settings.model_copy(
        update={"rules_paths": [rules], "scheduler_rules_poll_seconds": 0.1, "engine_enabled": False}
    )
    app = create_app(runtime=runtime, background=True)
    admin = {"X-API-Key": create_key(runtime.engine, name="a", scopes=["admin"])}
    with TestClient(app) as client:
        service: SchedulerService = app.state.scheduler
        listed = client.get("/v1/jobs", headers=admin).json()
        assert listed["running"] is True
        [job] = listed["campaigns"]
        assert (job["campaign"], job["cron"], job["zone"]) == ("daily", "0 9 * * *", "Europe/Berlin")
        assert job["next_run"] == "2026-03-02T08:00:00+00:00"  # 09:00 Berlin, from the runtime's clock
        background = {j["id"] for j in listed["background"]}
        assert {"campaign:daily", "rules", "expire-sends"} <= background

        def trigger(name: str) -> str:
            found = service.scheduler.get_job(f"campaign:{name}")
            return str(found.trigger) if found is not None else ""

        assert "hour='9'" in trigger("daily")
        write(rules / "daily.cadence", RULE.replace("09:00", "18:30"), 5)
        wait_for(lambda: "hour='18'" in trigger("daily") and "minute='30'" in trigger("daily"))
        write(
            rules / "weekly.cadence", RULE.replace("daily", "weekly").replace("every day", "every monday"), 6
        )
        wait_for(lambda: "day_of_week='mon'" in trigger("weekly"))
        (rules / "daily.cadence").unlink()
        wait_for(lambda: trigger("daily") == "")

        def stored() -> dict[str, int | None]:
            with runtime.engine.connect() as conn:
                return {r.campaign: r.removed_ms for r in conn.execute(select(scheduled_jobs))}

        wait_for(lambda: stored() == {"daily": MONDAY, "weekly": None})
        assert client.get("/v1/jobs", headers={"X-API-Key": "nope"}).status_code in (401, 403)
    assert not service.scheduler.running


def test_cadence_jobs_lists_next_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "daily.cadence").write_text(RULE)
    monkeypatch.setenv("CADENCE_DATABASE_URL", f"sqlite:///{tmp_path}/c.db")
    monkeypatch.setenv("CADENCE_RULES_PATHS", orjson.dumps([str(rules)]).decode())
    with pytest.raises(SystemExit) as info:
        main(["db", "upgrade"])
    assert info.value.code in (0, None)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["jobs", "--json"])
    assert info.value.code in (0, None)
    [row] = orjson.loads(capsys.readouterr().out)
    assert row["campaign"] == "daily" and row["schedule"] == 'every day at 09:00 in "Europe/Berlin"'
    assert row["next_run"] is not None and row["next_run"].endswith(("07:00:00+00:00", "08:00:00+00:00"))
    assert row["last_run"] is None


def test_rules_that_do_not_load_are_logged_once_not_every_poll(
    runtime: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = tmp_path / "rules"  # not there yet: `cadence serve` started where there are no rules
    runtime.settings = runtime.settings.model_copy(
        update={"rules_paths": [rules], "scheduler_rules_poll_seconds": 0.05, "engine_enabled": False}
    )
    app = create_app(runtime=runtime, background=True)
    with TestClient(app):
        service: SchedulerService = app.state.scheduler
        for _ in range(5):
            service.refresh()
        time.sleep(0.3)
        said = [r for r in caplog.records if "rules do not compile" in r.getMessage()]
        assert len(said) == 1 and "cannot read rule file" in said[0].getMessage()
        rules.mkdir()
        write(rules / "daily.cadence", RULE, 0)
        wait_for(lambda: service.scheduler.get_job("campaign:daily") is not None)  # still looked for
