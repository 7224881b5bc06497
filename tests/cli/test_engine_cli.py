"""Commands that read derived state work without a server: they apply the logged events first."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from cadence.cli import app
from cadence.engine.events import parse_call
from cadence.engine.ingest import record_events

RULES = Path(__file__).resolve().parents[2] / "rules"
DAY = 86_400_000
NOW = 1_772_697_600_000  # 2026-03-05 08:00 UTC
runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CADENCE_DATABASE_URL", raising=False)


def _logged_only(engine: Engine) -> None:
    """A lapsed buyer who still opens email, logged as an import or a stopped server leaves it: not applied."""
    calls = [
        {"type": "identify", "userId": "u-1", "messageId": "i1", "timestamp": (NOW - 400 * DAY) / 1000,
         "traits": {"timezone": "Europe/Berlin", "consent": {"email": True}}},
        {"type": "track", "userId": "u-1", "event": "Order Completed", "messageId": "o1",
         "timestamp": (NOW - 90 * DAY) / 1000, "properties": {"revenue": 80}},
        {"type": "track", "userId": "u-1", "event": "Email Opened", "messageId": "e1",
         "timestamp": (NOW - 3 * DAY) / 1000},
    ]  # fmt: skip
    record_events(engine=engine, batch=[parse_call(c, received_ms=NOW) for c in calls])


def test_status_catch_up_and_the_readers_apply_the_log_first(db_engine: Engine) -> None:
    _logged_only(db_engine)
    db = ["--database-url", db_engine.url.render_as_string(hide_password=False)]

    status = runner.invoke(app, [*db, "engine", "status", "--json"])
    assert status.exit_code == 0, status.output
    report = orjson.loads(status.output)
    assert report["lag"] == 3 and report["positions"]["profiles"] == 0

    # explain applies the 3 events before reading the profile: the customer exists and is eligible
    explained = runner.invoke(
        app,
        [
            *db,
            "explain",
            "winback",
            "--rules",
            str(RULES),
            "--at",
            "2026-03-05T08:00:00Z",
            "--customer",
            "u-1",
        ],
    )
    assert explained.exit_code == 0, explained.output
    assert "applying 3 events not applied yet" in explained.output
    assert "decision: send via email" in explained.output

    after = orjson.loads(runner.invoke(app, [*db, "engine", "status", "--json"]).output)
    assert after["lag"] == 0 and set(after["positions"].values()) == {3}
    assert (
        runner.invoke(app, [*db, "engine", "catch-up"]).output.strip()
        == "nothing to apply: the log is applied"
    )

    # a later event, then export: applied first, and the events (a column named "type") print as JSON
    later = {
        "type": "track",
        "userId": "u-1",
        "event": "Email Opened",
        "messageId": "e2",
        "timestamp": NOW / 1000,
    }
    record_events(engine=db_engine, batch=[parse_call(later, received_ms=NOW)])
    exported = runner.invoke(app, [*db, "customers", "export", "u-1"])
    assert exported.exit_code == 0, exported.output
    data = orjson.loads(exported.stdout)
    assert [e["message_id"] for e in data["events"]] == ["i1", "o1", "e1", "e2"]
    assert data["aggregates"]["Email Opened"]["count"] == 2

    erased = runner.invoke(app, [*db, "customers", "erase", "u-1", "--yes"])
    assert erased.exit_code == 0, erased.output
    assert "erased: 4 events" in erased.output
    assert "0 removals from remote ad audiences queued" in erased.output


def test_catch_up_sets_an_event_that_fails_aside_when_asked_and_retry_applies_it(
    db_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cadence.engine.consent import ConsentSubscriber

    _logged_only(db_engine)
    db = ["--database-url", db_engine.url.render_as_string(hide_password=False)]
    apply = ConsentSubscriber.apply

    def broken(self: ConsentSubscriber, conn: object, batch: list) -> None:  # type: ignore[type-arg]
        if any(e.type == "track" and e.event == "Order Completed" for e in batch):
            raise ValueError("cannot read this order")
        apply(self, conn, batch)

    monkeypatch.setattr(ConsentSubscriber, "apply", broken)
    refused = runner.invoke(app, [*db, "engine", "catch-up"])
    assert refused.exit_code == 1
    assert "ValueError: cannot read this order" in refused.output and "--set-aside" in refused.output

    went_on = runner.invoke(app, [*db, "engine", "catch-up", "--set-aside"])
    assert went_on.exit_code == 0, went_on.output
    assert "set event 2 aside" in went_on.output
    report = orjson.loads(runner.invoke(app, [*db, "engine", "status", "--json"]).output)
    assert report["lag"] == 0
    assert [(r["event_id"], r["subscriber"]) for r in report["quarantined"]["recent"]] == [(2, "consent")]
    shown = runner.invoke(app, [*db, "engine", "status"])
    assert "events set aside" in shown.output and "ValueError: cannot read" in shown.output

    still = runner.invoke(app, [*db, "engine", "retry", "2"])
    assert still.exit_code == 1 and "still fails" in still.output
    monkeypatch.setattr(ConsentSubscriber, "apply", apply)
    fixed = runner.invoke(app, [*db, "engine", "retry", "2"])
    assert fixed.exit_code == 0, fixed.output
    assert "applied event 2 to consent" in fixed.output
    report = orjson.loads(runner.invoke(app, [*db, "engine", "status", "--json"]).output)
    assert report["quarantined"]["count"] == 0
    gone = runner.invoke(app, [*db, "engine", "retry", "2"])
    assert gone.exit_code == 1 and "not set aside" in gone.output
