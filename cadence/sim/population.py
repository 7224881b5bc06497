"""Synthetic customers: hidden preferences, and observable traits that hint at them.

Each customer has hidden per-channel click affinities, a preferred local hour (in
some populations another one at weekends), a time zone, a fatigue sensitivity (each
recent message lowers the next one's click chance) and per-channel unsubscribe
propensities that grow with recent volume. The traits a marketer would see (age band,
device, app installed, daily rhythm) are correlated with the hidden values, so a model
can generalise across customers, but never determine them. Their time zone, email address
and phone number are traits too, as apps send them with identify (the zone sets the
customer's zone); they tell nothing.

Shapes (:data:`SHAPES`) change the mix, so results are not tuned to one world.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SHAPES", "Customer", "PopulationShape", "make_population"]

SIM_CHANNELS = ("email", "sms", "push")

#: (zone, share): where customers live; several observe DST on different dates.
ZONES = (
    ("America/New_York", 0.25),
    ("America/Los_Angeles", 0.12),
    ("Europe/Berlin", 0.2),
    ("Europe/London", 0.13),
    ("Asia/Kolkata", 0.1),
    ("Australia/Sydney", 0.1),
    ("Asia/Tokyo", 0.1),
)

#: Daily rhythm trait -> mean preferred local hour.
RHYTHMS = {"early_bird": 8.0, "office": 12.5, "afternoon": 16.0, "evening": 19.5}
#: Daily rhythm trait -> mean preferred local hour at weekends, for the customers whose
#: weekends differ (:attr:`PopulationShape.weekend_share`): early birds sleep in, office
#: readers read in the evening.
WEEKEND_RHYTHMS = {"early_bird": 10.5, "office": 19.0, "afternoon": 14.0, "evening": 19.5}


@dataclass(frozen=True)
class PopulationShape:
    """How a population is mixed: base click affinities per channel and how traits shift them."""

    name: str
    affinity: dict[str, float]  # median click probability of a fresh message at the preferred hour
    app_share: float = 0.5  # customers with the app (push available)
    phone_share: float = 0.85  # customers with a phone number (sms available)
    young_share: float = 0.4
    fatigue: float = 0.16  # median fatigue sensitivity
    unsubscribe: float = 0.0035  # median base unsubscribe probability per message
    weekend_share: float = 0.0  # customers whose preferred hour at weekends is their rhythm's weekend one
    description: str = ""


SHAPES: dict[str, PopulationShape] = {
    "balanced": PopulationShape(
        "balanced", {"email": 0.055, "sms": 0.075, "push": 0.075}, description="channels roughly even"
    ),
    "email_heavy": PopulationShape(
        "email_heavy",
        {"email": 0.05, "sms": 0.03, "push": 0.04},
        app_share=0.3,
        young_share=0.25,
        description="older, desktop-heavy customers who read email",
    ),
    "mobile_first": PopulationShape(
        "mobile_first",
        {"email": 0.09, "sms": 0.09, "push": 0.11},
        app_share=0.75,
        young_share=0.65,
        fatigue=0.2,
        description="young app users, more fatigue-sensitive",
    ),
    "weekender": PopulationShape(
        "weekender",
        {"email": 0.06, "sms": 0.07, "push": 0.07},
        weekend_share=0.8,
        description="most read at other hours at weekends (early birds sleep in, office readers read at night)",
    ),
}


@dataclass
class Customer:
    """One synthetic customer: what a marketer sees (traits, zone) and what only the world knows."""

    id: int
    zone: str
    traits: dict[str, Any]
    available: tuple[str, ...]  # channels the customer can be reached on
    affinity: dict[str, float]  # hidden
    preferred_hour: float  # hidden, local
    hour_width: float  # hidden
    fatigue: float  # hidden
    unsubscribe: dict[str, float]  # hidden, per message at zero load
    weekend_hour: float | None = None  # hidden, local: the preferred hour at weekends (None: the same)
    opted_out: set[str] = field(default_factory=set)


def _pick(rng: random.Random, items: tuple[tuple[str, float], ...]) -> str:
    x = rng.random() * sum(w for _, w in items)
    for name, weight in items:
        x -= weight
        if x <= 0:
            return name
    return items[-1][0]


def make_population(shape: PopulationShape | str, n: int, seed: int) -> list[Customer]:
    """``n`` customers of ``shape``, reproducible from ``seed``.

    >>> people = make_population("balanced", 3, seed=1)
    >>> [p.id for p in people], sorted(people[0].affinity)
    ([0, 1, 2], ['email', 'push', 'sms'])
    >>> make_population("balanced", 3, seed=1)[2].preferred_hour == people[2].preferred_hour
    True
    """
    if isinstance(shape, str):
        shape = SHAPES[shape]
    rng = random.Random(f"{shape.name}:{seed}")
    out = []
    for i in range(n):
        young = rng.random() < shape.young_share
        app = rng.random() < shape.app_share * (1.3 if young else 0.8)
        phone = rng.random() < shape.phone_share
        device = "mobile" if (app or (young and rng.random() < 0.7)) else rng.choice(["desktop", "mobile"])
        rhythm = rng.choice(list(RHYTHMS))
        available = ("email",) + (("sms",) if phone else ()) + (("push",) if app else ())
        # Traits shift the hidden affinities; personal noise keeps them from deciding it.
        shift = {
            "email": (-0.5 if young else 0.3) + (0.3 if device == "desktop" else 0.0),
            "sms": (0.4 if young else -0.2),
            "push": (0.5 if device == "mobile" else -0.4) + (0.2 if young else 0.0),
        }
        affinity = {
            ch: min(0.6, shape.affinity[ch] * math.exp(shift[ch] + rng.gauss(0, 0.6))) for ch in SIM_CHANNELS
        }
        # One channel is each customer's favourite, whatever the traits say.
        favourite = rng.choice(available)
        affinity[favourite] = min(0.6, affinity[favourite] * 1.8)
        preferred = (RHYTHMS[rhythm] + rng.gauss(0, 1.5)) % 24
        fatigue = shape.fatigue * math.exp(rng.gauss(0, 0.5))
        base_unsub = shape.unsubscribe * math.exp(rng.gauss(0, 0.6))
        unsubscribe = {
            "email": base_unsub,
            "sms": base_unsub * 1.6,  # a text feels more intrusive
            "push": base_unsub * 1.2,
        }
        zone = _pick(rng, ZONES)
        weekend_hour = None
        # No draw in a shape without weekend hours: their populations stay as they were.
        if shape.weekend_share and rng.random() < shape.weekend_share:
            weekend_hour = (WEEKEND_RHYTHMS[rhythm] + rng.gauss(0, 1.5)) % 24
        out.append(
            Customer(
                id=i,
                zone=zone,
                traits={
                    "age_band": "18-34" if young else "35+",
                    "device": device,
                    "app": app,
                    "rhythm": rhythm,
                    # As apps identify customers: the zone (which sets it, and says nothing
                    # about what they want here) and contact details (which say nothing at all).
                    "timezone": zone,
                    "email": f"customer{i}@example.test",
                    **({"phone": f"+1555{i:07d}"} if phone else {}),
                },
                available=available,
                affinity=affinity,
                preferred_hour=preferred,
                hour_width=rng.uniform(1.5, 3.0),
                fatigue=fatigue,
                unsubscribe=unsubscribe,
                weekend_hour=weekend_hour,
            )
        )
    return out
