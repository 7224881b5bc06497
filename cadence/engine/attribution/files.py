"""Reading touchpoint, conversion and holdout CSV files fast, with exact error positions.

The fast path is Apache Arrow's multi-threaded C++ CSV reader: quoted or unquoted
fields, ISO-8601 timestamps with ``T`` or a space, with or without a zone (UTC when
none). When anything is wrong, the file is re-scanned with the standard ``csv``
module to name the exact line and column of the first bad value.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.csv as pacsv  # type: ignore[import-untyped]

from cadence.engine.attribution.journeys import AttributionError, FloatArray, IntArray, TouchLog

__all__ = ["Holdouts", "load_first_seen", "load_holdouts", "load_touch_log", "parse_timestamp", "read_table"]

_ZONE = r"(Z|z|[+-]\d\d(:?\d\d)?)$"


def parse_timestamp(text: str) -> int:
    """Milliseconds since the epoch of an ISO-8601 timestamp (UTC when it has no zone).

    >>> parse_timestamp("2026-01-01T00:00:01Z"), parse_timestamp("2026-01-01 02:00:01+02:00")
    (1767225601000, 1767225601000)
    >>> parse_timestamp("2026-01-01 00:00:01")
    1767225601000
    """
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def _check_number(text: str) -> None:
    if not math.isfinite(float(text)):  # "nan", "inf": float() and Arrow parse them
        raise ValueError(text)


_CHECKS: dict[str, Callable[[str], object]] = {"ts": parse_timestamp, "value": _check_number}


def _locate(path: Path, columns: Sequence[str], problem: str) -> AttributionError:
    """Re-scan ``path`` for the first bad line and build an error naming it."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return AttributionError(f"{path}: the file is empty (expected columns {', '.join(columns)})")
            header = [h.strip() for h in header]
            index = {name: header.index(name) for name in columns if name in header}
            for row in reader:
                line = reader.line_num
                if not row or row == [""]:
                    continue
                if len(row) != len(header):
                    return AttributionError(
                        f"{path}:{line}: expected {len(header)} columns ({', '.join(header)}), got {len(row)}"
                    )
                for name in columns:
                    col = index[name]
                    text = row[col].strip()
                    where = f"{path}:{line}: column {col + 1} ({name})"
                    if not text:
                        return AttributionError(f"{where}: empty value")
                    check = _CHECKS.get(name)
                    if check is not None:
                        try:
                            check(text)
                        except (ValueError, OverflowError):
                            kind = "an ISO-8601 timestamp" if name == "ts" else "a finite number"
                            return AttributionError(f"{where}: {text!r} is not {kind}")
    except UnicodeDecodeError as exc:
        return AttributionError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    return AttributionError(f"{path}: {problem}")


def read_table(path: Path, columns: Sequence[str]) -> pa.Table:
    """Read ``columns`` (all as strings) from a CSV file with a header row."""
    if not path.exists():
        raise AttributionError(f"{path}: no such file")
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=16 << 20),
            parse_options=pacsv.ParseOptions(newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(columns),
                column_types={name: pa.string() for name in columns},
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowKeyError, KeyError) as exc:
        message = str(exc)
        missing = [c for c in columns if f"'{c}'" in message or f'"{c}"' in message]
        if missing or "not exist" in message:
            with path.open(encoding="utf-8", errors="replace") as f:
                header = f.readline().strip()
            raise AttributionError(
                f"{path}:1: missing column(s) {', '.join(columns)} in the header (got {header!r})"
            ) from None
        raise _locate(path, columns, message.splitlines()[0]) from None
    for name in columns:
        col = pc.utf8_trim_whitespace(table[name])
        shortest = pc.min(pc.utf8_length(col)).as_py()
        if shortest is not None and shortest == 0:
            raise _locate(path, columns, f"empty value in column {name}")
        table = table.set_column(table.schema.get_field_index(name), name, col)
    return table


def _read_typed(path: Path, columns: Sequence[str], numeric: str) -> pa.Table | None:
    """The fast path: let the multi-threaded reader parse ``ts`` (and ``numeric``,
    if a number) itself; None when any value needs the careful path."""
    types: dict[str, pa.DataType] = {name: pa.string() for name in columns}
    for ts_type in (pa.timestamp("ms"), pa.timestamp("ms", tz="UTC")):
        types["ts"] = ts_type
        if numeric == "value":
            types["value"] = pa.float64()
        try:
            table = pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=16 << 20),
                parse_options=pacsv.ParseOptions(newlines_in_values=False),
                convert_options=pacsv.ConvertOptions(
                    include_columns=list(columns), column_types=types, strings_can_be_null=False
                ),
            )
        except (pa.ArrowInvalid, pa.ArrowKeyError, KeyError):
            continue
        if any(table[name].null_count for name in columns):
            return None
        return table
    return None


def _timestamps(path: Path, columns: Sequence[str], col: pa.ChunkedArray) -> IntArray:
    """Epoch milliseconds of an ISO-8601 string column (zones honoured, UTC by default)."""
    if pa.types.is_timestamp(col.type):
        return np.asarray(pc.cast(col, pa.int64()).to_numpy(), dtype=np.int64)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    has_zone = pc.match_substring_regex(col, _ZONE)
    out = np.empty(len(col), dtype=np.int64)
    zoned = _bools(has_zone)
    try:
        for mask, tz in ((~zoned, None), (zoned, "UTC")):
            if not mask.any():
                continue
            part = col.filter(pa.array(mask)) if not mask.all() else col
            parsed = pc.cast(part, pa.timestamp("us", tz=tz))
            out[mask] = pc.cast(parsed, pa.int64()).to_numpy() // 1000
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise _locate(path, columns, str(exc).splitlines()[0]) from None
    return out


def _bools(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow array as numpy, without going through pandas."""
    return np.asarray(pc.cast(values, pa.uint8()).to_numpy(), dtype=bool)


def _floats(path: Path, columns: Sequence[str], col: pa.ChunkedArray) -> FloatArray:
    try:
        values = pc.cast(col, pa.float64())
    except pa.ArrowInvalid as exc:
        raise _locate(path, columns, str(exc).splitlines()[0]) from None
    return np.asarray(values.to_numpy(), dtype=np.float64)


def load_touch_log(
    touchpoints: Path,
    conversions: Path,
    *,
    channel_map: Callable[[str], str] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> TouchLog:
    """Read ``customer_id,ts,channel`` and ``customer_id,ts,value`` files into a :class:`TouchLog`.

    ``channel_map`` renames channels (channel grouping); customers of both files share
    one code space, and every customer in either file counts.
    """
    step = on_step or (lambda _name: None)
    t_cols = ("customer_id", "ts", "channel")
    c_cols = ("customer_id", "ts", "value")
    touches = _read_typed(touchpoints, t_cols, "") if touchpoints.exists() else None
    touches = touches if touches is not None else read_table(touchpoints, t_cols)
    t_ms = _timestamps(touchpoints, t_cols, touches["ts"])
    step("touchpoints")
    convs = _read_typed(conversions, c_cols, "value") if conversions.exists() else None
    convs = convs if convs is not None else read_table(conversions, c_cols)
    c_ms = _timestamps(conversions, c_cols, convs["ts"])
    c_val = _floats(conversions, c_cols, convs["value"])
    if not np.isfinite(c_val).all():
        raise _locate(conversions, c_cols, "a value is not a finite number")
    step("conversions")
    ids = pa.chunked_array(touches["customer_id"].chunks + convs["customer_id"].chunks, type=pa.string())
    encoded = ids.dictionary_encode().combine_chunks()
    codes = encoded.indices.to_numpy().astype(np.int64)
    dictionary = encoded.dictionary
    trimmed = pc.utf8_trim_whitespace(dictionary)
    if not trimmed.equals(dictionary):
        # Spaces around ids (unquoted CSV written with ", "): merge the trimmed duplicates.
        uniq, inverse = np.unique(np.array(trimmed.to_pylist(), dtype=object), return_inverse=True)
        codes = inverse.astype(np.int64)[codes]
        dictionary = pa.array(uniq.tolist(), type=pa.string())
    shortest = pc.min(pc.utf8_length(dictionary)).as_py() if len(dictionary) else 1
    if shortest == 0:
        empty_t = pc.min(pc.utf8_length(pc.utf8_trim_whitespace(touches["customer_id"]))).as_py() == 0
        raise _locate(
            touchpoints if empty_t else conversions, t_cols if empty_t else c_cols, "empty customer_id"
        )
    n_t = touches.num_rows
    channel_enc = touches["channel"].dictionary_encode().combine_chunks()
    names = [str(x).strip() for x in channel_enc.dictionary.to_pylist()]
    if any(not n for n in names):
        raise _locate(touchpoints, t_cols, "empty channel")
    chan_codes = channel_enc.indices.to_numpy().astype(np.int64)
    mapped = [channel_map(n) for n in names] if channel_map is not None else names
    channels = sorted(set(mapped))
    remap = np.array([channels.index(m) for m in mapped], dtype=np.int64)
    chan_codes = remap[chan_codes] if remap.size else chan_codes
    return TouchLog(
        channels=tuple(channels),
        customer_ids=_LazyIds(dictionary),
        touch_customer=codes[:n_t],
        touch_ms=t_ms,
        touch_channel=chan_codes,
        conv_customer=codes[n_t:],
        conv_ms=c_ms,
        conv_value=c_val,
    )


def load_first_seen(path: Path, log: TouchLog) -> TouchLog:
    """Read ``customer_id,first_seen`` and return ``log`` observing each customer from then.

    A customer first seen part-way through the period is not at risk of converting
    before (the causal model aligns observation windows with it). Customers listed
    here but in neither data file join the log with no touch and no conversion: they
    were observed and did not convert. A customer missing here is observed from the
    period's start.
    """
    cols = ("customer_id", "first_seen")
    table = read_table(path, cols)
    seen = _timestamps(path, cols, table["first_seen"])
    ids = pc.utf8_trim_whitespace(table["customer_id"].combine_chunks().cast(pa.string()))
    known = log.customer_ids
    if isinstance(known, _LazyIds):
        codes = known.index_of(ids)
        values = known._values
    else:
        lookup = {c: i for i, c in enumerate(known)}
        codes = np.array([lookup.get(str(c), -1) for c in ids.to_pylist()], dtype=np.int64)
        values = pa.array([str(c) for c in known], type=pa.string())
    unknown = codes < 0
    n_new = int(unknown.sum())
    codes[unknown] = log.n_customers + np.arange(n_new)
    t0, _t1 = log.period()
    first = np.full(log.n_customers + n_new, t0, dtype=np.int64)
    first[codes] = seen
    new_ids = pa.concat_arrays([values, ids.filter(pa.array(unknown))]) if n_new else values
    return replace(log, customer_ids=_LazyIds(new_ids), observed_from_ms=first)


class _LazyIds(Sequence[str]):
    """Customer ids backed by an Arrow array (no million-string Python list)."""

    def __init__(self, values: pa.Array) -> None:
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return str(self._values[index].as_py())

    def index_of(self, ids: pa.Array) -> IntArray:
        """Codes of ``ids`` (-1 for unknown customers)."""
        found = pc.index_in(ids, value_set=self._values)
        return np.asarray(pc.fill_null(found, -1).to_numpy(), dtype=np.int64)


@dataclass(frozen=True)
class Holdouts:
    """Holdout experiments: per channel, customer codes and whether each was held out."""

    customers: dict[str, IntArray]
    held_out: dict[str, np.ndarray]


_HOLD = re.compile(r"^(holdout|control|hold|held_out|withheld)$", re.I)
_TREAT = re.compile(r"^(treatment|treated|exposed|test)$", re.I)


def load_holdouts(path: Path, log: TouchLog) -> Holdouts:
    """Read ``customer_id,channel,group`` (group: ``holdout``/``control`` or ``treatment``).

    Customers that appear in neither data file are still part of the experiment
    (they did not convert); they get fresh codes past the log's customers.
    """
    cols = ("customer_id", "channel", "group")
    table = read_table(path, cols)
    groups = [str(g) for g in table["group"].unique().to_pylist()]
    for g in groups:
        if not (_HOLD.match(g) or _TREAT.match(g)):
            raise _locate_group(path, g)
    held = pc.match_substring_regex(table["group"], _HOLD.pattern, ignore_case=True)
    held_np = _bools(held)
    ids = log.customer_ids
    cust_col = table["customer_id"].combine_chunks()
    if isinstance(ids, _LazyIds):
        codes = ids.index_of(cust_col)
    else:
        lookup = {c: i for i, c in enumerate(ids)}
        codes = np.array([lookup.get(str(c), -1) for c in cust_col.to_pylist()], dtype=np.int64)
    unknown = codes < 0
    if unknown.any():
        # Unknown customers never touched nor converted: give them unique codes.
        codes[unknown] = log.n_customers + np.arange(int(unknown.sum()))
    enc = table["channel"].combine_chunks().dictionary_encode()
    names = [str(x) for x in enc.dictionary.to_pylist()]
    idx = enc.indices.to_numpy()
    out_c: dict[str, IntArray] = {}
    out_h: dict[str, np.ndarray] = {}
    for i, ch in sorted(enumerate(names), key=lambda p: p[1]):
        mask = idx == i
        out_c[ch] = codes[mask]
        out_h[ch] = held_np[mask]
    return Holdouts(customers=out_c, held_out=out_h)


def _locate_group(path: Path, group: str) -> AttributionError:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        col = header.index("group")
        for row in reader:
            if len(row) > col and row[col].strip() == group:
                where = f"{path}:{reader.line_num}: column {col + 1} (group)"
                return AttributionError(f"{where}: {group!r} is not holdout or treatment")
    return AttributionError(f"{path}: group {group!r} is not holdout or treatment")
