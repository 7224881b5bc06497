"""Random and mutated rule text: the only outcomes are a ruleset or diagnostics, quickly."""

from __future__ import annotations

import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cadence.channels import CHANNELS
from cadence.dsl.diagnostics import Diagnostic, render
from cadence.dsl.formatter import format_module
from cadence.dsl.loader import load_source
from cadence.dsl.parser import parse_text
from cadence.engine.campaign import EvalContext
from cadence.engine.profiles_memory import MemoryProfile, ProfileEvent

RULES = Path(__file__).resolve().parents[2] / "rules"
EXAMPLES = [p.read_text() for p in sorted(RULES.glob("*.cadence"))]
TOKENS = [
    "campaign",
    "segment",
    "event",
    "attribution",
    "settings",
    "test",
    "import",
    "audience",
    "trigger",
    "on",
    "where",
    "after",
    "unless",
    "send",
    "template",
    "with",
    "channel",
    "best",
    "of",
    "fallback",
    "cap",
    "per",
    "quiet",
    "in",
    "then",
    "defer",
    "priority",
    "exclusive",
    "schedule",
    "every",
    "at",
    "split",
    "holdout",
    "starts",
    "ends",
    "conversion",
    "value",
    "window",
    "model",
    "credit",
    "when",
    "touch",
    "given",
    "customer",
    "events",
    "expect",
    "no",
    "eligible",
    "not",
    "and",
    "or",
    "within",
    "between",
    "ago",
    "count",
    "sum",
    "has",
    "last",
    "consent",
    "now",
    "true",
    "false",
    "email",
    "sms",
    "x",
    "purchased",
    "event.value",
    "customer.tier",
    "email.opened",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ",",
    ";",
    ":",
    ".",
    "..",
    "??",
    "=",
    "==",
    ">=",
    "<",
    "+",
    "-",
    "*",
    "/",
    "3",
    "7d",
    "2h",
    "10%",
    "€50",
    "09:00",
    "2026-03-04",
    "2026-02-30",
    "25:99",
    '"x"',
    '"Europe/Berlin"',
    "# note",
    "\n",
    "\n    ",
    "'",
    "&",
    "@",
    "é",
]
PROFILE = MemoryProfile(
    1,
    traits={"tier": "gold", "age": "x"},
    timezone="Europe/Berlin",
    events=[ProfileEvent("Order Completed", 0, {"revenue": 3})],
    consent={"email": True},
)


def _exercise(text: str) -> None:
    started = time.perf_counter()
    result = load_source(text, available_channels=CHANNELS, extra={"segments.cadence": EXAMPLES[-1]})
    assert all(isinstance(d, Diagnostic) for d in result.diagnostics)
    for d in result.diagnostics:
        render(d)
        assert d.line >= 1 and d.column >= 1
    if result.ruleset is not None:
        ctx = EvalContext(profile=PROFILE, now_ms=10**12, event={"event": "x", "properties": {"value": "7"}})
        for segment in result.ruleset.segments.values():
            assert segment.condition(ctx) in (True, False)
            segment.condition.explain(ctx)
        for campaign in result.ruleset.campaigns.values():
            for pred in (campaign.audience, campaign.unless, campaign.trigger and campaign.trigger.where):
                if pred is not None:
                    assert pred(ctx) in (True, False)
            campaign.template.variables(ctx)
    module = parse_text(text, "f")
    if not module.diagnostics:
        once = format_module(module)
        assert format_module(parse_text(once, "f")) == once
        for _line, _column, comment in module.comments:
            assert comment in once  # formatting never loses a comment
    assert time.perf_counter() - started < 5


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map(" ".join))
def test_random_token_soup(text: str) -> None:
    _exercise(text)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_random_characters(text: str) -> None:
    _exercise(text)


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(EXAMPLES))
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        i = draw(st.integers(0, len(text) - 1))
        j = draw(st.integers(i, min(len(text), i + 12)))
        kind = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif kind == "replace":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[j:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_example())
def test_mutated_examples(text: str) -> None:
    _exercise(text)


def test_deep_nesting_is_a_diagnostic() -> None:
    for depth in (50, 3000):
        _exercise("segment s = " + "(" * depth + "true" + ")" * depth + "\n")
    _exercise("segment s = " + " and ".join(["true"] * 3000) + "\n")
