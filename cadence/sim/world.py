"""The simulated world: how customers respond, and the clock that drives policies through weeks.

Every customer gets one decision opportunity a day at 07:00 local time. A policy
answers with a channel and a send time (or nothing); the world delivers the message
at that time and draws the response from the hidden truth:

- ``P(click) = affinity[channel] * hour_factor * exp(-fatigue * load)``, where
  ``hour_factor = 0.2 + 0.8 * exp(-d^2 / 2w^2)`` for the distance ``d`` in hours between
  the local send hour and the preferred hour (on the customer's local Saturdays and Sundays,
  their weekend one where they have one), and ``load`` is the number of messages in
  the previous 7 days;
- ``P(unsubscribe from that channel) = unsubscribe[channel] * (1 + 0.6 * load) * (1.5 - hour_factor)``.

Feedback events (delivered, clicked, unsubscribed) reach the policy in time order,
each with its ``decision_id``, exactly as ``/v1/track`` would hand them to the learners.
"""

from __future__ import annotations

import heapq
import math
import random
import time as wallclock
from collections import deque
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from cadence.channels import Feedback
from cadence.engine.campaign import DAY_MS, HOUR_MS
from cadence.sim.population import SIM_CHANNELS, Customer

__all__ = ["Policy", "RunResult", "World", "click_probability", "run_policy", "unsubscribe_probability"]

#: Sends are allowed 08:00..21:00 local in every policy (the campaign's quiet hours).
QUIET_START, QUIET_END = 21, 8
LOAD_WINDOW_MS = 7 * DAY_MS
UNSUB_LOAD = 0.6


def hour_factor(customer: Customer, local_hour: float, weekend: bool = False) -> float:
    """How much the send hour helps: 1 at the preferred hour (at weekends, the customer's
    weekend one where they have one), 0.2 far from it.

    >>> from cadence.sim.population import make_population
    >>> c = next(c for c in make_population("weekender", 20, seed=1) if c.weekend_hour is not None)
    >>> hour_factor(c, c.weekend_hour, weekend=True), hour_factor(c, c.weekend_hour) < 0.9
    (1.0, True)
    """
    preferred = (
        customer.weekend_hour if weekend and customer.weekend_hour is not None else customer.preferred_hour
    )
    d = abs(local_hour - preferred) % 24
    d = min(d, 24 - d)
    return 0.2 + 0.8 * math.exp(-(d * d) / (2 * customer.hour_width**2))


def click_probability(
    customer: Customer, channel: str, local_hour: float, load: int, weekend: bool = False
) -> float:
    """The true chance that a message is clicked.

    >>> from cadence.sim.population import make_population
    >>> c = make_population("balanced", 1, seed=3)[0]
    >>> fresh = click_probability(c, "email", c.preferred_hour, 0)
    >>> fresh > click_probability(c, "email", c.preferred_hour, 5)
    True
    """
    return (
        customer.affinity[channel]
        * hour_factor(customer, local_hour, weekend)
        * math.exp(-customer.fatigue * load)
    )


def unsubscribe_probability(
    customer: Customer, channel: str, local_hour: float, load: int, weekend: bool = False
) -> float:
    """The true chance that a message makes the customer opt out of its channel."""
    return min(
        1.0,
        customer.unsubscribe[channel]
        * (1 + UNSUB_LOAD * load)
        * (1.5 - hour_factor(customer, local_hour, weekend)),
    )


@dataclass
class CustomerState:
    """What the world tracks per customer while a policy runs."""

    customer: Customer
    sends: deque[int] = field(default_factory=deque)  # delivered send times, last 30 days

    def load(self, at_ms: int) -> int:
        """Messages delivered in the 7 days before ``at_ms``."""
        return sum(1 for t in self.sends if at_ms - LOAD_WINDOW_MS <= t < at_ms)


class Policy(Protocol):
    """Something that decides sends for the simulated customers."""

    name: str

    def decide(self, state: CustomerState, now_ms: int) -> tuple[str, int] | None:
        """A (channel, send time) for this customer today, or None. Called at 07:00 local."""
        ...

    def feedback(self, state: CustomerState, channel: str, kind: Feedback, sent_ms: int, ts_ms: int) -> None:
        """A feedback event for the message this policy sent at ``sent_ms``."""
        ...


@dataclass
class RunResult:
    """What one policy achieved in one world."""

    policy: str
    customers: int
    days: int
    population: str = ""  # the population's shape, once known
    seed: int = 0
    sends: int = 0
    clicks: int = 0
    unsubscribes: int = 0
    unsubscribed_customers: int = 0
    email_unsubscribed_customers: int = 0
    decisions: int = 0
    decide_seconds: float = 0.0
    sends_by_channel: dict[str, int] = field(default_factory=dict)
    clicks_by_channel: dict[str, int] = field(default_factory=dict)

    @property
    def ctr(self) -> float:
        """Clicks per message sent."""
        return self.clicks / self.sends if self.sends else 0.0

    @property
    def unsubscribe_rate(self) -> float:
        """Share of customers who opted out of at least one channel."""
        return self.unsubscribed_customers / self.customers if self.customers else 0.0

    @property
    def decisions_per_second(self) -> float:
        """Decisions per second of wall time spent inside the policy's decide."""
        return self.decisions / self.decide_seconds if self.decide_seconds else float("inf")


class World:
    """Local-time arithmetic shared by every policy (cached per zone and day)."""

    def __init__(self, start: date) -> None:
        self.start = start
        self._cache: dict[tuple[str, int, int], int] = {}

    def local_ms(self, zone: str, day: int, hour: int) -> int:
        """Epoch ms of ``hour``:00 local on the ``day``-th simulated day (DST-correct)."""
        key = (zone, day, hour)
        value = self._cache.get(key)
        if value is None:
            d = self.start + timedelta(days=day)
            local = datetime(d.year, d.month, d.day, hour % 24, tzinfo=ZoneInfo(zone))
            if hour >= 24:
                local = datetime(d.year, d.month, d.day, tzinfo=ZoneInfo(zone)) + timedelta(days=hour // 24)
                local = local.replace(hour=hour % 24)
            value = self._cache[key] = int(local.timestamp() * 1000)
        return value


def local_hour(ms: int, zone: str) -> float:
    """The local wall-clock hour (fractional) of ``ms``."""
    local = datetime.fromtimestamp(ms / 1000, tz=ZoneInfo(zone))
    return local.hour + local.minute / 60


def local_weekend(ms: int, zone: str) -> bool:
    """Whether ``ms`` falls on a Saturday or Sunday, local time."""
    return datetime.fromtimestamp(ms / 1000, tz=ZoneInfo(zone)).weekday() >= 5


def run_policy(policy: Policy, customers: list[Customer], *, days: int, seed: int, start: date) -> RunResult:
    """Drive ``policy`` through ``days`` simulated days; customers are copied, never changed."""
    rng = random.Random(f"world:{seed}")
    world = World(start)
    states = [
        CustomerState(
            Customer(**{**c.__dict__, "opted_out": set(), "affinity": dict(c.affinity)})  # fresh copy per run
        )
        for c in customers
    ]
    result = RunResult(policy=policy.name, customers=len(customers), days=days)
    queue: list[tuple[int, int, int, str, str, int]] = []  # (ts, order, customer, kind, channel, sent_ms)
    order = 0
    for s in states:
        for day in range(days):
            heapq.heappush(
                queue, (world.local_ms(s.customer.zone, day, 7), order, s.customer.id, "decide", "", 0)
            )
            order += 1
    end_ms = max(world.local_ms(s.customer.zone, days, 0) for s in states) if states else 0
    while queue:
        ts, _, cid, kind, channel, sent_ms = heapq.heappop(queue)
        state = states[cid]
        customer = state.customer
        if kind == "decide":
            if ts >= end_ms:
                continue
            # A policy that decides in batches (over the API: one request for up to 1,000 customers)
            # gets every customer due at this instant at once; what comes after (sends, feedback) is
            # queued behind them either way, so the run is the same.
            many = getattr(policy, "decide_many", None)
            group = [cid]
            if many is not None:
                while queue and queue[0][0] == ts and queue[0][3] == "decide":
                    group.append(heapq.heappop(queue)[2])
            t0 = wallclock.perf_counter()
            choices = many([states[c] for c in group], ts) if many is not None else [policy.decide(state, ts)]
            result.decide_seconds += wallclock.perf_counter() - t0
            result.decisions += len(group)
            for who, choice in zip(group, choices, strict=True):
                if choice is not None:
                    ch, at = choice
                    order += 1
                    heapq.heappush(queue, (max(at, ts), order, who, "send", ch, 0))
        elif kind == "send":
            if channel in customer.opted_out or channel not in customer.available or ts >= end_ms:
                continue
            hour = local_hour(ts, customer.zone)
            weekend = customer.weekend_hour is not None and local_weekend(ts, customer.zone)
            load = state.load(ts)
            p_click = click_probability(customer, channel, hour, load, weekend)
            p_unsub = unsubscribe_probability(customer, channel, hour, load, weekend)
            state.sends.append(ts)
            while state.sends and state.sends[0] < ts - 30 * DAY_MS:
                state.sends.popleft()
            result.sends += 1
            result.sends_by_channel[channel] = result.sends_by_channel.get(channel, 0) + 1
            policy.feedback(state, channel, Feedback.DELIVERED, ts, ts)
            if rng.random() < p_click:
                order += 1
                heapq.heappush(
                    queue, (ts + rng.randint(60_000, 2 * HOUR_MS), order, cid, "click", channel, ts)
                )
            if rng.random() < p_unsub:
                order += 1
                heapq.heappush(
                    queue, (ts + rng.randint(60_000, 6 * HOUR_MS), order, cid, "unsub", channel, ts)
                )
        elif kind == "click":
            result.clicks += 1
            result.clicks_by_channel[channel] = result.clicks_by_channel.get(channel, 0) + 1
            policy.feedback(state, channel, Feedback.CLICKED, sent_ms, ts)
        elif kind == "unsub" and channel not in customer.opted_out:
            if not customer.opted_out:
                result.unsubscribed_customers += 1
            if channel == "email":
                result.email_unsubscribed_customers += 1
            customer.opted_out.add(channel)
            result.unsubscribes += 1
            policy.feedback(state, channel, Feedback.UNSUBSCRIBED, sent_ms, ts)
    return result


def allowed_hours() -> range:
    """Local hours every policy may send at (outside the 21:00..08:00 quiet hours)."""
    return range(QUIET_END, QUIET_START)


ALL_CHANNELS = SIM_CHANNELS
