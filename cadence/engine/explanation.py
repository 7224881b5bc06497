"""One sentence a person reads first: what a decision does and the main reasons why.

The structured explanation (every condition, candidate and suppression) stays beside
it; :func:`summarise` picks from it what a marketer asks first: what is sent, where
and when (local time), what the learners expect, what came second, and what held the
other campaigns and channels back.
"""

from __future__ import annotations

import functools

from cadence.engine.decision import Candidate, Decision
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
     unsubscribe risk 0.20%; next best push at 12:00 (2.1%). Not chosen: sms (opted out of sms);
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
    """
    # One phrase per reason: a cap that holds every channel of a campaign is said once, naming
    # the channels, and the campaigns a send outranked for one reason are named together.
    # A deferral out of quiet hours is noted as a "quiet" suppression; it says why a campaign was
    # not chosen only when nothing else held that campaign back.
    others = {s.campaign for s in decision.suppressions if s.reason != "quiet"}
    channels_of: dict[tuple[str, str], list[str]] = {}
    for s in decision.suppressions:
        if s.campaign == decision.campaign and s.channel is None and s.reason == "priority":
            continue
        if s.reason == "quiet" and s.campaign in others:
            continue
        if (
            decision.action == "send"
            and s.campaign == decision.campaign
            and (s.channel is None or s.channel == decision.channel)
        ):
            continue
        named = channels_of.setdefault((s.campaign, s.detail), [])
        if s.channel is not None and s.channel not in named:
            named.append(s.channel)
    held: list[str] = []
    campaigns_of: dict[str, list[str]] = {}  # other campaigns held back, by reason (and channels)
    for (campaign, detail), channels in channels_of.items():
        if decision.action == "send" and campaign == decision.campaign:
            held.append(f"{', '.join(channels)} ({detail})")
        else:
            why = detail + (f" ({', '.join(channels)})" if len(channels) > 1 else "")
            campaigns_of.setdefault(why, []).append(campaign)
    if decision.action != "send" or decision.send_at_ms is None:
        held += [f"{', '.join(names)}: {why}" for why, names in campaigns_of.items()]
        return "Nothing to send." + (" " + "; ".join(held) + "." if held else "")
    held += [f"{', '.join(names)} ({why})" for why, names in campaigns_of.items()]
    text = f"Send {decision.campaign}"
    if decision.template:
        text += f" (template {decision.template})"
    text += f" by {decision.channel} on {_when(decision.send_at_ms, zone, fallback_zone)}"
    if any(s.campaign == decision.campaign and s.reason == "quiet" for s in decision.suppressions):
        text += " (deferred out of quiet hours)"
    chosen = next(
        (
            c
            for c in decision.candidates
            if c.campaign == decision.campaign
            and c.channel == decision.channel
            and c.send_at_ms == decision.send_at_ms
        ),
        None,
    )
    if chosen is not None and (chosen.engagement or chosen.unsubscribe):
        text += f": expected engagement {chosen.engagement:.1%}, unsubscribe risk {chosen.unsubscribe:.2%}"
        if chosen.explored:
            text += " (an exploratory choice: the learners are still unsure here)"
        others = sorted(
            (c for c in decision.candidates if c is not chosen and c.channel != decision.channel),
            key=lambda c: -c.score,
        )
        if others:
            best = others[0]
            when = _when(best.send_at_ms, zone, fallback_zone)
            name = (
                best.channel if best.campaign == decision.campaign else f"{best.campaign} by {best.channel}"
            )
            text += f"; next best {name} at {when[-12:-7]} ({best.engagement:.1%}"
            if best.engagement > chosen.engagement and best.unsubscribe > chosen.unsubscribe:
                # it would engage more: what held it back is its unsubscribe risk, so say it
                text += f", unsubscribe risk {best.unsubscribe:.2%}"
            if best.campaign == decision.campaign and not chosen.explored and _alike(chosen, best):
                # A new learner values every channel alike: the pick is the draw's, not a preference.
                # (Between campaigns, priority may have decided instead.)
                text += ", valued alike: this decision's exploration draw chose"
            text += ")"
    text += "."
    if held:
        text += " Not chosen: " + "; ".join(held) + "."
    return text
