"""``cadence test``: run the ``test`` blocks of rule files, with time travel, and report coverage.

Each test builds an in-memory customer from ``given customer`` and ``given events``,
then walks its ``at TIME ... expect ...`` steps in order. At each step the customer
is seen as of that moment (later events are invisible), an ``on EVENT`` step adds
a triggering event that stays in the history, and sends decided by earlier steps
count towards caps. Relative times (``-45d``) are relative to the first absolute
``at`` of the test; absolute times without a zone are in the ruleset's zone.

``expect send`` and ``expect no send`` run the decision pipeline
(``cadence.engine.decide.decide``); when it is not installed those steps are
reported as skipped. ``eligible``/``not eligible`` and ``in``/``not in`` only need
the compiled conditions.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from cadence.dsl import ast
from cadence.dsl.explain import eligibility, find_decide
from cadence.dsl.loader import LoadResult
from cadence.dsl.parser import _timestamp
from cadence.engine.campaign import CompiledRuleset, EvalContext
from cadence.engine.profiles_memory import MemoryProfile, ProfileEvent
from cadence.engine.slots import zone_named

__all__ = ["Coverage", "StepResult", "TestReport", "run_tests"]

DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class StepResult:
    """One expectation's outcome."""

    file: str
    test: str
    line: int
    expectation: str
    status: str  # passed, failed, skipped
    message: str = ""


@dataclass
class Coverage:
    """How the tests exercised one rule: times it held (fired) and did not."""

    kind: str  # campaign or segment
    file: str
    fired: int = 0
    not_fired: int = 0
    expected: int = 0  # expectations naming it

    @property
    def covered(self) -> bool:
        """Named by an expectation, or seen both firing and not firing."""
        return self.expected > 0 or (self.fired > 0 and self.not_fired > 0)


@dataclass
class TestReport:
    """Every step result and the per-rule coverage."""

    results: list[StepResult] = field(default_factory=list)
    coverage: dict[str, Coverage] = field(default_factory=dict)

    @property
    def failed(self) -> list[StepResult]:
        """Failed steps."""
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """No failure."""
        return not self.failed

    def coverage_percent(self) -> float:
        """Share of rules covered, in percent."""
        if not self.coverage:
            return 100.0
        return 100.0 * sum(1 for c in self.coverage.values() if c.covered) / len(self.coverage)


def _value(expr: ast.Expr, gen_zone: ZoneInfo) -> Any:
    if isinstance(expr, ast.Lit):
        if expr.kind == "timestamp" and isinstance(expr.value, datetime):
            value = expr.value if expr.value.tzinfo else expr.value.replace(tzinfo=gen_zone)
            return int(value.timestamp() * 1000)
        if expr.kind == "number" and float(expr.value).is_integer():
            return int(expr.value)
        return expr.value
    if isinstance(expr, ast.SetLit):
        return [_value(i, gen_zone) for i in expr.items]
    if isinstance(expr, ast.Unary) and expr.op == "-":
        return -_value(expr.operand, gen_zone)
    if isinstance(expr, ast.Path):
        return ".".join(expr.parts)
    return None


def _event_name(node: ast.Path | ast.Lit) -> str:
    if isinstance(node, ast.Lit):
        return str(node.value)
    return str(node.ref[1]) if node.ref else ".".join(node.parts)


def _moment_ms(moment: ast.Moment, base_ms: int, zone: ZoneInfo) -> int:
    if moment.absolute is None:
        return base_ms + moment.offset_ms
    parsed = _timestamp(moment.absolute)
    assert parsed is not None
    local_zone = ZoneInfo(moment.zone) if moment.zone else zone
    return int(parsed.replace(tzinfo=local_zone).timestamp() * 1000)


def run_tests(
    result: LoadResult,
    *,
    available_channels: Collection[str],
    decide: Callable[..., Any] | None = None,
    only: Collection[str] | None = None,
) -> TestReport:
    """Run every test block of the loaded files (``only``: files to run, by name)."""
    ruleset = result.raise_for_errors()
    report = TestReport()
    for scope in result.scopes:
        for block in scope.module.blocks:
            if isinstance(block, ast.Campaign):
                report.coverage[block.name] = Coverage("campaign", scope.module.file)
            elif isinstance(block, ast.Segment):
                report.coverage[block.name] = Coverage("segment", scope.module.file)
    decide = decide or find_decide()
    zone = ZoneInfo(ruleset.settings.default_zone)
    for scope in result.scopes:
        if only is not None and scope.module.file not in only:
            continue
        for block in scope.module.blocks:
            if isinstance(block, ast.Test):
                report.results.extend(
                    _run_one(block, scope.module.file, ruleset, zone, available_channels, decide, report)
                )
    return report


def _run_one(  # noqa: C901 - one loop over the steps
    test: ast.Test,
    file: str,
    ruleset: CompiledRuleset,
    zone: ZoneInfo,
    available_channels: Collection[str],
    decide: Callable[..., Any] | None,
    report: TestReport,
) -> list[StepResult]:
    firsts = [s.at for s in test.steps if s.at.absolute is not None]
    base_ms = _moment_ms(firsts[0], 0, zone) if firsts else int(DEFAULT_START.timestamp() * 1000)
    traits: dict[str, Any] = {}
    timezone: str | None = None
    consent: dict[str, bool] = {}
    for name, expr in test.customer:
        if name == "timezone":
            timezone = str(_value(expr, zone))
        elif name == "consent":
            consent = {str(ch): True for ch in _value(expr, zone) or []}
        else:
            traits[name] = _value(expr, zone)
    events = [
        ProfileEvent(
            _event_name(f.event), _moment_ms(f.at, base_ms, zone), {n: _value(e, zone) for n, e in f.props}
        )
        for f in test.events
    ]
    customer = MemoryProfile(
        _customer_number(traits.get("id")), traits=traits, timezone=timezone, events=events, consent=consent
    )
    history: list[Any] = []
    out: list[StepResult] = []
    for step in test.steps:
        now = _moment_ms(step.at, base_ms, zone)
        event_payload = None
        if step.trigger is not None:
            name = _event_name(step.trigger.event)
            props = {n: _value(e, zone) for n, e in step.trigger.props}
            customer = customer.with_event(ProfileEvent(name, now, props))
            event_payload = {"event": name, "ts_ms": now, "properties": props}
        profile = customer.at(now)
        ctx = EvalContext(profile=profile, now_ms=now, event=event_payload)
        # coverage: every campaign and segment, at every step
        for cname, campaign in ruleset.campaigns.items():
            fired = eligibility(campaign, ctx, detail=False).eligible
            cov = report.coverage[cname]
            if fired:
                cov.fired += 1
            else:
                cov.not_fired += 1
        for sname, segment in ruleset.segments.items():
            cov = report.coverage[sname]
            if segment.condition(ctx):
                cov.fired += 1
            else:
                cov.not_fired += 1
        text = _describe(step)
        for target in (step.target, step.reason_campaign):
            if target in report.coverage:
                report.coverage[target].expected += 1
        res = StepResult(file, test.name, step.line, text, "passed")
        if step.expect in ("member", "not_member"):
            segment = ruleset.segments[str(step.target)]
            held = segment.condition(ctx)
            if held != (step.expect == "member"):
                parts = "; ".join(
                    f"{c.text} = {c.value!r}" for c in segment.condition.explain(ctx) if not c.passed
                )
                res.status, res.message = (
                    "failed",
                    f"customer {'is not' if not held else 'is'} in {step.target}"
                    + (f" ({parts})" if parts else ""),
                )
        elif step.expect in ("eligible", "not_eligible"):
            verdict = eligibility(ruleset.campaigns[str(step.target)], ctx)
            if verdict.eligible != (step.expect == "eligible"):
                failed = "; ".join(
                    f"{c.stage}: {c.text} = {c.value!r}" for c in verdict.checks if not c.passed
                )
                res.status = "failed"
                res.message = (
                    "eligible"
                    if verdict.eligible
                    else f"not eligible ({', '.join(verdict.reasons)}: {failed})"
                )
        elif decide is None:
            res.status, res.message = "skipped", "needs the decision pipeline (cadence.engine.decide)"
        else:
            decision = decide(
                ruleset=ruleset,
                profile=profile,
                now_ms=now,
                history=tuple(history),
                available_channels=available_channels,
                event=event_payload,
                seed=0,
            )
            # "on time": now, or the trigger's event time plus its delay; later means deferred
            on_time = now
            if decision.campaign in ruleset.campaigns and event_payload is not None:
                trig = ruleset.campaigns[decision.campaign].trigger
                on_time = now + (trig.delay_ms if trig is not None else 0)
            sent_now = decision.action == "send" and (
                decision.send_at_ms is None or decision.send_at_ms <= on_time
            )
            if step.expect == "send":
                # ``at HH:MM``: the send's time, the first such local time (in the customer's zone) from
                # now on, deferred or not; without it the send must go now (or at the trigger's delay)
                local_zone = zone_named(profile.timezone, ruleset.settings.default_zone)
                due = _next_local(now, step.send_time, local_zone) if step.send_time else None
                when_ok = sent_now if due is None else decision.send_at_ms == due
                if not (
                    decision.action == "send"
                    and when_ok
                    and decision.campaign == step.target
                    and (step.channel is None or decision.channel == step.channel)
                ):
                    res.status, res.message = "failed", _decision_text(decision, on_time, step, local_zone)
            else:
                deferred = decision.action == "send" and not sent_now
                if sent_now:
                    res.status, res.message = "failed", _decision_text(decision, on_time, step)
                elif step.reason is not None:
                    by_reason = decision.suppressed(step.reason_campaign, step.reason) or (
                        step.reason == "quiet" and deferred and decision.campaign == step.reason_campaign
                    )
                    if not by_reason:
                        res.status = "failed"
                        res.message = (
                            f"{step.reason_campaign} was not held back by {step.reason}: "
                            + _decision_text(decision, now, step)
                        )
            if decision.action == "send" and decision.campaign:
                from cadence.engine.decision import PastSend

                exclusive = ruleset.campaigns[decision.campaign].exclusive
                history.append(
                    PastSend(decision.send_at_ms or now, decision.campaign, decision.channel or "", exclusive)
                )
        out.append(res)
    return out


def _customer_number(label: Any) -> int:
    """The numeric customer id a test customer gets: its ``id`` if numeric, else a stable hash of it.

    Splits and holdouts hash this number, so a test's customer always lands in the same arm.

    >>> _customer_number("42"), _customer_number("c1") == _customer_number("c1"), _customer_number(None)
    (42, True, 1)
    """
    if label is None:
        return 1
    text = str(label)
    if text.isdigit():
        return int(text)
    return zlib.crc32(text.encode()) % 1_000_000_000 + 1


def _describe(step: ast.Step) -> str:
    from cadence.dsl.formatter import _expectation, _moment

    return f"at {_moment(step.at)} expect {_expectation(step)}"


def _next_local(now_ms: int, hhmm: str, zone: ZoneInfo) -> int:
    """The first instant at or after ``now_ms`` whose local time in ``zone`` is ``hhmm`` (a local time
    a DST change skips is taken as the time the clocks show after it).

    >>> from zoneinfo import ZoneInfo
    >>> berlin = ZoneInfo("Europe/Berlin")
    >>> at = lambda ms: datetime.fromtimestamp(ms / 1000, tz=berlin).isoformat()
    >>> at(_next_local(int(datetime(2026, 3, 29, 1, 30, tzinfo=berlin).timestamp() * 1000), "08:00", berlin))
    '2026-03-29T08:00:00+02:00'
    >>> at(_next_local(int(datetime(2026, 3, 28, 22, 0, tzinfo=berlin).timestamp() * 1000), "02:30", berlin))
    '2026-03-29T03:30:00+02:00'
    >>> at(_next_local(int(datetime(2026, 3, 5, 9, 0, tzinfo=berlin).timestamp() * 1000), "09:00", berlin))
    '2026-03-05T09:00:00+01:00'
    """
    hours, minutes = (int(x) for x in hhmm.split(":"))
    local = datetime.fromtimestamp(now_ms / 1000, tz=zone)
    for days in range(3):
        day = (local + timedelta(days=days)).date()
        wall = datetime(day.year, day.month, day.day, hours % 24, minutes, tzinfo=zone)
        # A wall time in a DST gap does not exist: read it with the offset before the gap, then normalise.
        ms = int(wall.astimezone(UTC).timestamp() * 1000)
        if ms >= now_ms:
            return ms
    raise AssertionError("unreachable: a local time of day recurs within two days")


def _decision_text(decision: Any, now: int, step: ast.Step, zone: ZoneInfo | None = None) -> str:
    if decision.action == "send":
        when = (
            "now"
            if not decision.send_at_ms or decision.send_at_ms <= now
            else (datetime.fromtimestamp(decision.send_at_ms / 1000, tz=zone or UTC).isoformat())
        )
        text = f"decided: send {decision.campaign} via {decision.channel} {when}"
    else:
        text = "decided: no send"
    named = {step.target, step.reason_campaign}
    reasons = "; ".join(
        dict.fromkeys(
            f"{s.campaign}: {s.reason} ({s.detail})" for s in decision.suppressions if s.campaign in named
        )
    )
    return text + (f"; suppressed: {reasons}" if reasons else "")
