"""The push prefilter never drops a customer the compiled rules would send to (prefilter is a superset)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from cadence.channels import CHANNELS
from cadence.dsl.loader import load_source
from cadence.engine.campaign import DAY_MS, CompiledRuleset
from cadence.engine.decide import decide
from cadence.scheduler.occurrences import ms
from cadence.scheduler.prefilter import audience_condition, push_prefilter
from cadence.scheduler.push import load_profiles
from cadence.scheduler.seed import SeedCustomer, seed_customers

HOUR = 3_600_000
NOW = ms("2026-03-02T09:37")  # not at midnight: windows start inside a UTC day
EVENTS = {"opened": "Email Opened", "purchased": "Order Completed", "viewed": "Page Viewed"}
HEADER = "".join(f'event {alias} = "{name}"\n' for alias, name in EVENTS.items())


def _population(n: int = 90) -> list[SeedCustomer]:
    rng = random.Random(11)
    out = []
    for i in range(1, n + 1):
        events: dict[str, list[int]] = {}
        for name in EVENTS.values():
            if rng.random() < 0.6:
                # Days back around the windows the rules use, at any hour (both sides of a day's start).
                events[name] = [
                    NOW
                    - rng.choice([0, 1, 6, 7, 8, 9, 10, 29, 30, 31, 59, 60, 61, 120]) * DAY_MS
                    + rng.randrange(-12, 12) * HOUR
                    for _ in range(rng.randrange(1, 4))
                ]
        traits: dict[str, Any] = {"email": f"c{i}@example.com"}
        plan = rng.choice(["pro", "free", "gold", None, 5])
        if plan is not None:
            traits["plan"] = plan
        if rng.random() < 0.5:
            traits["address"] = {"city": rng.choice(["Berlin", "Paris"])}
        consent = {ch: rng.random() < 0.7 for ch in ("email", "sms", "all") if rng.random() < 0.5}
        out.append(SeedCustomer(id=i, traits=traits, consent=consent, events=events))
    return out


@pytest.fixture
def population(db_engine: Engine) -> Iterator[Engine]:
    seed_customers(db_engine, _population(), now_ms=NOW)
    with db_engine.begin() as conn:  # purchases are worth 10 each
        for table in ("profile_event_stats", "profile_daily"):
            conn.execute(text(f"UPDATE {table} SET sum_value = count * 10 WHERE event = 'Order Completed'"))
    yield db_engine


def _atoms() -> st.SearchStrategy[str]:
    ev = st.sampled_from(sorted(EVENTS))
    days = st.sampled_from([1, 7, 10, 30, 60])
    op = st.sampled_from([">", ">=", "==", "<", "<="])
    k = st.integers(0, 2)
    return st.one_of(
        st.builds(lambda e, d, o, n: f"count({e} within {d}d) {o} {n}", ev, days, op, k),
        st.builds(lambda n, o, e, d: f"{n} {o} count({e} within {d}d)", k, op, ev, days),
        st.builds(lambda e, d: f"{e} within {d}d", ev, days),
        st.builds(lambda e, a, b: f"count({e} between {a + b}d and {b}d ago) > 0", ev, days, days),
        st.builds(lambda e, a, b: f"{e} between {a + b}d and {b}d ago", ev, days, days),
        st.builds(lambda d, o, n: f"sum(purchased.revenue within {d}d) {o} {n * 10}", days, op, k),
        st.builds(lambda e, o, n: f"count({e}) {o} {n}", ev, op, k),
        st.builds(lambda e, d: f"has(last({e})) and last({e}) > {d}d ago", ev, days),
        st.builds(lambda c: f"consent({c})", st.sampled_from(["email", "sms"])),
        st.builds(lambda v: f'(customer.plan ?? "free") == "{v}"', st.sampled_from(["pro", "free", "5"])),
        st.just('(customer.plan ?? "free") in ["pro", "gold"]'),
        st.just('(customer.address.city ?? "x") == "Berlin"'),
        st.sampled_from(["true", "false", "s1"]),
    )


def _expressions() -> st.SearchStrategy[str]:
    return st.recursive(
        _atoms(),
        lambda inner: st.one_of(
            st.builds(lambda a, b: f"({a}) and ({b})", inner, inner),
            st.builds(lambda a, b: f"({a}) or ({b})", inner, inner),
            st.builds(lambda a: f"not ({a})", inner),
        ),
        max_leaves=5,
    )


def _ruleset(segment: str, audience: str, channels: str) -> CompiledRuleset:
    source = (
        HEADER
        + f"segment s1 = {segment.replace('s1', 'true')}\n"
        + f'campaign c {{\n  audience {audience}\n  send template "t"\n  channel {channels}\n}}\n'
    )
    return load_source(source).raise_for_errors()


def _check(engine: Engine, ruleset: CompiledRuleset) -> tuple[set[int], set[int]]:
    """(customers the rules send to, customers the prefilter keeps)."""
    campaign = ruleset.campaigns["c"]
    with engine.connect() as conn:
        everyone = load_profiles(conn, after=0, limit=10_000, now_ms=NOW, events=None)
        cond = push_prefilter([campaign], now_ms=NOW, dialect=conn.dialect.name)
        kept = {
            p.customer_id
            for p in load_profiles(conn, after=0, limit=10_000, now_ms=NOW, events=None, prefilter=cond)
        }
    sent = set()
    for profile in everyone:
        decision = decide(
            ruleset=ruleset,
            profile=profile,
            now_ms=NOW,
            history=(),
            available_channels=CHANNELS,
            campaigns={"c"},
            seed=1,
            explain=False,
        )
        if decision.action == "send":
            sent.add(profile.customer_id)
    return sent, kept


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    segment=_expressions(),
    audience=_expressions(),
    channels=st.sampled_from(["email", "sms", "best of [email, sms]"]),
)
def test_the_prefilter_keeps_every_customer_the_rules_send_to(
    population: Engine, segment: str, audience: str, channels: str
) -> None:
    sent, kept = _check(population, _ruleset(segment, audience, channels))
    assert sent <= kept, f"dropped {sorted(sent - kept)}"


@pytest.mark.parametrize(
    "audience",
    [
        "count(opened within 7d) > 0",
        "consent(sms) and purchased within 30d",
        '(customer.plan ?? "free") == "pro" or count(viewed between 60d and 30d ago) >= 1',
        "has(last(purchased)) and last(purchased) > 10d ago",
    ],
)
def test_the_prefilter_leaves_out_customers_who_cannot_qualify(population: Engine, audience: str) -> None:
    ruleset = _ruleset("true", audience, "email")
    sent, kept = _check(population, ruleset)
    assert sent <= kept
    assert len(kept) < 90  # it does narrow
    with population.connect() as conn:
        cond = audience_condition(ruleset.campaigns["c"], now_ms=NOW, dialect=conn.dialect.name)
    assert cond is not None and "EXISTS" in cond.sql


def test_untranslatable_audiences_and_audience_campaigns_get_no_prefilter() -> None:
    negated = _ruleset("true", "not (opened within 7d)", "email").campaigns["c"]
    cond = audience_condition(negated, now_ms=NOW, dialect="sqlite")
    assert cond is not None and "profile_event_stats" not in cond.sql  # only the channel's consent
    audience_kind = dataclasses.replace(
        _ruleset("true", "opened within 7d", "email").campaigns["c"], kind="audience"
    )
    assert push_prefilter([audience_kind], now_ms=NOW, dialect="sqlite") is None
