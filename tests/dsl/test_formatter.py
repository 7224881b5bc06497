"""``cadence fmt``: canonical, idempotent, keeps comments and meaning."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cadence.dsl.formatter import format_text
from cadence.dsl.parser import parse_text

ROOT = Path(__file__).resolve().parents[2]
RULES = sorted([*(ROOT / "rules").glob("*.cadence"), *(ROOT / "examples").glob("*/*.cadence")])

MESSY = """# leading comment
import "segments.cadence"   # shared names
event   a="A"
event b = "B"
segment   s "S"=a within 7d and(b within 3d or not a within 1d)and customer.x??0>3 # why
campaign   c "C" {   # header note
  # before audience
  audience s
  send template "t" with {x:1,y:customer.name??"there"}
  channel best of [email,sms]
  cap 2 per 7d ; priority 3
  quiet 21:00..08:00 in customer.timezone??"UTC" then defer
  split holdout 10%,a 90% template "t2"
  # closing note
}
test "t" {
  given customer {id:"1",consent:[email]}
  given events {a at -2d {v:1};b at 2026-01-01 10:00 Europe/Berlin}
  at 2026-01-02 09:00 on a {v: 2} expect eligible c
}
# trailing comment
"""


def _shape(value: object) -> object:
    """The tree without positions, for comparing two parses."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            type(value).__name__,
            *(_shape(getattr(value, f.name)) for f in dataclasses.fields(value) if f.compare),
        )
    if isinstance(value, dict):
        if set(value) == {"line", "column"}:
            return None
        return {k: _shape(v) for k, v in value.items() if not k.endswith("_pos")}
    if isinstance(value, list | tuple):
        return [_shape(v) for v in value]
    return value


def _strip_positions(text: str) -> object:
    return _shape(parse_text(text, "x").blocks)


def test_messy_file_is_made_canonical_and_keeps_every_comment() -> None:
    out = format_text(MESSY)
    assert out == format_text(out)
    for comment in (
        "# leading comment",
        "# shared names",
        "# why",
        "# header note",
        "# before audience",
        "# closing note",
        "# trailing comment",
    ):
        assert comment in out
    assert "    audience  s\n" in out
    assert "    cap       2 per 7d\n    priority  3\n" in out
    assert 'campaign c "C" {  # header note\n    # before audience\n    audience  s\n' in out
    assert 'event a = "A"\nevent b = "B"\n' in out
    assert _strip_positions(out) == _strip_positions(MESSY)


def test_long_chains_break_one_condition_per_line() -> None:
    cond = " and ".join(f"count(event_number_{i} within 7d) > {i}" for i in range(4))
    out = format_text(f"segment s = {cond}  # keep\n")
    lines = out.splitlines()
    assert lines[0] == "segment s ="
    assert lines[1] == "    count(event_number_0 within 7d) > 0"
    assert all(line.startswith("    and count(") for line in lines[2:])
    assert lines[-1].endswith("  # keep")
    assert format_text(out) == out


def test_parentheses_only_where_needed() -> None:
    out = format_text(
        "segment s = ((a within 1d) or (b within 1d)) and not (c within 1d) and (1 + 2) * 3 > 4\n"
    )
    assert out == "segment s = (a within 1d or b within 1d) and not c within 1d and (1 + 2) * 3 > 4\n"


def test_a_learned_split_keeps_its_word() -> None:
    text = (
        'campaign c {\n  send template "t"\n  channel email\n  split learned a 50%,b 50% template "t2"\n}\n'
    )
    out = format_text(text)
    assert '    split     learned a 50%, b 50% template "t2"\n' in out
    assert format_text(out) == out and _strip_positions(out) == _strip_positions(text)


def test_syntax_errors_are_refused() -> None:
    with pytest.raises(ValueError, match="syntax errors"):
        format_text("segment s = (\n")


@pytest.mark.parametrize("path", RULES, ids=[p.name for p in RULES])
def test_examples_are_formatted(path: Path) -> None:
    text = path.read_text()
    assert format_text(text) == text
