"""Parser, checker and compiler behaviour: what rules mean when they run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cadence.dsl.compiler import CompiledPredicate
from cadence.dsl.loader import LoadResult, RulesetHolder, load_rules, load_source
from cadence.dsl.parser import grammar, parse_text
from cadence.engine.campaign import EvalContext
from cadence.engine.profiles_memory import MemoryProfile, ProfileEvent

DAY = 86_400_000
NOW = 1_780_000_000_000
Load = Callable[..., LoadResult]

HEADER = 'event purchased = "Order Completed"\nevent viewed = "Product Viewed"\n'


def ctx(
    events: list[tuple[str, int, dict[str, object]]] = (),
    traits: dict[str, object] | None = None,  # type: ignore[assignment]
    event: dict[str, object] | None = None,
    consent: dict[str, bool] | None = None,
) -> EvalContext:
    profile = MemoryProfile(
        7, traits=traits or {}, events=[ProfileEvent(n, NOW + t, p) for n, t, p in events], consent=consent
    )
    return EvalContext(profile=profile, now_ms=NOW, event=event)


def segment(load: Load, condition: str) -> CompiledPredicate:
    result = load(HEADER + f"segment s = {condition}\n")
    assert result.ok, [str(d) for d in result.diagnostics]
    pred = result.ruleset.segments["s"].condition
    assert isinstance(pred, CompiledPredicate)
    return pred


def test_grammar_is_built_once() -> None:
    assert grammar() is grammar()


def test_one_syntax_error_per_broken_block_and_good_blocks_survive() -> None:
    module = parse_text("segment a = (\nsegment b = true\ncampaign c {\n  sendd\n}\nsegment d = false\n", "f")
    assert [d.line for d in module.diagnostics] == [1, 4]
    assert [b.name for b in module.blocks] == ["b", "c", "d"]  # c parsed without its broken clause
    assert set(module.broken) == {"a", "c"}


def test_several_errors_in_one_block_each_reported_once(load: Load) -> None:
    text = 'campaign x {\n    audiance foo\n    channel emial\n    sendd template "x"\n    cap 2 per 7\n}\n'
    result = load(text)
    assert [(d.code, d.line, d.hint) for d in result.errors] == [
        ("E101", 2, "did you mean 'audience'?"),
        ("E202", 3, "did you mean 'email'?"),
        ("E101", 4, "did you mean 'send'?"),
        ("E302", 5, "write a duration such as 7d, 2h or 30m"),
    ]


def test_uses_of_a_broken_block_are_not_reported_again(load: Load) -> None:
    result = load('segment a = (\ncampaign c {\n  audience a\n  send template "t"\n  channel email\n}\n')
    assert [d.code for d in result.errors] == ["E102"]


@pytest.mark.parametrize(
    ("condition", "events", "expected"),
    [
        ("purchased within 30d", [("Order Completed", -10 * DAY, {})], True),
        ("purchased within 30d", [("Order Completed", -40 * DAY, {})], False),
        ("not purchased within 30d", [("Order Completed", -40 * DAY, {})], True),
        (
            "count(purchased within 7d) >= 2",
            [("Order Completed", -1 * DAY, {}), ("Order Completed", -2 * DAY, {})],
            True,
        ),
        ("count(purchased) > 2", [("Order Completed", -100 * DAY, {})], False),
        ("purchased between 90d and 30d ago", [("Order Completed", -45 * DAY, {})], True),
        ("purchased between 90d and 30d ago", [("Order Completed", -10 * DAY, {})], False),
        ("count(purchased between 90d and 30d ago) == 1", [("Order Completed", -45 * DAY, {})], True),
        (
            "sum(purchased.revenue within 30d) > 100",
            [("Order Completed", -1 * DAY, {"revenue": 60}), ("Order Completed", -2 * DAY, {"revenue": 50})],
            True,
        ),
        (
            "sum(purchased.revenue within 30d) > 100",
            [("Order Completed", -1 * DAY, {"revenue": 60}), ("Order Completed", -50 * DAY, {"revenue": 50})],
            False,
        ),
        ("(last(purchased) ?? now) < 30d ago", [("Order Completed", -40 * DAY, {})], True),
        ("(last(purchased) ?? now) < 30d ago", [], False),
        ("has(last(purchased)) and last(purchased) > 7d ago", [("Order Completed", -1 * DAY, {})], True),
        ('"Product Viewed" within 1d', [("Product Viewed", -60_000, {})], True),
        ("email.opened within 7d", [("Email Opened", -DAY, {})], True),
        ("sms.clicked within 7d", [("Message Clicked", -DAY, {"channel": "sms"})], True),
        ("sms.clicked within 7d", [("Message Clicked", -DAY, {"channel": "email"})], False),
        ("now - 2d > 3d ago", [], True),
        ("2 * 3 + 1 == 7 and 10% * 200 == 20", [], True),
    ],
)
def test_conditions_over_the_event_history(
    load: Load, condition: str, events: list[tuple[str, int, dict[str, object]]], expected: bool
) -> None:
    assert segment(load, condition)(ctx(events)) is expected


@pytest.mark.parametrize(
    ("condition", "traits", "expected"),
    [
        ('customer.tier ?? "" == "gold"', {"tier": "gold"}, True),
        ('customer.tier ?? "" == "gold"', {}, False),
        ('customer.tier ?? "none" in ["gold", "silver"]', {"tier": "silver"}, True),
        ('customer.tier ?? "none" not in ["gold", "silver"]', {}, True),
        ("has(customer.age) and customer.age >= 18", {"age": 30}, True),
        ("has(customer.age) and customer.age >= 18", {}, False),
        ('customer.address.city ?? "" == "Berlin"', {"address": {"city": "Berlin"}}, True),
        ('customer.address.city ?? "" == "Berlin"', {"address": "nowhere"}, False),
        ('customer.email ?? "" matches "*@example.com"', {"email": "a@example.com"}, True),
        ("customer.age ?? 0 > 18", {"age": "not a number"}, False),  # bad data: false, never an exception
    ],
)
def test_conditions_over_traits(
    load: Load, condition: str, traits: dict[str, object], expected: bool
) -> None:
    assert segment(load, condition)(ctx(traits=traits)) is expected


def test_consent_and_channels(load: Load) -> None:
    pred = segment(load, "consent(email) and not consent(sms)")
    assert pred(ctx(consent={"email": True, "sms": False})) is True
    assert pred(ctx(consent={"email": True, "sms": True})) is False
    assert pred(ctx(consent={"all": False})) is False


def test_has_narrows_only_on_the_right_of_and(load: Load) -> None:
    result = load(HEADER + "segment s = customer.age >= 18 and has(customer.age)\n")
    assert [(d.code, d.column) for d in result.errors] == [("E303", 13)]


def test_a_repeated_guard_is_redundant_not_an_error(load: Load) -> None:
    guarded = "has(last(purchased)) and last(purchased) > 1d ago"
    pred = segment(load, f"({guarded}) and ({guarded})")
    assert pred(ctx([("Order Completed", -2 * 3600_000, {})])) is True
    assert pred(ctx([("Order Completed", -2 * DAY, {})])) is False
    assert pred(ctx()) is False
    result = load(HEADER + "segment s = has(customer.age) and has(customer.age)\n")
    assert result.ok, [str(d) for d in result.diagnostics]


def test_explain_gives_each_part_its_actual_value(load: Load) -> None:
    result = load(
        HEADER + "segment buyers = count(purchased) > 0\n"
        'segment s = buyers and count(viewed within 7d) >= 3 and customer.tier ?? "" == "gold"\n'
    )
    pred = result.ruleset.segments["s"].condition
    parts = pred.explain(
        ctx([("Order Completed", -DAY, {}), ("Product Viewed", -DAY, {})], traits={"tier": "x"})
    )
    assert [(p.text, p.value, p.passed) for p in parts] == [
        ("buyers", True, True),
        ("buyers > count(purchased) > 0", 1, True),
        ("count(viewed within 7d) >= 3", 1, False),
        ('customer.tier ?? "" == "gold"', "x", False),
    ]
    assert (parts[2].pos.line, parts[2].pos.column) == (4, 24)


def test_no_user_text_reaches_the_generated_source(load: Load) -> None:
    evil = 'x"); __import__("os").system("echo pwned"); ("'
    quoted = evil.replace('"', '\\"')
    text = (
        f'event weird = "{quoted}"\n'
        f'segment s = weird within 1d and customer.tier ?? "{quoted}" == "a"\n'
        f'campaign c {{\n  audience s\n  send template "t" with {{ note: "{quoted}" }}\n'
        "  channel email\n}\n"
    )
    result = load(text)
    assert result.ok, [str(d) for d in result.diagnostics]
    pred = result.ruleset.segments["s"].condition
    source = "\n".join(pred._gen.sources)
    assert "pwned" not in source and "__import__" not in source and "tier" not in source
    assert evil in pred._gen.consts
    ctx_ = ctx([(evil, -1000, {})], traits={"tier": evil})
    assert pred(ctx_) is False
    assert result.ruleset.campaigns["c"].template.variables(ctx_) == {"note": evil}


def test_ruleset_ir_from_a_campaign(load: Load) -> None:
    result = load(
        HEADER
        + """
settings {
    timezone "Europe/Berlin"
    cap 3 per 7d on email
    cap 5 per 7d
    spacing 4h
}
campaign cart "Cart" {
    trigger   on "Cart Abandoned" where event.value ?? €0 >= €50 after 2h
    unless    purchased within 1h
    send      template "cart" with { total: event.value ?? €0 }
    channel   sms, fallback email
    cap       1 per 1d
    quiet     21:00..08:00 in customer.timezone ?? "UTC" then drop
    priority  8
    exclusive "touch"
    split     holdout 10%, a 90% template "cart_b"
    starts    2026-03-01
    ends      2026-04-01 12:00
    schedule  every weekday at 09:30 in customer.timezone
}
"""
    )
    assert result.ok, [str(d) for d in result.diagnostics]
    rs = result.ruleset
    c = rs.campaigns["cart"]
    assert c.trigger.event == "Cart Abandoned" and c.trigger.delay_ms == 2 * 3_600_000
    assert c.channels.channels == ("sms", "email") and c.channels.mode == "ordered"
    assert c.caps[0].count == 1 and c.caps[0].window_ms == DAY and c.caps[0].scope == "campaign"
    assert c.quiet.action == "drop" and c.quiet.use_customer_zone and c.quiet.fallback_zone == "UTC"
    assert (c.priority, c.exclusive) == (8, "touch")
    assert [(a.name, a.share, a.template, a.holdout) for a in c.split] == [
        ("holdout", 0.1, None, True),
        ("a", 0.9, "cart_b", False),
    ]
    assert c.schedule.cron == "30 9 * * 1-5" and c.schedule.zone == "customer"
    assert c.starts_ms == 1772319600000  # 2026-03-01 00:00 Europe/Berlin
    assert c.ends_ms == 1775037600000  # 2026-04-01 12:00 Europe/Berlin (summer time)
    assert rs.settings.default_zone == "Europe/Berlin" and rs.settings.min_spacing_ms == 4 * 3_600_000
    assert [(cap.scope, cap.channel, cap.count) for cap in rs.settings.caps] == [
        ("channel", "email", 3),
        ("customer", None, 5),
    ]
    assert {(a.event, a.prop) for a in rs.aggregates} == {("Order Completed", None)}
    ev = {"event": "Cart Abandoned", "properties": {"value": 80}}
    assert c.trigger.where(ctx(event=ev)) is True
    assert c.template.variables(ctx(event=ev)) == {"total": 80}
    with pytest.raises(AttributeError):
        c.priority = 1  # type: ignore[misc]


def test_a_learned_split_lets_the_learner_choose_the_variant(load: Load) -> None:
    """`split learned ...` is how a rule asks the learners to pick the arm's template per customer."""
    from cadence.engine.decide import decide, stable_share
    from cadence.engine.learners import DecisionLearner

    text = """
campaign offer "Offer" {
    send      template "offer"
    channel   best of [email, push]
    split     %s holdout 10%%, a 45%% template "t_a", b 45%% template "t_b"
}
"""
    learned, hashed = load(text % "learned"), load(text % "")
    assert learned.ok and hashed.ok, [str(d) for d in (*learned.diagnostics, *hashed.diagnostics)]
    assert learned.ruleset.campaigns["offer"].learn_variants
    assert not hashed.ruleset.campaigns["offer"].learn_variants
    assert [(a.name, a.share, a.holdout) for a in learned.ruleset.campaigns["offer"].split] == [
        ("holdout", 0.1, True),
        ("a", 0.45, False),
        ("b", 0.45, False),
    ]
    customer = next(i for i in range(100) if stable_share(i, "offer") >= 0.1)  # not in the holdout

    def arms(result: LoadResult) -> set[str | None]:
        d = decide(
            ruleset=result.ruleset,
            profile=MemoryProfile(customer_id=customer),
            now_ms=1_780_000_000_000,
            history=[],
            available_channels=frozenset({"email", "push"}),
            scorer=DecisionLearner(),
        )
        assert d.action == "send" and d.template in {"t_a", "t_b"}
        return {c.arm for c in d.candidates}

    assert arms(learned) == {"a", "b"}  # each variant valued
    assert len(arms(hashed)) == 1  # the customer's stable arm only


def test_attribution_spec(load: Load) -> None:
    from cadence.engine.attribution.spec import Touch

    result = load(
        HEADER
        + """
attribution fair "Fair" {
    conversion  purchased value event.revenue
    window      30d
    model       time_decay(half_life: 7d)
    channel     paid_search when medium = "cpc", source matches "google*"
    credit      paid_search 0 when every touch.campaign matches "brand*"
    weight      email 0.5 when any touch.channel == "email" and not any touch.source == "x"
    exclude     direct
}
"""
    )
    assert result.ok, [str(d) for d in result.diagnostics]
    spec = result.ruleset.attribution["fair"]
    assert (spec.conversion_event, spec.value_prop, spec.window_ms, spec.model) == (
        "Order Completed",
        "revenue",
        30 * DAY,
        "time_decay",
    )
    assert spec.params == {"half_life_ms": 7 * DAY}
    assert spec.channel_rules[0].when == {"medium": "cpc", "source": "google*"}
    credit, weight, exclude = spec.credit_rules
    brand = [Touch(0, "paid_search", campaign="brand_de"), Touch(1, "paid_search", campaign="brand_at")]
    mixed = [*brand, Touch(2, "paid_search", campaign="generic")]
    assert credit.when(brand) is True and credit.when(mixed) is False
    assert (weight.action, weight.value) == ("weight", 0.5)
    assert weight.when([Touch(0, "email")]) is True and weight.when([Touch(0, "email", source="x")]) is False
    assert exclude.action == "exclude" and exclude.when is None


def test_imports_aliases_and_cycles(load: Load) -> None:
    seg = 'event purchased = "Order Completed"\nsegment buyers = count(purchased) > 0\n'
    main = (
        'import "seg.cadence" as s\nsegment again = s.buyers and s.purchased within 9d\n'
        "segment loop1 = loop2\nsegment loop2 = loop1\n"
    )
    result = load_source(main, file="main.cadence", extra={"seg.cadence": seg})
    assert [(d.code, d.line) for d in result.errors] == [("E208", 4)]
    bad = load_source(
        'import "sge.cadence" as s\nsegment x = s.buyer\n', file="m.cadence", extra={"seg.cadence": seg}
    )
    assert [d.code for d in bad.errors] == ["E205"]
    assert "seg.cadence" in (bad.errors[0].hint or "")
    typo = load_source(
        'import "seg.cadence" as s\nsegment x = s.buyer\n', file="m.cadence", extra={"seg.cadence": seg}
    )
    assert [(d.code, d.hint) for d in typo.errors] == [("E201", "did you mean 'buyers'?")]


def test_channels_must_be_installed(load: Load) -> None:
    text = 'campaign c {\n  send template "t"\n  channel facebook\n}\n'
    result = load(text, available_channels=("email", "sms"))
    assert [(d.code, d.message) for d in result.errors] == [
        ("E202", "channel 'facebook' is not offered by any installed connector")
    ]
    assert load(text).ok


def test_unseen_event_names_are_warned_about(load: Load) -> None:
    result = load(
        'event purchased = "Order Complete"\nsegment s = purchased within 1d or "Signed Up" within 1d\n',
        known_events={"Order Completed", "Signed Up"},
    )
    assert result.ok
    assert [(d.code, d.line, d.hint) for d in result.diagnostics] == [
        ("W501", 1, "did you mean 'Order Completed'?")
    ]


def test_content_hash_and_atomic_reload(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.cadence").write_text("segment a = true\n")
    holder = RulesetHolder([rules])
    first = holder.reload()
    assert first.ok and holder.current is first.ruleset
    same = holder.reload()
    assert holder.current is first.ruleset and same.hash == first.hash
    (rules / "a.cadence").write_text("segment a = false\n")
    second = holder.reload()
    assert second.hash != first.hash and holder.current is second.ruleset
    (rules / "a.cadence").write_text("segment a = \n")
    broken = holder.reload()
    assert not broken.ok and holder.current is second.ruleset
    assert load_rules([rules]).hash == broken.hash


def test_calendar_caps_count_local_days_and_need_whole_days(load: Load) -> None:
    from cadence.dsl.formatter import format_text

    text = (
        HEADER
        + """settings {
    cap 1 per 1d calendar
    cap 2 per 7d on sms calendar
    cap 5 per 7d
}
campaign daily "Daily" {
    send      template "t"
    channel   email
    cap       1 per 2d calendar
}
"""
    )
    result = load(text)
    assert result.ok, [str(d) for d in result.diagnostics]
    caps = [
        (c.scope, c.channel, c.count, c.window_ms // DAY, c.calendar) for c in result.ruleset.settings.caps
    ]
    assert caps == [
        ("customer", None, 1, 1, True),
        ("channel", "sms", 2, 7, True),
        ("customer", None, 5, 7, False),
    ]
    campaign_cap = result.ruleset.campaigns["daily"].caps[0]
    assert (campaign_cap.window_ms // DAY, campaign_cap.calendar) == (2, True)
    # the formatter keeps the word, so formatting never changes what a cap means
    formatted = format_text(text)
    assert "cap       2 per 7d on sms calendar" in formatted and "cap       1 per 2d calendar" in formatted
    assert load(formatted).ruleset.settings.caps == result.ruleset.settings.caps
    # 'calendar' before 'on' reads the same (it was a parse error, "unexpected 'on'", with no hint)
    swapped = load(text.replace("cap 2 per 7d on sms calendar", "cap 2 per 7d calendar on sms"))
    assert swapped.ok and swapped.ruleset.settings.caps == result.ruleset.settings.caps
    assert "cap       2 per 7d on sms calendar" in format_text(
        text.replace("on sms calendar", "calendar on sms")
    )

    bad = load(HEADER + "settings {\n    cap 1 per 36h calendar\n}\n")
    assert not bad.ok
    (diag,) = bad.diagnostics
    assert diag.code == "E402" and "whole local days" in diag.message and (diag.line, diag.column) == (4, 15)
    # 'calendar' stays an ordinary name everywhere else
    assert load(HEADER + 'segment s = customer.calendar ?? "" == "x"\n').ok


def test_a_send_expectation_can_name_the_local_time_of_a_deferred_send(load: Load) -> None:
    """``expect send c at HH:MM``: the send goes at the first such local time from the step on (here
    08:00 summer time, the night the clocks go forward), deferred or not; the next step's ``at``
    still starts a step; the formatter keeps it; a time of day that is not one is E105."""
    from cadence.dsl.formatter import format_text
    from cadence.dsl.testing import run_tests
    from cadence.engine.decide import decide

    text = (
        'event purchased = "Order Completed"\n\n'
        'campaign promo "Promo" {\n'
        "    audience  count(purchased within 30d) >= 1\n"
        '    send      template "promo"\n'
        "    channel   email\n"
        '    quiet     21:00..08:00 in customer.timezone ?? "UTC" then defer\n'
        "}\n\n"
        'test "night" {\n'
        '    given customer { id: "c1", timezone: "Europe/Berlin", consent: [email] }\n'
        "    given events { purchased at -1d }\n"
        "    at 2026-03-29 01:30 Europe/Berlin expect send promo via email at 08:00\n"
        "    at 2026-03-30 01:30 Europe/Berlin expect send promo at 09:00\n"
        "    at 2026-03-31 10:00 Europe/Berlin expect send promo at 10:00\n"
        "}\n"
    )
    loaded = load(text)
    assert not loaded.errors, loaded.errors
    assert format_text(text) == text
    report = run_tests(loaded, available_channels=["email"], decide=decide)
    assert [s.status for s in report.results] == ["passed", "failed", "passed"]
    assert "2026-03-30T08:00:00+02:00" in report.results[1].message  # said in the customer's zone
    bad = load(text.replace("at 10:00", "at 24:30"))
    assert [(d.code, d.line, d.column) for d in bad.errors] == [("E105", 15, 60)]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("time_decay(half_life: 0d)", "'half_life' must be longer than 0"),
        ("position(first: 90%, last: 40%)", "first + last must be at most 100%"),
    ],
)
def test_attribution_model_parameters_the_engine_cannot_use_are_errors(
    load: Load, model: str, message: str
) -> None:
    # Both compiled, then every conversion raised in the engine loop, which retried the
    # batch for ever: no profile, decision or credit moved again.
    result = load(
        HEADER
        + f"""
attribution fair "Fair" {{
    conversion  purchased value event.revenue
    model       {model}
}}
"""
    )
    assert not result.ok
    assert any(d.code == "E402" and message in d.message for d in result.diagnostics), [
        str(d) for d in result.diagnostics
    ]
