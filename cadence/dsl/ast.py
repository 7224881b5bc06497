"""The typed syntax tree of a rule file: plain dataclasses that keep their positions.

Positions (``line``, ``column``, 1-based) never take part in equality, so two
parses of the same text formatted differently compare equal: the formatter's
round-trip test relies on it. The checker writes what each name resolved to into
``Path.ref`` (also excluded from equality); the compiler reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Arm",
    "Attribution",
    "Binary",
    "Block",
    "Call",
    "Campaign",
    "Clause",
    "EventAlias",
    "Expr",
    "Fixture",
    "Import",
    "Lit",
    "Moment",
    "Path",
    "Segment",
    "Settings",
    "Step",
    "Test",
    "Unary",
]


@dataclass(slots=True)
class Node:
    """Anything with a position."""

    line: int = field(default=0, compare=False, kw_only=True)
    column: int = field(default=0, compare=False, kw_only=True)


# ---- expressions --------------------------------------------------------------


@dataclass(slots=True)
class Lit(Node):
    """A literal. ``kind`` is its type; ``value`` is already converted (ms, shares, floats)."""

    kind: str  # number duration percent money timeofday timestamp string bool now
    value: Any
    text: str


@dataclass(slots=True)
class Path(Node):
    """A dotted name: ``seg.buyers``, ``customer.first_name``, ``email.opened``."""

    parts: tuple[str, ...]
    ref: Any = field(default=None, compare=False)


@dataclass(slots=True)
class Call(Node):
    """A built-in function call: ``count(...)``, ``has(...)``, ``last(...)``."""

    name: str
    args: tuple[Expr, ...]
    ref: Any = field(default=None, compare=False)


@dataclass(slots=True)
class Unary(Node):
    """``not x``, ``-x``, ``x ago``."""

    op: str
    operand: Expr


@dataclass(slots=True)
class Binary(Node):
    """Every two-operand form: and, or, ??, comparisons, in, matches, arithmetic,
    ``within`` (right is the window) and ``between`` (see :class:`Between`)."""

    op: str
    left: Expr
    right: Expr


@dataclass(slots=True)
class Between(Node):
    """``x between 90d and 30d ago``."""

    subject: Expr
    older: Expr
    newer: Expr
    ago: bool = True  # False when the closing "ago" is missing (a checker error)


@dataclass(slots=True)
class SetLit(Node):
    """``[a, b, c]``."""

    items: tuple[Expr, ...]


Expr = Lit | Path | Call | Unary | Binary | Between | SetLit


# ---- clauses ------------------------------------------------------------------


@dataclass(slots=True)
class Clause(Node):
    """One line of a block: a keyword and its arguments.

    ``keyword`` is the clause (``audience``, ``cap``...); ``args`` holds what it needs,
    by name, as expressions, names or strings.
    """

    keyword: str
    args: dict[str, Any]


@dataclass(slots=True)
class Arm(Node):
    """One arm of a split."""

    name: str
    share: Expr
    template: str | None = None


@dataclass(slots=True)
class Fixture(Node):
    """An event given to a test: ``purchased at -45d { revenue: 80 }``."""

    event: Path | Lit
    at: Moment
    props: tuple[tuple[str, Expr], ...] = ()


@dataclass(slots=True)
class Moment(Node):
    """A test time: absolute (``2026-03-04 22:30 Europe/Berlin``) or relative (``-45d``)."""

    absolute: str | None = None
    zone: str | None = None
    offset_ms: int = 0
    text: str = ""


@dataclass(slots=True)
class Step(Node):
    """``at TIME [on EVENT {props}] expect ...``."""

    at: Moment
    expect: str  # send no_send eligible not_eligible member not_member
    target: str | None = None
    channel: str | None = None
    reason: str | None = None
    reason_campaign: str | None = None
    trigger: Fixture | None = None
    target_pos: tuple[int, int] = field(default=(0, 0), compare=False)
    send_time: str | None = None  # ``expect send c at HH:MM``: the send's local time of day
    send_time_pos: tuple[int, int] = field(default=(0, 0), compare=False)


# ---- blocks -------------------------------------------------------------------


@dataclass(slots=True)
class Import(Node):
    """``import "segments.cadence" as seg``."""

    path: str
    alias: str | None = None


@dataclass(slots=True)
class EventAlias(Node):
    """``event purchased = "Order Completed"``."""

    name: str
    event: str


@dataclass(slots=True)
class Segment(Node):
    """``segment NAME "title" = condition``."""

    name: str
    title: str | None
    condition: Expr


@dataclass(slots=True)
class Campaign(Node):
    """``campaign NAME "title" { clauses }``."""

    name: str
    title: str | None
    clauses: list[Clause]


@dataclass(slots=True)
class Attribution(Node):
    """``attribution NAME "title" { clauses }``."""

    name: str
    title: str | None
    clauses: list[Clause]


@dataclass(slots=True)
class Settings(Node):
    """``settings { clauses }``."""

    clauses: list[Clause]


@dataclass(slots=True)
class Test(Node):
    """``test "name" { given ...; at ... expect ... }``."""

    name: str
    customer: tuple[tuple[str, Expr], ...] = ()
    events: tuple[Fixture, ...] = ()
    steps: tuple[Step, ...] = ()
    customer_pos: tuple[int, int] = field(default=(0, 0), compare=False)


Block = Import | EventAlias | Segment | Campaign | Attribution | Settings | Test
