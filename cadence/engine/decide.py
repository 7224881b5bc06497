"""The decision pipeline: which campaign, on which channel, at what time, and why.

:func:`decide` is pure. For one customer it

1. checks each message campaign's eligibility (start/end, trigger, audience, unless),
2. assigns split and holdout arms by a stable hash (a holdout never receives and is
   listed in :attr:`Decision.holdout` so attribution can measure lift),
3. finds the channels it may use: allowed by the campaign, offered by a connector,
   not opted out of, not bounced (``ordered`` keeps the first that works, ``best``
   keeps them all for the learner),
4. finds send-time slots: the earliest moment (now, or the trigger's event time plus
   its delay), deferred out of quiet hours in the customer's zone or dropped; with a
   scorer, also the following top-of-hour slots across :data:`WINDOW_SLOTS` hours,
5. removes candidates that break a cap (campaign, channel, customer or exclusive
   group; rolling window or calendar days in the customer's zone), the minimum
   spacing, or an exclusive group already used that local day,
6. scores the rest (the learners, or a deterministic order without a scorer), and
7. picks one: highest priority, then highest score, then earliest send, then name.

Every campaign that is not chosen carries at least one :class:`Suppression`.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol
from zoneinfo import ZoneInfo

import numpy as np

from cadence.channels import channel_named
from cadence.engine.campaign import (
    DAY_MS,
    Campaign,
    Cap,
    CompiledRuleset,
    ConditionResult,
    EvalContext,
    ProfileView,
    SplitArm,
)
from cadence.engine.decision import Candidate, Decision, PastSend, Scorer, Suppression
from cadence.engine.slots import (
    candidate_slots,
    local_datetime,
    local_day,
    local_days,
    quiet_zone,
    zone_named,
)

__all__ = [
    "WINDOW_SLOTS",
    "BulkScorer",
    "BulkScores",
    "GroupBests",
    "OptionGroup",
    "cap_allows",
    "decide",
    "group_bests",
    "split_arm",
    "stable_share",
]

#: How many send-time slots a scorer chooses among: now, then the next 23 hours.
WINDOW_SLOTS = 24

_CHANNEL_DETAIL = {
    "no_channel": "no installed connector offers {}",
    "consent": "opted out of {}",
    "no_opt_in": "no opt-in for {} (its connector needs explicit consent)",
    "bounced": "{} address bounced",
}
#: The suppression reason of a channel block, where it is not the block's own name.
_CHANNEL_REASON = {"no_opt_in": "consent"}


def stable_share(customer_id: int, salt: str) -> float:
    """A number in [0, 1) fixed for a (customer, salt) pair: the basis of splits and holdouts.

    >>> stable_share(42, "winback") == stable_share(42, "winback")
    True
    >>> 0.0 <= stable_share(42, "winback") < 1.0
    True
    """
    digest = hashlib.blake2b(f"{salt}\x00{customer_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_arm(arms: Sequence[SplitArm], share: float) -> SplitArm | None:
    """The arm whose cumulative share range holds ``share``; None past the last arm.

    >>> arms = (SplitArm("holdout", 0.1, holdout=True), SplitArm("a", 0.45), SplitArm("b", 0.45))
    >>> [split_arm(arms, x).name for x in (0.05, 0.3, 0.99)]
    ['holdout', 'a', 'b']
    """
    upto = 0.0
    for arm in arms:
        upto += arm.share
        if share < upto:
            return arm
    return None


def _first_arm(arms: Sequence[SplitArm], held: bool, customer_id: int, campaign: str) -> SplitArm | None:
    """The arm of ``arms`` that keeps a customer in the side (held out or not) they were first assigned.

    A holdout arm when ``held``; else a sending arm drawn by the stable hash in proportion to the
    sending arms' shares (None when there is none).

    >>> arms = (SplitArm("holdout", 0.5, holdout=True), SplitArm("a", 0.25), SplitArm("b", 0.25))
    >>> _first_arm(arms, True, 7, "promo").name, _first_arm(arms, False, 7, "promo").name in {"a", "b"}
    ('holdout', True)
    """
    side = [a for a in arms if a.holdout == held]
    if not side:
        return None
    return (
        split_arm(side, stable_share(customer_id, campaign + "/first") * sum(a.share for a in side))
        or side[-1]
    )


def _window_peak(times: Sequence[int], t: int, width: int) -> int:
    """The most of ``times`` inside any half-open window ``[s, s + width)`` that contains ``t``."""
    near = [x for x in times if t - width < x < t + width]
    if not near:
        return 0
    starts = {t - width + 1}
    for x in near:
        starts.add(x)
        starts.add(x - width + 1)
    best = 0
    for s in starts:
        if t - width < s <= t:
            n = sum(1 for x in near if s <= x < s + width)
            if n > best:
                best = n
    return best


def cap_allows(
    cap: Cap, times: Sequence[int], t: int, zone: ZoneInfo, day_of: Callable[[int], int] | None = None
) -> bool:
    """True when one more send at ``t`` keeps every window of ``cap`` at or under its count.

    ``times`` are the sends the cap counts (already filtered to its scope). A rolling cap
    checks every window of ``window_ms`` containing ``t``, past and queued sends alike;
    a calendar cap counts local calendar days in ``zone``.

    >>> from zoneinfo import ZoneInfo
    >>> two_a_week = Cap(count=2, window_ms=7 * DAY_MS)
    >>> cap_allows(two_a_week, [0, DAY_MS], 3 * DAY_MS, ZoneInfo("UTC"))
    False
    >>> cap_allows(two_a_week, [0, DAY_MS], 8 * DAY_MS, ZoneInfo("UTC"))
    True
    """
    if cap.count <= 0:
        return False
    if cap.calendar:
        day = day_of or (lambda ms: local_day(ms, zone))
        days = max(1, cap.window_ms // DAY_MS)
        return _window_peak([day(x) for x in times], day(t), days) < cap.count
    return _window_peak(times, t, max(1, cap.window_ms)) < cap.count


def _cap_blocked(points: Sequence[int], values: Sequence[int], width: int, count: int) -> list[bool]:
    """For each of ``values``: would one more send there put a window of ``width`` at ``count`` or over?

    The same answer as ``_window_peak(points, t, width) >= count`` for every ``t``, from the
    sorted ``points`` by bisection: the fullest window ``[s, s + width)`` holding ``t`` starts at
    ``t - width + 1`` or just where a later point enters it, so the peak is the larger of the
    count in ``[t - width + 1, t]`` and the counts of the windows ending at each point in
    ``(t, t + width - 1]``.

    >>> _cap_blocked([0, 5, 9], [4, 20], width=10, count=3)
    [True, False]
    >>> _cap_blocked([0, 5, 9], [4, 20], width=10, count=4)
    [False, False]
    """
    if not values:
        return []
    span_lo = bisect_left(points, min(values) - width + 1)
    if bisect_right(points, max(values) + width - 1) - span_lo < count:
        return [False] * len(values)  # fewer sends near the slots than the cap allows
    ending = [bisect_right(points, x) - bisect_left(points, x - width + 1) for x in points]
    out = []
    for t in values:
        lo = bisect_right(points, t)
        peak = lo - bisect_left(points, t - width + 1)
        hi = bisect_right(points, t + width - 1)
        if hi > lo:
            peak = max(peak, max(ending[lo:hi]))
        out.append(peak >= count)
    return out


def _cap_key(cap: Cap, campaign: Campaign, channel: str) -> tuple[str, ...] | None:
    """Which of the customer's sends ``cap`` counts for a candidate; None when it does not apply.

    ``campaign``: this campaign's sends (on ``cap.channel`` if set); ``channel``: every send on the
    candidate's channel; ``group``: the sends of the campaign's exclusive group; ``customer``: all.
    """
    if cap.channel is not None and cap.channel != channel:
        return None
    if cap.scope == "campaign":
        return ("cc", campaign.name, channel) if cap.channel is not None else ("c", campaign.name)
    if cap.scope == "channel":
        return ("ch", channel)
    if cap.scope == "group":
        return None if campaign.exclusive is None else ("g", campaign.exclusive)
    return ("all",)


def _recent_load(history: Sequence[PastSend], now_ms: int) -> str:
    """The customer's messages in the 7 days before ``now_ms``, said after an option not worth sending.

    The learners' risk of an unsubscribe and their fatigue rise with that load, and a reader of
    "best expected value <= 0" could not tell that it was the customer's recent messages (an
    outside check: a whole audience held back for a week after two sends each).

    >>> _recent_load([PastSend(ts_ms=-DAY_MS, campaign="c", channel="email")], 0), _recent_load([], 0)
    ('; 1 message in the last 7 days', '')
    """
    n = sum(1 for h in history if now_ms - 7 * DAY_MS <= h.ts_ms < now_ms)
    return "" if n == 0 else f"; {n} message{'s' if n != 1 else ''} in the last 7 days"


def _index_history(history: Sequence[PastSend]) -> dict[tuple[str, ...], list[int]]:
    """The send times of ``history`` under every key :func:`_cap_key` can ask for, sorted."""
    out: dict[tuple[str, ...], list[int]] = {("all",): []}
    for h in history:
        ts = h.ts_ms
        out[("all",)].append(ts)
        for key in (("ch", h.channel), ("c", h.campaign), ("cc", h.campaign, h.channel)):
            out.setdefault(key, []).append(ts)
        if h.exclusive is not None:
            out.setdefault(("g", h.exclusive), []).append(ts)
    for times in out.values():
        times.sort()
    return out


def _describe_cap(cap: Cap) -> str:
    days = cap.window_ms / DAY_MS
    span = f"{days:g}d" if days >= 1 else f"{cap.window_ms / 3_600_000:g}h"
    where = f" on {cap.channel}" if cap.channel else ""
    kind = " (calendar days)" if cap.calendar else ""
    return f"{cap.scope} cap {cap.count} per {span}{where}{kind}"


def _fmt(ms: int, zone: ZoneInfo) -> str:
    """``2026-03-04 22:30 CET``; a zone without a name by its offset as the summary writes them
    (``+05:45``, not the database's ``+0545``).

    >>> _fmt(1_772_659_800_000, ZoneInfo("Europe/Berlin")), _fmt(1_772_659_800_000, ZoneInfo("Asia/Kathmandu"))
    ('2026-03-04 22:30 CET', '2026-03-05 03:15 +05:45')
    """
    local = local_datetime(ms, zone)
    name = local.tzname() or ""
    if not name[:1].isalpha():
        offset = local.strftime("%z")
        name = f"{offset[:3]}:{offset[3:]}"
    return local.strftime("%Y-%m-%d %H:%M ") + name


class _Plan:
    """One eligible campaign with its surviving (channel, send time) options."""

    __slots__ = ("arm", "campaign", "channel_rank", "options", "variants")

    def __init__(self, campaign: Campaign, arm: SplitArm | None, variants: tuple[SplitArm, ...]) -> None:
        self.campaign = campaign
        self.arm = arm
        self.variants = variants
        self.options: dict[str, list[int]] = {}  # channel -> allowed send times
        self.channel_rank: dict[str, int] = {}


_new_object = object.__new__
_new_tuple = tuple.__new__  # a NamedTuple without its Python-level __new__


def _candidate(
    campaign: str,
    channel: str,
    send_at_ms: int,
    score: float,
    engagement: float,
    unsubscribe: float,
    explored: bool,
    arm: str | None,
    draw: float | None = None,
    mean: float | None = None,
) -> Candidate:
    """``Candidate(...)`` with every field given, made without the frozen dataclass's ``__init__``.

    A frozen dataclass sets each field through ``object.__setattr__``; filling the instance's
    ``__dict__`` at once makes the same object (equal, same hash and repr) in a fraction of the
    time, and a decision materialises one per (campaign, channel, variant).

    >>> _candidate("c", "email", 5, 0.5, 0.1, 0.01, False, None) == Candidate("c", "email", 5, 0.5, 0.1, 0.01)
    True
    """
    c: Candidate = _new_object(Candidate)
    d = c.__dict__
    d["campaign"] = campaign
    d["channel"] = channel
    d["send_at_ms"] = send_at_ms
    d["score"] = score
    d["engagement"] = engagement
    d["unsubscribe"] = unsubscribe
    d["explored"] = explored
    d["arm"] = arm
    d["draw"] = draw
    d["mean"] = mean
    return c


def _expected(c: Candidate) -> float:
    """The candidate's value at the posterior mean when the scorer said it, else its score."""
    return c.score if c.mean is None else c.mean


def _score_said(c: Candidate) -> str:
    """A candidate's score as a person compares it: the drawn value, or what the learners ranked it by instead.

    >>> _score_said(Candidate("c", "email", 0, 0.0123, draw=0.0123, mean=0.02))
    '0.0123'
    >>> _score_said(Candidate("c", "email", 0, 3.7e-8, draw=-0.0104, mean=0.037))
    'a draw of -0.0104 at or below zero (expected value 0.0370)'
    >>> _score_said(Candidate("c", "email", 0, 0.0, draw=0.012, mean=-0.003))
    '0 (a draw of 0.0120; expected value -0.0030 is not worth a send)'
    """
    if c.draw is None or c.mean is None or c.score == c.draw:
        return f"{c.score:.4f}"
    if c.score == -math.inf:
        return f"held back (a draw of {c.draw:.4f}, expected value {c.mean:.4f})"
    if c.score > 0:
        return f"a draw of {c.draw:.4f} at or below zero (expected value {c.mean:.4f})"
    return f"{c.score:.4g} (a draw of {c.draw:.4f}; expected value {c.mean:.4f} is not worth a send)"


def _compared(winner: Candidate, loser: Candidate) -> str:
    """Why ``winner`` scored higher, in the numbers a person compares.

    >>> _compared(Candidate("w", "sms", 0, 0.03, draw=0.03, mean=0.02), Candidate("l", "sms", 0, 0.01))
    '0.0300 > 0.0100'
    >>> _compared(Candidate("w", "sms", 0, 3.7e-8, draw=-0.02, mean=0.037),
    ...           Candidate("l", "sms", 0, 3.5e-8, draw=-0.01, mean=0.035))
    'both draws at or below zero: expected value 0.0370 > 0.0350'
    """
    low = [c.draw is not None and c.mean is not None and c.draw <= 0 < c.score for c in (winner, loser)]
    if all(low):
        return f"both draws at or below zero: expected value {winner.mean:.4f} > {loser.mean:.4f}"
    return f"{_score_said(winner)} > {_score_said(loser)}"


def _variant_note(winner: Candidate, candidates: Sequence[Candidate]) -> tuple[str, bool]:
    """How the winner's variant was chosen and how the variants compare, in one truthful sentence;
    and whether that accounts for ``winner.explored`` (else the exploration was in its channel or time).

    Variants are compared by expected value (the posterior mean's, as ``explored`` is decided;
    draws are this decision's, and a variant the minimum exploration share held back scores
    -inf), each at its best option; two that read the same to the fourth decimal are alike. The
    chosen variant was explored when the minimum exploration share forced it (every other variant
    held back) or when another is better: then the posterior draw favoured it.

    >>> def c(arm, mean, eng, score=0.01):
    ...     return Candidate("c", "email", 0, score, eng, 0.001, arm=arm, draw=score, mean=mean)
    >>> _variant_note(c("b", 0.02, 0.052), [c("a", 0.0126, 0.041), c("b", 0.02, 0.052)])[0]
    "variant 'b' exploited: the best variant, 0.0074 above 'a' in expected value (expected engagement 5.2% vs 4.1%)"
    >>> _variant_note(c("b", 0.0126, 0.041), [c("a", 0.02, 0.052), c("b", 0.0126, 0.041)])
    ("variant 'b' explored (the posterior draw favoured it); best variant 'a', 0.0074 above 'b' in expected value (expected engagement 5.2% vs 4.1%)", True)
    >>> _variant_note(c("b", 0.02, 0.069), [c("a", 0.02, 0.069), c("b", 0.02, 0.069)])[0]
    "variant 'b' exploited: valued alike with 'a' (expected value 0.0200, expected engagement 6.9%); this decision's posterior draw chose"
    >>> forced = [c("a", 0.02, 0.052, -math.inf), c("b", 0.0126, 0.041)]
    >>> _variant_note(forced[1], forced)[0]
    "variant 'b' explored (minimum exploration share); best variant 'a', 0.0074 above 'b' in expected value (expected engagement 5.2% vs 4.1%)"
    >>> forced = [c("a", 0.0126, 0.041, -math.inf), c("b", 0.02, 0.052)]
    >>> _variant_note(forced[1], forced)[0]
    "variant 'b' explored (minimum exploration share), the best variant too: 0.0074 above 'a' in expected value (expected engagement 5.2% vs 4.1%)"
    """
    per_arm: dict[str, Candidate] = {}
    held = False  # another variant held back by the minimum exploration share
    for c in candidates:
        if c.campaign != winner.campaign or c.arm is None:
            continue
        if c.arm != winner.arm and c.score == -math.inf:
            held = True
        if c.arm not in per_arm or _expected(c) > _expected(per_arm[c.arm]):
            per_arm[c.arm] = c
    how = "explored (minimum exploration share)" if held else "exploited"
    ranked = sorted(per_arm.values(), key=lambda c: -_expected(c))
    if len(ranked) < 2 or winner.arm not in per_arm:
        return f"variant {winner.arm!r} {how}", held
    unit = " in expected value" if ranked[0].mean is not None else ""
    mine = per_arm[winner.arm]
    top = f"{_expected(ranked[0]):.4f}"
    if f"{_expected(mine):.4f}" != top:
        best = ranked[0]
        if not held:
            how = "explored (the posterior draw favoured it)"
        return (
            f"variant {winner.arm!r} {how}; best variant {best.arm!r}, "
            f"{_expected(best) - _expected(mine):.4f} above {winner.arm!r}{unit} "
            f"(expected engagement {best.engagement:.1%} vs {mine.engagement:.1%})"
        ), True
    # The winner's variant is the best or alike: an exploration flagged on its variant's best option
    # was the draw's choice between variants alike; on another option, it was of channel or time.
    own_best = _expected(winner) >= _expected(mine)
    alike = [c.arm for c in ranked if f"{_expected(c):.4f}" == top and c.arm != winner.arm]
    if alike:
        return (
            f"variant {winner.arm!r} {how}: valued alike with {', '.join(map(repr, alike))} "
            f"(expected value {top}, expected engagement {mine.engagement:.1%})"
            + ("" if held else "; this decision's posterior draw chose")
        ), held or own_best
    second = ranked[1]
    return (
        f"variant {winner.arm!r} {how}{', the best variant too:' if held else ': the best variant,'} "
        f"{_expected(mine) - _expected(second):.4f} above {second.arm!r}{unit} "
        f"(expected engagement {mine.engagement:.1%} vs {second.engagement:.1%})"
    ), held


def _deferral(campaign: str, earliest: int, slot: int, window: str, zone: ZoneInfo) -> Suppression:
    """The ``quiet`` suppression of a campaign's immediate send, deferred to ``slot`` (its window said)."""
    return _suppression(
        campaign,
        "quiet",
        f"{_fmt(earliest, zone)} is inside quiet hours {window}: deferred to {_fmt(slot, zone)}",
    )


def _suppression(campaign: str, reason: str, detail: str, channel: str | None = None) -> Suppression:
    """``Suppression(...)`` made as :func:`_candidate` makes candidates.

    >>> _suppression("c", "cap", "full", "sms") == Suppression("c", "cap", "full", "sms")
    True
    """
    s: Suppression = _new_object(Suppression)
    d = s.__dict__
    d["campaign"] = campaign
    d["reason"] = reason
    d["detail"] = detail
    d["channel"] = channel
    return s


#: Per campaign (by id, with the campaign and the global caps it was worked out with): its caps
#: followed by the global caps, and those of them with a zero count.
_CAMPAIGN_CAPS: dict[int, tuple[Campaign, tuple[Cap, ...], tuple[Cap, ...], list[Cap]]] = {}


def _campaign_caps(campaign: Campaign, global_caps: tuple[Cap, ...]) -> tuple[tuple[Cap, ...], list[Cap]]:
    """The caps a campaign's sends obey (its own, then the global ones) and those with a zero count, memoised.

    >>> from cadence.engine.campaign import ChannelPolicy, TemplateSpec
    >>> c = Campaign(name="c", title="c", priority=0, audience=None, template=TemplateSpec("t"),
    ...              channels=ChannelPolicy(("email",)), caps=(Cap(count=0, window_ms=1),))
    >>> caps, zero = _campaign_caps(c, (Cap(count=2, window_ms=DAY_MS),))
    >>> len(caps), zero == [caps[0]]
    (2, True)
    """
    got = _CAMPAIGN_CAPS.get(id(campaign))
    if got is None or got[0] is not campaign or got[1] is not global_caps:
        if len(_CAMPAIGN_CAPS) >= 4096:
            _CAMPAIGN_CAPS.clear()
        caps = campaign.caps + global_caps if campaign.caps else global_caps
        got = _CAMPAIGN_CAPS[id(campaign)] = (campaign, global_caps, caps, [c for c in caps if c.count <= 0])
    return got[2], got[3]


def _bounced(profile: ProfileView, channel: str) -> bool:
    """A ``bounced`` trait naming ``channel`` (set by the customer's own systems).

    A bounce reported as an event (``Email Bounced``) is the consent's business
    (:mod:`cadence.engine.consent`): a hard one refuses the channel until an identify brings a
    new address, a soft one does not. (Any bounce event ever, soft or lifted, used to block the
    channel here for good.)
    """
    bounced = profile.traits.get("bounced")
    if bounced is None or bounced is False:
        return False
    if bounced is True:
        return True
    # Channel names in any case, as ingest reads them (cadence.channels.channel_named): ["Email"] is email.
    if isinstance(bounced, (list, tuple, set, frozenset)):
        return any(isinstance(name, str) and channel_named(name) == channel for name in bounced)
    return isinstance(bounced, Mapping) and any(
        isinstance(name, str) and channel_named(name) == channel and bool(flag)
        for name, flag in bounced.items()
    )


def _usable_channels(
    allowed: Sequence[str],
    channel_block: dict[str, str | None],
    profile: ProfileView,
    available: Collection[str],
    opt_in: Collection[str],
    all_opted_out: bool,
) -> tuple[list[str], list[tuple[str, str]]]:
    """The channels of ``allowed`` the customer can get (allowed, offered, consented, not bounced),
    and each other channel with the reason it is blocked, in order; ``channel_block`` memoises per channel."""
    usable: list[str] = []
    blocks: list[tuple[str, str]] = []
    for channel in allowed:
        blocked = channel_block.get(channel, "")
        if blocked == "":
            if channel not in available:
                blocked = "no_channel"
            elif all_opted_out or profile.consented(channel) is False:
                # a refusal a hard bounce recorded (the address), not the customer's own
                bounced = channel in getattr(profile, "undeliverable", ()) and not all_opted_out
                blocked = "bounced" if bounced else "consent"
            elif channel in opt_in and profile.consented(channel) is not True:
                blocked = "no_opt_in"
            elif _bounced(profile, channel):
                blocked = "bounced"
            else:
                blocked = None
            channel_block[channel] = blocked
        if blocked is None:
            usable.append(channel)
        else:
            blocks.append((channel, blocked))
    return usable, blocks


def _audience_detail(source: str, parts: Sequence[ConditionResult]) -> str:
    """Why a customer is not in a campaign's audience: the top-level conditions that failed, with their values.

    Without explained parts (``explain=False``) the audience as written.

    >>> _audience_detail("vip and count(purchased) > 2", [
    ...     ConditionResult("vip", True, True), ConditionResult("vip > tier == 'gold'", False, False, nested=True),
    ...     ConditionResult("count(purchased) > 2", 1, False)])
    'audience not met: count(purchased) > 2 is false (value 1)'
    >>> _audience_detail("a and b", [ConditionResult("a", False, False), ConditionResult("b", None, False)])
    'audience not met: a is false, b is false (value null)'
    >>> _audience_detail("a or b", [])
    'audience not met: a or b'
    """
    failed = [p for p in parts if not p.passed and not p.nested]
    if not failed:
        return f"audience not met: {source}"
    said = []
    for p in failed:
        value = p.value
        if isinstance(value, bool):
            said.append(f"{p.text} is false")
        else:
            shown = "null" if value is None else (f"{value!r}" if isinstance(value, str) else f"{value}")
            said.append(f"{p.text} is false (value {shown})")
    return "audience not met: " + ", ".join(said)


def _explain(pred: Any, ctx: EvalContext, stage: str) -> list[ConditionResult]:
    """Every part of ``pred`` with its value, marked with its clause (``audience``, ``where``, ``unless``).

    An ``unless`` part passes when it does *not* hold: ``unless X`` with X false let the campaign
    through, and a person reading ``passed: false`` beside a campaign that was sent was misled
    (``cadence explain`` has always read it so). Compiled predicates mark their parts so
    themselves (:class:`cadence.dsl.compiler.CompiledPredicate`); only other parts (a segment
    named as the audience, a hand-written predicate) are made again here.
    """
    explain = getattr(pred, "explain", None)
    if explain is None:
        return []
    flip = stage == "unless"
    return [
        p
        if p.stage == stage
        else ConditionResult(p.text, p.value, bool(p.passed) is not flip, p.pos, p.nested, stage)
        for p in explain(ctx)
    ]


def decide(
    *,
    ruleset: CompiledRuleset,
    profile: ProfileView,
    now_ms: int,
    history: Sequence[PastSend],
    available_channels: Collection[str],
    scorer: Scorer | None = None,
    event: Mapping[str, Any] | None = None,
    campaigns: Collection[str] | None = None,
    context: Mapping[str, Any] | None = None,
    seed: int = 0,
    explain: bool = True,
    opt_in_channels: Collection[str] = (),
) -> Decision:
    """Decide what one customer gets now (or at a later slot), or nothing, and why.

    Pure: everything is passed in and nothing is written. Without a ``scorer`` the
    result is deterministic: the earliest allowed send on the first usable channel
    of the highest-priority campaign (ties broken by name). ``explain=False`` leaves
    :attr:`Decision.conditions` empty (bulk pushes do not keep them); the decision
    itself is the same. A channel in ``opt_in_channels`` (its connector needs explicit
    consent, e.g. SMS through Twilio) is chosen only when the customer's consent for it
    is given, not merely not withdrawn.

    >>> from cadence.engine.campaign import ChannelPolicy, CompiledRuleset, GlobalSettings, TemplateSpec
    >>> from cadence.engine.profiles_memory import MemoryProfile
    >>> welcome = Campaign(name="welcome", title="Welcome", priority=1, audience=None,
    ...                    template=TemplateSpec("hello"), channels=ChannelPolicy(("email",)))
    >>> rules = CompiledRuleset(hash="h", campaigns={"welcome": welcome}, segments={},
    ...                         settings=GlobalSettings(), aggregates=frozenset())
    >>> d = decide(ruleset=rules, profile=MemoryProfile(customer_id=1), now_ms=0, history=[],
    ...            available_channels={"email"})
    >>> d.action, d.campaign, d.channel, d.send_at_ms
    ('send', 'welcome', 'email', 0)
    """
    ctx = EvalContext(profile=profile, now_ms=now_ms, event=event, context=context or {})
    settings = ruleset.settings
    customer_zone = zone_named(profile.timezone, settings.default_zone)
    suppressions: list[Suppression] = []
    conditions: dict[str, list[ConditionResult]] = {}
    holdout: list[str] = []
    assigned: list[str] = []  # sending arms of campaigns with a holdout arm
    # The arms the customer was first assigned (StoredProfile.arms): a merged visitor's may differ
    # from what their new id's hash draws, and the first one holds (a holdout never receives).
    first_arms: Mapping[str, bool] = getattr(profile, "arms", None) or {}
    plans: list[_Plan] = []
    available = set(available_channels)
    opt_in = set(opt_in_channels)
    all_opted_out = profile.consented("all") is False
    slot_count = WINDOW_SLOTS if scorer is not None else 1
    wanted = set(campaigns) if campaigns is not None else None
    slot_cache: dict[tuple[Any, ...], tuple[list[int], bool]] = {}
    channel_block: dict[str, str | None] = {}  # channel -> suppression reason, None when usable
    usable_of: dict[tuple[str, ...], tuple[list[str], list[tuple[str, str]]]] = {}  # by channel list
    checks: _Checks | None = None  # caps, spacing and groups over the history, made on first use
    zones: dict[tuple[bool, str], ZoneInfo] = {}  # quiet-hours zone by (use_customer_zone, fallback)
    ranks: dict[int, dict[str, int]] = {}  # channel rank by usable list (campaigns share them)
    # Scored campaigns whose earliest moment is quiet: (earliest, its deferred slot, window, zone).
    deferred: dict[str, tuple[int, int, str, ZoneInfo]] = {}

    for name in sorted(ruleset.campaigns):
        campaign = ruleset.campaigns[name]
        if campaign.kind != "message" or (wanted is not None and name not in wanted):
            continue
        parts: list[ConditionResult] = []
        conditions[name] = parts
        if campaign.starts_ms is not None and now_ms < campaign.starts_ms:
            suppressions.append(
                _suppression(name, "not_started", f"starts {_fmt(campaign.starts_ms, customer_zone)}")
            )
            continue
        if campaign.ends_ms is not None and now_ms >= campaign.ends_ms:
            suppressions.append(_suppression(name, "ended", f"ended {_fmt(campaign.ends_ms, customer_zone)}"))
            continue

        earliest = now_ms
        trigger = campaign.trigger
        if trigger is not None:
            names = {trigger.event, ruleset.event_aliases.get(trigger.event, trigger.event)}
            got = event.get("event") if event is not None else None
            if got not in names:
                detail = (
                    f"needs event {trigger.event!r}, got {got!r}" if got else f"needs event {trigger.event!r}"
                )
                suppressions.append(_suppression(name, "trigger", detail))
                continue
            if trigger.where is not None:
                if explain:
                    parts.extend(_explain(trigger.where, ctx, "where"))
                if not trigger.where(ctx):
                    suppressions.append(
                        _suppression(name, "trigger", f"where {trigger.where.source} is false")
                    )
                    continue
            event_ms = event.get("ts_ms") if event is not None else None
            event_at = int(event_ms) if isinstance(event_ms, (int, float)) else now_ms
            earliest = max(now_ms, event_at + trigger.delay_ms)

        if campaign.audience is not None:
            first_part = len(parts)
            if explain:
                parts.extend(_explain(campaign.audience, ctx, "audience"))
            if not campaign.audience(ctx):
                suppressions.append(
                    _suppression(
                        name, "audience", _audience_detail(campaign.audience.source, parts[first_part:])
                    )
                )
                continue
        if campaign.unless is not None:
            if explain:
                parts.extend(_explain(campaign.unless, ctx, "unless"))
            if campaign.unless(ctx):
                suppressions.append(_suppression(name, "unless", f"{campaign.unless.source} holds"))
                continue

        arm: SplitArm | None = None
        variants: tuple[SplitArm, ...] = ()
        if campaign.split:
            arm = split_arm(campaign.split, stable_share(profile.customer_id, name))
            first = first_arms.get(name)
            kept = first is not None and (arm is not None and arm.holdout) != first
            if kept:
                arm = _first_arm(campaign.split, bool(first), profile.customer_id, name)
            if arm is not None and arm.holdout:
                holdout.append(name)
                why = f"in holdout arm {arm.name!r} ({arm.share:.0%})"
                if kept:
                    # after an identity merge (their first id hashed otherwise) or a changed split
                    why += ", the arm the customer was first assigned"
                suppressions.append(_suppression(name, "holdout", why))
                continue
            if any(a.holdout for a in campaign.split):
                assigned.append(name)
            if campaign.learn_variants:
                variants = tuple(a for a in campaign.split if not a.holdout)
                if scorer is None and variants:
                    # Without a learner, a stable hash picks the variant in proportion to its share.
                    arm = split_arm(
                        variants,
                        stable_share(profile.customer_id, name + "/variant") * sum(a.share for a in variants),
                    )
                    variants = ()

        # Channels: allowed, offered, consented, not bounced (campaigns usually share one channel
        # list: its verdict is worked out once per decision).
        allowed = campaign.channels.channels
        known = usable_of.get(allowed)
        if known is None:
            known = usable_of[allowed] = _usable_channels(
                allowed, channel_block, profile, available, opt_in, all_opted_out
            )
        usable, blocks = known
        for channel, blocked in blocks:
            suppressions.append(
                _suppression(
                    name,
                    _CHANNEL_REASON.get(blocked, blocked),
                    _CHANNEL_DETAIL[blocked].format(channel),
                    channel,
                )
            )
        if not usable:
            if not any(s.campaign == name for s in suppressions):
                suppressions.append(_suppression(name, "no_channel", "the campaign allows no channel"))
            continue

        # Send-time slots, in the quiet-hours zone.
        quiet = campaign.quiet
        if quiet is not None:
            zone_key = (quiet.use_customer_zone, quiet.fallback_zone)
            zone = zones.get(zone_key)  # type: ignore[assignment]
            if zone is None:
                zone = zones[zone_key] = quiet_zone(quiet, profile.timezone)
        else:
            zone = customer_zone
        # A triggered campaign goes when its trigger says (the event's time plus the delay, out of
        # quiet hours): the learners pick its channel, not another hour of the next day.
        count = 1 if trigger is not None else slot_count
        # The fields the slots depend on (hashing the QuietHours dataclass costs more).
        slot_key = (
            (earliest, quiet.start, quiet.end, quiet.action, zone.key, campaign.ends_ms, count)
            if quiet is not None
            else (earliest, None, None, None, zone.key, campaign.ends_ms, count)
        )
        cached = slot_cache.get(slot_key)
        if cached is None:
            cached = slot_cache[slot_key] = candidate_slots(
                earliest_ms=earliest,
                count=count,
                quiet=campaign.quiet,
                zone=zone,
                until_ms=campaign.ends_ms,
            )
        slots, now_quiet = cached
        if quiet is not None and now_quiet:
            window = quiet.said(zone.key)
            if quiet.action == "drop" or quiet.whole_day:  # whole day: nothing to defer to
                suppressions.append(
                    _suppression(
                        name, "quiet", f"{_fmt(earliest, zone)} is inside quiet hours {window}: dropped"
                    )
                )
                continue
            if count == 1 and slots:
                suppressions.append(_deferral(name, earliest, slots[0], window, zone))
            elif slots:
                # With a scorer the deferred immediate send is one of many times: it is said only
                # when it is the one chosen (below), and its text is made only then.
                deferred[name] = (earliest, slots[0], window, zone)
        if not slots:
            suppressions.append(
                _suppression(name, "quiet", "no allowed send time left before the campaign ends")
            )
            continue

        plan = _Plan(campaign, arm, variants)
        caps, all_zero_caps = _campaign_caps(campaign, settings.caps)
        zero_caps = all_zero_caps if caps and not history else None
        if not history and not zero_caps:
            # Nothing to count and no zero cap: every usable channel keeps every slot (the loop
            # below would find the same, channel by channel).
            if campaign.channels.mode == "ordered":
                plan.channel_rank[usable[0]] = 0
                plan.options[usable[0]] = slots
            else:
                rank_of = ranks.get(id(usable))  # (usable lists live as long as usable_of)
                if rank_of is None:
                    rank_of = ranks[id(usable)] = {channel: rank for rank, channel in enumerate(usable)}
                plan.channel_rank = rank_of  # shared, never changed
                plan.options = dict.fromkeys(usable, slots)
            plans.append(plan)
            continue
        for rank, channel in enumerate(usable):
            plan.channel_rank[channel] = rank
            first_failure: tuple[str, str] | None = None
            if history:
                if checks is None:
                    checks = _Checks(history, settings.min_spacing_ms, customer_zone)
                kept_slots, first_failure = checks.kept(campaign, channel, caps, slots)
            elif not zero_caps:  # nothing to count: only a zero cap can block
                kept_slots = slots
            else:
                zero = next((c for c in zero_caps if _cap_key(c, campaign, channel)), None)
                kept_slots = slots if zero is None else []
                if zero is not None:
                    first_failure = ("cap", f"{_describe_cap(zero)} reached")
            if kept_slots:
                plan.options[channel] = kept_slots
            elif first_failure is not None:
                suppressions.append(_suppression(name, first_failure[0], first_failure[1], channel))
            if kept_slots and campaign.channels.mode == "ordered":
                break  # the first channel that works wins; the rest are fallbacks
        if plan.options:
            plans.append(plan)

    base = dict(
        ruleset_hash=ruleset.hash,
        customer_id=profile.customer_id,
        decided_at_ms=now_ms,
        conditions=conditions,
        holdout=tuple(holdout),
        assigned=tuple(assigned),
    )
    if not plans:
        return Decision(action="none", suppressions=tuple(suppressions), **base)  # type: ignore[arg-type]

    # Candidates, scored: in bulk when the scorer offers it, one Candidate each otherwise.
    by_name = {p.campaign.name: p for p in plans}
    bulk = scorer is not None and hasattr(scorer, "score_options")
    candidates: list[Candidate] = []
    best: dict[str, Candidate] = {}
    if bulk:
        candidates, best = _score_in_bulk(scorer, plans, profile, now_ms, seed)
    else:
        for plan in plans:
            arms = plan.variants or (plan.arm,)
            for channel, times in plan.options.items():
                for t, arm in ((t, arm) for t in times for arm in arms):
                    candidates.append(
                        _candidate(
                            plan.campaign.name,
                            channel,
                            t,
                            0.0,
                            0.0,
                            0.0,
                            False,
                            arm.name if arm is not None else None,
                        )
                    )
        if scorer is not None:
            candidates = list(scorer.score(profile=profile, candidates=candidates, now_ms=now_ms, seed=seed))
        for cand in candidates:
            plan = by_name[cand.campaign]
            current = best.get(cand.campaign)
            key = (cand.score, -cand.send_at_ms, -plan.channel_rank.get(cand.channel, 0))
            if current is None or key > (
                current.score,
                -current.send_at_ms,
                -plan.channel_rank.get(current.channel, 0),
            ):
                best[cand.campaign] = cand

    contenders = sorted(
        best.values(), key=lambda c: (-by_name[c.campaign].campaign.priority, -c.score, c.campaign)
    )
    if scorer is not None:
        worth = [c for c in contenders if c.score > 0]
        load = None
        for c in contenders:
            if c.score <= 0:
                if load is None:
                    load = _recent_load(history, now_ms)
                suppressions.append(
                    _suppression(
                        c.campaign,
                        "score",
                        f"best expected value {c.score if c.mean is None else c.mean:.4f} <= 0 "
                        f"(expected engagement {c.engagement:.1%}, unsubscribe risk {c.unsubscribe:.2%}"
                        f"{load})",
                        c.channel,
                    )
                )
        contenders = worth
    if not contenders:
        return Decision(
            action="none",
            candidates=tuple(candidates),
            suppressions=tuple(suppressions),
            **base,  # type: ignore[arg-type]
        )

    winner = contenders[0]
    wplan = by_name[winner.campaign]
    wcamp = wplan.campaign
    for loser in contenders[1:]:
        lcamp = by_name[loser.campaign].campaign
        if wcamp.exclusive is not None and lcamp.exclusive == wcamp.exclusive:
            suppressions.append(
                _suppression(
                    loser.campaign, "exclusive", f"{wcamp.name} won exclusive group {wcamp.exclusive!r}"
                )
            )
        elif lcamp.priority < wcamp.priority:
            suppressions.append(
                _suppression(
                    loser.campaign,
                    "priority",
                    f"{wcamp.name} has priority {wcamp.priority} > {lcamp.priority}",
                )
            )
        elif loser.score < winner.score:
            suppressions.append(
                _suppression(
                    loser.campaign,
                    "priority",
                    f"tie on priority {wcamp.priority}; {wcamp.name} scored higher ({_compared(winner, loser)})",
                )
            )
        else:
            suppressions.append(
                _suppression(
                    loser.campaign,
                    "priority",
                    f"tie on priority {wcamp.priority} and score; {wcamp.name} first by name",
                )
            )

    arm = wplan.arm
    if winner.arm is not None:
        arm = next((a for a in wcamp.split if a.name == winner.arm), arm)
    template = (arm.template if arm is not None and arm.template else None) or wcamp.template.name
    variables = wcamp.template.variables(ctx)
    when = deferred.get(wcamp.name)
    if when is not None and winner.send_at_ms == when[1]:
        # The chosen time is the immediate send, deferred out of quiet hours (as without a scorer).
        suppressions.append(_deferral(wcamp.name, *when))
    notes: list[str] = []
    explained = False  # whether the variant note accounts for the winner's exploration
    if wplan.variants:
        note, explained = _variant_note(winner, candidates)
        notes.append(note)
    if winner.explored and not explained:
        notes.append(
            "send time/channel chosen by exploration: the posterior draw favoured a less-known option"
        )
    if customer_zone.key != profile.timezone:
        said = f"time zone {profile.timezone!r} is unknown" if profile.timezone else "time zone is not known"
        # The chosen campaign's quiet hours fall back to a zone of its own (another campaign's may
        # to another), so the zone is said as the campaign's, not as if it were the customer's; a
        # campaign whose quiet hours name a fixed zone did not fall back at all.
        quiet_in = (
            f", {wcamp.name}'s quiet hours {quiet_zone(wcamp.quiet, None).key} (the campaign's fallback zone)"
            if wcamp.quiet is not None and wcamp.quiet.use_customer_zone
            else ""
        )
        notes.append(
            f"the customer's {said}: local times and calendar caps use {customer_zone.key} (the ruleset's zone)"
            f"{quiet_in}; an identify with traits.timezone sets it"
        )
    return Decision(
        action="send",
        campaign=wcamp.name,
        channel=winner.channel,
        send_at_ms=winner.send_at_ms,
        template=template,
        variables=variables,
        arm=arm.name if arm is not None else None,
        candidates=tuple(candidates),
        notes=tuple(notes),
        suppressions=tuple(suppressions),
        **base,  # type: ignore[arg-type]
    )


class OptionGroup(NamedTuple):
    """Send times of one (campaign, channel, variant) for a bulk scorer (a tuple: cheap to make)."""

    campaign: Campaign
    channel: str
    arm: str | None
    times: Sequence[int]


@dataclass(frozen=True)
class BulkScores:
    """A bulk scorer's answer: flat arrays over every group's times, in group order.

    Group ``k`` owns positions ``bounds[k]:bounds[k + 1]``.
    """

    bounds: Sequence[int]
    score: np.ndarray
    engagement: np.ndarray
    unsubscribe: np.ndarray
    explored: np.ndarray
    #: The drawn values and the values at the posterior mean, when ``score`` is made from them
    #: (see :class:`~cadence.engine.decision.Candidate`); None: not known.
    draw: np.ndarray | None = None
    mean: np.ndarray | None = None


class BulkScorer(Protocol):
    """A scorer that values many send times at once (the learners); decide() prefers it.

    A scorer may also offer ``best_options`` (same arguments), answering with each group's
    best option as :func:`group_bests` would pick it from ``score_options``
    (:data:`GroupBests`); decide() then calls that instead.
    """

    def score_options(
        self, *, profile: Any, groups: Sequence[OptionGroup], now_ms: int, seed: int
    ) -> BulkScores:
        """Value every time of every group; ``score`` is what decide maximises."""
        ...


#: Each group's best option, as lists in group order: the offset of its send time in the
#: group's list, its score, engagement, unsubscribe, exploration flag, drawn value and value at
#: the posterior mean (Nones when the scorer does not say). A scorer's ``best_options`` may
#: answer with the first five only.
GroupBests = tuple[
    list[int], list[float], list[float], list[float], list[bool], list[float | None], list[float | None]
]


def group_bests(res: BulkScores, n_groups: int) -> GroupBests:
    """Each group's best option of a bulk scorer's answer: its highest score, the earliest of equals.

    A group scored -inf throughout (a variant the minimum exploration share held back) is shown
    at its best drawn value, where it would have been sent.

    >>> res = BulkScores(bounds=range(0, 5, 2), score=np.array([0.1, 0.3, 0.2, 0.2]),
    ...                  engagement=np.zeros(4), unsubscribe=np.zeros(4), explored=np.zeros(4, dtype=bool))
    >>> group_bests(res, 2)[:2]
    ([1, 0], [0.3, 0.2])
    >>> held = BulkScores(bounds=range(0, 5, 2), score=np.array([0.1, 0.3, -np.inf, -np.inf]),
    ...                   engagement=np.zeros(4), unsubscribe=np.zeros(4), explored=np.zeros(4, dtype=bool),
    ...                   draw=np.array([0.1, 0.3, 0.1, 0.4]), mean=np.array([0.2, 0.2, 0.25, 0.3]))
    >>> group_bests(held, 2)[0], group_bests(held, 2)[5:]
    ([1, 1], ([0.3, 0.4], [0.2, 0.3]))
    """
    total = int(res.bounds[-1])
    width = total // n_groups if n_groups else 0
    bounds = res.bounds
    if (
        n_groups
        and width * n_groups == total
        and (
            bounds == range(0, total + 1, width)
            if type(bounds) is range  # the learners' answer when every group shares one list
            else list(bounds) == list(range(0, total + 1, width))
        )
    ):
        # Every group has as many times (they usually share one list): a (groups x times) matrix,
        # and argmax gives each row's first maximum, the earliest of equally good times.
        first = res.score.reshape(n_groups, width).argmax(axis=1)
        best = first + np.arange(0, total, width)
        offset = first.tolist()
    else:
        edges = np.asarray(res.bounds, dtype=np.int64)
        starts = edges[:-1]
        seg_max = np.maximum.reduceat(res.score, starts)
        at_max = np.flatnonzero(res.score >= np.repeat(seg_max, np.diff(edges)))
        # The first maximum of each group: the earliest of equally good times.
        best = at_max[np.searchsorted(at_max, starts)]
        offset = (best - starts).tolist()
    draw = res.draw
    if draw is not None and n_groups:
        for k in np.flatnonzero(res.score[best] == -np.inf).tolist():
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            j = int(np.argmax(draw[lo:hi]))
            best[k], offset[k] = lo + j, j
    none: list[float | None] = [None] * n_groups
    return (
        offset,
        res.score[best].tolist(),
        res.engagement[best].tolist(),
        res.unsubscribe[best].tolist(),
        res.explored[best].tolist(),
        none if draw is None else draw[best].tolist(),
        none if res.mean is None else res.mean[best].tolist(),
    )


def _score_in_bulk(
    scorer: Any, plans: Sequence[_Plan], profile: ProfileView, now_ms: int, seed: int
) -> tuple[list[Candidate], dict[str, Candidate]]:
    """Score every option in one vectorised call; keep the best send time per (campaign, channel, arm).

    Materialising hundreds of frozen candidates would cost more than scoring them, so the
    explanation lists each campaign's best send time per channel (and variant). Also returns
    each campaign's best candidate: highest score, then earliest send, then channel order.
    A scorer with ``best_options`` (the learners) answers with each group's best directly;
    otherwise ``score_options`` values every option and :func:`group_bests` picks.
    """
    groups: list[OptionGroup] = []
    ranks: list[int] = []
    for plan in plans:
        arm_names = (
            [a.name for a in plan.variants] if plan.variants else [plan.arm.name if plan.arm else None]
        )
        for channel, times in plan.options.items():
            rank = plan.channel_rank.get(channel, 0)
            for arm in arm_names:
                groups.append(_new_tuple(OptionGroup, (plan.campaign, channel, arm, times)))
                ranks.append(rank)
    best_options = getattr(scorer, "best_options", None)
    if best_options is not None:
        picked: GroupBests = best_options(profile=profile, groups=groups, now_ms=now_ms, seed=seed)
    else:
        res = scorer.score_options(profile=profile, groups=groups, now_ms=now_ms, seed=seed)
        picked = group_bests(res, len(groups))
    offset, score, engagement, unsubscribe, explored = picked[:5]
    draws, means = (picked[5], picked[6]) if len(picked) > 5 else ([None] * len(groups),) * 2
    out = []
    top: dict[str, Candidate] = {}
    # A campaign's groups are consecutive (one plan each): its best is kept in locals until the next
    # campaign starts.
    top_name = ""
    top_cand: Candidate | None = None
    top_value, top_send, top_rank = 0.0, 0, 0
    for (campaign, channel, arm, times), k, value, eng, uns, expl, drawn, mean, rank in zip(
        groups, offset, score, engagement, unsubscribe, explored, draws, means, ranks, strict=True
    ):
        name = campaign.name
        send_at = times[k]
        cand = _candidate(name, channel, send_at, value, eng, uns, expl, arm, drawn, mean)
        out.append(cand)
        # Highest (score, -send time, -channel rank); the first of equals stays.
        if name != top_name:
            if top_cand is not None:
                top[top_name] = top_cand
            top_name, top_cand, top_value, top_send, top_rank = name, cand, value, send_at, rank
        elif value > top_value or (
            value == top_value and (send_at < top_send or (send_at == top_send and rank < top_rank))
        ):
            top_cand, top_value, top_send, top_rank = cand, value, send_at, rank
    if top_cand is not None:
        top[top_name] = top_cand
    return out, top


def _bits(flags: Sequence[bool]) -> int:
    """``flags`` as an integer whose bit ``k`` is set when ``flags[k]`` is true.

    >>> bin(_bits([True, False, True]))
    '0b101'
    """
    out = 0
    for k, flag in enumerate(flags):
        if flag:
            out |= 1 << k
    return out


class _Checks:
    """Caps, minimum spacing and exclusive groups over one decision's history.

    The history is indexed once (sorted send times per cap scope), and each rule's verdict on
    a list of send times is worked out once per decision: campaigns that share their slots
    (and global caps, which every campaign and channel share) reuse it. A verdict is a bit
    mask over the slots (bit ``k``: slot ``k`` is blocked), so combining rules is an ``or``.
    """

    def __init__(self, history: Sequence[PastSend], min_spacing_ms: int, zone: ZoneInfo) -> None:
        self.history = history
        self.min_spacing_ms = min_spacing_ms
        self.zone = zone
        self.times = _index_history(history)
        self.days: dict[tuple[str, ...], list[int]] = {}
        self.verdicts: dict[tuple[Any, ...], Any] = {}
        self.slot_lists: dict[int, Sequence[int]] = {}  # keeps every slot list keyed by id alive

    def _slot_days(self, slots: Sequence[int]) -> list[int]:
        key = ("days", id(slots))
        got: list[int] | None = self.verdicts.get(key)
        if got is None:
            self.slot_lists[id(slots)] = slots
            got = self.verdicts[key] = local_days(slots, self.zone)
        return got

    def _cap(self, cap: Cap, key: tuple[str, ...], slots: Sequence[int]) -> int:
        """The slots ``cap`` (count > 0) blocks, as a bit mask (0 when it counts no send)."""
        memo = (key, cap.window_ms, cap.calendar, cap.count, id(slots))
        got: int | None = self.verdicts.get(memo)
        if got is None:
            self.slot_lists[id(slots)] = slots
            points = self.times.get(key)
            if not points:
                got = 0
            elif cap.calendar:
                days = self.days.get(key)
                if days is None:  # sorted again: a local day can step back at a DST change
                    days = self.days[key] = sorted(local_days(points, self.zone))
                width = max(1, cap.window_ms // DAY_MS)
                got = _bits(_cap_blocked(days, self._slot_days(slots), width, cap.count))
            else:
                width = max(1, cap.window_ms)
                lo, hi = self._span(slots)
                if bisect_right(points, hi + width - 1) - bisect_left(points, lo - width + 1) < cap.count:
                    got = 0  # fewer sends near the slots than the cap allows (as _cap_blocked finds)
                else:
                    got = _bits(_cap_blocked(points, slots, width, cap.count))
            self.verdicts[memo] = got
        return got

    def _span(self, slots: Sequence[int]) -> tuple[int, int]:
        """The earliest and latest of ``slots`` (campaigns share slot lists: worked out once each)."""
        key = ("span", id(slots))
        got: tuple[int, int] | None = self.verdicts.get(key)
        if got is None:
            self.slot_lists[id(slots)] = slots
            got = self.verdicts[key] = (min(slots), max(slots))
        return got

    def _spacing(self, slots: Sequence[int]) -> tuple[int, list[int]]:
        """The slots too close to a send (bit mask), and per slot the index in the history of the first such send."""
        memo = ("spacing", id(slots))
        got: tuple[int, list[int]] | None = self.verdicts.get(memo)
        if got is None:
            self.slot_lists[id(slots)] = slots
            gap = self.min_spacing_ms
            points = self.times[("all",)]
            hits = []
            for t in slots:
                hit = -1
                if bisect_right(points, t - gap) < bisect_left(points, t + gap):
                    hit = next(i for i, h in enumerate(self.history) if abs(h.ts_ms - t) < gap)
                hits.append(hit)
            got = self.verdicts[memo] = (_bits([i >= 0 for i in hits]), hits)
        return got

    def _exclusive(self, group: str, slots: Sequence[int]) -> tuple[int, list[int]]:
        """The slots on a local day ``group`` already sent (bit mask), and per slot the index of that send."""
        memo = ("exclusive", group, id(slots))
        got: tuple[int, list[int]] | None = self.verdicts.get(memo)
        if got is None:
            sent = [i for i, h in enumerate(self.history) if h.exclusive == group]
            sent_days = local_days([self.history[i].ts_ms for i in sent], self.zone)
            first_on: dict[int, int] = {}
            for i, day in zip(sent, sent_days, strict=True):
                first_on.setdefault(day, i)
            hits = [first_on.get(day, -1) for day in self._slot_days(slots)] if first_on else []
            got = self.verdicts[memo] = (_bits([i >= 0 for i in hits]), hits)
        return got

    def kept(
        self, campaign: Campaign, channel: str, caps: Sequence[Cap], slots: list[int]
    ) -> tuple[list[int], tuple[str, str] | None]:
        """The send times no rule blocks, and when none is left, the first rule the first time breaks.

        Rules in order: the caps, the minimum spacing, the exclusive group (as ``decide`` documents).
        The rules that do not look at the channel are combined once per campaign.
        """
        every = (1 << len(slots)) - 1
        memo = ("campaign", campaign.name, id(slots))
        shared: tuple[int, list[Cap]] | None = self.verdicts.get(memo)
        if shared is None:
            mask = 0
            per_channel: list[Cap] = []
            for cap in caps:
                if cap.channel is not None or cap.scope == "channel":
                    per_channel.append(cap)
                    continue
                key = _cap_key(cap, campaign, channel)
                if key is not None:
                    mask |= every if cap.count <= 0 else self._cap(cap, key, slots)
            if self.min_spacing_ms > 0:
                mask |= self._spacing(slots)[0]
            if campaign.exclusive is not None:
                mask |= self._exclusive(campaign.exclusive, slots)[0]
            shared = self.verdicts[memo] = (mask, per_channel)
        blocked, per_channel = shared
        for cap in per_channel:
            key = _cap_key(cap, campaign, channel)
            if key is not None:
                blocked |= every if cap.count <= 0 else self._cap(cap, key, slots)
        if not blocked:
            return slots, None
        if blocked != every:
            kept_key = ("kept", blocked, id(slots))
            kept: list[int] | None = self.verdicts.get(kept_key)
            if kept is None:  # channels and campaigns blocked alike share one list
                kept = self.verdicts[kept_key] = [t for k, t in enumerate(slots) if not blocked >> k & 1]
            return kept, None
        return [], self._first_failure(campaign, channel, caps, slots)

    def _first_failure(
        self, campaign: Campaign, channel: str, caps: Sequence[Cap], slots: list[int]
    ) -> tuple[str, str]:
        """The first rule, in order, that blocks the first send time (every time is blocked)."""
        for cap in caps:
            key = _cap_key(cap, campaign, channel)
            if key is not None and (cap.count <= 0 or self._cap(cap, key, slots) & 1):
                return "cap", f"{_describe_cap(cap)} reached"
        if self.min_spacing_ms > 0:
            mask, hits = self._spacing(slots)
            if mask & 1:
                h = self.history[hits[0]]
                return (
                    "spacing",
                    f"{h.campaign} via {h.channel} at {_fmt(h.ts_ms, self.zone)} is within "
                    f"{self.min_spacing_ms / 3_600_000:g}h",
                )
        assert campaign.exclusive is not None, "a blocked first slot has a rule that blocks it"
        h = self.history[self._exclusive(campaign.exclusive, slots)[1][0]]
        return "exclusive", f"{h.campaign} of group {campaign.exclusive!r} already sent or queued that day"
