"""The compiler: checked syntax trees to the engine's IR, through generated Python.

Every condition becomes a small Python function in one generated module, which is
passed to :func:`compile` once and executed in a fresh namespace. No text a user
wrote ever becomes code: string literals, event names and trait names live in a
constants list (``_K[3]``), numbers are written with ``repr`` of the float parsed
from the literal, and every identifier in the generated source is made up by the
compiler. The result is a :class:`~cadence.engine.campaign.CompiledRuleset`, plus
the :class:`~cadence.engine.campaign.AggregateNeed` list so that the engine keeps
only the profile aggregates the rules read.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import types
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, time
from typing import Any, Literal
from zoneinfo import ZoneInfo

from cadence.dsl import ast
from cadence.dsl.formatter import CMP_OPS, format_expr
from cadence.engine.attribution.spec import AttributionSpec, ChannelRule, CreditRule
from cadence.engine.campaign import (
    AggregateNeed,
    Cap,
    ChannelPolicy,
    ConditionResult,
    EvalContext,
    GlobalSettings,
    QuietHours,
    Schedule,
    SourcePos,
    SplitArm,
    TemplateSpec,
    Trigger,
)
from cadence.engine.campaign import Campaign as CampaignIR
from cadence.engine.campaign import Segment as SegmentIR

__all__ = ["CompiledPredicate", "Codegen", "RUNTIME_ERRORS"]

#: Data errors a condition may meet at run time (a trait of an unexpected type):
#: the condition is then false, and explain shows the value.
RUNTIME_ERRORS = (TypeError, ValueError, ZeroDivisionError, AttributeError, KeyError, OverflowError)
_EMPTY: Mapping[str, Any] = {}
#: A constant in generated source: a ``_K[i]`` reference or a number literal (never part of a name).
_CONSTANT = re.compile(r"_K\[(\d+)\]|(?<![\w.])(\d+(?:\.\d+)?(?:e[+-]?\d+)?)(?![\w.])")
_LOCAL_VAR = re.compile(r"\b_v\d+\b")
INLINE_LIMIT = 600  # segment conditions up to this much source are inlined where they are used
WEEKDAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, Mapping) else None


def _prop(ctx: EvalContext, key: str) -> Any:
    event = ctx.event
    if not event:
        return None
    return (event.get("properties") or _EMPTY).get(key)


def _match(pattern: re.Pattern[str], value: Any) -> bool:
    return isinstance(value, str) and pattern.match(value) is not None


class CompiledPredicate:
    """A compiled condition (implements :class:`~cadence.engine.campaign.Predicate`).

    Calling it runs the generated function. :meth:`explain` evaluates each top-level
    ``and`` part on its own and reports it with its actual value; the explain
    functions are generated on first use, so a ruleset that is never explained
    never pays for them.
    """

    __slots__ = ("_source", "_node", "pos", "_fn", "_parts", "_gen", "_explainers", "_file", "stage")

    def __init__(
        self,
        source: str | ast.Expr,
        fn: Callable[[EvalContext], bool],
        parts: list[ast.Expr],
        gen: Codegen,
        pos: SourcePos | None,
    ) -> None:
        # the canonical text is written on first use: loading a large ruleset need not format it
        self._source: str | None = source if isinstance(source, str) else None
        self._node: ast.Expr | None = None if isinstance(source, str) else source
        self.pos = pos
        self._fn = fn
        self._parts = parts
        self._gen = gen
        self._file = pos.file if pos is not None else "<rules>"
        # the campaign clause it is ("audience", "where", "unless"), which its explained parts say;
        # None for a segment's, unless a campaign names the segment as its audience
        self.stage: str | None = None
        self._explainers: (
            list[tuple[str, Callable[[EvalContext], tuple[Any, bool]], SourcePos | None, str | None]] | None
        ) = None

    def __call__(self, ctx: EvalContext) -> bool:
        return self._fn(ctx)

    @property
    def source(self) -> str:
        """The condition as written, in canonical form."""
        if self._source is None:
            assert self._node is not None
            self._source = format_expr(self._node)
        return self._source

    @source.setter
    def source(self, text: str) -> None:
        self._source = text

    @property
    def parts(self) -> tuple[ast.Expr, ...]:
        """The condition's top-level ``and`` parts, as checked syntax trees."""
        return tuple(self._parts)

    @property
    def segments(self) -> dict[str, ast.Expr]:
        """The syntax tree of every segment of the ruleset, by name (what the parts may refer to)."""
        return dict(self._gen.segment_ast)

    def __repr__(self) -> str:
        return f"<predicate {self.source!r}>"

    def explain(self, ctx: EvalContext) -> list[ConditionResult]:
        """Every top-level condition with its actual value; segment references are opened up.

        Each part says its clause (:attr:`stage`); an ``unless`` part passes when it does not
        hold, as it then let the campaign through.
        """
        if self._explainers is None:
            self._explainers = self._gen.explainers(self._parts, self._file)
        results: list[ConditionResult] = []
        flip = self.stage == "unless"
        for text, fn, pos, segment in self._explainers:
            value, passed = fn(ctx)
            results.append(ConditionResult(text, value, passed is not flip, pos, stage=self.stage))
            if segment is not None:
                inner = self._gen.segment_predicates.get(segment)
                if inner is not None and inner is not self:
                    for part in inner.explain(ctx):
                        results.append(
                            ConditionResult(
                                f"{text} > {part.text}",
                                part.value,
                                part.passed is not flip,
                                part.pos,
                                nested=True,
                                stage=self.stage,
                            )
                        )
        return results


class Codegen:
    """Generates, compiles and runs the Python source of one ruleset."""

    def __init__(self, *, default_zone: str = "UTC") -> None:
        self.zone = ZoneInfo(default_zone)
        self.zone_name = default_zone
        self.consts: list[Any] = []
        self._const_ids: dict[tuple[type, Any], int] = {}
        self.lines: list[str] = []
        self.sources: list[str] = []  # every generated module, kept for inspection and tests
        self.aggregates: set[AggregateNeed] = set()
        self.segment_funcs: dict[str, str] = {}
        self.segment_predicates: dict[str, CompiledPredicate] = {}
        self._pending: list[tuple[str, Callable[[Callable[..., Any]], None]]] = []
        self._bodies: dict[tuple[str, ...], str] = {}
        self._shapes: dict[tuple[str, ...], str] = {}
        self._instances: list[tuple[str, str, tuple[Any, ...]]] = []
        self.segment_ast: dict[str, ast.Expr] = {}
        self._segment_src: dict[str, str] = {}
        self._n = 0
        self.namespace: dict[str, Any] = {
            "_K": self.consts,
            "_ERR": RUNTIME_ERRORS,
            "_get": _get,
            "_prop": _prop,
            "_match": _match,
            "_EMPTY": _EMPTY,
        }

    # ---- plumbing
    def const(self, value: Any) -> str:
        """A reference to ``value`` in the constants list."""
        key = (type(value), value)
        try:
            index = self._const_ids.get(key)
        except TypeError:
            index = None
        if index is None:
            index = len(self.consts)
            self.consts.append(value)
            with contextlib.suppress(TypeError):  # unhashable constants are simply not shared
                self._const_ids[key] = index
        return f"_K[{index}]"

    def fresh(self, prefix: str) -> str:
        """A new identifier."""
        self._n += 1
        return f"{prefix}{self._n}"

    def function(
        self, body: list[str], on_ready: Callable[[Callable[..., Any]], None], *, name: str | None = None
    ) -> str:
        """Queue a function ``def NAME(ctx): BODY``; ``on_ready`` receives it after :meth:`build`.

        Functions of the same *shape* (equal but for their constants) share one piece of
        generated code: its constants become parameters with defaults (``_c0``, ``_c1``,
        read as fast locals), and each function is that code with its own defaults. A
        thousand campaigns that differ only in thresholds and names compile as a few
        functions, not a thousand.
        """
        key = tuple(body)
        if name is None and key in self._bodies:
            # identical conditions share one function
            self._pending.append((self._bodies[key], on_ready))
            return self._bodies[key]
        fname = name or self.fresh("_f")
        if name is None:
            self._bodies[key] = fname
        shape, values = self._shape(body)
        base = self._shapes.get(shape)
        if base is None:
            base = self._shapes[shape] = self.fresh("_shape")
            params = "".join(f", _c{i}=None" for i in range(len(values)))
            self.lines.append(f"def {base}(ctx{params}):")
            self.lines.extend("    " + line for line in shape)
        self._instances.append((fname, base, values))
        self._pending.append((fname, on_ready))
        return fname

    def _shape(self, body: list[str]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        """``body`` with its constants replaced by parameters, and the constants' values.

        >>> gen = Codegen()
        >>> gen._shape([f"return (_p.count({gen.const('Order Completed')}, _n - 86400000, _u) > 2.0)"])
        (('return (_p.count(_c0, _n - _c1, _u) > _c2)',), ('Order Completed', 86400000, 2.0))
        """
        values: list[Any] = []
        local_names: dict[str, str] = {}

        def constant(m: re.Match[str]) -> str:
            if m.group(1) is not None:
                values.append(self.consts[int(m.group(1))])
            else:
                text = m.group(2)
                values.append(float(text) if "." in text or "e" in text else int(text))
            return f"_c{len(values) - 1}"

        def local(m: re.Match[str]) -> str:
            return local_names.setdefault(m.group(0), f"_v{len(local_names)}")

        text = "\n".join(body)
        if "_v" in text:
            text = _LOCAL_VAR.sub(local, text)
        return tuple(_CONSTANT.sub(constant, text).split("\n")), tuple(values)

    def build(self, filename: str) -> None:
        """``compile()`` the queued source once and hand each function to its owner."""
        source = "\n".join(self.lines) + "\n"
        self.sources.append(source)
        code = compile(source, filename, "exec")
        namespace = self.namespace
        exec(code, namespace)  # noqa: S102 - compiler-generated source; user text only in constants
        for fname, base, values in self._instances:
            shared = namespace[base]
            fn = types.FunctionType(shared.__code__, namespace, fname, values or None)
            fn.__qualname__ = fname
            namespace[fname] = fn
        for fname, on_ready in self._pending:
            on_ready(namespace[fname])
        self.lines.clear()
        self._instances.clear()
        self._pending.clear()

    # ---- expressions
    def predicate_body(self, node: ast.Expr) -> list[str]:
        """The body of a condition function."""
        expr = self.cond(node)
        return [*_prologue(expr), "try:", f"    return {expr}", "except _ERR:", "    return False"]

    def cond(self, node: ast.Expr) -> str:
        """A Python expression that is a bool."""
        src = self.expr(node)
        if (
            isinstance(node, ast.Binary | ast.Unary | ast.Between | ast.Call)
            or (isinstance(node, ast.Path) and node.ref and node.ref[0] == "segment")
            or (isinstance(node, ast.Lit) and node.kind == "bool")
        ):
            return src
        return f"bool({src})"

    def _event(self, node: ast.Expr) -> str:
        if isinstance(node, ast.Lit):
            return str(node.value)
        assert isinstance(node, ast.Path) and node.ref is not None
        return str(node.ref[1])

    def _count(self, event: str, since: str, until: str) -> str:
        self.aggregates.add(AggregateNeed(event))
        return f"_p.count({self.const(event)}, {since}, {until})"

    def expr(self, node: ast.Expr) -> str:  # noqa: C901 - one case per node kind
        """A Python expression for ``node``."""
        if isinstance(node, ast.Lit):
            return self.literal(node)
        if isinstance(node, ast.Path):
            ref = node.ref
            kind = ref[0]
            if kind == "trait":
                parts = ref[1]
                src = f"_p.traits.get({self.const(parts[0])})"
                for part in parts[1:]:
                    src = f"_get({src}, {self.const(part)})"
                return src
            if kind == "timezone":
                return "_p.timezone"
            if kind == "prop":
                parts = ref[1]
                src = f"_prop(ctx, {self.const(parts[0])})"
                for part in parts[1:]:
                    src = f"_get({src}, {self.const(part)})"
                return src
            if kind == "segment":
                # inlined: no call per reference (cycles were rejected by the checker)
                name = ref[1]
                if name not in self._segment_src:
                    self._segment_src[name] = self.cond(self.segment_ast[name])
                src = self._segment_src[name]
                if len(src) <= INLINE_LIMIT:
                    return f"({src})"
                return f"{self.segment_funcs[name]}(ctx)"
            if kind == "channel":
                return self.const(ref[1])
            raise AssertionError(f"cannot compile {ref}")
        if isinstance(node, ast.SetLit):
            if all(
                isinstance(i, ast.Lit) or isinstance(i, ast.Path) and i.ref and i.ref[0] == "channel"
                for i in node.items
            ):
                values = frozenset(
                    i.value if isinstance(i, ast.Lit) else i.ref[1]  # type: ignore[union-attr]
                    for i in node.items
                )
                return self.const(values)
            return "frozenset((" + "".join(self.expr(i) + ", " for i in node.items) + "))"
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Between):
            return f"({self._count(self._event(node.subject), f'_n - {self.expr(node.older)}', f'_n - {self.expr(node.newer)}')} > 0)"  # noqa: E501
        if isinstance(node, ast.Unary):
            inner = self.expr(node.operand)
            if node.op == "not":
                return f"(not {inner})"
            if node.op == "-":
                return f"(-{inner})"
            return f"(_n - {inner})"
        op = node.op
        if op == "within":
            return f"({self._count(self._event(node.left), f'_n - {self.expr(node.right)}', '_u')} > 0)"
        if op == "??":
            var = self.fresh("_v")
            return f"({var} if ({var} := {self.expr(node.left)}) is not None else {self.expr(node.right)})"
        return self.binop(op, self.expr(node.left), node.right)

    def binop(self, op: str, left: str, right_node: ast.Expr) -> str:
        """``left OP right``."""
        if op == "matches":
            assert isinstance(right_node, ast.Lit)
            pattern = re.compile(fnmatch.translate(str(right_node.value)))
            return f"_match({self.const(pattern)}, {left})"
        right = self.expr(right_node)
        if op in ("in", "not in") and not isinstance(right_node, ast.SetLit):
            right = f"({right} or ())"
        return f"({left} {op} {right})"

    def literal(self, node: ast.Lit) -> str:
        """A literal's value, written as code."""
        kind, value = node.kind, node.value
        if kind in ("number", "percent", "money"):
            return repr(float(value))
        if kind == "duration":
            return repr(int(value))
        if kind == "bool":
            return "True" if value else "False"
        if kind == "now":
            return "_n"
        if kind == "timestamp":
            return repr(self.timestamp_ms(value))
        if kind == "timeofday":
            assert isinstance(value, time)
            return repr(value.hour * 60 + value.minute)
        return self.const(value)

    def timestamp_ms(self, value: datetime) -> int:
        """Milliseconds for a timestamp written in the ruleset's time zone."""
        if value.tzinfo is None:
            value = value.replace(tzinfo=self.zone)
        return int(value.astimezone(UTC).timestamp() * 1000)

    def call(self, node: ast.Call) -> str:
        """Built-in functions over the profile."""
        name, arg = node.name, node.args[0]
        if name == "has":
            return f"({self.expr(arg)} is not None)"
        if name == "consent":
            return f"(_p.consented({self.expr(arg)}) is True)"
        if name in ("last", "first"):
            event = self._event(arg)
            self.aggregates.add(AggregateNeed(event))
            return f"_p.{name}_at({self.const(event)})"
        since, until, inner = "0", "_u", arg
        if isinstance(arg, ast.Binary) and arg.op == "within":
            since, inner = f"(_n - {self.expr(arg.right)})", arg.left
        elif isinstance(arg, ast.Between):
            since, until, inner = (
                f"(_n - {self.expr(arg.older)})",
                f"(_n - {self.expr(arg.newer)})",
                arg.subject,
            )
        if name == "count":
            return self._count(self._event(inner), since, until)
        assert isinstance(inner, ast.Path) and inner.ref is not None
        _kind, event, prop = inner.ref
        self.aggregates.add(AggregateNeed(event, prop))
        return f"_p.sum({self.const(event)}, {self.const(prop)}, {since}, {until})"

    # ---- predicates
    def predicate(self, node: ast.Expr, file: str, *, segment: str | None = None) -> CompiledPredicate:
        """Queue ``node`` as a predicate; it is callable once :meth:`build` has run."""
        parts: list[ast.Expr] = []

        def flatten(n: ast.Expr) -> None:
            if isinstance(n, ast.Binary) and n.op == "and":
                flatten(n.left)
                flatten(n.right)
            else:
                parts.append(n)

        flatten(node)
        pred = CompiledPredicate(node, _unbuilt, parts, self, SourcePos(file, node.line, node.column))

        def ready(fn: Callable[..., Any]) -> None:
            pred._fn = fn

        fname = self.segment_funcs[segment] if segment is not None else None
        self.function(self.predicate_body(node), ready, name=fname)
        if segment is not None:
            self.segment_predicates[segment] = pred
        return pred

    def explainers(
        self, parts: list[ast.Expr], file: str
    ) -> list[tuple[str, Callable[[EvalContext], tuple[Any, bool]], SourcePos | None, str | None]]:
        """Generate (on first use) one function per part returning ``(value, passed)``."""
        out: list[Any] = []
        for part in parts:
            if isinstance(part, ast.Binary) and part.op in CMP_OPS:
                value = self.expr(part.left)
                test = self.binop(part.op, "_l", part.right)
                body = [f"_l = {value}", f"return _l, bool({test})"]
            else:
                body = [f"_l = {self.cond(part)}", "return _l, bool(_l)"]
            lines = [
                *_prologue("\n".join(body)),
                "try:",
                *("    " + b for b in body),
                "except _ERR as exc:",
                "    return f'error: {exc}', False",
            ]
            segment = (
                part.ref[1] if isinstance(part, ast.Path) and part.ref and part.ref[0] == "segment" else None
            )
            slot: list[Any] = [format_expr(part), None, SourcePos(file, part.line, part.column), segment]
            out.append(slot)

            def ready(fn: Callable[..., Any], slot: list[Any] = slot) -> None:
                slot[1] = fn

            self.function(lines, ready)
        self.build("<cadence explain>")
        return [tuple(s) for s in out]

    def touch_predicate(self, pred: tuple[Any, ...]) -> Callable[[Sequence[Any]], bool]:
        """A credit rule's condition over a journey's touches, compiled."""
        src = self._touch_src(pred)
        holder: list[Callable[..., bool]] = []
        fname = self.fresh("_t")
        self.lines.append(f"def {fname}(touches):")
        self.lines.append("    try:")
        self.lines.append(f"        return {src}")
        self.lines.append("    except _ERR:")
        self.lines.append("        return False")
        self._pending.append((fname, holder.append))

        def call(touches: Sequence[Any]) -> bool:
            return holder[0](touches)

        return call

    def _touch_src(self, pred: tuple[Any, ...]) -> str:
        kind = pred[0]
        if kind == "and" or kind == "or":
            return f"({self._touch_src(pred[1])} {kind} {self._touch_src(pred[2])})"
        if kind == "not":
            return f"(not {self._touch_src(pred[1])})"
        _k, quant, fname, op, value, _pos = pred
        field_ = f"(getattr(t, {self.const(fname)}, None) or '')"
        if op == "matches":
            test = f"_match({self.const(re.compile(fnmatch.translate(value)))}, {field_})"
        else:
            test = f"({field_} {op} {self.const(value)})"
        fn = "all" if quant == "every" else "any"
        return f"{fn}({test} for t in touches)"


def _prologue(src: str) -> list[str]:
    """Bind only the locals ``src`` reads: ``_p`` (profile), ``_n`` (now), ``_u`` (now + 1 ms)."""
    parts = []
    if "_p." in src:
        parts.append("_p = ctx.profile")
    if "_n" in src or "_u" in src:
        parts.append("_n = ctx.now_ms")
    if "_u" in src:
        parts.append("_u = _n + 1")
    return ["; ".join(parts)] if parts else []


def _unbuilt(_ctx: EvalContext) -> bool:
    raise RuntimeError("ruleset not built yet")


# ---- blocks to IR ------------------------------------------------------------------


def _num(node: ast.Expr) -> float:
    assert isinstance(node, ast.Lit)
    return float(node.value)


def _zone_of(node: ast.Expr | None, default: str) -> tuple[bool, str]:
    """(use the customer's zone, fallback zone) for a zone expression."""
    if node is None:
        return True, default
    if isinstance(node, ast.Lit):
        return False, str(node.value)
    if isinstance(node, ast.Path):
        return True, default
    assert isinstance(node, ast.Binary) and isinstance(node.right, ast.Lit)
    return True, str(node.right.value)


def cron_for(unit: str, at: time | None) -> str:
    """A five-field crontab for ``every UNIT at TIME``.

    >>> cron_for("weekday", time(9, 30)), cron_for("sunday", time(8, 0)), cron_for("hour", None)
    ('30 9 * * 1-5', '0 8 * * 0', '0 * * * *')
    """
    if unit == "hour":
        return "0 * * * *"
    assert at is not None
    head = f"{at.minute} {at.hour} * *"
    if unit == "day":
        return f"{head} *"
    if unit == "weekday":
        return f"{head} 1-5"
    if unit == "weekend":
        return f"{head} 0,6"
    return f"{head} {WEEKDAYS.index(unit)}"


def compile_campaign(gen: Codegen, block: ast.Campaign, file: str, default_zone: str) -> CampaignIR:  # noqa: C901
    """One campaign block to its IR (functions are callable after ``gen.build``)."""
    kw: dict[str, Any] = {}
    caps: list[Cap] = []
    template = TemplateSpec(name="")
    channels = ChannelPolicy(channels=())
    audience = None
    for clause in block.clauses:
        k, a = clause.keyword, clause.args
        if k == "audience":
            expr = a["expr"]
            if isinstance(expr, ast.Path) and expr.ref and expr.ref[0] == "segment":
                audience = gen.segment_predicates[expr.ref[1]]
            else:
                audience = gen.predicate(expr, file)
            # A segment's predicate is shared, but only ever an audience when read on its own
            # (other conditions open it up as nested parts, marked with their own clause).
            audience.stage = "audience"
        elif k == "unless":
            kw["unless"] = gen.predicate(a["expr"], file)
            kw["unless"].stage = "unless"
        elif k == "trigger":
            where = gen.predicate(a["where"], file) if a["where"] is not None else None
            if where is not None:
                where.stage = "where"
            delay = int(_num(a["after"])) if isinstance(a["after"], ast.Lit) else 0
            kw["trigger"] = Trigger(event=gen._event(a["event"]), where=where, delay_ms=delay)
        elif k == "send":
            template = _template(gen, a["template"], a["vars"])
        elif k == "sync":
            # an audience campaign: the scheduler syncs its members to the channel's audience
            kw["kind"] = "audience"
            template = _template(gen, "", a["vars"])
            channels = ChannelPolicy((a["channel"][0],))
        elif k == "channel":
            channels = ChannelPolicy(
                tuple(n for n, _p in a["channels"]), "best" if a["mode"] == "best" else "ordered"
            )
        elif k == "cap":
            caps.append(
                Cap(
                    int(_num(a["count"])),
                    int(_num(a["window"])),
                    "campaign",
                    calendar=bool(a.get("calendar")),
                )
            )
        elif k == "quiet":
            use_customer, fallback = _zone_of(a["zone"], default_zone)
            action: Literal["defer", "drop"] = "drop" if a["action"] and a["action"][0] == "drop" else "defer"
            kw["quiet"] = QuietHours(a["start"].value, a["end"].value, fallback, use_customer, action)
        elif k == "priority":
            kw["priority_"] = int(_num(a["expr"]))
        elif k == "exclusive":
            kw["exclusive"] = a["group"]
        elif k == "schedule":
            unit = a["every"][0]
            at = a["at"].value if a["at"] is not None else None
            zone = a["zone"]
            if zone is None:
                zone_name = default_zone
            elif isinstance(zone, ast.Lit):
                zone_name = str(zone.value)
            else:
                zone_name = "customer"
            text = (
                f"every {unit}"
                + (f" at {a['at'].text}" if at else "")
                + (f" in {format_expr(zone)}" if zone is not None else "")
            )
            kw["schedule"] = Schedule(cron_for(unit, at), zone_name, text)
        elif k == "split":
            kw["split"] = tuple(
                SplitArm(arm.name, _num(arm.share), arm.template, holdout=arm.name == "holdout")
                for arm in a["arms"]
            )
            kw["learn_variants"] = bool(a.get("learned"))
        elif k in ("starts", "ends"):
            kw[f"{k}_ms"] = gen.timestamp_ms(a["expr"].value)
    priority = kw.pop("priority_", 0)
    return CampaignIR(
        name=block.name,
        title=block.title or block.name,
        priority=priority,
        audience=audience,
        template=template,
        channels=channels,
        caps=tuple(caps),
        pos=SourcePos(file, block.line, block.column),
        **kw,
    )


def _template(gen: Codegen, name: str, variables: list[Any]) -> TemplateSpec:
    if not variables:
        return TemplateSpec(name=name)
    items = ", ".join(f"{gen.const(n)}: {gen.expr(e)}" for n, e, _p in variables)
    holder: list[Callable[..., dict[str, Any]]] = []
    gen.function(
        [
            *_prologue(items),
            "try:",
            f"    return {{{items}}}",
            "except _ERR:",
            "    return {}",
        ],
        holder.append,
    )

    def variables_of(ctx: EvalContext) -> dict[str, Any]:
        return holder[0](ctx)

    return TemplateSpec(name=name, variables=variables_of)


def compile_segment(gen: Codegen, block: ast.Segment, file: str) -> SegmentIR:
    """A segment block to its IR."""
    pred = gen.predicate(block.condition, file, segment=block.name)
    return SegmentIR(block.name, block.title or block.name, pred, SourcePos(file, block.line, block.column))


def compile_attribution(gen: Codegen, block: ast.Attribution, file: str) -> AttributionSpec:
    """An attribution block to its spec."""
    kw: dict[str, Any] = {}
    rules: list[ChannelRule] = []
    credits: list[CreditRule] = []
    for clause in block.clauses:
        k, a = clause.keyword, clause.args
        if k == "conversion":
            kw["conversion_event"] = gen._event(a["event"])
            if a["value"] is not None:
                kw["value_prop"] = a["value"][1]
        elif k == "window":
            kw["window_ms"] = int(_num(a["expr"]))
        elif k == "model":
            kw["model"] = a["name"]
            params: dict[str, Any] = {}
            for pname, expr, _pos in a["params"]:
                if pname == "half_life":
                    params["half_life_ms"] = int(_num(expr))
                else:
                    params[pname] = _num(expr)
            kw["params"] = params
        elif k == "channel_rule":
            rules.append(ChannelRule(a["channel"], {f: v for f, _op, v, _p in a["when"]}))
        elif k in ("credit", "weight", "exclude"):
            credit_actions: dict[str, Literal["fixed", "weight", "exclude"]] = {
                "credit": "fixed",
                "weight": "weight",
                "exclude": "exclude",
            }
            action = credit_actions[k]
            when = gen.touch_predicate(a["when"]) if a["when"] is not None else None
            value = _num(a["value"]) if a["value"] is not None else 0.0
            source = format_expr(a["value"]) if a["value"] is not None else ""
            credits.append(
                CreditRule(a["channel"], action, value, when, f"{k} {a['channel']} {source}".strip())
            )
    return AttributionSpec(
        name=block.name,
        title=block.title or block.name,
        channel_rules=tuple(rules),
        credit_rules=tuple(credits),
        pos=SourcePos(file, block.line, block.column),
        **kw,
    )


def compile_settings(blocks: list[ast.Settings], default_zone: str) -> GlobalSettings:
    """Every ``settings`` block merged."""
    caps: list[Cap] = []
    spacing = 0
    for block in blocks:
        for clause in block.clauses:
            a = clause.args
            if clause.keyword == "cap":
                on = a["on"]
                caps.append(
                    Cap(
                        int(_num(a["count"])),
                        int(_num(a["window"])),
                        "channel" if on else "customer",
                        on[0] if on else None,
                        calendar=bool(a.get("calendar")),
                    )
                )
            elif clause.keyword == "spacing":
                spacing = int(_num(a["expr"]))
    return GlobalSettings(caps=tuple(caps), min_spacing_ms=spacing, default_zone=default_zone)
