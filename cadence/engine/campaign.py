"""What a compiled campaign is: the contract between the rule compiler and the engine.

The DSL compiler (``cadence.dsl``) produces :class:`Campaign` objects; the decision
pipeline (``cadence.engine.decide``), the scheduler and ``cadence explain`` consume
them and never see a parse tree. Conditions are plain callables over an
:class:`EvalContext`; each also reports its parts with their actual values so an
explanation can show why a campaign did or did not fire.

Durations are integer milliseconds, times of day are ``datetime.time``, shares are
floats in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import time
from typing import Any, Literal, Protocol

__all__ = [
    "Cap",
    "Campaign",
    "ChannelPolicy",
    "ConditionResult",
    "EvalContext",
    "Predicate",
    "ProfileView",
    "QuietHours",
    "Schedule",
    "SourcePos",
    "SplitArm",
    "TemplateSpec",
    "Trigger",
]

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


class ProfileView(Protocol):
    """What rules can read about one customer. Backed by profile aggregates, never by
    scanning the event log; an in-memory implementation serves rule tests."""

    @property
    def customer_id(self) -> int: ...

    @property
    def traits(self) -> Mapping[str, Any]: ...

    @property
    def timezone(self) -> str | None: ...

    def count(self, event: str, since_ms: int, until_ms: int) -> int:
        """How many ``event``s happened in ``[since_ms, until_ms)``."""
        ...

    def sum(self, event: str, prop: str, since_ms: int, until_ms: int) -> float:
        """The sum of ``properties[prop]`` over ``event``s in ``[since_ms, until_ms)``."""
        ...

    def last_at(self, event: str) -> int | None:
        """When ``event`` last happened, or None."""
        ...

    def first_at(self, event: str) -> int | None:
        """When ``event`` first happened, or None."""
        ...

    def consented(self, channel: str) -> bool | None:
        """True/False when consent for ``channel`` is known, None when never given or refused."""
        ...


@dataclass(frozen=True)
class EvalContext:
    """Everything a condition may read: the customer, the triggering event, and now."""

    profile: ProfileView
    now_ms: int
    event: Mapping[str, Any] | None = None  # {"event": name, "ts_ms": .., "properties": {...}}
    context: Mapping[str, Any] = field(default_factory=dict)  # from the decision request


@dataclass(frozen=True)
class ConditionResult:
    """One condition, as written, with its value at evaluation time."""

    text: str
    value: Any
    passed: bool
    pos: SourcePos | None = None
    nested: bool = False  # a part of a segment a top-level condition names (``seg > part``)
    # the campaign clause it belongs to: "audience", "where" (a trigger's) or "unless"; None for the
    # parts of a segment no campaign names as its audience. ``passed`` is whether the part let the campaign through: for an
    # ``unless`` part, that it does *not* hold (``unless X`` with X false passes, value false).
    stage: str | None = None


class Predicate(Protocol):
    """A compiled condition: call it to decide, ``explain`` it to see every part."""

    source: str

    def __call__(self, ctx: EvalContext) -> bool: ...

    def explain(self, ctx: EvalContext) -> list[ConditionResult]: ...


@dataclass(frozen=True)
class SourcePos:
    """Where something was written: ``file:line:column``."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Cap:
    """At most ``count`` messages per ``window_ms``.

    ``scope`` says what is counted: this campaign's sends, a channel's sends (global
    caps), or every send to the customer. ``calendar=True`` counts calendar days in
    the customer's time zone instead of a rolling window.
    """

    count: int
    window_ms: int
    scope: Literal["campaign", "channel", "customer", "group"] = "campaign"
    channel: str | None = None
    calendar: bool = False


@dataclass(frozen=True)
class QuietHours:
    """No sends between ``start`` and ``end`` local time (the range may wrap midnight).

    The zone is ``profile.timezone`` when ``use_customer_zone`` and the customer has
    one, else ``fallback_zone``. ``action`` says whether a send that falls inside is
    deferred to the next allowed time or dropped. Equal ends (``08:00..08:00``) cover the
    whole day: the campaign never sends (what the linter's W505 tells the marketer).
    """

    start: time
    end: time
    fallback_zone: str
    use_customer_zone: bool = True
    action: Literal["defer", "drop"] = "defer"

    @property
    def whole_day(self) -> bool:
        """Whether the range covers every local time, so that no send time is ever allowed."""
        return self.start == self.end

    def said(self, zone: str) -> str:
        """The range as explanations and the dispatcher write it, in ``zone`` (the zone it was read in).

        >>> QuietHours(start=time(21), end=time(8), fallback_zone="UTC").said("Europe/Berlin")
        '21:00..08:00 Europe/Berlin'
        >>> QuietHours(start=time(8), end=time(8), fallback_zone="UTC").said("UTC")
        '08:00..08:00 UTC (the whole day)'
        """
        return f"{self.start:%H:%M}..{self.end:%H:%M} {zone}" + (" (the whole day)" if self.whole_day else "")


@dataclass(frozen=True)
class ChannelPolicy:
    """Which channels a campaign may use.

    ``mode="best"``: the learner picks among ``channels`` per customer.
    ``mode="ordered"``: the first channel the customer can receive wins; the rest are
    fallbacks in order.
    """

    channels: tuple[str, ...]
    mode: Literal["best", "ordered"] = "ordered"


@dataclass(frozen=True)
class SplitArm:
    """One arm of a split: a share of customers by stable hash, with its template.

    A holdout arm (``holdout=True``) never receives the campaign; it is recorded so
    attribution can measure lift.
    """

    name: str
    share: float
    template: str | None = None
    holdout: bool = False


@dataclass(frozen=True)
class TemplateSpec:
    """The message: a template name and a callable that builds its variables."""

    name: str
    variables: Callable[[EvalContext], dict[str, Any]] = lambda _ctx: {}


@dataclass(frozen=True)
class Trigger:
    """Fire on an event: ``on EVENT where CONDITION after DELAY``."""

    event: str
    where: Predicate | None = None
    delay_ms: int = 0


@dataclass(frozen=True)
class Schedule:
    """A recurring push to the whole audience.

    ``cron`` is a five-field crontab expression (``"0 9 * * *"``);
    ``zone="customer"`` means each customer's local time, otherwise a zone name.
    ``text`` is the schedule as written in the rule file.
    """

    cron: str
    zone: str
    text: str


@dataclass(frozen=True)
class Campaign:
    """A compiled campaign. Immutable; part of a ruleset with a content hash."""

    name: str
    title: str
    priority: int
    audience: Predicate | None
    template: TemplateSpec
    channels: ChannelPolicy
    trigger: Trigger | None = None
    unless: Predicate | None = None
    caps: tuple[Cap, ...] = ()
    quiet: QuietHours | None = None
    exclusive: str | None = None
    schedule: Schedule | None = None
    split: tuple[SplitArm, ...] = ()
    learn_variants: bool = False  # let the learner choose among split arms' templates
    min_explore: float = 0.1
    starts_ms: int | None = None
    ends_ms: int | None = None
    kind: Literal["message", "audience"] = "message"  # audience: sync membership (ads)
    pos: SourcePos | None = None


@dataclass(frozen=True)
class GlobalSettings:
    """Ruleset-wide settings: caps across campaigns, minimum spacing, default zone."""

    caps: tuple[Cap, ...] = ()
    min_spacing_ms: int = 0
    default_zone: str = "UTC"


@dataclass(frozen=True)
class Segment:
    """A named audience condition."""

    name: str
    title: str
    condition: Predicate
    pos: SourcePos | None = None


@dataclass(frozen=True)
class AggregateNeed:
    """A profile aggregate some rule reads: the engine maintains only these."""

    event: str
    prop: str | None = None  # None: counts only


@dataclass(frozen=True)
class CompiledRuleset:
    """Everything a rule directory compiles to. ``hash`` is the content hash of the sources."""

    hash: str
    campaigns: Mapping[str, Campaign]
    segments: Mapping[str, Segment]
    settings: GlobalSettings
    aggregates: frozenset[AggregateNeed]
    event_aliases: Mapping[str, str] = field(default_factory=dict)  # purchased -> "Order Completed"
    attribution: Mapping[str, Any] = field(default_factory=dict)  # name -> attribution spec
    files: Sequence[str] = ()
