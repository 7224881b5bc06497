"""One sentence a person reads first: what a decision does and the main reasons why.

The structured explanation (every condition, candidate and suppression) stays beside
it; :func:`summarise` picks from it what a marketer asks first: what is sent, where
and when (local time), what the learners expect, what came second, and what held the
other campaigns and channels back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from cadence.engine.decision import Candidate, Decision, Suppression
from cadence.engine.slots import local_datetime, zone_named

__all__ = ["summarise"]


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _when(ms: int, zone: str | None, fallback: str) -> str:
    """``Thu 05 Mar 10:00 +01:00`` (English names whatever the locale; strftime is slow, too).

    >>> _when(1_772_701_200_000, "Asia/Kolkata", "UTC")
    'Thu 05 Mar 14:30 +05:30'
    """
    return _when_text(ms, zone, fallback)


def _format_when(ms: int, zone: str | None, fallback: str) -> str:
    local = local_datetime(ms, zone_named(zone, fallback))
    minutes = int(local.utcoffset().total_seconds()) // 60  # type: ignore[union-attr]
    sign = "-" if minutes < 0 else "+"
    hh, mm = divmod(abs(minutes), 60)
    return (
        f"{_DAYS[local.weekday()]} {local.day:02d} {_MONTHS[local.month - 1]} "
        f"{local.hour:02d}:{local.minute:02d} {sign}{hh:02d}:{mm:02d}"
    )


#: ``_when``'s texts, kept: send times are whole hours shared by the customers of a zone.
_when_text = functools.lru_cache(maxsize=8192)(_format_when)


def _alike(a: Candidate, b: Candidate) -> bool:
    """The learners' expectations of ``a`` and ``b`` read the same in the summary (to its precision).

    >>> _alike(Candidate("c", "email", 0, 0.3, 0.0685, 0.002), Candidate("c", "sms", 0, 0.1, 0.0687, 0.002))
    True
    >>> _alike(Candidate("c", "email", 0, 0.3, 0.0685, 0.002), Candidate("c", "sms", 0, 0.1, 0.052, 0.002))
    False
    """
    return f"{a.engagement:.1%} {a.unsubscribe:.2%}" == f"{b.engagement:.1%} {b.unsubscribe:.2%}"


#: At most this many campaigns are named for one reason; the rest are counted.
_NAMED = 6


def _common(s: Suppression) -> str:
    """What ``s`` says that the same cause says for other candidates: their own numbers left out.

    >>> _common(Suppression("c", "score", "best expected value -0.0030 <= 0 (expected engagement 4.1%, unsubscribe risk 0.20%)"))
    'best expected value <= 0'
    >>> _common(Suppression("c", "score", "best expected value -0.0030 <= 0 (expected engagement 4.1%, unsubscribe risk 0.20%; 2 messages in the last 7 days)"))
    'best expected value <= 0 (2 messages in the last 7 days)'
    >>> _common(Suppression("c", "priority", "tie on priority 1; v scored higher (0.0263 > 0.0110)"))
    'tie on priority 1; v scored higher'
    >>> _common(Suppression("c", "cap", "campaign cap 1 per 7d reached", "sms"))
    'campaign cap 1 per 7d reached'
    """
    if s.reason == "score":
        _numbers, load, last = s.detail.rpartition("; ")
        return f"best expected value <= 0 ({last}" if load else "best expected value <= 0"
    if s.reason == "priority" and " scored higher (" in s.detail:
        return s.detail.partition(" (")[0]
    return s.detail


def _deferral(s: Suppression) -> bool:
    """Whether ``s`` only notes that quiet hours moved a send later (``then defer``).

    A deferral is not why a campaign was not sent, so it is left out when something else held
    the campaign; a ``then drop`` (or no allowed time left) is, and is always said.

    >>> _deferral(Suppression("c", "quiet", "23:10 is inside quiet hours 22:00..08:00 UTC: deferred to 08:00"))
    True
    >>> _deferral(Suppression("c", "quiet", "23:10 is inside quiet hours 22:00..08:00 UTC: dropped"))
    False
    """
    return s.reason == "quiet" and ": deferred to " in s.detail


def _outranked(decision: Decision, campaign: str) -> Suppression | None:
    """Why ``campaign`` lost to the chosen one whatever its score: the chosen campaign's priority,
    an exclusive group it won, or a tie broken on score or name (None: something else held it).

    >>> d = Decision(action="send", ruleset_hash="h", customer_id=1, decided_at_ms=0, campaign="vip",
    ...              suppressions=[Suppression("promo", "consent", "opted out of sms", "sms"),
    ...                            Suppression("promo", "priority", "vip has priority 5 > 3")])
    >>> _outranked(d, "promo").detail, _outranked(d, "news")
    ('vip has priority 5 > 3', None)
    """
    return next(
        (
            s
            for s in decision.suppressions
            if s.campaign == campaign and s.channel is None and s.reason in ("priority", "exclusive")
        ),
        None,
    )


def _names(names: list[str]) -> str:
    """``a, b, c``, or the first few and how many more.

    >>> _names([f"c{i}" for i in range(1, 10)])
    'c1, c2, c3, c4, c5, c6 and 3 more'
    """
    if len(names) <= _NAMED:
        return ", ".join(names)
    return f"{', '.join(names[:_NAMED])} and {len(names) - _NAMED} more"


@dataclass
class _Held:
    """Everything one reason held back: the chosen campaign's channels, other campaigns (with theirs)."""

    channels: list[str] = field(default_factory=list)
    campaigns: dict[str, list[str]] = field(default_factory=dict)
    details: dict[str, None] = field(default_factory=dict)  # the distinct details, in order

    def said(self, common: str, *, sending: bool, chosen: str | None = None) -> str:
        """The reason once, with what it held: ``winback by sms, and c, v (detail)`` (``chosen``: the
        campaign sent, whose other channels it held), or ``c, v: detail (email, sms)``."""
        detail = next(iter(self.details)) if len(self.details) == 1 else common
        sets = {tuple(chs) for chs in self.campaigns.values()}
        if len(sets) <= 1:
            # The same channels for every campaign: named once, after the reason (one channel
            # is left out: the detail usually names it, "opted out of sms").
            who = _names(list(self.campaigns))
            shared = next(iter(sets), ())
            why = detail + (f" ({', '.join(shared)})" if len(shared) > 1 else "")
        else:
            by_channels: dict[tuple[str, ...], list[str]] = {}
            for campaign, chs in self.campaigns.items():
                by_channels.setdefault(tuple(chs), []).append(campaign)
            who = ", ".join(
                f"{_names(names)} ({', '.join(chs)})" if chs else _names(names)
                for chs, names in by_channels.items()
            )
            why = detail
        if not sending:
            return f"{who}: {why}"
        if not self.channels:
            return f"{who} ({why})"
        own = f"{chosen} by {', '.join(self.channels)}" if chosen else ", ".join(self.channels)
        return f"{own}, and {who} ({why})" if self.campaigns else f"{own} ({detail})"


def summarise(decision: Decision, *, zone: str | None, fallback_zone: str = "UTC") -> str:
    """The decision in one or two sentences, in the customer's local time.

    >>> from dataclasses import replace
    >>> from cadence.engine.decision import Candidate, Suppression
    >>> d = Decision(action="send", ruleset_hash="h", customer_id=1, decided_at_ms=0, campaign="winback",
    ...              channel="email", send_at_ms=1_772_701_200_000, template="offer_x",
    ...              candidates=[Candidate("winback", "email", 1_772_701_200_000, 0.03, 0.052, 0.002),
    ...                          Candidate("winback", "push", 1_772_708_400_000, 0.01, 0.021, 0.001)],
    ...              suppressions=[Suppression("winback", "consent", "opted out of sms", "sms"),
    ...                            Suppression("cart", "priority", "lost to winback on priority (5 > 3)")])
    >>> summarise(d, zone="Europe/Berlin")  # doctest: +NORMALIZE_WHITESPACE
    'Send winback (template offer_x) by email on Thu 05 Mar 10:00 +01:00: expected engagement 5.2%,
     unsubscribe risk 0.20%; next best push at 12:00 (2.1%). Not chosen: winback by sms (opted out of sms);
     cart (lost to winback on priority (5 > 3)).'
    >>> tie = [Candidate("winback", "email", 1_772_701_200_000, 0.32, 0.0685, 0.002),
    ...        Candidate("winback", "sms", 1_772_701_200_000, 0.31, 0.0685, 0.002)]
    >>> summarise(replace(d, candidates=tie, suppressions=[]), zone="UTC").split("; ")[1]
    "next best sms at 09:00 (6.9%, valued alike: this decision's exploration draw chose)."
    >>> riskier = [Candidate("winback", "push", 1_772_701_200_000, 0.01, 0.048, 0.0049),
    ...            Candidate("winback", "email", 1_772_701_200_000, 0.0, 0.081, 0.0087)]
    >>> summarise(replace(d, channel="push", candidates=riskier, suppressions=[]), zone="UTC").split("; ")[1]
    'next best email at 09:00 (8.1%, unsubscribe risk 0.87%).'
    >>> other = [tie[0], Candidate("cart", "sms", 1_772_701_200_000, 0.31, 0.0685, 0.002)]
    >>> summarise(replace(d, candidates=other, suppressions=[]), zone="UTC").split("; ")[1]
    'next best cart by sms at 09:00 (6.9%).'
    >>> summarise(Decision(action="none", ruleset_hash="h", customer_id=1, decided_at_ms=0,
    ...                    suppressions=[Suppression("winback", "cap", "campaign cap 2 per 7d reached")]),
    ...           zone=None)
    'Nothing to send. winback: campaign cap 2 per 7d reached.'
    >>> capped = [Suppression("daily", "cap", "customer cap 1 per 1d reached", ch) for ch in ("email", "sms")]
    >>> summarise(Decision(action="none", ruleset_hash="h", customer_id=1, decided_at_ms=0,
    ...                    suppressions=capped), zone=None)
    'Nothing to send. daily: customer cap 1 per 1d reached (email, sms).'
    >>> waiting = [Suppression(c, "trigger", "needs event 'Signed Up'") for c in ("welcome", "tips")]
    >>> summarise(Decision(action="none", ruleset_hash="h", customer_id=1, decided_at_ms=0,
    ...                    suppressions=waiting), zone=None)
    "Nothing to send. welcome, tips: needs event 'Signed Up'."
    >>> lost = [Suppression(c, "priority", "lost to winback on priority (5 > 3)") for c in ("cart", "news")]
    >>> summarise(replace(d, suppressions=lost), zone="UTC").split("Not chosen: ")[1]
    'cart, news (lost to winback on priority (5 > 3)).'
    >>> later = Suppression("cart", "quiet", "23:10 is inside quiet hours 22:00..08:00: deferred to 08:00")
    >>> summarise(replace(d, suppressions=[later, *lost]), zone="UTC").split("Not chosen: ")[1]
    'cart, news (lost to winback on priority (5 > 3)).'
    >>> "on Thu 05 Mar 09:00 +00:00 (deferred out of quiet hours): expected" in summarise(
    ...     replace(d, suppressions=[replace(later, campaign="winback")]), zone="UTC")
    True

    A reason that held the chosen campaign's channel and other campaigns is said once; so is a
    cause whose details differ only in each candidate's numbers:

    >>> pushcap = [Suppression(c, "cap", "channel cap 1 per 1d on push reached", "push") for c in ("winback", "c", "v")]
    >>> ties = [Suppression(c, "priority", f"tie on priority 1; winback scored higher (0.0300 > 0.0{n}00)")
    ...         for n, c in ((2, "c"), (1, "v"))]
    >>> summarise(replace(d, suppressions=[*pushcap, *ties]), zone="UTC").split("Not chosen: ")[1]
    'winback by push, and c, v (channel cap 1 per 1d on push reached); c, v (tie on priority 1; winback scored higher).'
    >>> low = [Suppression(c, "score", f"best expected value -0.00{n} <= 0 (expected engagement 1.{n}%, unsubscribe risk 0.30%)", ch)
    ...        for n, (c, ch) in enumerate((("a", "email"), ("b", "email"), ("c", "sms")))]
    >>> summarise(Decision(action="none", ruleset_hash="h", customer_id=1, decided_at_ms=0, suppressions=low), zone=None)
    'Nothing to send. a, b (email), c (sms): best expected value <= 0.'
    >>> many = [Suppression(f"c{i}", "trigger", "needs event 'Signed Up'") for i in range(1, 10)]
    >>> summarise(Decision(action="none", ruleset_hash="h", customer_id=1, decided_at_ms=0, suppressions=many), zone=None)
    "Nothing to send. c1, c2, c3, c4, c5, c6 and 3 more: needs event 'Signed Up'."
    """
    # One phrase per reason: a cap that holds every channel of a campaign is said once, naming
    # the channels, and the campaigns (and the chosen campaign's channels) a reason held are named
    # together; reasons that differ only in one candidate's numbers are said once, without them.
    # A deferral out of quiet hours is noted as a "quiet" suppression; it says why a campaign was
    # not chosen only when nothing else held that campaign back. A quiet-hours drop is always
    # said: it is what took the campaign's last channels away (a consent on one channel, say,
    # left the others to it).
    sending = decision.action == "send" and decision.send_at_ms is not None
    # The chosen option; of a split's arms (the same campaign, channel and time) the chosen arm's:
    # another arm's engagement and "exploratory" note were said of 94 of 609 sends in an outside check.
    same = [
        c
        for c in decision.candidates
        if c.campaign == decision.campaign
        and c.channel == decision.channel
        and c.send_at_ms == decision.send_at_ms
    ]
    chosen = next((c for c in same if c.arm == decision.arm), same[0] if same else None)
    runner_up = None
    if sending and chosen is not None and (chosen.engagement or chosen.unsubscribe):
        runner_up = max(
            # Another channel of the chosen campaign, or any option of another campaign (its times
            # on the chosen channel too: another campaign by email is an alternative to this email).
            (
                c
                for c in decision.candidates
                if c is not chosen and (c.channel != decision.channel or c.campaign != decision.campaign)
            ),
            key=lambda c: c.score,
            default=None,
        )
    # A runner-up of another campaign that lost on priority or an exclusive group (and may engage
    # more than the chosen one) says so beside its numbers, and that reason is not said again below.
    outranked = (
        _outranked(decision, runner_up.campaign)
        if runner_up is not None and runner_up.campaign != decision.campaign
        else None
    )
    others = {s.campaign for s in decision.suppressions if not _deferral(s)}
    reasons: dict[str, _Held] = {}
    for s in decision.suppressions:
        if s.campaign == decision.campaign and s.channel is None and s.reason == "priority":
            continue
        if s is outranked:
            continue
        if _deferral(s) and s.campaign in others:
            continue
        if (
            decision.action == "send"
            and s.campaign == decision.campaign
            and (s.channel is None or s.channel == decision.channel)
        ):
            continue
        held_by = reasons.setdefault(_common(s), _Held())
        held_by.details.setdefault(s.detail)
        if sending and s.campaign == decision.campaign:
            named = held_by.channels
        else:
            named = held_by.campaigns.setdefault(s.campaign, [])
        if s.channel is not None and s.channel not in named:
            named.append(s.channel)
    # The chosen campaign's own channels first, as a reader looks there first.
    ordered = sorted(reasons.items(), key=lambda item: not item[1].channels)
    held = [held_by.said(common, sending=sending, chosen=decision.campaign) for common, held_by in ordered]
    if not sending:
        return "Nothing to send." + (" " + "; ".join(held) + "." if held else "")
    assert decision.send_at_ms is not None
    text = f"Send {decision.campaign}"
    if decision.template:
        text += f" (template {decision.template})"
    text += f" by {decision.channel} on {_when(decision.send_at_ms, zone, fallback_zone)}"
    if any(s.campaign == decision.campaign and _deferral(s) for s in decision.suppressions):
        text += " (deferred out of quiet hours)"
    if chosen is not None and (chosen.engagement or chosen.unsubscribe):
        text += f": expected engagement {chosen.engagement:.1%}, unsubscribe risk {chosen.unsubscribe:.2%}"
        if chosen.explored:
            text += " (an exploratory choice: the learners are still unsure here)"
        if runner_up is not None:
            best = runner_up
            when = _when(best.send_at_ms, zone, fallback_zone)
            name = (
                best.channel if best.campaign == decision.campaign else f"{best.campaign} by {best.channel}"
            )
            # The time alone on the chosen send's local day; with the day when it falls on another.
            same_day = when[:10] == _when(decision.send_at_ms, zone, fallback_zone)[:10]
            text += f"; next best {name} at {when[-12:-7] if same_day else when[:-7]} ({best.engagement:.1%}"
            if best.engagement > chosen.engagement and best.unsubscribe > chosen.unsubscribe:
                # it would engage more: what held it back is its unsubscribe risk, so say it
                text += f", unsubscribe risk {best.unsubscribe:.2%}"
            if best.campaign == decision.campaign and not chosen.explored and _alike(chosen, best):
                # A new learner values every channel alike: the pick is the draw's, not a preference.
                # (Between campaigns, priority may have decided instead.)
                text += ", valued alike: this decision's exploration draw chose"
            if outranked is not None:
                # an outside check read "(6.9%)" beside a chosen 6.4% as a worse choice
                text += f", out-ranked: {_common(outranked)}"
            text += ")"
    text += "."
    if held:
        text += " Not chosen: " + "; ".join(held) + "."
    return text
