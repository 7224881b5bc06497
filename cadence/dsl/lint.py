"""``cadence lint``: rules that are legal but probably not what was meant.

* W502 a segment nothing uses;
* W503 a rule that can never fire (a condition that is always false, an ``unless``
  that always holds because it tests the triggering event itself, an end date in the past);
* W504 two campaigns with the same priority, the same trigger and the same audience
  (only the tie-break decides between them);
* W505 quiet hours that cover the whole day;
* W506 a cap stricter than the schedule of a campaign without an audience (every run
  targets everyone, so most runs would be capped).
"""

from __future__ import annotations

from collections.abc import Iterable

from cadence.dsl import ast
from cadence.dsl.checker import Checker, ModuleScope
from cadence.dsl.diagnostics import Diagnostic, sort_diagnostics
from cadence.dsl.formatter import format_expr
from cadence.dsl.loader import LoadResult

__all__ = ["lint"]

DAY_MS = 86_400_000
RUNS_PER_DAY = {"day": 1.0, "weekday": 5 / 7, "weekend": 2 / 7, "hour": 24.0}


def _always_false(node: ast.Expr) -> str | None:
    """Why ``node`` can never be true, or None."""
    if isinstance(node, ast.Lit) and node.kind == "bool" and node.value is False:
        return "it is 'false'"
    if isinstance(node, ast.Binary):
        if node.op == "and":
            return _always_false(node.left) or _always_false(node.right)
        if node.op == "or":
            left, right = _always_false(node.left), _always_false(node.right)
            return left if left and right else None
        if node.op == "within" and isinstance(node.right, ast.Lit) and node.right.value == 0:
            return f"'{format_expr(node)}' looks at an empty window"
        if (
            isinstance(node.left, ast.Call)
            and node.left.name == "count"
            and isinstance(node.right, ast.Lit)
            and node.right.kind == "number"
        ):
            v = node.right.value
            if (node.op == "<" and v <= 0) or (node.op == "<=" and v < 0) or (node.op == "==" and v < 0):
                return f"'{format_expr(node)}': a count is never negative"
    if isinstance(node, ast.Unary) and node.op == "not":
        inner = node.operand
        if isinstance(inner, ast.Lit) and inner.kind == "bool" and inner.value is True:
            return "it is 'not true'"
    return None


def _parts(node: ast.Expr) -> Iterable[ast.Expr]:
    if isinstance(node, ast.Binary) and node.op == "and":
        yield from _parts(node.left)
        yield from _parts(node.right)
    else:
        yield node


def _event_of(node: ast.Expr) -> str | None:
    if isinstance(node, ast.Lit) and node.kind == "string":
        return str(node.value)
    if isinstance(node, ast.Path) and node.ref and node.ref[0] == "event":
        return str(node.ref[1])
    return None


def lint(result: LoadResult, *, now_ms: int | None = None) -> list[Diagnostic]:
    """Warnings for the loaded rules (which should have no errors)."""
    checker = Checker(result.scopes, available_channels=())
    for scope in result.scopes:
        checker._current = scope.module
        _lint_scope(checker, scope, result, now_ms)
    _overlaps(checker, result.scopes)
    return sort_diagnostics(checker.diagnostics)


def _warn(
    checker: Checker, node: ast.Node, code: str, message: str, length: int, hint: str | None = None
) -> None:
    checker.at(node, code, message, length, hint, "warning")


def _lint_scope(checker: Checker, scope: ModuleScope, result: LoadResult, now_ms: int | None) -> None:  # noqa: C901
    for block in scope.module.blocks:
        if isinstance(block, ast.Segment):
            if block.name not in result.used_segments and not _used_by_tests(result, block.name):
                _warn(
                    checker,
                    block,
                    "W502",
                    f"segment '{block.name}' is never used",
                    len("segment"),
                    "use it in an audience, or remove it",
                )
            why = _always_false(block.condition)
            if why:
                _warn(
                    checker, block, "W503", f"segment '{block.name}' can never match: {why}", len("segment")
                )
        if not isinstance(block, ast.Campaign):
            continue
        clauses = {c.keyword: c for c in block.clauses}
        for key in ("audience", "where"):
            clause = clauses.get("audience") if key == "audience" else clauses.get("trigger")
            if clause is None:
                continue
            expr = clause.args["expr"] if key == "audience" else clause.args.get("where")
            why = _always_false(expr) if expr is not None else None
            if why:
                _warn(
                    checker,
                    clause,
                    "W503",
                    f"campaign '{block.name}' can never fire: {why}",
                    len(clause.keyword),
                )
        trigger, unless = clauses.get("trigger"), clauses.get("unless")
        if trigger is not None and unless is not None:
            event = _event_of(trigger.args["event"])
            after = trigger.args["after"]
            delay = after.value if isinstance(after, ast.Lit) else 0
            for part in _parts(unless.args["expr"]):
                if (
                    isinstance(part, ast.Binary)
                    and part.op == "within"
                    and _event_of(part.left) == event
                    and isinstance(part.right, ast.Lit)
                    and part.right.value > delay
                ):
                    _warn(
                        checker,
                        unless,
                        "W503",
                        f"campaign '{block.name}' can never fire: '{format_expr(part)}' always holds, "
                        "because the triggering event itself is within that window",
                        len("unless"),
                        "make the unless window shorter than the trigger delay, or test another event",
                    )
        ends = clauses.get("ends")
        if ends is not None and now_ms is not None and isinstance(ends.args["expr"], ast.Lit):
            from cadence.dsl.compiler import Codegen

            end_ms = Codegen().timestamp_ms(ends.args["expr"].value)
            if end_ms <= now_ms:
                _warn(checker, ends, "W503", f"campaign '{block.name}' has ended", len("ends"))
        quiet = clauses.get("quiet")
        if quiet is not None:
            start, end = quiet.args["start"], quiet.args["end"]
            if isinstance(start, ast.Lit) and isinstance(end, ast.Lit) and start.value == end.value:
                _warn(
                    checker,
                    quiet,
                    "W505",
                    f"quiet hours {start.text}..{end.text} cover the whole day: "
                    f"campaign '{block.name}' can never send",
                    len("quiet"),
                )
        schedule = clauses.get("schedule")
        # with an audience, membership changes from run to run and the cap is fatigue control;
        # without one, every run targets everyone and a stricter cap silently thins the schedule
        if schedule is not None and "audience" not in clauses:
            unit = schedule.args["every"][0]
            per_day = RUNS_PER_DAY.get(unit, 1 / 7)
            for cap in (c for c in block.clauses if c.keyword == "cap"):
                count, window = cap.args["count"], cap.args["window"]
                if isinstance(count, ast.Lit) and isinstance(window, ast.Lit) and window.kind == "duration":
                    runs = per_day * window.value / DAY_MS
                    if runs > count.value + 1e-9:
                        _warn(
                            checker,
                            cap,
                            "W506",
                            f"the schedule runs about {runs:g} times per {window.text} but the cap allows "
                            f"{count.text}: most runs will be capped",
                            len("cap"),
                            "loosen the cap or schedule less often",
                        )


def _used_by_tests(result: LoadResult, name: str) -> bool:
    return any(
        step.target == name
        for scope in result.scopes
        for block in scope.module.blocks
        if isinstance(block, ast.Test)
        for step in block.steps
    )


def _overlaps(checker: Checker, scopes: list[ModuleScope]) -> None:
    seen: dict[tuple[int, str | None, str], tuple[str, str, int]] = {}
    for scope in scopes:
        checker._current = scope.module
        for block in scope.module.blocks:
            if not isinstance(block, ast.Campaign):
                continue
            clauses = {c.keyword: c for c in block.clauses}
            priority = clauses.get("priority")
            prio = (
                int(priority.args["expr"].value)
                if priority and isinstance(priority.args["expr"], ast.Lit)
                else 0
            )
            audience = clauses.get("audience")
            text = format_expr(audience.args["expr"]) if audience else "everyone"
            trigger = clauses.get("trigger")
            event = _event_of(trigger.args["event"]) if trigger else None
            key = (prio, event, text)
            if key in seen:
                other, file, line = seen[key]
                _warn(
                    checker,
                    block,
                    "W504",
                    f"campaigns '{other}' ({file}:{line}) and '{block.name}' have the same priority {prio}, "
                    f"trigger and audience: only the tie-break decides",
                    len("campaign"),
                    "give one a different priority, or narrow one audience",
                )
            else:
                seen[key] = (block.name, scope.module.file, block.line)
