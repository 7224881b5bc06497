"""Reading touchpoint and conversion files: formats accepted, errors that say where."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cadence.engine.attribution.files import load_holdouts, load_touch_log
from cadence.engine.attribution.journeys import AttributionError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_quoted_unquoted_zones_and_spaces_all_read_alike(tmp_path: Path) -> None:
    t = write(
        tmp_path / "T.csv",
        "customer_id,ts,channel\n"
        '"a","2026-01-01T10:00:00Z","email"\n'
        "a,2026-01-01 12:00:00+02:00,search\n"
        "b,2026-01-02T00:00:00.250,email\n",
    )
    c = write(
        tmp_path / "C.csv", 'customer_id,ts,value\n"a",2026-01-01 11:00:00,10.5\nc,2026-01-03T00:00:00Z,3\n'
    )
    log = load_touch_log(t, c)
    assert log.channels == ("email", "search")
    assert log.n_customers == 3  # c converted without touches and still counts
    base = 1767225600000  # 2026-01-01T00:00:00Z
    np.testing.assert_array_equal(
        log.touch_ms, [base + 10 * 3600_000, base + 10 * 3600_000, base + 86400_000 + 250]
    )
    np.testing.assert_array_equal(log.conv_value, [10.5, 3.0])
    j = log.journeys(30 * 86400_000)
    # a's email (10:00) precedes the 11:00 conversion; the 12:00+02:00 search is 10:00 UTC: also before.
    assert sorted(j.paths()[0]) == ["email", "search"]


def test_mixed_naive_and_zoned_timestamps_in_one_column(tmp_path: Path) -> None:
    t = write(
        tmp_path / "T.csv", "customer_id,ts,channel\na,2026-01-01T00:00:00,x\na,2026-01-01T01:00:00+01:00,y\n"
    )
    c = write(tmp_path / "C.csv", "customer_id,ts,value\n")
    log = load_touch_log(t, c)
    assert log.touch_ms[0] == log.touch_ms[1]
    assert log.conv_ms.shape == (0,)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (
            "a,2026-01-01T00:00:00,x\nb,yesterday,y\n",
            ":3: column 2 (ts): 'yesterday' is not an ISO-8601 timestamp",
        ),
        ("a,2026-01-01T00:00:00,x\nb,2026-01-01T00:00:00\n", ":3: expected 3 columns"),
        ("a,2026-01-01T00:00:00,x\n,2026-01-01T00:00:00,y\n", ":3: column 1 (customer_id): empty value"),
    ],
)
def test_bad_rows_are_named_by_file_line_and_column(tmp_path: Path, body: str, where: str) -> None:
    t = write(tmp_path / "T.csv", "customer_id,ts,channel\n" + body)
    c = write(tmp_path / "C.csv", "customer_id,ts,value\n")
    with pytest.raises(AttributionError) as info:
        load_touch_log(t, c)
    assert f"{t}{where}" in str(info.value)


def test_bad_value_and_missing_column(tmp_path: Path) -> None:
    t = write(tmp_path / "T.csv", "customer_id,ts,channel\na,2026-01-01T00:00:00,x\n")
    c = write(
        tmp_path / "C.csv", "customer_id,ts,value\na,2026-01-02T00:00:00,1\na,2026-01-03T00:00:00,ten\n"
    )
    with pytest.raises(AttributionError, match=r"C\.csv:3: column 3 \(value\): 'ten' is not a finite number"):
        load_touch_log(t, c)
    c2 = write(tmp_path / "C2.csv", "customer,ts,value\na,2026-01-02T00:00:00,1\n")
    with pytest.raises(AttributionError, match=r"C2\.csv:1: missing column"):
        load_touch_log(t, c2)


def test_holdouts_file(tmp_path: Path) -> None:
    t = write(tmp_path / "T.csv", "customer_id,ts,channel\na,2026-01-01T00:00:00,email\n")
    c = write(tmp_path / "C.csv", "customer_id,ts,value\na,2026-01-02T00:00:00,1\n")
    log = load_touch_log(t, c)
    h = write(tmp_path / "H.csv", "customer_id,channel,group\na,email,treatment\nz,email,holdout\n")
    hold = load_holdouts(h, log)
    assert hold.held_out["email"].tolist() == [False, True]
    assert hold.customers["email"][0] == 0 and hold.customers["email"][1] >= log.n_customers
    bad = write(tmp_path / "B.csv", "customer_id,channel,group\na,email,maybe\n")
    with pytest.raises(AttributionError, match=r"B\.csv:2: column 3 \(group\): 'maybe'"):
        load_holdouts(bad, log)


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-Infinity"])
def test_a_value_that_is_not_a_finite_number_is_a_bad_row(tmp_path: Path, bad: str) -> None:
    # Arrow and float() both parse these: the run printed "nan nan%" for every model.
    t = write(tmp_path / "T.csv", "customer_id,ts,channel\na,2026-01-01T00:00:00,x\n")
    c = write(
        tmp_path / "C.csv", f"customer_id,ts,value\na,2026-01-02T00:00:00,1\na,2026-01-03T00:00:00,{bad}\n"
    )
    with pytest.raises(
        AttributionError, match=rf"C\.csv:3: column 3 \(value\): '{bad}' is not a finite number"
    ):
        load_touch_log(t, c)
