"""Journeys and models: invariants on random data, and exactness against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cadence.engine.attribution import heuristics, markov, shapley
from cadence.engine.attribution.journeys import DAY_MS, Journeys, TouchLog, build_journeys
from cadence.engine.attribution.models import MODELS, run_model
from cadence.engine.attribution.spec import CreditRule, Touch

PATH_MODELS = [m for m in MODELS if m != "causal"]


def random_log(seed: int, customers: int = 300, channels: int = 4) -> TouchLog:
    rng = np.random.default_rng(seed)
    n_touch = customers * 4
    n_conv = customers // 3
    return TouchLog(
        channels=tuple(f"ch{i}" for i in range(channels)),
        customer_ids=[str(i) for i in range(customers)],
        touch_customer=rng.integers(0, customers, n_touch),
        touch_ms=rng.integers(0, 120 * DAY_MS, n_touch),
        touch_channel=rng.integers(0, channels, n_touch),
        conv_customer=rng.integers(0, customers, n_conv),
        conv_ms=rng.integers(0, 120 * DAY_MS, n_conv),
        conv_value=rng.random(n_conv) * 100,
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_journeys_hold_only_touches_before_their_conversion_within_the_window(seed: int) -> None:
    log = random_log(seed)
    window = 20 * DAY_MS
    j = log.journeys(window)
    assert np.all(np.diff(j.touch_journey) >= 0), "touches are grouped by journey"
    end = j.end_ms[j.touch_journey]
    conv = j.converted[j.touch_journey] > 0
    assert np.all(j.touch_ms[conv] <= end[conv])
    assert np.all(end[conv] - j.touch_ms[conv] <= window)
    # Every conversion is one journey, whether or not it has touches.
    assert int(j.converted.sum()) == log.conv_ms.shape[0]
    # A converting journey holds exactly its customer's touches after their previous
    # conversion, at or before this one, and inside the window.
    for jj in np.flatnonzero(j.converted > 0).tolist():
        cust, end_ms = j.customer[jj], j.end_ms[jj]
        mine = (log.touch_customer == cust) & (log.touch_ms <= end_ms) & (log.touch_ms >= end_ms - window)
        earlier = log.conv_ms[(log.conv_customer == cust) & (log.conv_ms < end_ms)]
        if earlier.size:
            mine &= log.touch_ms > earlier.max()
        assert int(mine.sum()) == int(j.length[jj])
        got = np.sort(j.touch_ms[j.start[jj] : j.start[jj + 1]])
        np.testing.assert_array_equal(got, np.sort(log.touch_ms[mine]))


def test_touches_after_a_conversion_are_not_credited_for_it() -> None:
    j = build_journeys(
        channels=["email", "display"],
        touch_customer=np.array([0, 0]),
        touch_ms=np.array([1 * DAY_MS, 3 * DAY_MS]),
        touch_channel=np.array([0, 1]),
        conv_customer=np.array([0]),
        conv_ms=np.array([2 * DAY_MS]),
        conv_value=np.array([1.0]),
        window_ms=30 * DAY_MS,
    )
    for model in PATH_MODELS:
        result = run_model(model, log=_log_of(j), journeys=j, window_ms=30 * DAY_MS)
        assert result.by_channel() == {"email": 1.0, "display": 0.0}, model


def _log_of(j: Journeys) -> TouchLog:
    return TouchLog(
        channels=j.channels,
        customer_ids=list(j.customer_ids),
        touch_customer=j.customer[j.touch_journey],
        touch_ms=j.touch_ms,
        touch_channel=j.touch_channel,
        conv_customer=j.customer[j.converted > 0],
        conv_ms=j.end_ms[j.converted > 0],
        conv_value=j.value[j.converted > 0],
    )


@pytest.mark.parametrize("model", PATH_MODELS)
@pytest.mark.parametrize("seed", [4, 5])
def test_path_models_give_each_conversion_exactly_one_credit(model: str, seed: int) -> None:
    log = random_log(seed)
    j = log.journeys(30 * DAY_MS)
    result = run_model(model, log=log, journeys=j, window_ms=30 * DAY_MS, params={"order": 2})
    per_journey = np.bincount(j.touch_journey, weights=result.touch_credit, minlength=j.n_journeys)
    has_touches = j.length > 0
    expected = np.where(has_touches, j.converted, 0.0)
    if model == "markov":
        # Journey shares are rescaled to the global removal shares: totals match.
        assert math.isclose(per_journey.sum(), expected.sum(), rel_tol=1e-9)
    else:
        np.testing.assert_allclose(per_journey, expected, atol=1e-9)
    assert np.all(result.touch_credit >= -1e-12)
    by_value = result.by_channel(value=True)
    assert sum(by_value.values()) > 0


def brute_shapley(value: dict[frozenset[str], float], players: list[str]) -> dict[str, float]:
    phi = dict.fromkeys(players, 0.0)
    perms = list(itertools.permutations(players))
    for perm in perms:
        seen: frozenset[str] = frozenset()
        for p in perm:
            phi[p] += value.get(seen | {p}, 0.0) - value.get(seen, 0.0)
            seen = seen | {p}
    return {p: v / len(perms) for p, v in phi.items()}


def test_coalition_shapley_matches_brute_force_over_permutations() -> None:
    rng = np.random.default_rng(0)
    k = 4
    names = [str(i) for i in range(k)]
    journeys_by_mask = {m: int(rng.integers(5, 50)) for m in range(1, 1 << k)}
    conversions = {m: int(rng.integers(0, n)) for m, n in journeys_by_mask.items()}
    shares = shapley.coalition_shares(journeys_by_mask, conversions, k)
    for mask in range(1, 1 << k):
        members = [names[i] for i in range(k) if mask >> i & 1]
        value = {}
        for r in range(len(members) + 1):
            for sub in itertools.combinations(members, r):
                m = sum(1 << int(s) for s in sub)
                value[frozenset(sub)] = conversions.get(m, 0) / journeys_by_mask[m] if m else 0.0
        phi = brute_shapley(value, members)
        positive = {p: max(v, 0.0) for p, v in phi.items()}
        total = sum(positive.values())
        for p in members:
            expected = positive[p] / total if total > 0 else 1 / len(members)
            assert math.isclose(shares[mask, int(p)], expected, abs_tol=1e-9)


def dense_markov(paths: list[list[str]], converted: list[int], order: int, removed: str | None) -> float:
    """Absorption probability by value iteration on explicit states (an independent solver)."""
    counts: dict[tuple, dict[tuple, float]] = {}
    for path, conv in zip(paths, converted, strict=True):
        states = [("START",)] + [tuple(path[max(0, i - order + 1) : i + 1]) for i in range(len(path))]
        states.append(("CONV",) if conv else ("NULL",))
        for a, b in zip(states[:-1], states[1:], strict=True):
            counts.setdefault(a, {}).setdefault(b, 0.0)
            counts[a][b] += 1
    prob = {s: 0.0 for s in counts}
    for _ in range(5000):
        for s, nxt in counts.items():
            if removed is not None and removed in s:
                prob[s] = 0.0
                continue
            total = sum(nxt.values())
            acc = 0.0
            for t, c in nxt.items():
                if t == ("CONV",):
                    acc += c / total
                elif t != ("NULL",) and not (removed is not None and removed in t):
                    acc += c / total * prob.get(t, 0.0)
            prob[s] = acc
    return prob[("START",)]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_markov_removal_effects_match_an_independent_solver(order: int) -> None:
    rng = np.random.default_rng(order)
    names = ["a", "b", "c"]
    paths = [[names[int(x)] for x in rng.integers(0, 3, int(rng.integers(1, 5)))] for _ in range(60)]
    converted = [int(rng.random() < 0.4) for _ in paths]
    j = Journeys.from_paths(paths, converted=converted)
    effects, base = markov.removal_effects(j, order=order)
    full = dense_markov(paths, converted, order, None)
    assert math.isclose(base, full, rel_tol=1e-6)
    for i, c in enumerate(j.channels):
        expected = 1 - dense_markov(paths, converted, order, c) / full
        assert math.isclose(effects[i], max(expected, 0.0), abs_tol=1e-6)


def test_markov_transition_tally_is_incremental() -> None:
    tally = markov.TransitionTally(order=2)
    tally.add_path([0, 1, 2], converted=True)
    tally.add_path([0, 1], converted=False)
    assert tally.counts[((-1,), (0,))] == 2.0
    assert tally.counts[((0,), (0, 1))] == 2.0
    assert tally.counts[((0, 1), (1, 2))] == 1.0
    assert tally.counts[((0, 1), (-3,))] == 1.0


def test_time_decay_prefers_recent_touches_and_position_is_configurable() -> None:
    j = Journeys.from_paths([["a", "b", "c"]], converted=[1])
    decay = heuristics.time_decay(j, half_life_ms=DAY_MS)
    assert decay[0] < decay[1] < decay[2]
    assert math.isclose(decay[2], 2 * decay[1])
    pos = heuristics.position(j, first=0.5, last=0.3)
    np.testing.assert_allclose(pos, [0.5, 0.2, 0.3])


def test_credit_rules_exclude_fix_and_weight_under_conditions() -> None:
    paths = [["email", "display", "search"], ["display", "search"], ["email"]]
    j = Journeys.from_paths(paths, converted=[1, 1, 1])
    log = _log_of(j)
    no_display = run_model(
        "linear",
        log=log,
        journeys=j,
        window_ms=30 * DAY_MS,
        credit_rules=[CreditRule("display", action="exclude")],
    )
    assert no_display.by_channel()["display"] == 0.0
    assert math.isclose(sum(no_display.by_channel().values()), 3.0)

    def with_email(touches: list[Touch]) -> bool:
        return any(t.channel == "email" for t in touches)

    fixed = run_model(
        "linear",
        log=log,
        journeys=j,
        window_ms=30 * DAY_MS,
        credit_rules=[CreditRule("search", action="fixed", value=0.5, when=with_email)],
    )
    credit = fixed.by_channel()
    # journey 0 has email: search gets exactly 0.5; journey 1 has no email: linear 0.5.
    assert math.isclose(credit["search"], 1.0)
    assert math.isclose(credit["email"], 0.25 + 1.0)
    weighted = run_model(
        "last_touch",
        log=log,
        journeys=j,
        window_ms=30 * DAY_MS,
        credit_rules=[CreditRule("email", action="weight", value=2.0)],
    )
    assert weighted.by_channel() == {"display": 0.0, "email": 1.0, "search": 2.0}


@pytest.mark.parametrize(("n_touch", "n_conv"), [(5, 0), (0, 3), (0, 0)])
def test_every_model_survives_empty_touches_or_conversions(n_touch: int, n_conv: int) -> None:
    rng = np.random.default_rng(0)
    log = TouchLog(
        channels=("a", "b"),
        customer_ids=[str(i) for i in range(5)],
        touch_customer=rng.integers(0, 5, n_touch),
        touch_ms=rng.integers(0, 10 * DAY_MS, n_touch),
        touch_channel=rng.integers(0, 2, n_touch),
        conv_customer=rng.integers(0, 5, n_conv),
        conv_ms=rng.integers(0, 10 * DAY_MS, n_conv),
        conv_value=np.ones(n_conv),
    )
    j = log.journeys(30 * DAY_MS)
    assert int(j.converted.sum()) == n_conv
    for model in MODELS:
        credit = run_model(model, log=log, journeys=j, window_ms=30 * DAY_MS).by_channel()
        assert all(v == 0.0 for v in credit.values()), model


@pytest.mark.parametrize(
    ("referrer", "channel"),
    [
        ("https://www.google.com/search?q=shoes", "organic_search"),
        ("https://www.google.co.uk/", "organic_search"),
        ("https://www.bing.com/search?q=x", "organic_search"),
        ("https://duckduckgo.com/", "organic_search"),
        ("https://search.yahoo.com/search?p=x", "organic_search"),
        ("https://yandex.ru/search/?text=x", "organic_search"),
        ("https://www.facebook.com/", "organic_social"),
        ("https://twitter.com/someone", "organic_social"),
        ("https://x.com/someone/status/1", "organic_social"),
        ("https://www.youtube.com/watch?v=1", "organic_video"),
        ("https://blog.example.org/post", "referral"),
        ("https://www.xbox.com/", "referral"),
    ],
)
def test_a_referrer_is_grouped_by_its_host_as_analytics_tools_do(referrer: str, channel: str) -> None:
    # A visit from Google's result page is organic search, not a referral: the host is
    # "google.com" once "www." is dropped, which a bare "google" pattern never matched.
    from cadence.engine.attribution.grouping import group_channel

    assert group_channel({"referrer": referrer}) == channel
