"""``cadence import`` warns of what ``POST /v1/batch`` warns of, naming the line and the field (both databases).

File imports accepted events with an unusable ``bounce_type``, a campaign that is not a string,
consent values of the wrong type or channel names in another case and said nothing; the API
named each field. Both now call :func:`~cadence.engine.events.call_warnings`; the import asks
:func:`~cadence.engine.events.may_warn` first on the lines it takes the fast path for, so a line
of each warning is imported here through that path (with a ``messageId``) and through the general
one (without), and the report must hold exactly what ``call_warnings`` says of each line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from cadence.cli import app
from cadence.engine.events import call_warnings
from cadence.engine.importer import SHOWN_WARNINGS, import_file

#: One call per warning the API gives (see tests/api/test_ingest_warnings.py), and clean calls.
CALLS: list[dict[str, Any]] = [
    {"type": "track", "userId": "u1", "event": "Email Bounced", "properties": {"bounce_type": ["soft"]}},
    {"type": "track", "userId": "u1", "event": "Email Bounced", "properties": {"bounce_type": "maybe"}},
    {"type": "track", "userId": "u1", "event": "Message Sent", "properties": {"channel": "sms", "campaign": ["spring"]}},
    {"type": "track", "userId": "u1", "event": "Message Clicked", "properties": {"campaign": {"name": "spring"}},
     "context": {"campaign": {"name": "spring"}}},
    {"type": "identify", "userId": "u1", "traits": {"consent": {"email": "no", "SMS": True}, "unsubscribed": "true"}},
    {"type": "identify", "userId": "u1", "context": {"traits": {"consent": ["email", 5]}}},
    {"type": "track", "userId": "u1", "event": "Consent Updated", "properties": {"channel": ["sms"], "granted": "false"}},
    {"type": "track", "userId": "u1", "event": "Unsubscribed", "properties": {"channel": "Email"}},
    {"type": "track", "userId": "u1", "event": "Message Clicked", "properties": {"channel": "whatsapp"}},
    {"type": "track", "userId": "u1", "event": "Message Opened", "properties": {"decision_id": 12345}},
    {"type": "track", "userId": "u1", "event": "Viewed", "context": {"campaign": "spring", "page": ["/"]}},
    {"type": "page", "anonymousId": "a1", "name": "Home", "context": {"timezone": "Mars/Olympus"}},
    {"type": "identify", "userId": "u1", "traits": {"timezone": "europe/nowhere"}},
    # clean: nothing to say (a feedback event whose only campaign is the context's UTM object)
    {"type": "track", "userId": "u1", "event": "Email Opened", "properties": {"revenue": 5},
     "context": {"campaign": {"name": "spring"}, "page": {"path": "/"}, "timezone": "Europe/Berlin"}},
    {"type": "track", "userId": "u1", "event": "Message Bounced", "properties": {"channel": "sms", "bounce_type": "Soft"}},
    {"type": "identify", "userId": "u1", "traits": {"consent": {"email": True}}},
]  # fmt: skip

#: Lines as a client may write them: an escaped key, blanks around the colon, zones of other types.
WRITTEN = [
    b'{"type":"track","userId":"u1","event":"Email Bounced","properties":{"bounce\\u005ftype":["soft"]}}',
    b'{"type": "track", "userId": "u1", "event": "Viewed", "context": {"campaign" : "spring"}}',
    b'{"type":"identify","userId":"u1","traits":{"timezone" : 5},"context":{"timezone":""}}',
    b'{"type":"track","userId":"u1","event":"Viewed","context":{"timezone":"Europe/Berlin","x":{"timezone":"Mars"}}}',
]


def lines_of(with_message_ids: bool) -> list[bytes]:
    calls = [{**call, "messageId": f"m{i}"} if with_message_ids else call for i, call in enumerate(CALLS)]
    written = [
        line.replace(b'{"type"', b'{"messageId":"w%d","type"' % i) if with_message_ids else line
        for i, line in enumerate(WRITTEN)
    ]
    return [orjson.dumps(call) for call in calls] + written


def expected(lines: list[bytes]) -> list[dict[str, Any]]:
    found = []
    for number, line in enumerate(lines, 1):
        call = orjson.loads(line)
        found += [{"line": number, "field": f, "warning": w} for f, w in call_warnings(call, call["type"])]
    return found


@pytest.mark.parametrize("path_taken", ["fast", "general"])
def test_an_import_reports_the_apis_warnings_with_line_and_field(
    tmp_path: Path, db_engine: Engine, path_taken: str
) -> None:
    lines = lines_of(with_message_ids=path_taken == "fast")
    path = tmp_path / "events.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    want = expected(lines)
    # every warning the API gives is among them, and the clean calls give none
    fields = {w["field"] for w in want}
    assert {
        "properties.bounce_type",
        "properties.campaign",
        "traits.consent.email",
        "traits.consent.SMS",
    } <= fields
    assert {
        "context.traits.consent.1",
        "properties.granted",
        "properties.decision_id",
        "context.page",
    } <= fields
    assert {w["line"] for w in want} == set(range(1, 14)) | {len(CALLS) + 1, len(CALLS) + 2, len(CALLS) + 3}

    report = import_file(engine=db_engine, path=path, batch_size=5)
    # (without message ids the escaped line is the first one's content again: a duplicate, warned of as the API would)
    assert (report.lines, report.accepted + report.duplicates, report.rejected) == (len(lines), len(lines), 0)
    assert report.warnings_path == tmp_path / "events.ndjson.warnings.ndjson"
    written = [orjson.loads(line) for line in report.warnings_path.read_bytes().splitlines()]
    assert written == want
    assert report.warned == len(want) and sum(report.warning_fields.values()) == len(want)
    assert [tuple(w) for w in report.first_warnings] == [
        (w["line"], w["field"], w["warning"]) for w in want[:SHOWN_WARNINGS]
    ]


def test_a_csv_records_warnings_name_its_line(tmp_path: Path, db_engine: Engine) -> None:
    path = tmp_path / "bounces.csv"
    path.write_text("userId,event,bounce_type\nu1,Email Bounced,hard\nu2,Email Bounced,maybe\n")
    report = import_file(engine=db_engine, path=path)
    assert report.accepted == 2
    assert [tuple(w[:2]) for w in report.first_warnings] == [(3, "properties.bounce_type")]


def test_a_clean_file_writes_no_warnings_file(tmp_path: Path, db_engine: Engine) -> None:
    path = tmp_path / "clean.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps({**c, "messageId": f"c{i}"}) for i, c in enumerate(CALLS[-3:])))
    report = import_file(engine=db_engine, path=path)
    assert (report.accepted, report.warned, report.warnings_path) == (3, 0, None)
    assert not (tmp_path / "clean.ndjson.warnings.ndjson").exists()


def test_the_command_shows_the_first_warnings_and_where_the_rest_are(
    tmp_path: Path, db_engine: Engine
) -> None:
    path = tmp_path / "events.ndjson"
    lines = lines_of(with_message_ids=True) * 2  # more than are shown (the repeats warn as the API would)
    path.write_bytes(b"\n".join(lines) + b"\n")
    url = db_engine.url.render_as_string(hide_password=False)
    out = tmp_path / "said.ndjson"
    result = CliRunner().invoke(app, ["--database-url", url, "import", str(path), "--warnings", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the terminal's width wraps lines
    assert "line 1: properties.bounce_type: an array (['soft']), not 'hard' or 'soft'" in said
    assert "line 8: properties.channel: 'Email' is read as 'email'" in said
    total = len(expected(lines))
    assert f"{total} warning(s) on stored lines (" in said
    assert f"{total - SHOWN_WARNINGS} not shown above, written to {out}" in said
    assert len(out.read_bytes().splitlines()) == total
