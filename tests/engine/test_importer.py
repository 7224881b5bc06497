"""``cadence import``: NDJSON and CSV files with bad lines, through the real CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import orjson
import pytest
from sqlalchemy import Engine, func, select
from typer.testing import CliRunner

from cadence.cli import app
from cadence.engine.importer import import_file
from cadence.engine.loop import EngineLoop
from cadence.runtime import Runtime
from cadence.store.schema.core import events


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(events)) or 0)


def test_ndjson_import_keeps_good_lines_and_reports_bad_ones(tmp_path: Path, db_engine: Engine) -> None:
    path = tmp_path / "events.ndjson"
    lines = [
        json.dumps({"type": "track", "userId": f"u{i}", "event": "Order Completed", "messageId": f"m{i}"})
        for i in range(25)
    ]
    lines.insert(3, "{broken")
    lines.insert(10, json.dumps({"type": "track", "event": "No Id"}))
    path.write_text("\n".join(lines) + "\n")
    report = import_file(engine=db_engine, path=path, batch_size=4)
    assert (report.lines, report.accepted, report.rejected) == (27, 25, 2)
    rejects = [orjson.loads(line) for line in report.rejects_path.read_bytes().splitlines()]  # type: ignore[union-attr]
    assert [(r["line"], r["field"]) for r in rejects] == [(4, "line"), (11, "userId")]
    again = import_file(engine=db_engine, path=path)
    assert (again.accepted, again.duplicates) == (0, 25)
    assert count(db_engine) == 25


def test_csv_import_with_column_mapping_via_cli(tmp_path: Path, db_engine: Engine) -> None:
    path = tmp_path / "orders.csv"
    path.write_text(
        "customer,when,amount,sku\n"
        "c1,2026-01-02 10:00:00,12.5,A\n"
        ",2026-01-02 11:00:00,3,B\n"
        "c2,not-a-date,4,C\n"
        "c3,2026-01-03T09:00:00Z,7,D\n"
        "c4,2026-01-03T09:00:00Z,8\n"  # a cell short: reported, not a crash of the whole import
        "c5,2026-01-03T09:00:00Z,9,E,extra\n"
    )
    url = db_engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(
        app,
        [
            "--database-url",
            url,
            "import",
            str(path),
            "--map",
            "customer=userId",
            "--map",
            "when=timestamp",
            "--map",
            "amount=properties.revenue",
            "--map",
            "sku=event",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4 rejected" in result.output
    with db_engine.connect() as conn:
        rows = conn.execute(
            select(events.c.user_id, events.c.event, events.c.payload).order_by(events.c.id)
        ).all()
    assert [(r.user_id, r.event, r.payload["properties"]["revenue"]) for r in rows] == [
        ("c1", "A", 12.5),
        ("c3", "D", 7),
    ]
    rejects = (tmp_path / "orders.csv.rejects.ndjson").read_text()
    assert '"field":"userId"' in rejects and '"field":"timestamp"' in rejects
    assert "3 cells where the header has 4 columns" in rejects and "more cells than header columns" in rejects


def test_mapping_to_a_missing_column_is_a_clear_error(tmp_path: Path, sqlite_engine: Engine) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    url = sqlite_engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(app, ["--database-url", url, "import", str(path), "--map", "user=userId"])
    assert result.exit_code == 2
    assert "user" in result.output and "not in the CSV header" in result.output


def test_a_byte_order_mark_is_not_part_of_the_first_line_or_column(tmp_path: Path, db_engine: Engine) -> None:
    """Excel's "CSV UTF-8" and editors on Windows start the file with one: the first column's name
    (then unknown to --map) and the first NDJSON line (then not JSON) must not carry it."""
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfuser,event\nu1,Order Completed\n")
    ndjson_path = tmp_path / "windows.ndjson"
    ndjson_path.write_bytes(b'\xef\xbb\xbf{"type":"track","userId":"u2","event":"A","messageId":"w1"}\n')
    url = db_engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(app, ["--database-url", url, "import", str(csv_path), "--map", "user=userId"])
    assert result.exit_code == 0, result.output
    assert import_file(engine=db_engine, path=ndjson_path).accepted == 1
    with db_engine.connect() as conn:
        rows = conn.execute(select(events.c.user_id, events.c.event).order_by(events.c.id)).all()
    assert [tuple(r) for r in rows] == [("u1", "Order Completed"), ("u2", "A")]


def test_an_imported_time_zone_that_is_not_one_is_reported_when_the_log_is_applied(
    tmp_path: Path, runtime: Runtime, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API answers such a call with `warnings`; an import has no answer per line, so the engine
    # loop names the event and the field when it meets the value (once per value and process).
    from cadence.engine import profiles

    monkeypatch.setattr(profiles, "_REPORTED_ZONES", set())
    path = tmp_path / "people.ndjson"
    calls = [
        {"type": "identify", "userId": f"u{i}", "messageId": f"i{i}", "traits": {"timezone": "Pluto/Base"}}
        for i in range(3)
    ]
    calls.append(
        {
            "type": "track",
            "userId": "u0",
            "event": "Seen",
            "messageId": "t0",
            "context": {"timezone": "+05:30"},
        }
    )
    path.write_text("\n".join(json.dumps(c) for c in calls) + "\n")
    assert import_file(engine=runtime.engine, path=path).accepted == 4
    with caplog.at_level(logging.WARNING, logger="cadence.profiles"):
        EngineLoop(runtime).catch_up()
    said = [r.getMessage() for r in caplog.records if r.name == "cadence.profiles"]
    assert len(said) == 2
    assert "event 1: traits.timezone 'Pluto/Base' is not an IANA time zone" in said[0]
    assert "event 4: context.timezone '+05:30'" in said[1]
