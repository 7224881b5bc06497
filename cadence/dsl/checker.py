"""The checker: names resolved across imports, types with units, ranges, channels.

It walks every parsed module once, records what each name means in ``Path.ref``
(the compiler reads it), and reports problems as diagnostics. Root causes only:
an expression that already failed has the type ``error``, which is compatible with
everything, so one misspelt name yields one diagnostic, not one per use.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from cadence.channels import CHANNELS, Feedback, feedback_aggregate
from cadence.dsl import ast
from cadence.dsl.diagnostics import UNIT_WORDS, Diagnostic, did_you_mean
from cadence.dsl.parser import ParsedModule, _time_of_day
from cadence.engine.attribution.spec import MODELS
from cadence.engine.decision import SUPPRESSION_REASONS

__all__ = ["FUNCTIONS", "Checker", "ModuleScope", "T", "audience_channels", "feedback_event_name"]

DAY_MS = 86_400_000


@cache
def audience_channels() -> frozenset[str]:
    """Channels whose connector keeps an ad audience in sync (Custom Audiences, Customer Match).

    The connectors declare no capability for it: these are the channels of the two
    built-in connectors that implement membership adds and removes. Imported on first
    use, so checking rules without ``sync`` never loads the HTTP clients.
    """
    from cadence.connectors.facebook import Facebook
    from cadence.connectors.google_ads import GoogleAds

    return frozenset(Facebook.channels | GoogleAds.channels)


FUNCTIONS = ("count", "sum", "last", "first", "has", "consent")
SCHEDULE_UNITS = (
    "day",
    "weekday",
    "weekend",
    "hour",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
)
TOUCH_FIELDS = ("channel", "campaign", "source", "medium")
CHANNEL_RULE_FIELDS = ("source", "medium", "event", "referrer", "campaign")
MODEL_PARAMS = {"time_decay": {"half_life": "duration"}, "position": {"first": "percent", "last": "percent"}}
ORDERED = {"number", "money", "percent", "duration", "timestamp", "timeofday"}
UNIT_EXAMPLES = {
    "duration": "7d, 2h or 30m",
    "percent": "10%",
    "money": "€50",
    "timeofday": "09:00",
    "timestamp": "2026-03-04 or 30d ago",
    "number": "3",
    "string": '"text"',
    "bool": "true or a condition",
}
KIND_NAMES = {
    "number": "a number",
    "money": "an amount of money",
    "percent": "a percentage",
    "duration": "a duration",
    "timestamp": "a point in time",
    "timeofday": "a time of day",
    "string": "text",
    "bool": "a condition",
    "channel": "a channel",
    "set": "a set",
    "event": "an event",
    "eventprop": "an event property",
    "any": "a value",
}


@cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) | {"UTC"}


def feedback_event_name(channel: str, kind: str) -> str:
    """The profile aggregate ``CHANNEL.KIND`` stands for (see :func:`cadence.channels.feedback_aggregate`).

    >>> feedback_event_name("email", "opened"), feedback_event_name("sms", "clicked")
    ('email.opened', 'sms.clicked')
    """
    return feedback_aggregate(channel, kind)


@dataclass(frozen=True)
class T:
    """A type: its kind (with the unit), whether it may be missing, and a set's element kind."""

    kind: str
    optional: bool = False
    elem: str | None = None

    def __str__(self) -> str:
        name = KIND_NAMES.get(self.kind, self.kind)
        if self.kind == "set" and self.elem:
            name = f"a set of {self.elem}s"
        return name + (" that may be missing" if self.optional else "")


ERROR = T("error")
BOOL = T("bool")


@dataclass
class ModuleScope:
    """What one file defines and what it can see."""

    module: ParsedModule
    aliases: dict[str, ast.EventAlias] = field(default_factory=dict)
    segments: dict[str, ast.Segment] = field(default_factory=dict)
    campaigns: dict[str, ast.Campaign] = field(default_factory=dict)
    attributions: dict[str, ast.Attribution] = field(default_factory=dict)
    open_imports: list[ModuleScope] = field(default_factory=list)
    named_imports: dict[str, ModuleScope] = field(default_factory=dict)

    def visible(self) -> Iterator[ModuleScope]:
        """This scope, then every scope imported without an alias."""
        yield self
        yield from self.open_imports


@dataclass
class _Env:
    scope: ModuleScope
    event_allowed: bool = False
    guarded: frozenset[tuple[str, ...]] = frozenset()
    where: str = "condition"


class Checker:
    """Check parsed modules; collect diagnostics (see :attr:`diagnostics`)."""

    def __init__(
        self,
        scopes: list[ModuleScope],
        *,
        available_channels: Collection[str],
        known_events: Collection[str] | None = None,
    ) -> None:
        self.scopes = scopes
        self.available = tuple(available_channels)
        self.known_events = set(known_events) if known_events is not None else None
        self.diagnostics: list[Diagnostic] = []
        self.segment_refs: dict[str, set[str]] = {}
        self.used_segments: set[str] = set()
        self.default_zone = "UTC"
        self._current: ParsedModule | None = None
        self._seen_event_warnings: set[tuple[str, int, int]] = set()

    # ---- reporting
    def error(
        self,
        code: str,
        message: str,
        line: int,
        column: int,
        length: int = 1,
        hint: str | None = None,
        severity: str = "error",
    ) -> None:
        """Record one diagnostic at a position of the current module."""
        module = self._current
        assert module is not None
        lines = module.lines
        source = lines[line - 1] if 0 < line <= len(lines) else ""
        self.diagnostics.append(
            Diagnostic(
                code,
                message,
                module.file,
                line,
                column,
                max(1, length),
                hint,
                severity,  # type: ignore[arg-type]
                source,
            )
        )

    def at(
        self,
        node: ast.Node | dict[str, int] | tuple[int, int],
        code: str,
        message: str,
        length: int = 1,
        hint: str | None = None,
        severity: str = "error",
    ) -> None:
        """Record one diagnostic at a node or a ``{"line", "column"}`` position."""
        if isinstance(node, dict):
            line, column = node["line"], node["column"]
        elif isinstance(node, tuple):
            line, column = node
        else:
            line, column = node.line, node.column
        self.error(code, message, line, column, length, hint, severity)

    # ---- entry point
    def run(self) -> None:
        """Check every module."""
        for scope in self.scopes:
            for block in scope.module.blocks:
                if isinstance(block, ast.Settings):
                    self._current = scope.module
                    for clause in block.clauses:
                        if clause.keyword == "timezone" and self._check_zone(
                            clause.args["zone"], clause.args["zone_pos"]
                        ):
                            self.default_zone = clause.args["zone"]
        for scope in self.scopes:
            self._current = scope.module
            for block in scope.module.blocks:
                if isinstance(block, ast.EventAlias):
                    self._warn_unknown_event(block.event, block, len("event"))
                elif isinstance(block, ast.Segment):
                    self.segment_refs[block.name] = set()
                    self._seg_owner = block.name
                    self.bool_expr(block.condition, _Env(scope), "segment")
                    self._seg_owner = None
                elif isinstance(block, ast.Campaign):
                    self.campaign(block, scope)
                elif isinstance(block, ast.Attribution):
                    self.attribution(block, scope)
                elif isinstance(block, ast.Settings):
                    self.settings(block, scope)
                elif isinstance(block, ast.Test):
                    self.test(block, scope)
        self._segment_cycles()

    _seg_owner: str | None = None

    def _segment_cycles(self) -> None:
        state: dict[str, int] = {}
        owners = {b.name: (s, b) for s in self.scopes for b in s.module.blocks if isinstance(b, ast.Segment)}

        def visit(name: str, stack: list[str]) -> None:
            state[name] = 1
            for ref in sorted(self.segment_refs.get(name, ())):
                if state.get(ref) == 1:
                    scope, block = owners[name]
                    self._current = scope.module
                    cycle = (
                        " -> ".join([*stack[stack.index(ref) :], name, ref])
                        if ref in stack
                        else f"{name} -> {ref}"
                    )
                    self.at(
                        block, "E208", f"segment '{name}' refers to itself through {cycle}", len("segment")
                    )
                elif ref not in state:
                    visit(ref, [*stack, name])
            state[name] = 2

        for name in sorted(self.segment_refs):
            if name not in state:
                visit(name, [])

    # ---- helpers
    def _check_zone(self, zone: str, pos: Any) -> bool:
        if zone in _zones():
            return True
        self.at(
            pos,
            "E403",
            f"unknown time zone '{zone}'",
            len(zone) + 2,
            did_you_mean(zone, _zones(), cutoff=0.7),
        )
        return False

    def _warn_unknown_event(self, name: str, node: Any, length: int) -> None:
        if self.known_events is None or name in self.known_events:
            return
        key = (name, getattr(node, "line", 0), getattr(node, "column", 0))
        if key in self._seen_event_warnings:
            return
        self._seen_event_warnings.add(key)
        hint = did_you_mean(name, self.known_events)
        self.at(node, "W501", f"no event named '{name}' has ever been recorded", length, hint, "warning")

    def channel_name(self, name: str, pos: Any) -> bool:
        """Check a channel name against the known and the installed channels."""
        if name in self.available:
            return True
        if name in CHANNELS:
            self.at(
                pos,
                "E202",
                f"channel '{name}' is not offered by any installed connector",
                len(name),
                f"installed: {', '.join(self.available) or 'none'}",
            )
            return False
        self.at(
            pos,
            "E202",
            f"unknown channel '{name}'",
            len(name),
            did_you_mean(name, [*self.available, *CHANNELS]),
        )
        return False

    def _visible_names(self, scope: ModuleScope) -> list[str]:
        names: list[str] = ["customer", "event", *self.available]
        for s in scope.visible():
            names += [*s.aliases, *s.segments]
        names += list(scope.named_imports)
        return names

    def _broken(self, scope: ModuleScope, name: str) -> bool:
        return any(name in s.module.broken for s in scope.visible())

    # ---- event references (count, within, trigger, conversion, fixtures)
    def event_ref(self, node: ast.Expr, env: _Env, *, allow_prop: bool = False) -> str | None:
        """Resolve ``node`` as an event (or ``event.prop`` when ``allow_prop``); None if it is not one."""
        if isinstance(node, ast.Lit) and node.kind == "string":
            self._warn_unknown_event(node.value, node, len(node.text))
            return str(node.value)
        if not isinstance(node, ast.Path):
            what = KIND_NAMES.get(node.kind, "this") if isinstance(node, ast.Lit) else "this expression"
            self.at(
                node,
                "E301",
                f"expected an event here, got {what}",
                1,
                "name an event: an alias declared with `event`, a quoted name or email.opened",
            )
            return None
        t = self.path(node, env, as_event=True)
        if t.kind == "error":
            return None
        ref = node.ref
        if ref and ref[0] == "event":
            return str(ref[1])
        if ref and ref[0] == "eventprop" and allow_prop:
            return str(ref[1])
        if ref and ref[0] == "eventprop":
            self.at(
                node,
                "E301",
                f"'{'.'.join(node.parts)}' is an event property, not an event",
                len(".".join(node.parts)),
            )
            return None
        self.at(
            node,
            "E301",
            f"'{'.'.join(node.parts)}' is {t}, not an event",
            len(".".join(node.parts)),
            'declare it with: event NAME = "Event Name"',
        )
        return None

    # ---- expressions
    def bool_expr(self, node: ast.Expr, env: _Env, where: str) -> None:
        """Check a condition (must be a non-optional bool)."""
        t = self.expr(node, env)
        self._want(node, t, "bool", where)

    def _want(self, node: ast.Expr, t: T, kind: str, where: str) -> bool:
        if t.kind in ("error", "any") or (t.kind == kind and not t.optional):
            return True
        if t.optional and t.kind == kind:
            return self._optional(node)
        if t.optional:
            return self._optional(node)
        if kind == "bool":
            hint = None
            if t.kind == "event":
                hint = "write e.g. 'purchased within 30d' or 'count(purchased) > 0'"
            self.at(node, "E301", f"{where} needs a condition (true or false), got {t}", _len(node), hint)
            return False
        code = "E302" if kind in UNIT_EXAMPLES and t.kind in UNIT_EXAMPLES else "E301"
        hint = (
            f"write {KIND_NAMES.get(kind, kind)} such as {UNIT_EXAMPLES[kind]}"
            if kind in UNIT_EXAMPLES
            else None
        )
        self.at(node, code, f"{where} needs {KIND_NAMES.get(kind, kind)}, got {t}", _len(node), hint)
        return False

    def _optional(self, node: ast.Expr) -> bool:
        text = _text(node)
        self.at(
            node,
            "E303",
            f"'{text}' may be missing",
            len(text),
            f"write '{text} ?? DEFAULT' or guard it with has({text})",
        )
        return False

    def expr(self, node: ast.Expr, env: _Env) -> T:  # noqa: C901 - one dispatch over node kinds
        """The type of ``node``; reports problems."""
        if isinstance(node, ast.Lit):
            if node.kind in ("timeofday", "timestamp") and node.value is None:
                self.at(node, "E105", f"'{node.text}' is not {KIND_NAMES[node.kind]}", len(node.text))
                return ERROR
            if node.kind == "now":
                return T("timestamp")
            return T(node.kind)
        if isinstance(node, ast.Path):
            return self.path(node, env)
        if isinstance(node, ast.SetLit):
            kinds = set()
            for item in node.items:
                t = self.expr(item, env)
                if t.optional:
                    self._optional(item)
                if t.kind not in ("error", "any"):
                    kinds.add(t.kind)
            if len(kinds) > 1:
                self.at(node, "E301", "a set must hold values of one kind", 1)
                return ERROR
            return T("set", elem=kinds.pop() if kinds else None)
        if isinstance(node, ast.Call):
            return self.call(node, env)
        if isinstance(node, ast.Between):
            if not node.ago:
                self.at(
                    node.newer,
                    "E301",
                    "a time range ends with 'ago'",
                    _len(node.newer),
                    f"write 'between {_text(node.older)} and {_text(node.newer)} ago'",
                )
                return ERROR
            ev = self.event_ref(node.subject, env)
            older = self.expr(node.older, env)
            newer = self.expr(node.newer, env)
            ok = self._want(node.older, older, "duration", "between") & self._want(
                node.newer, newer, "duration", "between"
            )
            older_v, newer_v = _lit_value(node.older), _lit_value(node.newer)
            if ok and older_v is not None and newer_v is not None and older_v <= newer_v:
                self.at(
                    node.older,
                    "E402",
                    "in 'between A and B ago' A must be the longer time ago",
                    len(_text(node.older)),
                    f"write 'between {_text(node.newer)} and {_text(node.older)} ago'",
                )
            return BOOL if ev is not None else ERROR
        if isinstance(node, ast.Unary):
            return self.unary(node, env)
        return self.binary(node, env)

    def unary(self, node: ast.Unary, env: _Env) -> T:
        """``not``, ``-``, ``ago``."""
        t = self.expr(node.operand, env)
        if node.op == "not":
            return BOOL if self._want(node.operand, t, "bool", "'not'") else ERROR
        if node.op == "ago":
            return T("timestamp") if self._want(node.operand, t, "duration", "'ago'") else ERROR
        if t.kind in ("error", "any"):
            return t
        if t.optional:
            self._optional(node.operand)
            return ERROR
        if t.kind not in ("number", "money", "percent", "duration"):
            self.at(node, "E301", f"cannot negate {t}")
            return ERROR
        return t

    def _guards(self, node: ast.Expr) -> set[tuple[str, ...]]:
        """Paths proven present when ``node`` is true (``has(x) and ...``)."""
        if isinstance(node, ast.Call) and node.name == "has" and len(node.args) == 1:
            arg = node.args[0]
            if isinstance(arg, ast.Path):
                return {arg.parts}
            return {("call", _text(arg))}
        if isinstance(node, ast.Binary) and node.op == "and":
            return self._guards(node.left) | self._guards(node.right)
        return set()

    def binary(self, node: ast.Binary, env: _Env) -> T:  # noqa: C901 - the operator table
        """Every binary operator."""
        op = node.op
        if op in ("and", "or"):
            left = self.expr(node.left, env)
            self._want(node.left, left, "bool", f"'{op}'")
            right_env = env
            if op == "and":
                guards = self._guards(node.left)
                if guards:
                    right_env = _Env(env.scope, env.event_allowed, env.guarded | guards, env.where)
            right = self.expr(node.right, right_env)
            self._want(node.right, right, "bool", f"'{op}'")
            return BOOL
        if op == "within":
            ev = self.event_ref(node.left, env)
            window = self.expr(node.right, env)
            ok = self._want(node.right, window, "duration", "'within'")
            return BOOL if ev is not None and ok else ERROR
        left = self.expr(node.left, env)
        if op == "??":
            right = self.expr(node.right, env)
            if right.optional:
                self._optional(node.right)
                return ERROR
            if left.kind == "error" or right.kind == "error":
                return ERROR
            if left.kind not in ("any", right.kind) and right.kind != "any":
                self._mismatch(node, left, right, "??")
                return ERROR
            return T(right.kind if right.kind != "any" else left.kind, False, right.elem or left.elem)
        right = self.expr(node.right, env)
        bad = False
        for side, t in ((node.left, left), (node.right, right)):
            if t.optional:
                self._optional(side)
                bad = True
        if bad or left.kind == "error" or right.kind == "error":
            return BOOL if op in ("==", "!=", ">", "<", ">=", "<=", "in", "not in", "matches") else ERROR
        if op in ("==", "!="):
            if not _compatible(left, right):
                self._mismatch(node, left, right, op)
            return BOOL
        if op in (">", "<", ">=", "<="):
            if not _compatible(left, right):
                self._mismatch(node, left, right, op)
            elif left.kind not in ORDERED | {"any"} or right.kind not in ORDERED | {"any"}:
                self.at(
                    node,
                    "E301",
                    f"cannot order {left}: '{op}' compares numbers, amounts, durations and times",
                    _len(node.left),
                )
            return BOOL
        if op in ("in", "not in"):
            if right.kind not in ("set", "any"):
                self.at(
                    node.right,
                    "E301",
                    f"'{op}' needs a set on its right, got {right}",
                    _len(node.right),
                    'write e.g. ["gold", "silver"]',
                )
            elif right.elem and left.kind not in ("any", right.elem):
                self._mismatch(node, left, T(right.elem), op)
            return BOOL
        if op == "matches":
            if not (isinstance(node.right, ast.Lit) and node.right.kind == "string"):
                self.at(
                    node.right,
                    "E301",
                    "'matches' needs a quoted pattern such as \"brand*\"",
                    _len(node.right),
                )
            if left.kind not in ("string", "any"):
                self._mismatch(node, left, T("string"), op)
            return BOOL
        return self._arith(node, left, right)

    def _arith(self, node: ast.Binary, left: T, right: T) -> T:
        op = node.op
        lk, rk = left.kind, right.kind
        if "any" in (lk, rk):
            return T(lk if rk == "any" else rk)
        table: dict[tuple[str, str, str], str] = {}
        for k in ("number", "money", "percent", "duration"):
            table[("+", k, k)] = k
            table[("-", k, k)] = k
        table.update(
            {
                ("+", "timestamp", "duration"): "timestamp",
                ("-", "timestamp", "duration"): "timestamp",
                ("-", "timestamp", "timestamp"): "duration",
                ("*", "number", "number"): "number",
                ("/", "number", "number"): "number",
                ("*", "money", "number"): "money",
                ("*", "number", "money"): "money",
                ("/", "money", "number"): "money",
                ("/", "money", "money"): "number",
                ("*", "money", "percent"): "money",
                ("*", "percent", "money"): "money",
                ("*", "number", "percent"): "number",
                ("*", "percent", "number"): "number",
                ("*", "duration", "number"): "duration",
                ("*", "number", "duration"): "duration",
                ("/", "duration", "number"): "duration",
                ("/", "duration", "duration"): "number",
            }
        )
        result = table.get((op, lk, rk))
        if result is None:
            self._mismatch(node, left, right, op)
            return ERROR
        return T(result)

    def _mismatch(self, node: ast.Binary, left: T, right: T, op: str) -> None:
        hint = None
        kinds = {left.kind, right.kind}
        sums = any(isinstance(n, ast.Call) and n.name in ("sum", "count") for n in (node.left, node.right))
        if kinds == {"money", "number"} and sums:
            hint = "count() and sum() give plain numbers: compare with 100, not €100"
        elif kinds == {"money", "number"}:
            hint = "amounts of money are written with a currency sign, e.g. €50"
        elif kinds == {"duration", "number"}:
            hint = "durations need a unit, e.g. 7d, 12h or 30m"
        elif kinds == {"percent", "number"}:
            hint = "percentages are written with %, e.g. 10%"
        elif kinds == {"timestamp", "duration"}:
            hint = "turn a duration into a point in time with 'ago', e.g. 30d ago"
        code = "E302" if kinds <= set(UNIT_EXAMPLES) else "E301"
        self.at(node, code, f"cannot combine {left} and {right} with '{op}'", _len(node.left), hint)

    def path(self, node: ast.Path, env: _Env, *, as_event: bool = False) -> T:  # noqa: C901
        """Resolve a dotted name; annotate ``node.ref``."""
        parts = node.parts
        head = parts[0]
        scope = env.scope
        length = len(".".join(parts))
        if head == "customer" and len(parts) >= 2:
            if len(parts) == 2 and parts[1] == "timezone":
                node.ref = ("timezone",)
                return T("string", optional=parts not in env.guarded)
            node.ref = ("trait", parts[1:])
            return T("any", optional=parts not in env.guarded)
        if head == "event" and len(parts) >= 2:
            if not env.event_allowed:
                self.at(
                    node,
                    "E207",
                    f"'{'.'.join(parts)}' is only known in a campaign with a trigger",
                    length,
                    "add 'trigger on EVENT', or read the customer's history with count(...) or last(...)",
                )
                return ERROR
            node.ref = ("prop", parts[1:])
            return T("any", optional=parts not in env.guarded)
        if len(parts) == 2 and head in (*CHANNELS, *self.available) and head not in scope.named_imports:
            kinds = [f.value for f in Feedback]
            if parts[1] not in kinds:
                self.at(
                    node,
                    "E206",
                    f"'{parts[1]}' is not something that happens on {head}",
                    length,
                    did_you_mean(parts[1], kinds) or f"one of: {', '.join(kinds)}",
                )
                return ERROR
            # A feedback aggregate, counted from whatever name the feedback arrived under:
            # the checker has validated both parts, and the log never holds this name.
            name = feedback_event_name(head, parts[1])
            node.ref = ("event", name)
            return T("event")
        if head in scope.named_imports:
            target = scope.named_imports[head]
            if len(parts) < 2:
                self.at(node, "E201", f"'{head}' names an imported file; write {head}.NAME", length)
                return ERROR
            return self._resolve_in([target], node, parts[1:], env, length, prefix=head + ".")
        return self._resolve_in(list(scope.visible()), node, parts, env, length, prefix="")

    def _resolve_in(
        self,
        scopes: list[ModuleScope],
        node: ast.Path,
        parts: tuple[str, ...],
        env: _Env,
        length: int,
        prefix: str,
    ) -> T:
        name = parts[0]
        for s in scopes:
            if name in s.aliases:
                event = s.aliases[name].event
                if len(parts) == 1:
                    node.ref = ("event", event)
                    return T("event")
                if len(parts) == 2:
                    node.ref = ("eventprop", event, parts[1])
                    return T("eventprop")
            if name in s.segments and len(parts) == 1:
                node.ref = ("segment", name)
                self.used_segments.add(name)
                if self._seg_owner is not None:
                    self.segment_refs.setdefault(self._seg_owner, set()).add(name)
                return BOOL
        if not prefix and len(parts) == 1 and name in self.available:
            node.ref = ("channel", name)
            return T("channel")
        if not prefix and len(parts) == 1 and name in CHANNELS:
            self.channel_name(name, node)
            return ERROR
        if any(name in s.module.broken or "*" in s.module.broken for s in scopes):
            return ERROR
        if not prefix and len(parts) == 1 and name in UNIT_WORDS:
            self.at(
                node,
                "E302",
                f"'{name}' is not a duration",
                length,
                f"durations are a number and a unit: write {UNIT_WORDS[name]}",
            )
            return ERROR
        candidates = (
            self._visible_names(env.scope) if not prefix else [*scopes[0].aliases, *scopes[0].segments]
        )
        what = f"'{prefix}{name}'"
        hint = did_you_mean(name, candidates)
        if not prefix and name in ("purchased", "opened", "clicked") and hint is None:
            hint = f'declare it first: event {name} = "Event Name"'
        if prefix and name in scopes[0].campaigns:
            self.at(node, "E301", f"{what} is a campaign; only segments and events can be used here", length)
            return ERROR
        self.at(node, "E201", f"unknown name {what}", length, hint)
        return ERROR

    def call(self, node: ast.Call, env: _Env) -> T:  # noqa: C901
        """Built-in functions."""
        name, args = node.name, node.args
        if name not in FUNCTIONS:
            self.at(
                node,
                "E203",
                f"unknown function '{name}'",
                len(name),
                did_you_mean(name, FUNCTIONS) or f"the functions are {', '.join(FUNCTIONS)}",
            )
            for arg in args:
                self.expr(arg, env)
            return ERROR
        if len(args) != 1:
            self.at(node, "E304", f"{name}() takes one argument, got {len(args)}", len(name))
            return ERROR
        arg = args[0]
        if name == "has":
            # Whether a value can be missing does not depend on guards already passed:
            # ``has(x) and has(x)`` is redundant, not wrong.
            unguarded = _Env(env.scope, env.event_allowed, frozenset(), env.where)
            t = self.path(arg, unguarded) if isinstance(arg, ast.Path) else self.expr(arg, unguarded)
            if t.kind != "error" and not t.optional:
                self.at(
                    arg,
                    "E304",
                    f"'{_text(arg)}' is never missing; has() checks customer traits, "
                    "event properties and last()/first()",
                    _len(arg),
                )
            return BOOL
        if name == "consent":
            t = self.expr(arg, env)
            if t.kind not in ("channel", "error"):
                self.at(arg, "E301", f"consent() takes a channel such as email, got {t}", _len(arg))
            return BOOL
        if name in ("last", "first"):
            ev = self.event_ref(arg, env)
            return T("timestamp", optional=("call", _text(node)) not in env.guarded) if ev else ERROR
        # count and sum: EVENT, EVENT within D, EVENT between A and B ago
        inner = arg
        if isinstance(arg, ast.Binary) and arg.op == "within":
            window = self.expr(arg.right, env)
            self._want(arg.right, window, "duration", "'within'")
            inner = arg.left
        elif isinstance(arg, ast.Between):
            for d in (arg.older, arg.newer):
                self._want(d, self.expr(d, env), "duration", "'between'")
            inner = arg.subject
        if name == "count":
            return T("number") if self.event_ref(inner, env) else ERROR
        ev = self.event_ref(inner, env, allow_prop=True)
        if ev is None:
            return ERROR
        if not (isinstance(inner, ast.Path) and inner.ref and inner.ref[0] == "eventprop"):
            self.at(
                inner,
                "E304",
                "sum() adds up an event property: write sum(EVENT.PROPERTY within 30d)",
                _len(inner),
            )
            return ERROR
        return T("number")

    # ---- blocks
    def _clauses(self, clauses: list[ast.Clause], repeatable: tuple[str, ...]) -> dict[str, ast.Clause]:
        seen: dict[str, ast.Clause] = {}
        for clause in clauses:
            if clause.keyword in seen and clause.keyword not in repeatable:
                self.at(
                    clause,
                    "E405",
                    f"'{clause.keyword}' is given twice",
                    len(clause.keyword),
                    f"first given on line {seen[clause.keyword].line}",
                )
                continue
            seen.setdefault(clause.keyword, clause)
        return seen

    def _number(
        self, node: ast.Expr, env: _Env, where: str, *, integer: bool = True, minimum: float = 0
    ) -> None:
        t = self.expr(node, env)
        if not self._want(node, t, "number", where) or not self._literal(node, where, t):
            return
        value = _lit_value(node)
        if value is not None and ((integer and value != int(value)) or value < minimum):
            kind = "a whole number" if integer else "a number"
            self.at(
                node, "E402", f"{where} must be {kind} of at least {minimum:g}, got {_text(node)}", _len(node)
            )

    def _duration(self, node: ast.Expr, env: _Env, where: str, *, positive: bool = True) -> None:
        t = self.expr(node, env)
        if self._want(node, t, "duration", where) and self._literal(node, where, t) and positive:
            value = _lit_value(node)
            if value is not None and value <= 0:
                self.at(node, "E402", f"{where} must be longer than 0", _len(node))

    def _literal(self, node: ast.Expr, where: str, t: T | None = None) -> bool:
        """Settings of a rule (counts, windows, shares, times) are written as values, not computed."""
        if isinstance(node, ast.Lit) and node.value is not None:
            return True
        if t is not None and t.kind == "error":
            return False  # already reported
        self.at(
            node,
            "E301",
            f"{where} must be written as a plain value, not computed",
            _len(node),
            "write e.g. 3, 7d, 45% or 09:00",
        )
        return False

    def cap(self, clause: ast.Clause, env: _Env, *, in_settings: bool) -> None:
        """``cap N per DURATION [on CHANNEL] [calendar]``."""
        self._number(clause.args["count"], env, "a cap's count", minimum=1)
        self._duration(clause.args["window"], env, "a cap's window")
        window = clause.args["window"]
        value = _lit_value(window) if isinstance(window, ast.Lit) and window.kind == "duration" else None
        if clause.args.get("calendar") is not None and value is not None and (value <= 0 or value % DAY_MS):
            self.at(
                window,
                "E402",
                "a calendar cap counts whole local days; its window must be a number of days",
                _len(window),
                "write e.g. 1d or 7d",
            )
        on = clause.args["on"]
        if on is not None:
            if in_settings:
                self.channel_name(on[0], on[1])
            else:
                self.at(
                    on[1],
                    "E406",
                    "a campaign's cap counts that campaign's sends; per-channel caps go in 'settings'",
                    len(on[0]),
                )

    def campaign(self, block: ast.Campaign, scope: ModuleScope) -> None:  # noqa: C901
        """Check a campaign block."""
        seen = self._clauses(block.clauses, ("cap",))
        trigger = seen.get("trigger")
        env = _Env(scope, event_allowed=trigger is not None)
        sync = seen.get("sync")
        if sync is not None:
            self._sync_campaign(block, seen, scope)
        for keyword in ("send", "channel"):
            if sync is None and keyword not in seen and block.name not in scope.module.broken:
                example = 'send template "NAME"' if keyword == "send" else "channel email"
                self.at(
                    block,
                    "E404",
                    f"campaign '{block.name}' has no '{keyword}' clause",
                    len("campaign"),
                    f"add e.g. `{example}`",
                )
        for clause in block.clauses:
            kw, args = clause.keyword, clause.args
            if kw in ("audience", "unless"):
                self.bool_expr(args["expr"], env, kw)
            elif kw == "trigger":
                self.event_ref(args["event"], env)
                if args["where"] is not None:
                    self.bool_expr(args["where"], env, "where")
                if args["after"] is not None:
                    self._duration(args["after"], env, "'after'", positive=False)
            elif kw in ("send", "sync"):
                names = set()
                for name, expr, pos in args["vars"]:
                    if name in names:
                        self.at(pos, "E204", f"template variable '{name}' is given twice", len(name))
                    names.add(name)
                    t = self.expr(expr, env)
                    if t.optional:
                        self._optional(expr)
                if kw == "sync":
                    self.audience_channel(*args["channel"])
            elif kw == "channel":
                names = set()
                for name, pos in args["channels"]:
                    if name in names:
                        self.at(pos, "E204", f"channel '{name}' is listed twice", len(name))
                    names.add(name)
                    self.channel_name(name, pos)
            elif kw == "cap":
                self.cap(clause, env, in_settings=False)
            elif kw == "quiet":
                self.quiet(clause, env)
            elif kw == "priority":
                self._number(args["expr"], env, "priority")
            elif kw == "schedule":
                self.schedule(clause, env)
            elif kw == "split":
                self.split(clause, env)
            elif kw in ("starts", "ends"):
                t = self.expr(args["expr"], env)
                if self._want(args["expr"], t, "timestamp", f"'{kw}'") and not isinstance(
                    args["expr"], ast.Lit
                ):
                    self.at(
                        args["expr"], "E301", f"'{kw}' needs a date such as 2026-03-01", _len(args["expr"])
                    )
        starts, ends = seen.get("starts"), seen.get("ends")
        if starts and ends:
            a, b = starts.args["expr"], ends.args["expr"]
            if (
                isinstance(a, ast.Lit)
                and isinstance(b, ast.Lit)
                and a.value
                and b.value
                and b.value <= a.value
            ):
                self.at(b, "E402", "the campaign ends before it starts", len(b.text))

    def _sync_campaign(self, block: ast.Campaign, seen: dict[str, ast.Clause], scope: ModuleScope) -> None:
        """A campaign that syncs an ad audience sends no message and runs on its schedule."""
        for keyword in ("send", "channel", "trigger", "split"):
            clause = seen.get(keyword)
            if clause is not None:
                self.at(
                    clause,
                    "E406",
                    f"'{keyword}' is not allowed in a campaign that syncs an audience (it sends no message)",
                    len(keyword),
                    "put messages in a campaign of their own",
                )
        if "schedule" not in seen and block.name not in scope.module.broken:
            self.at(
                block,
                "E404",
                f"campaign '{block.name}' syncs an audience but has no 'schedule' clause",
                len("campaign"),
                "add e.g. `schedule every day at 06:00`: each run syncs the membership changes",
            )

    def audience_channel(self, name: str, pos: Any) -> None:
        """The channel of ``sync audience to``: installed, and its connector keeps audiences."""
        if not self.channel_name(name, pos):
            return
        capable = audience_channels()
        if name not in capable:
            self.at(
                pos,
                "E202",
                f"channel '{name}' cannot hold an audience",
                len(name),
                f"audiences can be synced to: {', '.join(sorted(capable))}",
            )

    def quiet(self, clause: ast.Clause, env: _Env) -> None:
        """``quiet 21:00..08:00 in ZONE then defer|drop``."""
        args = clause.args
        for key in ("start", "end"):
            node = args[key]
            t = self.expr(node, env)
            if t.kind == "timeofday" and not self._literal(node, "quiet hours"):
                break
            if t.kind not in ("timeofday", "error"):
                # one mistake (e.g. "21..8") is one diagnostic, however many ends it affects
                self.at(
                    node,
                    "E302",
                    f"quiet hours need a time of day, got {t}",
                    _len(node),
                    "write e.g. quiet 21:00..08:00",
                )
                break
        zone = args["zone"]
        if zone is not None:
            self.zone_expr(zone, env)
        action = args["action"]
        if action is not None and action[0] not in ("defer", "drop"):
            self.at(
                action[1],
                "E206",
                f"quiet hours end with 'then defer' or 'then drop', not '{action[0]}'",
                len(action[0]),
                did_you_mean(action[0], ("defer", "drop")),
            )

    def zone_expr(self, node: ast.Expr, env: _Env) -> None:
        """A zone: "Europe/Berlin", customer.timezone, or customer.timezone ?? "Europe/Berlin"."""
        if isinstance(node, ast.Lit) and node.kind == "string":
            self._check_zone(node.value, node)
            return
        if isinstance(node, ast.Path) and node.parts == ("customer", "timezone"):
            node.ref = ("timezone",)
            return
        if (
            isinstance(node, ast.Binary)
            and node.op == "??"
            and isinstance(node.left, ast.Path)
            and node.left.parts == ("customer", "timezone")
            and isinstance(node.right, ast.Lit)
            and node.right.kind == "string"
        ):
            node.left.ref = ("timezone",)
            self._check_zone(node.right.value, node.right)
            return
        self.at(
            node,
            "E301",
            "a time zone is a quoted zone name or customer.timezone",
            _len(node),
            'write e.g. in customer.timezone ?? "Europe/Berlin"',
        )

    def schedule(self, clause: ast.Clause, env: _Env) -> None:
        """``schedule every UNIT [at TIME] [in ZONE]``."""
        unit, pos = clause.args["every"]
        if unit not in SCHEDULE_UNITS:
            self.at(
                pos,
                "E206",
                f"'{unit}' is not a schedule",
                len(unit),
                did_you_mean(unit, SCHEDULE_UNITS) or f"one of: {', '.join(SCHEDULE_UNITS)}",
            )
        at = clause.args["at"]
        if at is not None:
            t = self.expr(at, env)
            if t.kind == "timeofday":
                self._literal(at, "a schedule time")
            elif t.kind != "error":
                self.at(
                    at, "E302", f"a schedule runs at a time of day, got {t}", _len(at), "write e.g. at 09:00"
                )
            if unit == "hour":
                self.at(at, "E406", "'every hour' runs on the hour; it takes no 'at'", _len(at))
        elif unit != "hour" and unit in SCHEDULE_UNITS:
            self.at(
                clause,
                "E404",
                f"'schedule every {unit}' needs a time",
                len("schedule"),
                f"write e.g. schedule every {unit} at 09:00",
            )
        if clause.args["zone"] is not None:
            self.zone_expr(clause.args["zone"], env)

    def split(self, clause: ast.Clause, env: _Env) -> None:
        """Shares must be percentages adding up to 100%."""
        total = 0.0
        known = True
        names: set[str] = set()
        for arm in clause.args["arms"]:
            if arm.name in names:
                self.at(arm, "E204", f"split arm '{arm.name}' is given twice", len(arm.name))
            names.add(arm.name)
            t = self.expr(arm.share, env)
            if t.kind == "number" and isinstance(arm.share, ast.Lit):
                self.at(
                    arm.share,
                    "E302",
                    f"a split share is a percentage, got the number {arm.share.text}",
                    len(arm.share.text),
                    f"write {arm.share.text}%",
                )
                known = False
            elif not self._want(arm.share, t, "percent", "a split share"):
                known = False
            elif self._literal(arm.share, "a split share", t):
                total += float(_lit_value(arm.share) or 0.0)
            else:
                known = False
        if known and abs(total - 1.0) > 1e-9:
            self.at(
                clause,
                "E401",
                f"split shares add up to {total * 100:g}%, not 100%",
                len("split"),
                "make the shares add up to exactly 100%",
            )

    def attribution(self, block: ast.Attribution, scope: ModuleScope) -> None:  # noqa: C901
        """Check an attribution block."""
        seen = self._clauses(block.clauses, ("channel_rule", "credit", "weight", "exclude"))
        env = _Env(scope)
        if "conversion" not in seen and block.name not in scope.module.broken:
            self.at(
                block,
                "E404",
                f"attribution '{block.name}' has no 'conversion' clause",
                len("attribution"),
                "add e.g. `conversion purchased value event.revenue`",
            )
        for clause in block.clauses:
            kw, args = clause.keyword, clause.args
            if kw == "conversion":
                self.event_ref(args["event"], env)
                if args["value"] is not None and args["value"][0] != "event":
                    head, _prop, pos = args["value"]
                    self.at(
                        pos,
                        "E206",
                        "the conversion value is a property of the event: write value event.NAME",
                        len(head),
                    )
            elif kw == "window":
                node = args["expr"]
                t = self.expr(node, env)
                if self._want(node, t, "duration", "the attribution window") and self._literal(
                    node, "the attribution window", t
                ):
                    value = _lit_value(node)
                    if value is not None and not (DAY_MS <= value <= 90 * DAY_MS):
                        self.at(
                            node,
                            "E402",
                            f"the attribution window must be between 1d and 90d, got {_text(node)}",
                            _len(node),
                        )
            elif kw == "model":
                self.model(clause, env)
            elif kw == "channel_rule":
                for fname, _op, _glob, pos in args["when"]:
                    if fname not in CHANNEL_RULE_FIELDS:
                        self.at(
                            pos,
                            "E206",
                            f"a touch is matched on {', '.join(CHANNEL_RULE_FIELDS)}, not '{fname}'",
                            len(fname),
                            did_you_mean(fname, CHANNEL_RULE_FIELDS),
                        )
            elif kw in ("credit", "weight", "exclude"):
                value = args["value"]
                if kw == "credit" and value is not None:
                    t = self.expr(value, env)
                    if t.kind == "number" and _lit_value(value) == 0:
                        pass
                    elif self._want(value, t, "percent", "a fixed credit") and self._literal(
                        value, "a credit"
                    ):
                        v = _lit_value(value)
                        if v is not None and not 0 <= v <= 1:
                            self.at(value, "E402", "a credit share must be between 0% and 100%", _len(value))
                elif kw == "weight" and value is not None:
                    self._number(value, env, "a credit weight", integer=False)
                if args["when"] is not None:
                    self.touch_pred(args["when"])

    def touch_pred(self, pred: tuple[Any, ...]) -> None:
        """Conditions over a journey's touches."""
        if pred[0] in ("and", "or"):
            self.touch_pred(pred[1])
            self.touch_pred(pred[2])
        elif pred[0] == "not":
            self.touch_pred(pred[1])
        else:
            _q, _quant, fname, _op, _value, pos = pred
            if fname not in TOUCH_FIELDS:
                self.at(
                    pos,
                    "E206",
                    f"a touch has {', '.join(TOUCH_FIELDS)}, not '{fname}'",
                    len(fname),
                    did_you_mean(fname, TOUCH_FIELDS),
                )

    def model(self, clause: ast.Clause, env: _Env) -> None:
        """A model name and its parameters."""
        name = clause.args["name"]
        if name not in MODELS:
            self.at(
                clause.args["name_pos"],
                "E206",
                f"unknown attribution model '{name}'",
                len(name),
                did_you_mean(name, MODELS) or f"one of: {', '.join(MODELS)}",
            )
            return
        allowed = MODEL_PARAMS.get(name, {})
        shares: dict[str, tuple[float, ast.Expr]] = {}
        for pname, expr, pos in clause.args["params"]:
            if pname not in allowed:
                hint = did_you_mean(pname, allowed) if allowed else f"'{name}' takes no parameters"
                self.at(pos, "E206", f"'{name}' has no parameter '{pname}'", len(pname), hint)
                continue
            t = self.expr(expr, env)
            if self._want(expr, t, allowed[pname], f"'{pname}'") and self._literal(expr, f"'{pname}'", t):
                # Values the models cannot use: the engine loop would fail on every conversion.
                value = _lit_value(expr)
                if value is not None and allowed[pname] == "duration" and value <= 0:
                    self.at(expr, "E402", f"'{pname}' must be longer than 0", _len(expr))
                elif value is not None and allowed[pname] == "percent":
                    shares[pname] = (float(value), expr)
        first = shares["first"][0] if "first" in shares else 0.4
        last = shares["last"][0] if "last" in shares else 0.4
        if shares and first + last > 1 + 1e-9:
            node = (shares.get("last") or shares["first"])[1]
            self.at(node, "E402", "first + last must be at most 100%", _len(node))

    def settings(self, block: ast.Settings, scope: ModuleScope) -> None:
        """Global settings."""
        self._clauses(block.clauses, ("cap",))
        env = _Env(scope)
        for clause in block.clauses:
            if clause.keyword == "cap":
                self.cap(clause, env, in_settings=True)
            elif clause.keyword == "spacing":
                self._duration(clause.args["expr"], env, "spacing", positive=False)

    def test(self, block: ast.Test, scope: ModuleScope) -> None:  # noqa: C901
        """Fixtures and expectations."""
        env = _Env(scope)
        for name, expr in block.customer:
            if name == "consent":
                if not isinstance(expr, ast.SetLit):
                    self.at(expr, "E301", "consent is a list of channels, e.g. [email, sms]", _len(expr))
                    continue
                for item in expr.items:
                    if isinstance(item, ast.Path) and len(item.parts) == 1:
                        if self.channel_name(item.parts[0], item):
                            item.ref = ("channel", item.parts[0])
                    else:
                        self.at(item, "E301", "consent lists channel names", _len(item))
            elif name == "timezone":
                if isinstance(expr, ast.Lit) and expr.kind == "string":
                    self._check_zone(expr.value, expr)
                else:
                    self.at(expr, "E301", 'timezone is a quoted zone name, e.g. "Europe/Berlin"', _len(expr))
            else:
                self._fixture_value(expr, env)
        fixtures = list(block.events) + [s.trigger for s in block.steps if s.trigger is not None]
        for fixture in fixtures:
            self.event_ref(fixture.event, env)
            for _name, expr in fixture.props:
                self._fixture_value(expr, env)
            self._moment(fixture.at)
        campaigns = {n for s in self.scopes for n in s.campaigns}
        segments = {n for s in self.scopes for n in s.segments}
        broken = {n for s in self.scopes for n in s.module.broken}
        for step in block.steps:
            self._moment(step.at)
            if step.expect in ("send", "eligible", "not_eligible") and step.target not in campaigns | broken:
                self.at(
                    step.target_pos,
                    "E407",
                    f"unknown campaign '{step.target}'",
                    len(step.target or ""),
                    did_you_mean(step.target or "", campaigns),
                )
            if step.expect in ("member", "not_member") and step.target not in segments | broken:
                self.at(
                    step.target_pos,
                    "E407",
                    f"unknown segment '{step.target}'",
                    len(step.target or ""),
                    did_you_mean(step.target or "", segments),
                )
            if step.channel is not None:
                self.channel_name(step.channel, step.target_pos)
            if step.send_time is not None and _time_of_day(step.send_time) is None:
                self.at(
                    step.send_time_pos,
                    "E105",
                    f"'{step.send_time}' is not a time of day",
                    len(step.send_time),
                )
            if step.reason is not None:
                if step.reason not in SUPPRESSION_REASONS:
                    self.at(
                        step.target_pos,
                        "E407",
                        f"'{step.reason}' is not a reason",
                        len(step.reason),
                        did_you_mean(step.reason, SUPPRESSION_REASONS)
                        or f"one of: {', '.join(SUPPRESSION_REASONS)}",
                    )
                if step.reason_campaign not in campaigns | broken:
                    self.at(
                        step.target_pos,
                        "E407",
                        f"unknown campaign '{step.reason_campaign}'",
                        len(step.reason or ""),
                        did_you_mean(step.reason_campaign or "", campaigns),
                    )

    def _fixture_value(self, expr: ast.Expr, env: _Env) -> None:
        if isinstance(expr, ast.Lit) and expr.kind != "now":
            self.expr(expr, env)
            return
        if isinstance(expr, ast.SetLit):
            for item in expr.items:
                self._fixture_value(item, env)
            return
        if isinstance(expr, ast.Unary) and expr.op == "-" and isinstance(expr.operand, ast.Lit):
            return
        self.at(expr, "E301", "test data must be plain values (numbers, text, dates, lists)", _len(expr))

    def _moment(self, moment: ast.Moment) -> None:
        if moment.absolute is not None:
            from cadence.dsl.parser import _timestamp

            if _timestamp(moment.absolute) is None:
                self.at(moment, "E105", f"'{moment.absolute}' is not a valid date", len(moment.absolute))
            if moment.zone is not None:
                self._check_zone(
                    moment.zone, {"line": moment.line, "column": moment.column + len(moment.absolute) + 1}
                )


def _lit_value(node: ast.Expr) -> Any:
    if isinstance(node, ast.Lit) and node.kind in ("number", "duration", "percent", "money"):
        return node.value
    return None


def _compatible(a: T, b: T) -> bool:
    return a.kind == b.kind or "any" in (a.kind, b.kind) or "error" in (a.kind, b.kind)


def _text(node: ast.Expr) -> str:
    from cadence.dsl.formatter import format_expr

    return format_expr(node)


def _len(node: ast.Expr) -> int:
    if isinstance(node, ast.Lit):
        return len(node.text)
    if isinstance(node, ast.Path):
        return len(".".join(node.parts))
    if isinstance(node, ast.Call):
        return len(node.name)
    return 1
