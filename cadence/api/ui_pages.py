"""What each dashboard page shows, gathered from the owning modules' service functions.

Each ``*_page`` function takes the runtime (and the page's parameters) and returns the
template's context: plain dicts and lists, with chart specifications ready for
Chart.js. They read aggregates only (attribution credits and tallies, campaign day
counts, one customer's profile rows), so their cost does not grow with the event log.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from sqlalchemy import Connection, select

from cadence.clock import datetime_to_ms, now_ms
from cadence.connectors.delivery import circuit_states
from cadence.dsl.loader import RulesetHolder, load_rules
from cadence.dsl.testing import run_tests
from cadence.engine.attribution.holdout import lift
from cadence.engine.attribution.journeys import DAY_MS, AttributionError
from cadence.engine.attribution.materialized import MATERIALIZED_MODELS, read_fits
from cadence.engine.attribution.online import (
    RULE_MODELS,
    channel_interactions,
    kept_windows,
    query_attribution,
    ruleset_of,
    specs_of,
    unattributed_share,
)
from cadence.engine.campaign_stats import KINDS, campaign_stats, queue_outcomes
from cadence.engine.decide import BEFORE_SPLIT_REASONS
from cadence.engine.decisions_service import decision_record, make_decision
from cadence.engine.identity import customer_by_ref, identities_of
from cadence.engine.learning import LearnerSubscriber
from cadence.engine.profiles import load_profile
from cadence.errors import CadenceError, IdentityError
from cadence.runtime import Runtime
from cadence.scheduler.service import SchedulerService, list_jobs
from cadence.store.db import read_connection
from cadence.store.fast import fetch_in, fetch_rows, iter_rows
from cadence.store.schema.decisions import decisions
from cadence.store.schema.sends import sends

__all__ = ["attribution_page", "campaigns_page", "customer_page", "preview_decision", "rules_page"]

EPOCH = date(1970, 1, 1)
#: Every model the attribution page can show.
PAGE_MODELS = (*RULE_MODELS, *MATERIALIZED_MODELS)
#: One colour per series, readable on white and distinct for the colour-blind (Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
FUNNEL = ("sent", "delivered", "opened", "clicked", "converted", "unsubscribed")


def _day(d: date) -> int:
    return (d - EPOCH).days


def _label(day: int) -> str:
    return date.fromordinal(EPOCH.toordinal() + day).isoformat()


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _bar_chart(
    labels: Sequence[str], series: Mapping[str, Sequence[float]], *, stacked: bool = False
) -> dict[str, Any]:
    datasets = [
        {"label": name, "data": [round(float(v), 4) for v in values], "backgroundColor": _color(i)}
        for i, (name, values) in enumerate(series.items())
    ]
    scales = {"x": {"stacked": stacked}, "y": {"stacked": stacked, "beginAtZero": True}}
    return {
        "type": "bar",
        "data": {"labels": list(labels), "datasets": datasets},
        "options": {"scales": scales},
    }


def _line_chart(labels: Sequence[str], series: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    datasets = [
        {
            "label": name,
            "data": [round(float(v), 4) for v in values],
            "borderColor": _color(i),
            "backgroundColor": _color(i),
            "tension": 0,
            "pointRadius": 0,
        }
        for i, (name, values) in enumerate(series.items())
    ]
    return {
        "type": "line",
        "data": {"labels": list(labels), "datasets": datasets},
        "options": {"scales": {"y": {"beginAtZero": True}}},
    }


# --------------------------------------------------------------------------- attribution


#: Models the attribution page shows unless others are picked.
DEFAULT_PAGE_MODELS = ("last_touch", "linear", "position", "shapley_simplified", "causal")


def attribution_page(
    runtime: Runtime,
    *,
    spec: str | None,
    models: Sequence[str],
    window_days: int,
    since: date,
    until: date,
    on_missing_fit: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Credit by channel for several models, conversions per day, interactions, holdout lift.

    Rule-based models read the per-day credits of the range; ``shapley``,
    ``shapley_ordered``, ``markov`` and ``causal`` read their materialised fits (all
    time, or the causal model's last 90 days), never solved here: a page costs the
    same at any number of stored touchpoints. A missing fit is reported, and
    ``on_missing_fit(spec, window_days)`` is called (to ask the refresher for it).
    ``spec`` None is the first attribution block of the loaded rules (``default`` without any).
    """
    errors: list[str] = []
    unknown = [m for m in models if m not in PAGE_MODELS]
    if unknown:
        errors.append(f"unknown model {', '.join(map(repr, unknown))} (choose from {', '.join(PAGE_MODELS)})")
    models = [m for m in models if m in PAGE_MODELS] or ["last_touch"]
    blocks = {s.name: s for s in specs_of(runtime)}
    if spec is not None and spec not in blocks:
        errors.append(
            f"unknown attribution block {spec!r}; showing {next(iter(blocks))} (known: {', '.join(blocks)})"
        )
        spec = None
    if spec is None:
        spec = next(iter(blocks))
    windows = kept_windows(blocks[spec])
    if window_days not in windows:
        default = 30 if 30 in windows else windows[-1]
        errors.append(
            f"window {window_days}d is not kept; showing {default}d (kept: {', '.join(map(str, windows))})"
        )
        window_days = default
    since_day, until_day = _day(since), _day(until)
    with read_connection(runtime.engine) as conn:
        by_model: dict[str, list[dict[str, Any]]] = {}
        rule = [m for m in models if m not in MATERIALIZED_MODELS]
        try:
            if rule:
                by_model.update(
                    query_attribution(
                        conn,
                        spec=spec,
                        models=rule,
                        window_days=window_days,
                        since_day=since_day,
                        until_day=until_day,
                    )
                )
        except AttributionError as exc:
            errors.append(str(exc))
        wanted = sorted({*[m for m in models if m in MATERIALIZED_MODELS], "causal"})
        fits = read_fits(conn, spec=spec, models=wanted, window_days=window_days)
        newest = int(conn.exec_driver_sql("SELECT MAX(id) FROM events").scalar() or 0)
        missing = [m for m in models if m in MATERIALIZED_MODELS and (m, window_days) not in fits]
        for m in models:
            if m in MATERIALIZED_MODELS and (m, window_days) in fits:
                by_model[m] = fits[(m, window_days)].rows
        per_day = query_attribution(
            conn,
            spec=spec,
            models=["last_touch"],
            window_days=window_days,
            since_day=since_day,
            until_day=until_day,
            group_by="day",
        )["last_touch"]
        interactions = channel_interactions(conn, spec=spec, window_days=window_days)
        untouched, total = unattributed_share(
            conn, spec=spec, window_days=window_days, since_day=since_day, until_day=until_day
        )
        ruleset = ruleset_of(runtime)
        lifts = holdout_lifts(
            conn,
            since_ms=since_day * 86_400_000,
            until_ms=(until_day + 1) * 86_400_000,
            conversion_event=blocks[spec].conversion_event,
            campaigns=[
                name
                for name, campaign in (ruleset.campaigns.items() if ruleset is not None else ())
                if any(arm.holdout for arm in campaign.split)
            ],
        )
    if missing or (("causal", window_days) not in fits):
        errors.append(
            f"not fitted yet for the {window_days}-day window: {', '.join(missing or ['causal'])}; "
            "the leader refreshes materialised models in the background "
            "(or run `cadence attribution refresh`)"
        )
        if on_missing_fit is not None:
            on_missing_fit(spec, window_days)
    causal_fit = fits.get(("causal", window_days))
    causal = None
    if causal_fit is not None and causal_fit.rows:
        info = causal_fit.result
        causal = {
            "share_anyway": info.get("share_anyway"),
            "baseline": info.get("baseline_conversions"),
            "expected": info.get("expected_conversions"),
            "observed": info.get("observed_conversions"),
            "customers": info.get("customers"),
            "from_ms": info.get("from_ms"),
            "to_ms": info.get("to_ms"),
            "interactions": [p for p in info.get("interactions", []) if p["conversions"] >= 0.05][:10],
            "half_lives": info.get("half_life_days", {}),
        }
    freshness = [
        {
            "model": m,
            "fitted_ms": f.fitted_ms,
            "position": f.position,
            "behind": max(0, newest - f.position),
            "seconds": f.seconds,
        }
        for (m, _w), f in sorted(fits.items())
        if m in models or m == "causal"
    ]
    channels = sorted({row["key"] for rows in by_model.values() for row in rows})
    table = [
        {
            "channel": ch,
            "credit": {m: next((r for r in by_model.get(m, []) if r["key"] == ch), None) for m in by_model},
        }
        for ch in channels
    ]
    credit_chart = _bar_chart(
        channels,
        {
            m: [next((r["conversions"] for r in rows if r["key"] == ch), 0.0) for ch in channels]
            for m, rows in by_model.items()
        },
    )
    day_counts = {row["key"]: row["conversions"] for row in per_day}
    labels = [_label(d) for d in range(since_day, until_day + 1)]
    day_chart = _line_chart(labels, {"conversions (all)": [day_counts.get(lab, 0.0) for lab in labels]})
    pairs = sorted(interactions["pairs"].items(), key=lambda kv: -kv[1])[:20]
    return {
        "spec": spec,
        "models": [m for m in models if m in by_model],
        "all_models": PAGE_MODELS,
        "materialized": MATERIALIZED_MODELS,
        "causal": causal,
        "freshness": freshness,
        "windows": windows,
        "window": window_days,
        "blocks": list(blocks),
        "table": table,
        "total_conversions": total,
        "untouched": untouched,
        "untouched_share": (untouched / total) if total else None,
        "interactions": {
            "channels": interactions["channels"],
            "solo": interactions["solo"],
            "pairs": [
                {
                    "a": a,
                    "b": b,
                    "conversions": n,
                    "share": n / interactions["total"] if interactions["total"] else 0.0,
                }
                for (a, b), n in pairs
            ],
            "total": interactions["total"],
        },
        "lifts": lifts,
        "lift_conversion": blocks[spec].conversion_event,
        "charts": {"credit": credit_chart, "daily": day_chart},
        "errors": errors,
    }


def holdout_lifts(
    conn: Connection,
    *,
    since_ms: int,
    until_ms: int,
    conversion_event: str = "Order Completed",
    campaigns: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Measured lift per campaign with a holdout arm: customers by assigned arm, intent to treat.

    A committed decision in ``[since_ms, until_ms)`` *assigns* a customer an arm of every
    campaign it drew a split arm for (its explanation lists the campaign under ``holdout``,
    or the campaign was considered and not suppressed before the split: sent, capped,
    out-bid or without consent alike). The stable hash fixes the arm, so whether the
    message went says nothing about the arm's customers: counting only those sent would
    compare the customers the caps and the priority chose with the whole holdout arm.
    Each customer counts once, in the arm of their first assignment in the range, and
    *converted* when they have a ``conversion_event`` at or after that first assignment
    and before ``until_ms``. The arms are independent samples of customers, so the
    interval is the one of a difference of two proportions.

    ``campaigns`` are those known to have a holdout arm (the loaded rules'); any other
    campaign a decision held a customer out of is measured too (the range is read twice
    then). Parses one explanation per customer when their first decision in the range drew
    every arm, more only for customers a campaign's earlier checks (``audience``,
    ``unless``, trigger) kept out of its split; then reads the customers' conversion day
    buckets and stats (:func:`converted_after`), never the whole event log.
    """
    first, found = _first_assignments(conn, since_ms=since_ms, until_ms=until_ms, campaigns=campaigns)
    if found:  # held-out campaigns the first reading did not know of: read again, looking for them too
        first, _found = _first_assignments(
            conn, since_ms=since_ms, until_ms=until_ms, campaigns={*campaigns, *found}
        )
    assigned = {c: first[c] for c in sorted(first)}
    converted = converted_after(
        conn,
        {(customer, ms) for arms in assigned.values() for customer, (ms, _held) in arms.items()},
        until_ms=until_ms,
        conversion_event=conversion_event,
    )
    out = []
    for campaign, arms in assigned.items():
        n_t = c_t = n_h = c_h = 0
        for customer, (ms, held) in arms.items():
            hit = (customer, ms) in converted
            if held:
                n_h, c_h = n_h + 1, c_h + hit
            else:
                n_t, c_t = n_t + 1, c_t + hit
        if n_t and n_h:
            measured = lift(campaign, treated=n_t, treated_conv=c_t, held_out=n_h, held_out_conv=c_h)
            out.append(
                {
                    "campaign": campaign,
                    "treated": n_t,
                    "held_out": n_h,
                    "treated_rate": measured.treated_rate,
                    "held_out_rate": measured.held_out_rate,
                    "difference": measured.difference,
                    "low": measured.low,
                    "high": measured.high,
                    "incremental": measured.incremental,
                }
            )
    return out


def _first_assignments(
    conn: Connection, *, since_ms: int, until_ms: int, campaigns: Collection[str]
) -> tuple[dict[str, dict[int, tuple[int, bool]]], set[str]]:
    """Per campaign of ``campaigns``, each customer's first decision in the range that drew
    them an arm of it: customer -> (decided ms, True when that arm is the holdout); and the
    campaigns the decisions held customers out of that ``campaigns`` lacks.

    The decisions come in time order, and a customer's explanation is parsed only until
    they have an arm of every campaign: with the loaded rules' holdout campaigns known,
    one explanation per customer when their first decision drew every arm. A campaign
    found on the way was not looked for in the decisions read before: the caller reads
    again, knowing it.
    """
    first: dict[str, dict[int, tuple[int, bool]]] = {c: {} for c in campaigns}
    found: set[str] = set()
    done: set[int] = set()  # customers with an arm of every campaign of ``first``
    for customer_id, decided_ms, text in iter_rows(
        conn,
        # As text: psycopg's own json loader is the stdlib's.
        "SELECT customer_id, decided_at_ms, CAST(explanation AS TEXT) FROM decisions "
        "WHERE decided_at_ms >= ? AND decided_at_ms < ? ORDER BY decided_at_ms",
        (since_ms, until_ms),
    ):
        if customer_id in done:
            continue
        info = orjson.loads(text)
        held = info.get("holdout") or ()
        for campaign in held:
            if campaign not in first:
                found.add(campaign)
                first[campaign] = {}
        # A campaign missing from the conditions was not decided about (a request naming others).
        considered = info.get("conditions") or {}
        early = {s["campaign"] for s in info.get("suppressions", ()) if s["reason"] in BEFORE_SPLIT_REASONS}
        missing = False
        for campaign, arms in first.items():
            if customer_id in arms:
                continue
            if campaign in held:
                arms[customer_id] = (decided_ms, True)
            elif campaign in considered and campaign not in early:
                arms[customer_id] = (decided_ms, False)
            else:
                missing = True
        if not missing:
            done.add(customer_id)
    return first, found


def converted_after(
    conn: Connection, starts: Collection[tuple[int, int]], *, until_ms: int, conversion_event: str
) -> set[tuple[int, int]]:
    """The (customer, start ms) pairs of ``starts`` with a ``conversion_event`` in ``[start, until_ms)``.

    A customer's day buckets (``profile_daily``) answer for the days after the start's
    day; on the start's day itself, the customer's last conversion ever (``profile_event_stats``)
    does when it falls on that day. What is left (a conversion on the start's day, and the
    last one after ``until_ms``) is read from the customer's events.
    """
    if not starts:
        return set()
    customers = sorted({customer for customer, _ms in starts})
    first_day = min(ms for _c, ms in starts) // DAY_MS
    until_day = (until_ms - 1) // DAY_MS
    days: dict[int, list[int]] = {}
    for customer, day in fetch_in(
        conn,
        "SELECT customer_id, day FROM profile_daily WHERE event = ? AND day >= ? AND day <= ? "
        "AND count > 0 AND customer_id IN_VALUES",
        customers,
        conversion_event,
        first_day,
        until_day,
    ):
        days.setdefault(customer, []).append(day)
    if not days:
        return set()
    last = dict(
        fetch_in(
            conn,
            "SELECT customer_id, last_ms FROM profile_event_stats WHERE event = ? AND customer_id IN_VALUES",
            list(days),
            conversion_event,
        )
    )
    out: set[tuple[int, int]] = set()
    for customer, ms in starts:
        bought = days.get(customer)
        if not bought:
            continue
        day = ms // DAY_MS
        if any(day < d for d in bought):  # a later day of the range
            out.add((customer, ms))
        elif day in bought:
            last_ms = last.get(customer, 0)
            if last_ms // DAY_MS == day:
                if ms <= last_ms < until_ms:
                    out.add((customer, ms))
            elif _converted_in(conn, customer, conversion_event, ms, min(until_ms, (day + 1) * DAY_MS)):
                out.add((customer, ms))
    return out


def _converted_in(conn: Connection, customer_id: int, event: str, since_ms: int, until_ms: int) -> bool:
    """Whether the customer's events (every id they go by) hold ``event`` in ``[since_ms, until_ms)``."""
    for kind, value in identities_of(conn, customer_id):
        column = "user_id" if kind == "user" else "anonymous_id"
        found = fetch_rows(
            conn,
            f"SELECT 1 FROM events WHERE {column} = ? AND type = 'track' AND event = ? "  # noqa: S608 (a column name of two)
            "AND ts_ms >= ? AND ts_ms < ? LIMIT 1",
            (value, event, since_ms, until_ms),
        )
        if found:
            return True
    return False


# --------------------------------------------------------------------------- campaigns


def campaigns_page(runtime: Runtime, *, since: date, until: date) -> dict[str, Any]:
    """Funnel per campaign and channel, daily series, queue outcomes, exploration share."""
    since_day, until_day = _day(since), _day(until)
    with read_connection(runtime.engine) as conn:
        stats = campaign_stats(conn, since_day=since_day, until_day=until_day, top_campaigns=8)
        outcomes = queue_outcomes(conn)
        attributed = query_attribution(
            conn,
            spec=specs_of(runtime)[0].name,
            models=["last_touch"],
            window_days=30,
            since_day=since_day,
            until_day=until_day,
            group_by="campaign",
        )["last_touch"]
        decided = decision_mix(conn, since_ms=since_day * 86_400_000, until_ms=(until_day + 1) * 86_400_000)
    credit = {row["key"]: row["conversions"] for row in attributed}
    keys = sorted(set(stats.totals) | set(outcomes))
    rows: list[dict[str, Any]] = []
    for campaign, channel in keys:
        kinds = stats.totals.get((campaign, channel), {})
        sent = kinds.get("sent", 0)
        rows.append(
            {
                "campaign": campaign or "(none)",
                "channel": channel or "-",
                "counts": {k: kinds.get(k, 0) for k in KINDS},
                "open_rate": kinds.get("opened", 0) / sent if sent else None,
                "click_rate": kinds.get("clicked", 0) / sent if sent else None,
                "unsubscribe_rate": kinds.get("unsubscribed", 0) / sent if sent else None,
                "queue": outcomes.get((campaign, channel), {}),
            }
        )
    labels = [_label(d) for d in stats.days]
    funnel_chart = _line_chart(
        labels, {k: [stats.daily.get(k, {}).get(d, 0) for d in stats.days] for k in FUNNEL}
    )
    top = sorted(stats.sent_by_campaign, key=lambda c: -sum(stats.sent_by_campaign[c].values()))[:8]
    sends_chart = _bar_chart(
        labels,
        {(c or "(none)"): [stats.sent_by_campaign[c].get(d, 0) for d in stats.days] for c in top},
        stacked=True,
    )
    return {
        "rows": rows,
        "kinds": KINDS,
        "attributed": credit,
        "channel_totals": stats.channel_totals(),
        "decided": decided,
        "charts": {"funnel": funnel_chart, "sends": sends_chart},
    }


def decision_mix(conn: Connection, *, since_ms: int, until_ms: int, limit: int = 50_000) -> dict[str, Any]:
    """Exploration vs exploitation, and suppressions by reason, over committed decisions.

    Reads at most ``limit`` decisions of the range (the newest).
    """
    rows = conn.execute(
        select(decisions.c.action, decisions.c.campaign, decisions.c.channel, decisions.c.explanation)
        .where(decisions.c.decided_at_ms >= since_ms, decisions.c.decided_at_ms < until_ms)
        .order_by(decisions.c.decided_at_ms.desc())
        .limit(limit)
    )
    total = sends = explored = 0
    reasons: dict[str, int] = {}
    for action, campaign, channel, explanation in rows:
        total += 1
        explanation = explanation or {}
        for s in explanation.get("suppressions", []):
            reasons[s.get("reason", "?")] = reasons.get(s.get("reason", "?"), 0) + 1
        if action != "send":
            continue
        sends += 1
        chosen = next(
            (
                c
                for c in explanation.get("candidates", [])
                if c.get("campaign") == campaign and c.get("channel") == channel
            ),
            None,
        )
        if chosen is not None and chosen.get("explored"):
            explored += 1
    return {
        "decisions": total,
        "sends": sends,
        "explored": explored,
        "explored_share": explored / sends if sends else None,
        "suppressions": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "limited": total >= limit,
    }


# --------------------------------------------------------------------------- decisions


def customer_page(runtime: Runtime, *, customer: str) -> dict[str, Any]:
    """One customer's profile aggregates, consent, identities and last decisions."""
    if not customer:
        return {"found": None}
    now = now_ms()
    with read_connection(runtime.engine) as conn:
        cid = customer_by_ref(conn, customer)
        if cid is None:
            return {"found": False}
        profile = load_profile(conn, cid, now_ms=now, horizon_days=90)
        ids = identities_of(conn, cid)
        last = last_decisions(conn, customer_id=cid, limit=10)
    today = now // 86_400_000
    days = list(range(today - 29, today + 1))
    top_events = sorted(profile.stats, key=lambda e: -profile.stats[e][0])[:6]
    activity = _bar_chart(
        [_label(d) for d in days],
        {e: [profile.days.get(e, {}).get(d, (0, 0.0))[0] for d in days] for e in top_events},
        stacked=True,
    )
    stats = [
        {"event": e, "count": s[0], "sum": s[1], "first_ms": s[2], "last_ms": s[3], "last_value": s[4]}
        for e, s in sorted(profile.stats.items(), key=lambda kv: -kv[1][3])
    ]
    return {
        "found": True,
        "customer_id": cid,
        "profile": profile,
        "identities": ids,
        "stats": stats,
        "decisions": last,
        "charts": {"activity": activity},
    }


def last_decisions(
    conn: Connection, *, customer_id: int, limit: int, fallback_zone: str = "UTC"
) -> list[dict[str, Any]]:
    """The customer's newest committed decisions, as ``GET /v1/decisions/{id}`` shows them."""
    rows = conn.execute(
        select(decisions)
        .where(decisions.c.customer_id == customer_id)
        .order_by(decisions.c.decided_at_ms.desc())
        .limit(limit)
    ).all()
    if not rows:  # an empty IN would still walk the whole send queue on SQLite
        return []
    status = {
        r.decision_id: r.status
        for r in conn.execute(
            select(sends.c.decision_id, sends.c.status).where(sends.c.decision_id.in_([r.id for r in rows]))
        )
    }
    return [decision_record(r, send_status=status.get(r.id), fallback_zone=fallback_zone) for r in rows]


def _parse_at(text: str, zone: str) -> int:
    if not text:
        return now_ms()
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CadenceError(f"zone: unknown time zone {zone!r}") from exc
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise CadenceError(f"at: {text!r} is not a date and time (YYYY-MM-DDTHH:MM)") from exc
    return datetime_to_ms(parsed if parsed.tzinfo else parsed.replace(tzinfo=tz))


def preview_decision(
    runtime: Runtime,
    *,
    holder: RulesetHolder,
    customer: str,
    at: str,
    zone: str,
    learners: LearnerSubscriber | None = None,
    opt_in_channels: Collection[str] = (),
) -> dict[str, Any]:
    """A decision for ``customer`` at ``at`` (now when empty), computed and shown, never recorded.

    The same service as ``POST /v1/decisions`` in ``preview`` mode, on the loaded rules
    and the learners of the engine loop (when it runs in this process).

    Returns ``{"error": message}`` when it cannot be made (unknown customer, rules that
    do not compile, a bad time).
    """
    if holder.current is None:
        result = holder.reload()
        if holder.current is None:
            return {"error": f"the rules do not compile ({len(result.errors)} error(s)): see the rules page"}
    ruleset = holder.current
    try:
        when = _parse_at(at, zone)
    except CadenceError as exc:
        return {"error": str(exc)}
    with read_connection(runtime.engine) as conn:
        try:
            return make_decision(
                conn=conn,
                ruleset=ruleset,
                customer_ref=customer,
                now_ms=when,
                available_channels=holder.available_channels,
                opt_in_channels=opt_in_channels,
                learners=learners,
                mode="preview",
            )
        except IdentityError as exc:
            return {"error": str(exc)}


# --------------------------------------------------------------------------- rules


def rules_page(
    runtime: Runtime,
    *,
    holder: RulesetHolder,
    cache: MutableMapping[str, Any],
    scheduler: SchedulerService | None = None,
    recheck: bool = False,
) -> dict[str, Any]:
    """The loaded ruleset, check and test results (cached per content hash), jobs, connector health."""
    if holder.current is None:
        holder.reload()
    ruleset = holder.current
    checked = cache.get("rules_check")
    if recheck or checked is None or (ruleset is not None and checked["loaded_hash"] != ruleset.hash):
        checked = _check_rules(runtime, holder)
        checked["loaded_hash"] = ruleset.hash if ruleset else None
        cache["rules_check"] = checked
    campaigns = []
    if ruleset is not None:
        for name, c in sorted(ruleset.campaigns.items(), key=lambda kv: (-kv[1].priority, kv[0])):
            campaigns.append(
                {
                    "name": name,
                    "title": c.title,
                    "priority": c.priority,
                    "kind": c.kind,
                    "channels": list(c.channels.channels),
                    "mode": c.channels.mode,
                    "trigger": c.trigger.event if c.trigger else None,
                    "schedule": c.schedule.text if c.schedule else None,
                    "caps": len(c.caps),
                    "split": [a.name for a in c.split],
                    "where": str(c.pos) if c.pos is not None else None,
                }
            )
    with read_connection(runtime.engine) as conn:
        circuits = circuit_states(conn)
        today = now_ms() // 86_400_000
        week = campaign_stats(conn, since_day=today - 6, until_day=today).channel_totals()
    health = []
    for channel, kinds in sorted(week.items()):
        sent = kinds.get("sent", 0)
        errors = kinds.get("failed", 0) + kinds.get("bounced", 0)
        health.append(
            {
                "channel": channel,
                "sent": sent,
                "errors": errors,
                "error_rate": errors / sent if sent else None,
            }
        )
    return {
        "ruleset": ruleset,
        "paths": [str(p) for p in holder.paths],
        "campaigns": campaigns,
        "check": checked,
        "jobs": scheduled_jobs(runtime, ruleset, scheduler),
        "circuits": circuits,
        "channels": holder.available_channels,
        "health": health,
    }


def _check_rules(runtime: Runtime, holder: RulesetHolder) -> dict[str, Any]:
    result = load_rules(
        holder.paths, available_channels=holder.available_channels, default_zone=holder.default_zone
    )
    out: dict[str, Any] = {
        "disk_hash": result.hash,
        "ok": result.ok,
        "diagnostics": [d.to_dict() for d in result.diagnostics],
        "tests": None,
        "checked_ms": now_ms(),
    }
    if result.ok:
        try:
            report = run_tests(result, available_channels=holder.available_channels)
        except CadenceError as exc:
            out["tests_error"] = str(exc)
        else:
            out["tests"] = {
                "passed": sum(1 for r in report.results if r.status == "passed"),
                "failed": [
                    {
                        "file": r.file,
                        "line": r.line,
                        "test": r.test,
                        "expectation": r.expectation,
                        "message": r.message,
                    }
                    for r in report.failed
                ],
                "skipped": sum(1 for r in report.results if r.status == "skipped"),
                "coverage": report.coverage_percent(),
                "untested": sorted(n for n, c in report.coverage.items() if not c.covered),
            }
    return out


def scheduled_jobs(runtime: Runtime, ruleset: Any, scheduler: SchedulerService | None) -> dict[str, Any]:
    """Scheduled campaigns with their next and last runs, and the scheduler's own jobs (``GET /v1/jobs``)."""
    running = scheduler is not None and scheduler.scheduler.running
    return {
        "running": running,
        "campaigns": list_jobs(runtime.engine, ruleset, now_ms=runtime.clock.now_ms()),
        "background": scheduler.jobs() if scheduler is not None and running else [],
    }
