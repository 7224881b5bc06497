"""``cadence attribution``: simulate, run every model from files, score."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from sqlalchemy import Engine

from cadence.cli import main
from cadence.engine.attribution.spec import MODELS


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return int(info.value.code or 0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "attribution",
                "simulate",
                "--customers",
                "20000",
                "--scenario",
                "targeted",
                "--out-dir",
                str(out),
            ]
        )
    assert info.value.code in (0, None)
    return out


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_simulate_writes_the_four_files(data: Path) -> None:
    for name in ("T.csv", "C.csv", "truth.csv", "holdouts.csv"):
        assert (data / name).stat().st_size > 0
    truth = {r["channel"]: float(r["incremental"]) for r in read(data / "truth.csv")}
    assert truth["social"] == 0.0 and truth["email"] > 0


def test_run_one_model_writes_channel_credit(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "credits.csv"
    code = cli(
        "attribution",
        "run",
        "-t",
        str(data / "T.csv"),
        "-c",
        str(data / "C.csv"),
        "-m",
        "last_touch",
        "--window",
        "14d",
        "--out",
        str(out),
        "--no-progress",
    )
    assert code == 0
    rows = read(out)
    assert list(rows[0]) == ["channel", "credit"]
    conversions = len(read(data / "C.csv"))
    total = sum(float(r["credit"]) for r in rows)
    assert 0 < total <= conversions


def test_run_every_model_with_value_report_and_holdouts(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all.csv"
    code = cli(
        "attribution",
        "run",
        "-t",
        str(data / "T.csv"),
        "-c",
        str(data / "C.csv"),
        "-m",
        ",".join(MODELS[:5]),
        *[x for m in MODELS[5:] for x in ("-m", m)],
        "--value",
        "--report",
        "--holdouts",
        str(data / "holdouts.csv"),
        "--out",
        str(out),
        "--no-progress",
    )
    assert code == 0
    rows = read(out)
    assert list(rows[0]) == ["channel", "model", "credit"]
    assert {r["model"] for r in rows} == set(MODELS)
    value_total = sum(float(r["credit"]) for r in rows if r["model"] == "linear")
    conv_value = sum(float(r["value"]) for r in read(data / "C.csv"))
    assert 0 < value_total <= conv_value
    printed = capsys.readouterr().out
    assert "would have happened anyway" in printed
    assert "Holdout lift" in printed
    score_code = cli("attribution", "score", "--truth", str(data / "truth.csv"), str(out))
    assert score_code == 0
    assert "causal" in capsys.readouterr().out


def test_errors_name_the_place(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "T.csv"
    bad.write_text("customer_id,ts,channel\na,2026-01-01T00:00:00,email\na,2026-13-01T00:00:00,email\n")
    code = cli("attribution", "run", "-t", str(bad), "-c", str(data / "C.csv"), "--no-progress")
    assert code == 2
    assert f"{bad}:3: column 2 (ts)" in " ".join(capsys.readouterr().err.split())
    assert cli("attribution", "run", "-t", str(bad), "-c", str(data / "C.csv"), "-m", "nope") == 2
    assert cli("attribution", "run", "-t", str(bad), "-c", str(data / "C.csv"), "--window", "91d") == 2


def test_customers_file_aligns_late_arrivals(tmp_path: Path) -> None:
    """``simulate --scenario late`` writes first-seen times; ``run --customers`` observes each customer from then."""
    assert cli("attribution", "simulate", "-n", "8000", "-s", "late", "--seed", "4", "-o", str(tmp_path)) == 0
    first_seen = read(tmp_path / "customers.csv")
    assert len(first_seen) == 8000  # every customer, those who never touched nor converted too
    truth = {r["channel"]: float(r["incremental"]) for r in read(tmp_path / "truth.csv")}
    credited = {}
    for name, extra in (("whole", []), ("aligned", ["--customers", str(tmp_path / "customers.csv")])):
        out = tmp_path / f"{name}.csv"
        args = ["-t", str(tmp_path / "T.csv"), "-c", str(tmp_path / "C.csv"), "-m", "causal"]
        assert cli("attribution", "run", *args, "-o", str(out), "--no-progress", *extra) == 0
        credited[name] = sum(float(r["credit"]) for r in read(out))
    # Counted as at risk from the start, late arrivals make baseline conversions look
    # like marketing's work: the aligned run credits less, closer to the truth.
    true_total = sum(v for k, v in truth.items() if not k.startswith("("))
    assert abs(credited["aligned"] - true_total) < abs(credited["whole"] - true_total)
    assert credited["aligned"] < credited["whole"]


def test_refresh_refits_the_kept_windows_and_names_a_window_without_tallies(
    db_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    from cadence.engine.events import parse_call
    from cadence.engine.ingest import record_events

    day, t0 = 86_400_000, 1_767_225_600_000
    calls = [
        {"type": "track", "userId": "a", "messageId": "c1", "timestamp": t0 / 1000,
         "event": "Message Clicked", "properties": {"channel": "email"}},
        {"type": "track", "userId": "a", "messageId": "o1", "timestamp": (t0 + day) / 1000,
         "event": "Order Completed", "properties": {"revenue": 10}},
    ]  # fmt: skip
    record_events(engine=db_engine, batch=[parse_call(c, received_ms=t0) for c in calls])
    db = ["--database-url", db_engine.url.render_as_string(hide_password=False)]
    assert cli(*db, "attribution", "refresh", "--window", "7d", "--model", "markov,causal") == 0
    out = capsys.readouterr().out
    assert "markov" in out and "7d" in out
    # Markov at 45 days has no tallies: it was "refitted" from the open journeys alone.
    assert cli(*db, "attribution", "refresh", "--window", "45d", "--model", "markov") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "45d" in err and "markov" in err, err
    assert cli(*db, "attribution", "refresh", "--window", "36h", "--model", "causal") == 2
    assert "whole days" in " ".join(capsys.readouterr().err.split())


def test_a_half_life_of_zero_is_an_error_not_a_traceback(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("attribution", "run", "-t", str(data / "T.csv"), "-c", str(data / "C.csv"), "--no-progress")
    assert cli(*args, "-m", "time_decay", "--half-life", "0d") == 2
    assert "--half-life" in " ".join(capsys.readouterr().err.split())
