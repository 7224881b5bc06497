"""Attribution in the engine loop: per-event updates, aggregate queries.

:class:`AttributionSubscriber` maps events to touches (our own sends and clicks on
their channel; visits with UTM parameters or a referrer through channel grouping) and
to conversions (the attribution block's conversion event), for every
:class:`AttributionSpec`. A customer's open journey lives in ``attribution_touches``;
a conversion credits it at once with every rule-based model for every standard window
(:data:`WINDOWS_DAYS`) into ``attribution_credits`` (and, without the campaign, into
``attribution_channel_credits``, which channel and day queries read; without the channel, into
``attribution_campaign_credits``, which campaign queries read), adds the journey to the coalition
and path tallies, and closes it into ``attribution_history``, from where an event logged
late (one that sorts before a conversion already credited) credits that conversion again.
:func:`query_attribution` answers from those tables
only: rule-based credit by channel, campaign or day over a date range; Shapley from
coalition tallies and Markov removal effects from path tallies (all time).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy import Connection

from cadence.channels import Feedback, feedback_campaign, feedback_channel, feedback_kind
from cadence.engine.attribution import heuristics
from cadence.engine.attribution.grouping import DEFAULT_CHANNEL_RULES, group_channel
from cadence.engine.attribution.journeys import DAY_MS, AttributionError, Journeys
from cadence.engine.attribution.markov import TransitionTally, _conversion_probability
from cadence.engine.attribution.models import apply_credit_rules
from cadence.engine.attribution.shapley import MAX_EXACT_CHANNELS, coalition_shares
from cadence.engine.attribution.spec import AttributionSpec, CreditRule, Touch
from cadence.engine.events import LoggedEvent
from cadence.engine.profiles import event_value
from cadence.store.fast import ask_in, execute_in, execute_many, fetch_in, rows_of, write_rows

__all__ = [
    "ONLINE_MODELS",
    "WINDOWS_DAYS",
    "AttributionSubscriber",
    "block_named",
    "channel_interactions",
    "default_specs",
    "journey_credits",
    "kept_windows",
    "query_attribution",
    "ruleset_of",
    "specs_of",
    "touch_of",
    "unattributed_share",
]

#: Windows kept for every block (plus the block's own window).
WINDOWS_DAYS = (1, 7, 14, 30, 60, 90)
#: Models credited per conversion as it arrives.
RULE_MODELS = (
    "first_touch",
    "last_touch",
    "last_non_direct",
    "linear",
    "time_decay",
    "position",
    "shapley_simplified",
)
#: Models the query API serves (the others are offline: ``cadence attribution run``).
ONLINE_MODELS = (*RULE_MODELS, "shapley", "markov")
KEEP_MS = 90 * DAY_MS
#: How long conversions stay open to credit again when an earlier event is logged late (before
#: the newest event the block has seen); their journeys' touches are kept a window longer.
RECREDIT_MS = 90 * DAY_MS
HISTORY_KEEP_MS = RECREDIT_MS + KEEP_MS


#: Seconds between two attempts to load rules that did not load (missing or not compiling).
RULES_RETRY_S = 5.0


def specs_of(runtime: Any) -> list[AttributionSpec]:
    """The ``attribution`` blocks of the runtime's rules, else :func:`default_specs`.

    The rules are loaded here when nothing has loaded them yet: the engine loop may apply
    the log before the scheduler or a request loads them (``cadence serve`` at start-up,
    ``cadence engine catch-up``), and a conversion credited to ``default`` then would stay
    there. Until the runtime's own holder has rules (and in the CLI, which has none),
    attribution reads the rule files through a holder of its own.
    """
    blocks = getattr(ruleset_of(runtime), "attribution", None) or {}
    return list(blocks.values()) or default_specs()


def block_named(runtime: Any, name: str | None) -> AttributionSpec:
    """The attribution block ``name`` of :func:`specs_of` (None: the first); an error names the known ones."""
    specs = {s.name: s for s in specs_of(runtime)}
    if name is None:
        return next(iter(specs.values()))
    if name not in specs:
        raise AttributionError(f"spec: unknown attribution block {name!r} (known: {', '.join(specs)})")
    return specs[name]


def ruleset_of(runtime: Any) -> Any:
    """The runtime's current ruleset as attribution reads it (see :func:`specs_of`), or None."""
    return getattr(_rules_holder(runtime), "current", None)


def _rules_holder(runtime: Any) -> Any:
    """The runtime's rules holder once it holds rules, else one of attribution's own.

    The shared holder is never reloaded from here: what the decisions API sees (no
    ruleset yet: 503) stays as it was.
    """
    extensions = getattr(runtime, "extensions", None) if runtime is not None else None
    if extensions is None:
        return None
    shared = extensions.get("rules")
    if getattr(shared, "current", None) is not None:
        return shared
    settings = getattr(runtime, "settings", None)
    paths = list(getattr(shared, "paths", None) or getattr(settings, "rules_paths", None) or [])
    if not paths:
        return shared
    own = extensions.get("attribution.rules")
    if own is None:
        from cadence.dsl.loader import RulesetHolder

        if shared is not None:
            channels, zone = shared.available_channels, shared.default_zone
        else:
            from cadence.dsl.explain import installed_channels

            channels, zone = installed_channels(settings), settings.default_timezone
        own = extensions.setdefault(
            "attribution.rules", RulesetHolder(paths, available_channels=channels, default_zone=zone)
        )
    if own.current is None:
        now = time.monotonic()
        tried = extensions.get("attribution.rules_tried")
        if tried is None or now - tried >= RULES_RETRY_S:
            extensions["attribution.rules_tried"] = now
            own.reload()
    return own


def kept_windows(spec: AttributionSpec) -> list[int]:
    """Windows (days) whose credits and tallies are kept for ``spec``: :data:`WINDOWS_DAYS` and its own.

    >>> kept_windows(AttributionSpec(name="b", title="", conversion_event="x", window_ms=45 * DAY_MS))
    [1, 7, 14, 30, 45, 60, 90]
    """
    own = max(1, min(90, round(spec.window_ms / DAY_MS)))
    return sorted({*WINDOWS_DAYS, own})


def default_specs() -> list[AttributionSpec]:
    """The block used when no rules define one: ``Order Completed``, valued by ``revenue``."""
    return [
        AttributionSpec(
            name="default", title="Orders", conversion_event="Order Completed", value_prop="revenue"
        )
    ]


def touch_of(event: LoggedEvent, spec: AttributionSpec) -> tuple[str, str] | None:
    """(channel, campaign) if ``event`` is a touch for ``spec``, else None.

    >>> from cadence.engine.events import LoggedEvent as E
    >>> spec = default_specs()[0]
    >>> touch_of(E(1, "m", "track", "Message Clicked", "u", None, 1, 0, "api",
    ...     {"properties": {"channel": "sms", "campaign": "spring"}}), spec)
    ('sms', 'spring')
    >>> touch_of(E(2, "m", "page", None, "u", None, 1, 0, "api",
    ...     {"context": {"campaign": {"source": "google", "medium": "cpc", "name": "brand"}}}), spec)
    ('paid_search', 'brand')
    >>> touch_of(E(3, "m", "track", "Ad Viewed", "u", None, 1, 0, "api", {"properties": {"channel": "display"}}), spec)
    ('display', '')
    >>> touch_of(E(4, "m", "track", "Order Completed", "u", None, 1, 0, "api", {}), spec) is None
    True
    >>> touch_of(E(5, "m", "page", None, "u", None, 1, 0, "api",
    ...     {"context": {"campaign": "spring"}, "properties": {"utm_source": 5, "utm_medium": "cpc"}}), spec)
    ('paid_other', '')
    """
    if event.type == "track" and event.event == spec.conversion_event:
        return None
    props = event.properties
    kind = feedback_kind(event.event) if event.type == "track" else None
    if kind in (Feedback.SENT, Feedback.CLICKED):
        channel = feedback_channel(event.event, props)
        if isinstance(channel, str) and channel:
            return channel, feedback_campaign(props)
        return None
    if kind is not None or event.type not in ("track", "page", "screen"):
        return None
    # Only text is matched and shown (a number as its text): a list or an object is no source or
    # campaign, and a number given to the glob matcher, or a context.campaign that is not an
    # object, stopped the engine loop's attribution until the event was set aside.
    campaign = event.context.get("campaign")
    campaign = campaign if isinstance(campaign, dict) else {}
    page = event.context.get("page")
    page = page if isinstance(page, dict) else {}
    fields = {
        "source": _text(campaign.get("source")) or _text(props.get("utm_source")),
        "medium": _text(campaign.get("medium")) or _text(props.get("utm_medium")),
        "campaign": _text(campaign.get("name"))
        or _text(props.get("utm_campaign"))
        or _text(props.get("campaign")),
        "referrer": _text(page.get("referrer")) or _text(props.get("referrer")),
        "event": event.event,
    }
    label = fields["campaign"] or ""
    if spec.channel_rules:
        # The block's own rules first: they may name events ("Ad Clicked" -> display).
        channel = _grouped_channel(spec.channel_rules, fields)
        if channel:
            return channel, label
    own = props.get("channel")
    if isinstance(own, str) and own.strip():
        return own.strip(), label
    if not (fields["source"] or fields["medium"] or fields["referrer"]):
        return None
    channel = _grouped_channel(DEFAULT_CHANNEL_RULES, fields)
    return (channel, label) if channel else None


def _text(value: object) -> str | None:
    """A UTM field as text: a string as it is, a number as its text, anything else none.

    >>> _text("cpc"), _text(2024), _text(["cpc"]), _text(True), _text("")
    ('cpc', '2024', None, None, None)
    """
    if isinstance(value, str):
        return value or None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


#: :func:`_grouped_channel`'s answers: (id of the rules, the fields) -> (the rules, the channel).
_GROUPED: dict[tuple[int, tuple[Any, ...]], tuple[Any, str | None]] = {}


def _grouped_channel(rules: Sequence[Any], fields: Mapping[str, Any]) -> str | None:
    """:func:`group_channel`, remembered per rules and UTM tuple (a handful of tuples recur, and matching
    every glob of every rule for each touch cost most of the loop's attribution time): the default
    rules and a block's own alike."""
    values = (fields["source"], fields["medium"], fields["campaign"], fields["referrer"], fields["event"])
    try:
        key = (id(rules), values)
        hit = _GROUPED.get(key)
    except TypeError:  # a field that is not a string nor a number (unhashable JSON): not remembered
        return group_channel(fields, rules)
    if hit is not None and hit[0] is rules:  # the same rules object, not a later one at the same address
        return hit[1]
    if len(_GROUPED) >= 16_384:
        _GROUPED.clear()
    channel = group_channel(fields, rules)
    _GROUPED[key] = (rules, channel)
    return channel


def journey_credits(
    touches: Sequence[tuple[int, str, str]],
    conv_ms: int,
    *,
    params: Mapping[str, Any] | None = None,
    credit_rules: Sequence[CreditRule] = (),
) -> dict[str, list[tuple[str, str, float]]]:
    """Per rule-based model: (channel, campaign, credit) of one converting journey.

    ``touches`` are (ts_ms, channel, campaign), oldest first, all at or before ``conv_ms``;
    the block's credit rules apply (exclusions first).

    >>> c = journey_credits([(0, "email", "a"), (DAY_MS, "search", "")], 2 * DAY_MS)
    >>> c["linear"], c["last_touch"][1]
    ([('email', 'a', 0.5), ('search', '', 0.5)], ('search', '', 1.0))
    """
    params = params or {}
    if credit_rules and touches:
        seen = [Touch(ts_ms=t[0], channel=t[1], campaign=t[2] or None) for t in touches]
        gone = {r.channel for r in credit_rules if r.action == "exclude" and (r.when is None or r.when(seen))}
        touches = [t for t in touches if t[1] not in gone]
    if not touches:
        return {m: [] for m in RULE_MODELS}
    if any(r.action != "exclude" for r in credit_rules):
        # Conditions are decided here, on the touches with their campaigns: the journey
        # arrays below hold channels and times only.
        seen = [Touch(ts_ms=t[0], channel=t[1], campaign=t[2] or None) for t in touches]
        holding = [
            replace(r, when=None)
            for r in credit_rules
            if r.action != "exclude" and (r.when is None or r.when(seen))
        ]
        credits = _model_arrays(touches, conv_ms, params)
        j = _journey_of(touches, conv_ms)
        shares = [apply_credit_rules(j, credits[m], holding).tolist() for m in RULE_MODELS]
    else:
        shares = rule_shares(
            [t[1] for t in touches],
            [conv_ms - t[0] for t in touches],
            half_life_ms=int(params.get("half_life_ms", 7 * DAY_MS)),
            first=float(params.get("first", 0.4)),
            last=float(params.get("last", 0.4)),
        )
    return {
        m: [(t[1], t[2], float(c)) for t, c in zip(touches, share, strict=True)]
        for m, share in zip(RULE_MODELS, shares, strict=True)
    }


def rule_shares(
    channels: Sequence[str], ages_ms: Sequence[int], *, half_life_ms: int, first: float, last: float
) -> list[list[float]]:
    """Each :data:`RULE_MODELS` model's share per touch of one converting journey, in plain Python.

    Bit for bit what the vectorised models in :mod:`~cadence.engine.attribution.heuristics`
    give for a single journey (the same operations in the same order), without building
    arrays: for the three or four touches of a typical journey numpy's per-call overhead
    is most of the cost. ``ages_ms`` is how long before the conversion each touch was.

    >>> rule_shares(["email", "direct"], [DAY_MS, 0], half_life_ms=DAY_MS, first=0.4, last=0.4)[1:3]
    [[0.0, 1.0], [1.0, 0.0]]
    """
    if half_life_ms <= 0:
        raise ValueError("half_life_ms must be positive")
    if first < 0 or last < 0 or first + last > 1:
        raise ValueError("position weights must be >= 0 and first + last <= 1")
    n = len(channels)
    first_touch = [0.0] * n
    first_touch[0] = 1.0
    last_touch = [0.0] * n
    last_touch[-1] = 1.0
    last_non_direct = last_touch
    for i in range(n - 1, -1, -1):
        if channels[i].lower() not in heuristics.DIRECT_CHANNELS:
            last_non_direct = [0.0] * n
            last_non_direct[i] = 1.0
            break
    linear = [1.0 / n] * n
    # numpy's exp2, not math.exp2: on a CPU with AVX-512 numpy has its own exp2, which can
    # differ from the C library's in the last bit, and the shares must be the vectorised ones.
    weights = np.exp2(-np.array(ages_ms, dtype=np.float64) / half_life_ms).tolist()
    total = 0.0
    for w in weights:
        total += w
    time_decay = [w / total for w in weights] if total > 0 else [0.0] * n
    if n == 1:
        position = [1.0]
    elif n == 2:
        position = [0.5, 0.5]
    else:
        middle = (1.0 - first - last) / max(float(n) - 2, 1.0)
        position = [first, *([middle] * (n - 2)), last]
    per_channel: dict[str, int] = {}
    for c in channels:
        per_channel[c] = per_channel.get(c, 0) + 1
    distinct = len(per_channel)
    shapley = [1.0 / distinct / per_channel[c] for c in channels]
    return [first_touch, last_touch, last_non_direct, linear, time_decay, position, shapley]


def _journey_of(touches: Sequence[tuple[int, str, str]], conv_ms: int) -> Journeys:
    return Journeys.from_paths(
        [[t[1] for t in touches]], converted=[1.0], gaps_ms=[[conv_ms - t[0] for t in touches]]
    )


def _model_arrays(
    touches: Sequence[tuple[int, str, str]], conv_ms: int, params: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The vectorised models over one journey: the reference :func:`rule_shares` matches."""
    j = _journey_of(touches, conv_ms)
    return {
        "first_touch": heuristics.first_touch(j),
        "last_touch": heuristics.last_touch(j),
        "last_non_direct": heuristics.last_non_direct(j),
        "linear": heuristics.linear(j),
        "time_decay": heuristics.time_decay(j, half_life_ms=int(params.get("half_life_ms", 7 * DAY_MS))),
        "position": heuristics.position(
            j, first=float(params.get("first", 0.4)), last=float(params.get("last", 0.4))
        ),
        "shapley_simplified": heuristics.shapley_simplified(j),
    }


_CREDIT_COLUMNS = (
    ("spec", "text"),
    ("model", "text"),
    ("window_days", "integer"),
    ("day", "integer"),
    ("channel", "text"),
    ("campaign", "text"),
    ("conversions", "float8"),
    ("value", "float8"),
)
_ADD_CREDIT = (
    "ON CONFLICT (spec, model, window_days, day, channel, campaign) "
    "DO UPDATE SET conversions = attribution_credits.conversions + excluded.conversions, "
    "value = attribution_credits.value + excluded.value"
)
_CHANNEL_CREDIT_COLUMNS = tuple(c for c in _CREDIT_COLUMNS if c[0] != "campaign")
_ADD_CHANNEL_CREDIT = (
    "ON CONFLICT (spec, model, window_days, day, channel) "
    "DO UPDATE SET conversions = attribution_channel_credits.conversions + excluded.conversions, "
    "value = attribution_channel_credits.value + excluded.value"
)
_CAMPAIGN_CREDIT_COLUMNS = tuple(c for c in _CREDIT_COLUMNS if c[0] != "channel")
_ADD_CAMPAIGN_CREDIT = (
    "ON CONFLICT (spec, model, window_days, day, campaign) "
    "DO UPDATE SET conversions = attribution_campaign_credits.conversions + excluded.conversions, "
    "value = attribution_campaign_credits.value + excluded.value"
)
_COALITION_COLUMNS = (
    ("spec", "text"),
    ("window_days", "integer"),
    ("channels", "text"),
    ("journeys", "float8"),
    ("conversions", "float8"),
)
_ADD_COALITION = (
    "ON CONFLICT (spec, window_days, channels) "
    "DO UPDATE SET journeys = attribution_coalitions.journeys + excluded.journeys, "
    "conversions = attribution_coalitions.conversions + excluded.conversions"
)
_PATH_COLUMNS = (("spec", "text"), ("window_days", "integer"), ("path", "text"), ("conversions", "float8"))
_ADD_PATH = (
    "ON CONFLICT (spec, window_days, path) "
    "DO UPDATE SET conversions = attribution_paths.conversions + excluded.conversions"
)
_TOUCH_COLUMNS = (
    ("spec", "text"),
    ("customer_id", "bigint"),
    ("ts_ms", "bigint"),
    ("channel", "text"),
    ("campaign", "text"),
    ("event_id", "bigint"),
)
_HISTORY_COLUMNS = (*_TOUCH_COLUMNS[:5], ("value", "float8"), ("event_id", "bigint"), ("closed_by", "bigint"))

#: The blocks that have open journeys, one index seek each (a "loose index scan": no
#: database here skips through an index for ``SELECT DISTINCT`` by itself).
_DISTINCT_SPECS = (
    "WITH RECURSIVE s(spec) AS (SELECT MIN(spec) FROM {table} UNION ALL "
    "SELECT (SELECT MIN(spec) FROM {table} WHERE spec > s.spec) FROM s WHERE s.spec IS NOT NULL) "
    "SELECT spec FROM s WHERE spec IS NOT NULL"
)


def _ts(touch: tuple[Any, ...]) -> int:
    return int(touch[0])


#: One event of a customer's timeline: ``(ts_ms, kind, channel, campaign, event_id, value)``,
#: kind 0 a touch, 1 a conversion (channel and campaign ""). Sorted as tuples, touches come
#: before a conversion at the same millisecond (they count before it), by channel and
#: campaign among themselves; conversions in log order.
_Entry = tuple[int, int, str, str, int, float]


@dataclass
class _Tallies:
    """What conversions add to the aggregates, before it is written."""

    #: (model, window, day, channel, campaign) -> [conversions, value]
    credits: dict[tuple[str, int, int, str, str], list[float]] = field(default_factory=dict)
    #: Conversions with no touch in a window credit no channel, for every model alike:
    #: (window, day) -> [conversions, value], spread over the models when written.
    untouched: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    coalitions: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    paths: dict[tuple[int, str], float] = field(default_factory=dict)

    def add_difference(self, added: _Tallies, removed: _Tallies) -> None:
        """Add ``added - removed`` (conversions credited again); keys that did not change are left out."""
        for mine, plus, minus in (
            (self.credits, added.credits, removed.credits),
            (self.untouched, added.untouched, removed.untouched),
            (self.coalitions, added.coalitions, removed.coalitions),
        ):
            for key in plus.keys() | minus.keys():
                a, b = plus.get(key, (0.0, 0.0)), minus.get(key, (0.0, 0.0))
                if a[0] != b[0] or a[1] != b[1]:
                    acc = mine.setdefault(key, [0.0, 0.0])  # type: ignore[arg-type]
                    acc[0] += a[0] - b[0]
                    acc[1] += a[1] - b[1]
        for key in added.paths.keys() | removed.paths.keys():
            d = added.paths.get(key, 0.0) - removed.paths.get(key, 0.0)
            if d:
                self.paths[key] = self.paths.get(key, 0.0) + d

    def write(self, conn: Connection, name: str) -> None:
        """Add these tallies to the block's aggregate tables."""
        credits = dict(self.credits)
        # Touches always have a channel, so these keys are never credited by a touch.
        for (w, day), acc in self.untouched.items():
            for model in RULE_MODELS:
                credits[(model, w, day, "", "")] = acc
        write_rows(
            conn,
            "attribution_credits",
            _CREDIT_COLUMNS,
            [(name, m, w, d, ch, cp, v[0], v[1]) for (m, w, d, ch, cp), v in credits.items()],
            _ADD_CREDIT,
        )
        by_channel: dict[tuple[str, int, int, str], list[float]] = {}
        for (m, w, d, ch, _cp), v in credits.items():
            acc = by_channel.setdefault((m, w, d, ch), [0.0, 0.0])
            acc[0] += v[0]
            acc[1] += v[1]
        write_rows(
            conn,
            "attribution_channel_credits",
            _CHANNEL_CREDIT_COLUMNS,
            [(name, m, w, d, ch, v[0], v[1]) for (m, w, d, ch), v in by_channel.items()],
            _ADD_CHANNEL_CREDIT,
        )
        by_campaign: dict[tuple[str, int, int, str], list[float]] = {}
        for (m, w, d, _ch, cp), v in credits.items():
            acc = by_campaign.setdefault((m, w, d, cp), [0.0, 0.0])
            acc[0] += v[0]
            acc[1] += v[1]
        write_rows(
            conn,
            "attribution_campaign_credits",
            _CAMPAIGN_CREDIT_COLUMNS,
            [(name, m, w, d, cp, v[0], v[1]) for (m, w, d, cp), v in by_campaign.items()],
            _ADD_CAMPAIGN_CREDIT,
        )
        write_rows(
            conn,
            "attribution_coalitions",
            _COALITION_COLUMNS,
            [(name, w, k, v[0], v[1]) for (w, k), v in self.coalitions.items()],
            _ADD_COALITION,
        )
        write_rows(
            conn,
            "attribution_paths",
            _PATH_COLUMNS,
            [(name, w, k, v) for (w, k), v in self.paths.items()],
            _ADD_PATH,
        )


def _credit_timeline(
    timeline: Sequence[_Entry],
    since: _Entry,
    spec: AttributionSpec,
    windows: Sequence[int],
    out: _Tallies,
    final_but_new: frozenset[int] = frozenset(),
) -> tuple[list[_Entry], list[tuple[_Entry, int]]]:
    """Credit the conversions of one customer's sorted ``timeline`` that sort at or after
    ``since`` into ``out``; return the open touches (after the last conversion) and the
    closed entries (the rest), each with the event id of the conversion that closed it (a
    conversion's own). A conversion before ``since`` whose event id is in ``final_but_new`` (logged
    for the first time, but older than the conversions that can be credited again) counts
    with no touch: it still counts once, and takes no credit from conversions already final.

    Each conversion closes the journey of the touches since the one before it; each
    window's journey is a suffix of those, and windows that reach back to the same touch
    share its credits.
    """
    touches: list[_Entry] = []
    closed: list[tuple[_Entry, int]] = []
    for entry in timeline:
        if entry[1] == 0:
            touches.append(entry)
            continue
        if entry >= since:
            _credit_conversion(touches, entry, spec, windows, out)
        elif entry[4] in final_but_new:
            _credit_conversion([], entry, spec, windows, out)
        closed.extend((t, entry[4]) for t in touches)
        closed.append((entry, entry[4]))
        touches = []
    return touches, closed


def _credit_conversion(
    touches: Sequence[_Entry],
    conversion: _Entry,
    spec: AttributionSpec,
    windows: Sequence[int],
    out: _Tallies,
) -> None:
    ts_ms, value = conversion[0], conversion[5]
    day = ts_ms // DAY_MS
    n = len(touches)
    solved: dict[int, tuple[list[tuple[str, str, str, float, float]], str, str]] = {}
    for w in windows:
        k = bisect_left(touches, ts_ms - w * DAY_MS, 0, n, key=_ts)
        if k not in solved:
            inside = [(t[0], t[2], t[3]) for t in touches[k:]]
            per_model = journey_credits(inside, ts_ms, params=spec.params, credit_rules=spec.credit_rules)
            solved[k] = (
                [
                    (model, channel, campaign, credit, credit * value)
                    for model, rows in per_model.items()
                    for channel, campaign, credit in rows
                ],
                "+".join(sorted({t[1] for t in inside})),
                ">".join(t[1] for t in inside),
            )
        shares, coalition, path = solved[k]
        if not shares:  # no touch in the window, or every one excluded
            acc = out.untouched.setdefault((w, day), [0.0, 0.0])
            acc[0] += 1.0
            acc[1] += value
        for model, channel, campaign, credit, credit_value in shares:
            acc = out.credits.setdefault((model, w, day, channel, campaign), [0.0, 0.0])
            acc[0] += credit
            acc[1] += credit_value
        if k < n:
            tally = out.coalitions.setdefault((w, coalition), [0.0, 0.0])
            tally[0] += 1.0
            tally[1] += 1.0
            out.paths[(w, path)] = out.paths.get((w, path), 0.0) + 1.0


@dataclass
class AttributionSubscriber:
    """The engine-loop subscriber keeping attribution aggregates for every block."""

    runtime: Any = None
    specs: Sequence[AttributionSpec] | None = None
    name: str = "attribution"
    _pruned_day: dict[str, int] = field(default_factory=dict)

    def current_specs(self) -> list[AttributionSpec]:
        """The blocks to keep: given ones, else the loaded rules' ``attribution`` blocks,
        else :func:`default_specs`."""
        return list(self.specs) if self.specs is not None else specs_of(self.runtime)

    def windows(self, spec: AttributionSpec) -> list[int]:
        """Windows (days) kept for ``spec``."""
        return kept_windows(spec)

    def start(self, conn: Connection, checkpoint: int) -> int:
        """State is in the database: resume from the stored checkpoint."""
        return checkpoint

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        """Record touches, credit conversions, close journeys."""
        for spec in self.current_specs():
            self._apply_spec(conn, spec, batch)

    def _apply_spec(self, conn: Connection, spec: AttributionSpec, batch: Sequence[LoggedEvent]) -> None:
        conversion = spec.conversion_event
        arrived: dict[int, list[_Entry]] = {}
        for e in batch:
            if e.type == "track" and e.event == conversion:
                entry: _Entry = (e.ts_ms, 1, "", "", e.id, _conversion_value(e, spec))
            else:
                touch = touch_of(e, spec)
                if touch is None:
                    continue
                entry = (e.ts_ms, 0, touch[0], touch[1], e.id, 0.0)
            arrived.setdefault(e.customer_id, []).append(entry)
        if not arrived:
            return
        name = spec.name
        customers = sorted(arrived)
        asked_open = ask_in(
            conn,
            "SELECT customer_id, ts_ms, channel, campaign, event_id, id FROM attribution_touches "
            "WHERE spec = ? AND customer_id IN_VALUES",
            customers,
            name,
        )
        asked_last = ask_in(
            conn,
            "SELECT customer_id, MAX(ts_ms) FROM attribution_history "
            "WHERE spec = ? AND channel = '' AND customer_id IN_VALUES GROUP BY customer_id",
            customers,
            name,
        )
        stored_open: dict[int, list[_Entry]] = {}
        stored: dict[int, int] = {}  # event id -> row id of the open touches already in the table
        for row in rows_of(asked_open):
            stored_open.setdefault(int(row[0]), []).append(
                (int(row[1]), 0, str(row[2]), str(row[3]), int(row[4]), 0.0)
            )
            stored[int(row[4])] = int(row[5])
        windows = self.windows(spec)
        # A customer whose batch holds an event that sorts before their last credited
        # conversion is *late*: the conversions from that event on are credited again.
        late: dict[int, _Entry] = {}
        for cid, last_ms in rows_of(asked_last):
            first = min(arrived[int(cid)])
            if last_ms is not None and (first[0] < last_ms or (first[0] == last_ms and first[1] == 0)):
                late[int(cid)] = first
        # The late customers' history from the longest window before their first late event:
        # the conversions to credit again, and the journeys they were credited with.
        history: dict[int, list[_Entry]] = {}
        journeys: dict[int, list[_Entry]] = {}  # conversion's event id -> the touches it closed
        closers: dict[int, int] = {}  # a stored touch's event id -> the conversion's that closed it
        history_ids: list[int] = []
        newest = max(entry[0] for entries in arrived.values() for entry in entries)
        day = newest // DAY_MS
        prune = self._pruned_day.get(name) != day
        horizon: _Entry = (0, 0, "", "", 0, 0.0)
        if late or prune:
            seen = conn.exec_driver_sql(
                _placeholders(conn, "SELECT MAX(ts_ms) FROM attribution_history WHERE spec = ?"), (name,)
            ).scalar()
            newest_seen = max(newest, int(seen or 0))
            # Conversions older than this are final: they close journeys but keep their credit.
            horizon = (newest_seen - RECREDIT_MS, 0, "", "", 0, 0.0)
        if late:
            since_ms = min(first[0] for first in late.values()) - max(windows) * DAY_MS
            for row in fetch_in(
                conn,
                "SELECT customer_id, ts_ms, channel, campaign, event_id, value, closed_by, id "
                "FROM attribution_history WHERE spec = ? AND ts_ms >= ? AND customer_id IN_VALUES",
                sorted(late),
                name,
                since_ms,
            ):
                kind = 1 if row[2] == "" else 0
                entry = (int(row[1]), kind, str(row[2]), str(row[3]), int(row[4]), float(row[5]))
                history.setdefault(int(row[0]), []).append(entry)
                if kind == 0:
                    journeys.setdefault(int(row[6]), []).append(entry)
                    closers[entry[4]] = int(row[6])
                history_ids.append(int(row[7]))
        tallies = _Tallies()
        added, removed = _Tallies(), _Tallies()
        open_: dict[int, list[_Entry]] = {}
        closed_rows: list[tuple[Any, ...]] = []
        for cid in customers:
            now = sorted(history.get(cid, []) + stored_open.get(cid, []) + arrived[cid])
            first = late.get(cid)
            if first is not None:
                first = max(first, horizon)
            if first is None:
                # Nothing credited after this batch's events: only its conversions are new.
                open_[cid], closed = _credit_timeline(now, now[0], spec, windows, tallies)
            else:
                # Take back what the conversions from the late event on were credited with,
                # and credit them again on the whole timeline (of the merged customer, too).
                for entry in history[cid]:
                    if entry[1] == 1 and entry >= first:
                        _credit_conversion(sorted(journeys.get(entry[4], [])), entry, spec, windows, removed)
                new_conversions = frozenset(e[4] for e in arrived[cid] if e[1] == 1)
                open_[cid], closed = _credit_timeline(now, first, spec, windows, added, new_conversions)
                # A conversion before the late event was not credited again: its touches keep
                # the conversion they were credited to (after a merge, the timeline interleaves
                # two customers' journeys).
                credited_again = {e[4] for e in now if e[1] == 1 and e >= first}
                closed = [(e, c if c in credited_again else closers.get(e[4], c)) for e, c in closed]
            # Conversions and the touches they closed go to the history (a late customer's
            # loaded rows are written again: a touch may now be closed by another conversion).
            closed_rows.extend(
                (name, cid, entry[0], entry[2], entry[3], entry[5], entry[4], closer)
                for entry, closer in closed
                if newest - entry[0] <= HISTORY_KEEP_MS
            )
        if late:
            tallies.add_difference(added, removed)
        tallies.write(conn, name)
        execute_in(conn, "DELETE FROM attribution_history WHERE id IN_VALUES", history_ids)
        write_rows(conn, "attribution_history", _HISTORY_COLUMNS, closed_rows)
        # Prune the history once per day of event time (the delete walks the (spec, ts) index).
        if prune:
            execute_many(
                conn,
                "DELETE FROM attribution_history WHERE spec = ? AND ts_ms < ?",
                [(name, horizon[0] - KEEP_MS)],
            )
            self._pruned_day[name] = day
        # The open journeys of these customers, pruned to the longest window: rows of closed
        # or expired touches go, new open touches come; the others stay as they are.
        kept: set[int] = set()
        new_rows = []
        for c, touches in open_.items():
            for t in touches:
                if newest - t[0] <= KEEP_MS:
                    if t[4] in stored:
                        kept.add(t[4])
                    else:
                        new_rows.append((name, c, t[0], t[2], t[3], t[4]))
        execute_in(
            conn,
            "DELETE FROM attribution_touches WHERE id IN_VALUES",
            [row_id for event_id, row_id in stored.items() if event_id not in kept],
        )
        write_rows(conn, "attribution_touches", _TOUCH_COLUMNS, new_rows)

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        """The loser's open journey becomes the winner's."""
        self.merged_many(conn, [(winner, loser)])

    def merged_many(self, conn: Connection, merges: Sequence[tuple[int, int]]) -> None:
        """Every loser's open journeys become its winner's (each block's, through its index)."""
        if not merges:
            return
        for table in ("attribution_touches", "attribution_history"):
            specs = [r[0] for r in conn.exec_driver_sql(_DISTINCT_SPECS.format(table=table)).fetchall()]
            execute_many(
                conn,
                f"UPDATE {table} SET customer_id = ? WHERE spec = ? AND customer_id = ?",
                [(winner, spec, loser) for spec in specs for winner, loser in merges],
            )

    def erased(self, conn: Connection, customer_id: int) -> None:
        """Forget the customer's journeys (credited aggregates hold no customer)."""
        execute_many(conn, "DELETE FROM attribution_touches WHERE customer_id = ?", [(customer_id,)])
        execute_many(conn, "DELETE FROM attribution_history WHERE customer_id = ?", [(customer_id,)])


def _conversion_value(event: LoggedEvent, spec: AttributionSpec) -> float:
    """The conversion's value: a number or a numeric string, else 0 (NaN and infinities too:
    one would turn every sum it joins into NaN)."""
    props = event.properties
    if spec.value_prop:
        raw = props.get(spec.value_prop)
        try:
            value = float(raw) if raw is not None and not isinstance(raw, bool) else 0.0
        except (TypeError, ValueError):
            return 0.0
    else:
        value = event_value(props) or 0.0
    return value if math.isfinite(value) else 0.0


GROUPS = {"channel": "channel", "campaign": "campaign", "day": "day"}


def query_attribution(
    conn: Connection,
    *,
    spec: str,
    models: Sequence[str],
    window_days: int,
    since_day: int | None = None,
    until_day: int | None = None,
    group_by: str = "channel",
) -> dict[str, list[dict[str, Any]]]:
    """Per model: rows ``{"key", "conversions", "value"}`` from the aggregates only.

    Rule-based models honour the date range (UTC days of the conversions) and every
    grouping; ``shapley`` and ``markov`` are solved from all-time tallies, by channel.
    """
    if group_by not in GROUPS:
        raise AttributionError(f"group_by must be channel, campaign or day, not {group_by!r}")
    out: dict[str, list[dict[str, Any]]] = {}
    open_paths: list[list[str]] | None = None  # read once for shapley and markov
    for model in models:
        if model in RULE_MODELS:
            table = (
                "attribution_campaign_credits" if group_by == "campaign" else "attribution_channel_credits"
            )
            sql = (
                f"SELECT {GROUPS[group_by]}, SUM(conversions), SUM(value) FROM {table} "
                "WHERE spec = ? AND model = ? AND window_days = ? AND day >= ? AND day <= ? "
                f"GROUP BY {GROUPS[group_by]} ORDER BY {GROUPS[group_by]}"
            )
            params = (spec, model, window_days, since_day or 0, until_day if until_day is not None else 10**9)
            rows = conn.exec_driver_sql(_placeholders(conn, sql), params).all()
            out[model] = [
                {
                    "key": r[0] if group_by != "day" else _day(int(r[0])),
                    "conversions": float(r[1]),
                    "value": float(r[2]),
                }
                for r in rows
                # A key whose credit moved to another (an event logged late) sums to zero.
                if (group_by == "day" or r[0] != "") and (abs(r[1]) > 1e-9 or abs(r[2]) > 1e-9)
            ]
            blank = next((r for r in rows if r[0] == ""), None)
            if group_by == "campaign" and blank is not None:
                # The empty campaign holds the conversions with no touch (no channel either)
                # and the credit of touches without a campaign: keep the latter as "(none)".
                untouched = conn.exec_driver_sql(
                    _placeholders(
                        conn,
                        "SELECT SUM(conversions), SUM(value) FROM attribution_channel_credits WHERE spec = ? "
                        "AND model = ? AND window_days = ? AND day >= ? AND day <= ? AND channel = ''",
                    ),
                    params,
                ).one()
                conversions = float(blank[1]) - float(untouched[0] or 0.0)
                if conversions > 1e-9:
                    value = float(blank[2]) - float(untouched[1] or 0.0)
                    out[model].insert(0, {"key": "(none)", "conversions": conversions, "value": value})
        elif model in ("shapley", "markov"):
            if group_by != "channel":
                raise AttributionError(f"{model} is solved from all-time tallies: group_by must be channel")
            if open_paths is None:
                open_paths = _open_paths(conn, spec, window_days)
            out[model] = _tally_model(conn, spec, model, window_days, open_paths)
        else:
            raise AttributionError(
                f"model {model!r} is not served online (choose from {', '.join(ONLINE_MODELS)}); "
                "run it offline with `cadence attribution run`"
            )
    return out


def channel_interactions(conn: Connection, *, spec: str, window_days: int) -> dict[str, Any]:
    """How channels work together on converting journeys, from the coalition tallies.

    Returns ``{"channels": [...], "solo": {channel: conversions with only it},
    "pairs": {(a, b): conversions whose journey had both}, "total": conversions with a touch}``
    (all time, the ``window_days`` tallies).
    """
    rows = conn.exec_driver_sql(
        _placeholders(
            conn,
            "SELECT channels, conversions FROM attribution_coalitions WHERE spec = ? AND window_days = ?",
        ),
        (spec, window_days),
    ).all()
    solo: dict[str, float] = {}
    pairs: dict[tuple[str, str], float] = {}
    seen: set[str] = set()
    total = 0.0
    for key, conv in rows:
        members = sorted(c for c in str(key).split("+") if c)
        n = float(conv)
        total += n
        seen.update(members)
        if len(members) == 1:
            solo[members[0]] = solo.get(members[0], 0.0) + n
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                pairs[(a, b)] = pairs.get((a, b), 0.0) + n
    return {"channels": sorted(seen), "solo": solo, "pairs": pairs, "total": total}


def unattributed_share(
    conn: Connection,
    *,
    spec: str,
    window_days: int,
    since_day: int | None = None,
    until_day: int | None = None,
) -> tuple[float, float]:
    """(conversions with no touch inside the window, all conversions) over a date range.

    Counted from the last-touch credits, where a journey without touches is credited to
    no channel: these conversions happened with no marketing that the window saw.
    """
    row = conn.exec_driver_sql(
        _placeholders(
            conn,
            "SELECT SUM(CASE WHEN channel = '' THEN conversions ELSE 0 END), SUM(conversions) "
            "FROM attribution_channel_credits WHERE spec = ? AND model = 'last_touch' AND window_days = ? "
            "AND day >= ? AND day <= ?",
        ),
        (spec, window_days, since_day or 0, until_day if until_day is not None else 10**9),
    ).one()
    return float(row[0] or 0.0), float(row[1] or 0.0)


def _day(day: int) -> str:
    return str(np.datetime64(day, "D"))


def _placeholders(conn: Connection, sql: str) -> str:
    return sql.replace("?", "%s") if conn.dialect.name == "postgresql" else sql


def _open_paths(conn: Connection, spec: str, window_days: int) -> list[list[str]]:
    rows = conn.exec_driver_sql(
        _placeholders(
            conn,
            "SELECT customer_id, ts_ms, channel FROM attribution_touches WHERE spec = ? "
            "ORDER BY customer_id, ts_ms, channel, campaign, event_id",
        ),
        (spec,),
    ).all()
    by_customer: dict[int, list[tuple[int, str]]] = {}
    for cid, ts, channel in rows:
        by_customer.setdefault(int(cid), []).append((int(ts), str(channel)))
    paths = []
    for touches in by_customer.values():
        last = touches[-1][0]
        paths.append([c for ts, c in touches if last - ts <= window_days * DAY_MS])
    return paths


def _tally_model(
    conn: Connection, spec: str, model: str, window_days: int, open_paths: list[list[str]]
) -> list[dict[str, Any]]:
    if model == "shapley":
        rows = conn.exec_driver_sql(
            _placeholders(
                conn,
                "SELECT channels, journeys, conversions FROM attribution_coalitions WHERE spec = ? AND window_days = ?",
            ),
            (spec, window_days),
        ).all()
        tallies = {str(r[0]): [float(r[1]), float(r[2])] for r in rows}
        for p in open_paths:
            key = "+".join(sorted(set(p)))
            tallies.setdefault(key, [0.0, 0.0])[0] += 1.0
        channels = sorted({c for k in tallies for c in k.split("+") if c})
        if len(channels) > MAX_EXACT_CHANNELS:
            raise AttributionError(
                f"exact Shapley handles at most {MAX_EXACT_CHANNELS} channels, got {len(channels)}: "
                "group channels first (channel rules of the attribution block)"
            )
        code = {c: i for i, c in enumerate(channels)}

        def mask(key: str) -> int:
            return sum(1 << code[c] for c in key.split("+") if c)

        journeys = {mask(k): int(round(v[0])) for k, v in tallies.items()}
        conversions = {mask(k): int(round(v[1])) for k, v in tallies.items()}
        shares = coalition_shares(journeys, conversions, len(channels))
        credit = np.zeros(len(channels))
        for k, v in tallies.items():
            credit += shares[mask(k)] * v[1]
        return [
            {"key": c, "conversions": float(x), "value": None} for c, x in zip(channels, credit, strict=True)
        ]
    rows = conn.exec_driver_sql(
        _placeholders(
            conn, "SELECT path, conversions FROM attribution_paths WHERE spec = ? AND window_days = ?"
        ),
        (spec, window_days),
    ).all()
    channels = sorted({c for r in rows for c in str(r[0]).split(">")} | {c for p in open_paths for c in p})
    code = {c: i for i, c in enumerate(channels)}
    tally = TransitionTally(order=1)
    total_conv = 0.0
    for path, conv in rows:
        tally.add_path([code[c] for c in str(path).split(">")], converted=True, count=float(conv))
        total_conv += float(conv)
    for p in open_paths:
        tally.add_path([code[c] for c in p], converted=False)
    credit = _removal_credit(tally, len(channels), total_conv)
    return [{"key": c, "conversions": float(x), "value": None} for c, x in zip(channels, credit, strict=True)]


def _removal_credit(tally: TransitionTally, k: int, total: float) -> np.ndarray:
    """Markov removal-effect credit from a transition tally (states are channel tuples)."""
    special: dict[tuple[int, ...], int] = {(-1,): 0, (-2,): 1, (-3,): 2}
    ids: dict[tuple[int, ...], int] = dict(special)
    src, dst, counts = [], [], []
    for (a, b), n in tally.counts.items():
        for s in (a, b):
            if s not in ids:
                ids[s] = len(ids)
        src.append(ids[a])
        dst.append(ids[b])
        counts.append(n)
    if not counts:
        return np.zeros(k)
    state_mask = np.zeros(len(ids), dtype=np.int64)
    for s, i in ids.items():
        if i >= 3:
            state_mask[i] = sum(1 << c for c in set(s))
    s_arr, d_arr, c_arr = np.array(src), np.array(dst), np.array(counts, dtype=np.float64)
    base = _conversion_probability(s_arr, d_arr, c_arr, len(ids), None)
    effects = np.zeros(k)
    if base > 0:
        for c in range(k):
            removed = (state_mask >> c) & 1 == 1
            effects[c] = max(0.0, 1 - _conversion_probability(s_arr, d_arr, c_arr, len(ids), removed) / base)
    return total * effects / effects.sum() if effects.sum() > 0 else effects
