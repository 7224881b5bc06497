"""The campaign rules a send must still keep when it goes out: quiet hours, customer caps, spacing.

A decision places a send outside its campaign's quiet hours and within the customer's caps
and minimum spacing. The send can still go out later than planned (a provider's 429 or
``Retry-After``, a retry after a failure, a dispatcher that was down, a connector's rate limit,
``cadence sends requeue``), or next to a send the decision did not know about (two customers,
each with a send queued, stitched into one by an alias or identify: the merge moves the sends
to one customer, but each was decided alone). So the dispatcher checks
each send it claims once more, at the moment it would go out, against the rules it holds (but
a send decided as of the past, :func:`cadence.engine.sendqueue.is_replay`, whose timeline is not
the dispatcher's clock):

- **Quiet hours** of the send's campaign, in the customer's zone (the campaign's fallback zone
  without one), as decisions read them (:mod:`cadence.engine.slots`). Inside them a
  ``then defer`` campaign's send waits, still ``queued``, for the next allowed local time (its
  ``due_ms`` moves there; no attempt is counted), a ``then drop`` campaign's send is
  ``suppressed``, and a send whose next allowed time is at or after the campaign's end is
  ``expired``. Audience syncs are exempt (quiet hours do not apply to them).
- **Global caps** of the ruleset's ``settings`` (``cap N per WINDOW [calendar]``, per customer or
  on a channel), counted over the customer's sends that went out or are going out
  (``sent``/``sending``, at their due time, as decisions count them; a deferral moves it) and
  those claimed before it in the same round, with the customers merged into it: a send that
  would break one by going out now is ``suppressed``.
- **Minimum spacing** of the ruleset's ``settings``: a send closer than that to one of those
  sends is deferred (still ``queued``) to the first time the spacing allows; its quiet hours
  and caps are checked again then.

Each verdict is recorded on the row: ``last_error`` says why, starting ``quiet:``, ``cap:`` or
``spacing:``. A send whose campaign is not in the loaded rules (renamed, removed), or any send
while no rules are loaded, goes out as before: there is nothing to check it against (the
ruleset has no global quiet hours). Campaign caps are not checked here: only the merged
customer case can break them, and the decision that queued each send counted them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from cadence.engine.campaign import DAY_MS, Cap, CompiledRuleset
from cadence.engine.decide import cap_allows
from cadence.engine.slots import is_quiet, local_datetime, next_allowed_ms, quiet_zone, zone_named

__all__ = ["QUIET_PREFIX", "CAP_PREFIX", "SPACING_PREFIX", "Held", "RulesCheck", "history_horizon_ms"]

QUIET_PREFIX = "quiet:"
CAP_PREFIX = "cap:"
SPACING_PREFIX = "spacing:"


@dataclass(frozen=True)
class Held:
    """A send the rules hold back now: its new ``status``, why, and (when deferred) its new due time."""

    status: str  # queued (deferred) | suppressed | expired
    reason: str
    due_ms: int | None = None


def _fmt(ms: int, zone: ZoneInfo) -> str:
    return local_datetime(ms, zone).strftime("%Y-%m-%d %H:%M %Z")


def _describe(cap: Cap) -> str:
    days = cap.window_ms / DAY_MS
    span = f"{days:g}d" if days >= 1 else f"{cap.window_ms / 3_600_000:g}h"
    where = f" on {cap.channel}" if cap.channel else ""
    return f"{cap.count} per {span}{where}{' (calendar days)' if cap.calendar else ''}"


def history_horizon_ms(ruleset: CompiledRuleset | None) -> int | None:
    """How far back the customer's sends matter to the global caps and spacing; None when nothing counts them.

    A calendar cap counts whole local days: one more day covers any zone's offset.

    >>> from cadence.engine.campaign import GlobalSettings
    >>> rs = CompiledRuleset("h", {}, {}, GlobalSettings(caps=(Cap(1, DAY_MS, "customer", calendar=True),)), frozenset())
    >>> history_horizon_ms(rs) == 2 * DAY_MS
    True
    >>> history_horizon_ms(CompiledRuleset("h", {}, {}, GlobalSettings(), frozenset())) is None
    True
    """
    if ruleset is None:
        return None
    settings = ruleset.settings
    spans = [c.window_ms + (DAY_MS if c.calendar else 0) for c in settings.caps]
    if settings.min_spacing_ms > 0:
        spans.append(settings.min_spacing_ms)
    return max(spans) if spans else None


@dataclass
class RulesCheck:
    """The rules of one dispatch round, at ``now``, over the customers' past sends.

    ``history``: per (canonical) customer, the ``(channel, ms)`` of their sends that went out
    or are going out. :meth:`check` adds each send it lets through, so a second send of the
    same customer in the round is counted against the first.
    """

    ruleset: CompiledRuleset
    now: int
    history: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    #: Quiet-hours verdicts by (campaign, customer zone): every send of a round is checked at one ``now``.
    _quiet_seen: dict[tuple[str, str | None], Held | None] = field(default_factory=dict)

    def check(
        self, *, campaign: str, channel: str, customer_id: int, timezone: str | None, membership: bool = False
    ) -> Held | None:
        """None when the send may go now (and it is counted), else what to do with it.

        An ad-audience change (``membership``: an ``add`` or ``remove`` operation, or any send of
        an audience sync campaign) is no message: never held, never counted.
        """
        if membership or self.is_sync(campaign):
            return None
        key = (campaign, timezone)
        if key in self._quiet_seen:
            held = self._quiet_seen[key]
        else:
            held = self._quiet_seen[key] = self._quiet(campaign, timezone)
        if held is None:
            held = self._caps(campaign, channel, customer_id, timezone)
        if held is None:
            self.history.setdefault(customer_id, []).append((channel, self.now))
        return held

    def is_sync(self, name: str) -> bool:
        """Whether ``name`` is an audience sync in the loaded rules (its sends are membership changes)."""
        campaign = self.ruleset.campaigns.get(name)
        return campaign is not None and campaign.kind != "message"

    def _quiet(self, name: str, timezone: str | None) -> Held | None:
        campaign = self.ruleset.campaigns.get(name)
        if campaign is None or campaign.kind != "message" or campaign.quiet is None:
            return None
        quiet = campaign.quiet
        zone = quiet_zone(quiet, timezone)
        now = self.now
        if not is_quiet(quiet, local_datetime(now, zone).time()):
            return None
        said = f"{QUIET_PREFIX} {_fmt(now, zone)} is inside quiet hours {quiet.said(zone.key)} of campaign {name!r}"
        if quiet.action == "drop":
            return Held("suppressed", f"{said} (then drop): dropped")
        later = next_allowed_ms(quiet, now, zone)
        if later is None:  # the whole day is quiet: waiting would never end
            return Held("suppressed", f"{said}: dropped")
        if campaign.ends_ms is not None and later >= campaign.ends_ms:
            return Held(
                "expired", f"{said}: the next allowed time {_fmt(later, zone)} is after the campaign ends"
            )
        return Held("queued", f"{said}: deferred to {_fmt(later, zone)}", later)

    def _caps(self, name: str, channel: str, customer_id: int, timezone: str | None) -> Held | None:
        settings = self.ruleset.settings
        past = self.history.get(customer_id)
        if not past or (not settings.caps and settings.min_spacing_ms <= 0):
            return None
        zone = zone_named(timezone, settings.default_zone)
        now = self.now
        for cap in settings.caps:
            if cap.channel is not None and cap.channel != channel:
                continue
            times = sorted(t for ch, t in past if cap.scope != "channel" or ch == channel)
            if not cap_allows(cap, times, now, zone):
                return Held(
                    "suppressed",
                    f"{CAP_PREFIX} the customer's sends (merged customers included) already reach the "
                    f"{'channel' if cap.scope == 'channel' else 'customer'} cap {_describe(cap)}",
                )
        gap = settings.min_spacing_ms
        if gap > 0:
            close = [t for _ch, t in past if abs(t - now) < gap]
            if close:
                later = max(close) + gap
                return Held(
                    "queued",
                    f"{SPACING_PREFIX} a send to this customer at {_fmt(max(close), zone)} is closer than the "
                    f"minimum spacing of {gap / 3_600_000:g}h: deferred to {_fmt(later, zone)}",
                    later,
                )
        return None
