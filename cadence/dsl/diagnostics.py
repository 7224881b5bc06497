"""Diagnostics: what is wrong, where, and what was probably meant.

Every problem the parser, checker or linter finds is a :class:`Diagnostic` with a
code (``E1xx`` syntax, ``E2xx`` names, ``E3xx`` types and units, ``E4xx`` values
and ranges, ``W5xx`` warnings and lint), a position, and an optional hint.
:func:`render` prints it the way compilers do::

    rules/x.cadence:3:13: error E202: unknown channel 'emial'
        3 |     channel emial
          |             ^^^^^ did you mean 'email'?
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["CODES", "UNIT_WORDS", "Diagnostic", "did_you_mean", "render", "render_all", "sort_diagnostics"]

#: Every diagnostic code, with what it means (the language reference lists them too).
CODES: dict[str, str] = {
    "E101": "syntax error: unexpected word or symbol",
    "E102": "syntax error: unexpected end of block (a missing '}' or value)",
    "E103": "syntax error: a character that is not part of the language",
    "E104": "unknown top-level keyword",
    "E105": "bad literal (date, time or string)",
    "E106": "expression nested too deeply",
    "E201": "unknown name",
    "E202": "unknown channel, or a channel no installed connector offers",
    "E203": "unknown function",
    "E204": "duplicate definition",
    "E205": "import problem (missing file, cycle, unknown alias)",
    "E206": "unknown event field or unknown option",
    "E207": "'event' used outside a triggered campaign",
    "E208": "segments refer to each other in a cycle",
    "E301": "type mismatch",
    "E302": "wrong unit",
    "E303": "optional value used without '??' or has()",
    "E304": "wrong number or kind of arguments",
    "E401": "split shares do not add up to 100%",
    "E402": "value out of range",
    "E403": "unknown time zone",
    "E404": "missing required clause",
    "E405": "clause given twice",
    "E406": "clause not allowed here",
    "E407": "unknown campaign, segment or reason in a test",
    "W501": "event name never seen in the event log",
    "W502": "segment is never used",
    "W503": "rule can never fire",
    "W504": "campaigns with equal priority and overlapping audiences",
    "W505": "quiet hours cover the whole day",
    "W506": "cap is stricter than the schedule",
}


#: Words people use for durations, and how to write them instead.
UNIT_WORDS = {
    word: example
    for words, example in (
        (("second", "seconds", "sec", "secs"), "30s"),
        (("minute", "minutes", "min", "mins"), "15m"),
        (("hour", "hours", "hr", "hrs"), "1h"),
        (("day", "days", "daily"), "1d"),
        (("week", "weeks", "weekly"), "1w or 7d"),
        (("month", "months", "monthly"), "30d"),
        (("year", "years", "yearly"), "365d"),
    )
    for word in words
}


@dataclass(frozen=True)
class Diagnostic:
    """One problem in a rule file."""

    code: str
    message: str
    file: str
    line: int
    column: int
    length: int = 1
    hint: str | None = None
    severity: Literal["error", "warning"] = "error"
    source_line: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.severity} {self.code}: {self.message}"


def did_you_mean(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The closest candidate to ``word``, formatted as a hint, or None.

    >>> did_you_mean("emial", ["email", "sms", "push"])
    "did you mean 'email'?"
    >>> did_you_mean("zzz", ["email"]) is None
    True
    """
    pool = sorted({c for c in candidates if c != word})
    matches = difflib.get_close_matches(word, pool, n=1, cutoff=cutoff)
    if not matches:
        lowered = {c.lower(): c for c in pool}
        if word.lower() in lowered:
            return f"did you mean '{lowered[word.lower()]}'?"
        return None
    return f"did you mean '{matches[0]}'?"


def sort_diagnostics(diags: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Sorted by file, line and column; exact duplicates removed."""
    unique = {(d.file, d.line, d.column, d.code, d.message): d for d in diags}
    return sorted(unique.values(), key=lambda d: (d.file, d.line, d.column, d.code))


def render(diag: Diagnostic) -> str:
    """The diagnostic with its source line and a caret under the offending text.

    >>> print(render(Diagnostic("E202", "unknown channel 'emial'", "x.cadence", 3, 13, 5,
    ...     "did you mean 'email'?", source_line="    channel emial")))
    x.cadence:3:13: error E202: unknown channel 'emial'
        3 |     channel emial
          |             ^^^^^ did you mean 'email'?
    """
    head = str(diag)
    if not diag.source_line:
        return head + (f"\n    = {diag.hint}" if diag.hint else "")
    number = str(diag.line)
    gutter = " " * len(number)
    caret = " " * (diag.column - 1) + "^" * max(1, diag.length)
    tail = f" {diag.hint}" if diag.hint else ""
    return f"{head}\n    {number} | {diag.source_line}\n    {gutter} | {caret}{tail}"


def render_all(diags: Sequence[Diagnostic]) -> str:
    """Every diagnostic rendered, then a summary line."""
    errors = sum(1 for d in diags if d.severity == "error")
    warnings = len(diags) - errors
    parts = [render(d) for d in diags]
    parts.append(
        f"{errors} error{'s' if errors != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''}"
    )
    return "\n".join(parts)
