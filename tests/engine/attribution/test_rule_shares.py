"""The engine loop's per-conversion credit (plain Python) against the vectorised models."""

from __future__ import annotations

import random

import pytest

from cadence.engine.attribution.journeys import DAY_MS
from cadence.engine.attribution.online import RULE_MODELS, _model_arrays, journey_credits, rule_shares
from cadence.engine.attribution.spec import CreditRule

CHANNELS = ("email", "sms", "direct", "Direct", "paid_search", "(direct)", "referral")


def random_journey(rng: random.Random, conv_ms: int) -> list[tuple[int, str, str]]:
    n = rng.choice((1, 1, 2, 3, 4, 7, 20))
    times = sorted(conv_ms - rng.randrange(0, 120 * DAY_MS) for _ in range(n))
    if rng.random() < 0.3:
        times = [times[-1]] * n  # same-millisecond touches
    return [(t, rng.choice(CHANNELS), rng.choice(("", "spring"))) for t in times]


@pytest.mark.parametrize("params", [{}, {"half_life_ms": 3 * DAY_MS, "first": 0.3, "last": 0.5}])
def test_plain_shares_are_the_vectorised_models_bit_for_bit(params: dict[str, float]) -> None:
    rng = random.Random(11)
    conv_ms = 1_767_225_600_000
    for _ in range(3000):
        touches = random_journey(rng, conv_ms)
        reference = _model_arrays(touches, conv_ms, params)
        shares = rule_shares(
            [t[1] for t in touches],
            [conv_ms - t[0] for t in touches],
            half_life_ms=int(params.get("half_life_ms", 7 * DAY_MS)),
            first=float(params.get("first", 0.4)),
            last=float(params.get("last", 0.4)),
        )
        for model, share in zip(RULE_MODELS, shares, strict=True):
            assert share == reference[model].tolist(), (model, touches)


def test_bad_parameters_fail_as_the_vectorised_models_do() -> None:
    touches = [(0, "email", ""), (DAY_MS, "sms", "")]
    with pytest.raises(ValueError, match="half_life_ms"):
        journey_credits(touches, 2 * DAY_MS, params={"half_life_ms": 0})
    with pytest.raises(ValueError, match="position weights"):
        journey_credits(touches, 2 * DAY_MS, params={"first": 0.8, "last": 0.8})


def test_fixed_and_weight_rules_still_reshape_the_credit() -> None:
    touches = [(0, "email", "a"), (DAY_MS, "sms", "")]
    fixed = journey_credits(
        touches, 2 * DAY_MS, credit_rules=[CreditRule("email", action="fixed", value=0.0)]
    )
    assert fixed["linear"] == [("email", "a", 0.0), ("sms", "", 1.0)]
    excluded = journey_credits(touches, 2 * DAY_MS, credit_rules=[CreditRule("sms", action="exclude")])
    assert excluded["last_touch"] == [("email", "a", 1.0)]
