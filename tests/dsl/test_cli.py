"""The rule tools from the command line, over the example library and a real database."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from cadence.cli import app
from cadence.engine.events import parse_call
from cadence.engine.ingest import record_events
from cadence.engine.loop import EngineLoop
from cadence.runtime import open_runtime
from cadence.settings import Settings

RULES = Path(__file__).resolve().parents[2] / "rules"
DAY = 86_400_000
runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CADENCE_DATABASE_URL", raising=False)


def test_examples_check_format_lint_and_test_clean() -> None:
    check = runner.invoke(app, ["check", str(RULES)])
    assert check.exit_code == 0, check.output
    assert "ok: 9 file(s), 8 campaign(s)" in check.output
    fmt = runner.invoke(app, ["fmt", "--check", str(RULES)])
    assert fmt.exit_code == 0, fmt.output
    lint = runner.invoke(app, ["lint", str(RULES)])
    assert lint.exit_code == 0, lint.output
    test = runner.invoke(app, ["test", str(RULES)])
    assert test.exit_code == 0, test.output
    assert " 0 failed, 0 skipped" in test.output and "coverage: 100% of rules" in test.output


def test_simulator_rules_check_format_lint_and_test_clean() -> None:
    rules = RULES.parent / "examples" / "simulate"
    for command in (["check"], ["fmt", "--check"], ["lint"], ["test"]):
        result = runner.invoke(app, [*command, str(rules)])
        assert result.exit_code == 0, (command, result.output)
    assert "3 passed, 0 failed" in result.output


def test_check_exits_1_and_lists_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cadence"
    bad.write_text(
        'segment s = count(x within 7) > 0\ncampaign c {\n  send template "t"\n  channel emial\n}\n'
    )
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 1
    assert "bad.cadence:1:19: error E201: unknown name 'x'" in result.output
    assert "bad.cadence:4:11: error E202: unknown channel 'emial'" in result.output
    assert "did you mean 'email'?" in result.output
    as_json = runner.invoke(app, ["check", "--json", str(bad)])
    body = orjson.loads(as_json.output)
    assert body["ok"] is False and [d["code"] for d in body["diagnostics"]] == ["E201", "E302", "E202"]


def test_fmt_rewrites_and_check_mode_fails_first(tmp_path: Path) -> None:
    target = tmp_path / "x.cadence"
    target.write_text("segment  s=true # c\n")
    assert runner.invoke(app, ["fmt", "--check", str(target)]).exit_code == 1
    assert target.read_text() == "segment  s=true # c\n"
    assert runner.invoke(app, ["fmt", str(tmp_path)]).exit_code == 0
    assert target.read_text() == "segment s = true  # c\n"
    assert runner.invoke(app, ["fmt", "--check", str(target)]).exit_code == 0


def test_lint_findings(tmp_path: Path) -> None:
    (tmp_path / "l.cadence").write_text(
        'event p = "P"\n'
        "segment unused = p within 1d\n"
        "segment never = count(p) < 0\n"
        'campaign a {\n  audience never\n  trigger on p after 1h\n  unless p within 2h\n  send template "t"\n'
        "  channel email\n  quiet 22:00..22:00\n}\n"
        'campaign b {\n  audience never\n  trigger on p\n  send template "t"\n  channel email\n}\n'
        'campaign d {\n  send template "t"\n  channel email\n'
        "  schedule every day at 09:00\n  cap 1 per 7d\n}\n"
    )
    result = runner.invoke(app, ["lint", str(tmp_path)])
    assert result.exit_code == 1
    codes = [line.split()[2].rstrip(":") for line in result.output.splitlines() if ": warning " in line]
    assert codes == ["W502", "W503", "W503", "W505", "W504", "W506"], result.output


def test_quiet_hours_with_equal_ends_never_send_as_the_linter_says(tmp_path: Path) -> None:
    """W505 says ``quiet 08:00..08:00`` covers the whole day and the campaign can never send; the rule
    file's own tests agree, at night and at noon, with ``drop`` and ``defer`` (until session 24 the
    range was empty and the campaign sent at every hour: an outside checker's D5)."""
    (tmp_path / "e.cadence").write_text(
        'campaign e "E" {\n    send      template "e"\n    channel   email\n'
        "    quiet     08:00..08:00 then drop\n}\n\n"
        'campaign w "W" {\n    send      template "w"\n    channel   email\n'
        "    quiet     22:00..22:00 then defer\n}\n\n"
        'test "the linter says these campaigns can never send" {\n'
        '    given customer { id: "x1", timezone: "UTC", consent: [email] }\n'
        "    at 2026-12-01 03:00 UTC expect no send because quiet(e)\n"
        "    at 2026-12-01 12:00 UTC expect no send because quiet(w)\n"
        "}\n"
    )
    lint = runner.invoke(app, ["lint", str(tmp_path)])
    assert "W505: quiet hours 08:00..08:00 cover the whole day: campaign 'e' can never send" in lint.output
    result = runner.invoke(app, ["test", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "2 passed, 0 failed" in result.output, result.output


def test_failing_rule_test_exits_1_with_the_reason(tmp_path: Path) -> None:
    for f in RULES.glob("*.cadence"):
        shutil.copy(f, tmp_path / f.name)
    cart = tmp_path / "cart.cadence"
    cart.write_text(
        cart.read_text().replace("expect send cart_rescue via sms", "expect send cart_rescue via email")
    )
    result = runner.invoke(app, ["test", str(tmp_path)])
    assert result.exit_code == 1
    assert "FAILED" in result.output and "decided: send cart_rescue via sms now" in result.output


def _customer(engine: Engine, now: int) -> None:
    """Ada: bought 90 days ago, opened an email 3 days ago, consented to email; through the real loop."""
    calls = [
        {
            "type": "identify",
            "userId": "u-1",
            "messageId": "i1",
            "timestamp": (now - 400 * DAY) / 1000,
            "traits": {"first_name": "Ada", "timezone": "Europe/Berlin", "consent": {"email": True}},
        },
        {
            "type": "track",
            "userId": "u-1",
            "event": "Order Completed",
            "messageId": "o1",
            "timestamp": (now - 90 * DAY) / 1000,
            "properties": {"revenue": 80},
        },
        {
            "type": "track",
            "userId": "u-1",
            "event": "Email Opened",
            "messageId": "e1",
            "timestamp": (now - 3 * DAY) / 1000,
        },
    ]
    record_events(engine=engine, batch=[parse_call(c, received_ms=now) for c in calls])
    runtime = open_runtime(
        Settings(database_url=engine.url.render_as_string(hide_password=False)), engine=engine
    )
    EngineLoop(runtime).catch_up()


def test_explain_reads_the_profile_tables(db_engine: Engine) -> None:
    now = 1_772_697_600_000  # 2026-03-05 08:00 UTC
    _customer(db_engine, now)
    url = db_engine.url.render_as_string(hide_password=False)
    base = [
        "--database-url",
        url,
        "explain",
        "winback",
        "--rules",
        str(RULES),
        "--at",
        "2026-03-05T08:00:00Z",
    ]
    result = runner.invoke(app, [*base, "--customer", "u-1", "--json"])
    assert result.exit_code == 0, result.output
    record = orjson.loads(result.output)
    assert record["eligible"] is True and record["customer_id"] == 1
    checks = {c["text"]: (c["value"], c["passed"]) for c in record["checks"]}
    assert checks["count(email.opened within 30d) > 0"] == (1, True)
    assert checks["seg.lapsed > not purchased within 60d"] == (True, True)
    assert record["decision"]["action"] == "send" and record["decision"]["channel"] == "email"
    not_eligible = runner.invoke(
        app, [*base[:2], "explain", "cart_rescue", "--rules", str(RULES), "--customer", "1"]
    )
    assert not_eligible.exit_code == 0, not_eligible.output
    assert "why not:" in not_eligible.output and "trigger" in not_eligible.output
    unknown = runner.invoke(app, [*base, "--customer", "nobody"])
    assert unknown.exit_code != 0


def test_check_warns_about_events_never_seen_in_the_database(db_engine: Engine, tmp_path: Path) -> None:
    _customer(db_engine, 1_772_697_600_000)
    rules = tmp_path / "r.cadence"
    rules.write_text('event purchased = "Order Complete"\nsegment s = purchased within 1d\n')
    url = db_engine.url.render_as_string(hide_password=False)
    result = runner.invoke(app, ["--database-url", url, "check", str(rules)])
    assert result.exit_code == 0, result.output
    assert "warning W501: no event named 'Order Complete' has ever been recorded" in result.output
    assert "did you mean 'Order Completed'?" in result.output
