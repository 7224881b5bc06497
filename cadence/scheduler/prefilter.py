"""A conservative SQL prefilter for scheduled pushes, derived from the compiled audience.

A push evaluates the compiled rules per customer; most audiences start with a
requirement the database can check on its own (``count(opened within 30d) > 0``,
``consent(email)``, ``customer.plan == "pro"``). :func:`push_prefilter` turns the
parts it understands into a ``WHERE`` condition on ``profiles`` so the customers who
cannot qualify are never loaded, and leaves the rest to the compiled rules.

It must never drop a customer the rules would accept, so each translation is a
*necessary* condition of its part (the SQL may keep more customers, never fewer):

- ``count(E ...) > k`` (k >= 0), ``>= k`` / ``== k`` (k > 0), ``E within W``,
  ``E between A and B ago``, and the same for ``sum`` (which counts only with an
  event): the customer has an ``E`` at or after the UTC day the window starts in
  (``profile_event_stats.last_ms``; windows reach back to whole days);
- ``last(E) > W ago`` / ``>=``: ``last_ms`` at or after ``now - W``;
- ``consent(ch)``: a granted consent row for ``ch``;
- ``customer.a.b == "s"``, ``customer.a in ["s", "t"]`` (string literals only, keys of
  letters, digits and ``_``), and ``(customer.a ?? "d") == "s"``;
- ``and``/``or`` of those, and segment references (opened up);
- anything else (``not``, arithmetic, numbers compared with traits, ...) is "true".

The campaign's channels add one more: a customer who refused every one of them (or
``all``) cannot be sent the campaign. Audience-type campaigns sync removals too, so
a tick with one gets no prefilter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cadence.dsl.compiler import CompiledPredicate
from cadence.engine.campaign import DAY_MS, Campaign
from cadence.scheduler.needs import duration_of, event_of

__all__ = ["SqlCondition", "audience_condition", "push_prefilter"]

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NUMBER_KINDS = ("number", "percent", "money")
_FLIP = {">": "<", ">=": "<=", "<": ">", "<=": ">=", "==": "=="}


@dataclass
class SqlCondition:
    """A ``WHERE`` fragment over ``profiles`` with ``?`` parameters."""

    sql: str
    params: list[Any] = field(default_factory=list)


def _and(left: SqlCondition | None, right: SqlCondition | None) -> SqlCondition | None:
    if left is None:
        return right
    if right is None:
        return left
    return SqlCondition(f"({left.sql} AND {right.sql})", [*left.params, *right.params])


def _or(left: SqlCondition | None, right: SqlCondition | None) -> SqlCondition | None:
    if left is None or right is None:
        return None  # one side may be anything: no restriction
    return SqlCondition(f"({left.sql} OR {right.sql})", [*left.params, *right.params])


def _has_event(event: str, since_ms: int | None) -> SqlCondition:
    sql = "EXISTS (SELECT 1 FROM profile_event_stats s WHERE s.customer_id = profiles.customer_id AND s.event = ?"
    if since_ms is None:
        return SqlCondition(sql + ")", [event])
    return SqlCondition(sql + " AND s.last_ms >= ?)", [event, since_ms])


def _number(node: Any) -> float | None:
    if type(node).__name__ == "Lit" and node.kind in _NUMBER_KINDS:
        return float(node.value)
    return None


def _trait(node: Any, dialect: str) -> str | None:
    """SQL text of a trait (as text), or None when the path is not a plain trait path."""
    ref = getattr(node, "ref", None)
    if type(node).__name__ != "Path" or not isinstance(ref, tuple) or len(ref) != 2 or ref[0] != "trait":
        return None
    keys = ref[1]
    if not keys or not all(isinstance(k, str) and _KEY.match(k) for k in keys):
        return None
    if dialect == "postgresql":
        return "(profiles.traits #>> '{" + ",".join(keys) + "}')"
    return "json_extract(profiles.traits, '$." + ".".join(keys) + "')"


@dataclass
class _Translator:
    now_ms: int
    dialect: str
    segments: Mapping[str, Any]
    _open: set[str] = field(default_factory=set)

    def since(self, window_ms: int | None) -> int | None:
        """The start of the UTC day a window starting ``window_ms`` ago falls in (windows reach back to it)."""
        if window_ms is None:
            return None
        return (self.now_ms - window_ms) // DAY_MS * DAY_MS

    def windowed(self, arg: Any) -> SqlCondition | None:
        """What ``count(arg) >= 1`` (or ``sum(arg) != 0``) needs."""
        kind = type(arg).__name__
        if kind == "Binary" and arg.op == "within":
            event, window = event_of(arg.left), duration_of(arg.right)
            if event is None or window is None:
                return None if event is None else _has_event(event, None)
            return _has_event(event, self.since(window))
        if kind == "Between":
            event, older = event_of(arg.subject), duration_of(arg.older)
            if event is None:
                return None
            return _has_event(event, self.since(older))
        event = event_of(arg)
        return _has_event(event, None) if event is not None else None

    def compare(self, node: Any) -> SqlCondition | None:
        op, left, right = node.op, node.left, node.right
        if type(right).__name__ == "Call" and type(left).__name__ != "Call" and op in _FLIP:
            op, left, right = _FLIP[op], right, left
        if type(left).__name__ == "Call":
            name = left.name
            k = _number(right)
            if name in ("count", "sum") and k is not None and left.args:
                needs_one = (op == ">" and k >= 0) or (op in (">=", "==") and k > 0)
                return self.windowed(left.args[0]) if needs_one else None
            if name == "last" and op in (">", ">=") and left.args:
                ago = right if type(right).__name__ == "Unary" and right.op == "ago" else None
                window = duration_of(ago.operand) if ago is not None else None
                event = event_of(left.args[0])
                if event is not None and window is not None:
                    return _has_event(event, self.now_ms - window)
                return None
        if op in ("==", "in"):
            return self.trait_equals(node.left, node.right, op)
        return None

    def trait_equals(self, left: Any, right: Any, op: str) -> SqlCondition | None:
        if op == "==" and type(left).__name__ == "Lit":
            left, right = right, left
        default: str | None = None
        if type(left).__name__ == "Binary" and left.op == "??":
            fallback = left.right
            if type(fallback).__name__ != "Lit" or fallback.kind != "string":
                return None
            default, left = str(fallback.value), left.left
        column = _trait(left, self.dialect)
        if column is None:
            return None
        if op == "==":
            if type(right).__name__ != "Lit" or right.kind != "string":
                return None
            values = [str(right.value)]
        else:
            items = getattr(right, "items", None)
            if type(right).__name__ != "SetLit" or not items:
                return None
            if not all(type(i).__name__ == "Lit" and i.kind == "string" for i in items):
                return None
            values = [str(i.value) for i in items]
        cond = SqlCondition(f"{column} IN ({', '.join('?' for _ in values)})", values)
        if default is not None and default in values:
            cond = SqlCondition(f"({cond.sql} OR {column} IS NULL)", cond.params)
        return cond

    def cond(self, node: Any) -> SqlCondition | None:  # noqa: C901 - one case per construct
        kind = type(node).__name__
        if kind == "Binary":
            if node.op == "and":
                return _and(self.cond(node.left), self.cond(node.right))
            if node.op == "or":
                return _or(self.cond(node.left), self.cond(node.right))
            if node.op == "within":
                return self.windowed(node)
            if node.op in ("==", ">", ">=", "<", "<=", "in"):
                return self.compare(node)
            return None
        if kind == "Between":
            return self.windowed(node)
        if kind == "Lit" and node.kind == "bool":
            return None if node.value else SqlCondition("1 = 0")
        if kind == "Call" and node.name == "consent" and node.args:
            ref = getattr(node.args[0], "ref", None)
            if isinstance(ref, tuple) and len(ref) == 2 and ref[0] == "channel":
                return SqlCondition(
                    "EXISTS (SELECT 1 FROM consent c WHERE c.customer_id = profiles.customer_id"
                    " AND c.channel = ? AND c.granted = ?)",
                    [str(ref[1]), True],
                )
            return None
        if kind == "Path":
            ref = getattr(node, "ref", None)
            if isinstance(ref, tuple) and len(ref) == 2 and ref[0] == "segment":
                name = str(ref[1])
                body = self.segments.get(name)
                if body is None or name in self._open:
                    return None
                self._open.add(name)
                try:
                    return self.cond(body)
                finally:
                    self._open.discard(name)
        return None


def _channels_condition(campaign: Campaign) -> SqlCondition | None:
    """Some channel of the campaign is not refused (and not everything is)."""
    channels = list(campaign.channels.channels)
    if not channels:
        return SqlCondition("1 = 0")
    refused = (
        "EXISTS (SELECT 1 FROM consent c WHERE c.customer_id = profiles.customer_id"
        " AND c.channel = ? AND c.granted = ?)"
    )
    parts = [f"NOT {refused}" for _ in channels]
    params: list[Any] = []
    for ch in channels:
        params += [ch, False]
    return SqlCondition(f"(NOT {refused} AND ({' OR '.join(parts)}))", ["all", False, *params])


def audience_condition(campaign: Campaign, *, now_ms: int, dialect: str) -> SqlCondition | None:
    """A necessary condition, in SQL, for ``campaign`` to send to a customer now; None: no restriction."""
    cond = _channels_condition(campaign)
    audience = campaign.audience
    if not isinstance(audience, CompiledPredicate):  # a condition built in Python: no syntax to translate
        return cond
    translator = _Translator(now_ms, dialect, audience.segments)
    for part in audience.parts:
        cond = _and(cond, translator.cond(part))
    return cond


def push_prefilter(campaigns: Sequence[Campaign], *, now_ms: int, dialect: str) -> SqlCondition | None:
    """The condition a customer must meet to be worth evaluating for any of ``campaigns``."""
    if not campaigns or any(c.kind != "message" for c in campaigns):
        return None
    out: SqlCondition | None = SqlCondition("1 = 0")
    for campaign in campaigns:
        out = _or(out, audience_condition(campaign, now_ms=now_ms, dialect=dialect))
        if out is None:
            return None
    return out
