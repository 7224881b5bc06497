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
from cadence.engine.assignments import block_lifts
from cadence.engine.attribution.journeys import AttributionError
from cadence.engine.attribution.materialized import MATERIALIZED_MODELS, read_fits
from cadence.engine.attribution.online import (
    RULE_MODELS,
    channel_interactions,
    kept_windows,
    query_attribution,
    specs_of,
    unattributed_share,
)
from cadence.engine.campaign_stats import KINDS, campaign_stats, queue_outcomes
from cadence.engine.decisions_service import decision_record, make_decision
from cadence.engine.identity import customer_by_ref, identities_of
from cadence.engine.learning import LearnerSubscriber
from cadence.engine.profiles import load_profile
from cadence.errors import CadenceError, IdentityError
from cadence.runtime import Runtime
from cadence.scheduler.service import SchedulerService, list_jobs
from cadence.store.db import read_connection
from cadence.store.fast import fetch_rows, iter_rows
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
        lifts = block_lifts(conn, blocks[spec], since_day=since_day, until_day=until_day)
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

    Reads at most ``limit`` decisions of the range (the newest), grouped by their
    ``explored`` and ``suppressed`` columns; a decision recorded before those columns
    (migration arms_0001) is read from its explanation.
    """

    def newest(columns: str) -> str:
        return (
            f"(SELECT {columns} FROM decisions WHERE decided_at_ms >= ? AND decided_at_ms < ?"  # noqa: S608 (no input in it)
            " ORDER BY decided_at_ms DESC LIMIT ?) newest"
        )

    total = sends = explored = 0
    reasons: dict[str, int] = {}
    legacy = 0
    for action, was_explored, suppressed, n in fetch_rows(
        conn,
        "SELECT action, explored, suppressed, COUNT(*) FROM "
        + newest("action, explored, suppressed")
        + " GROUP BY action, explored, suppressed",
        (since_ms, until_ms, limit),
    ):
        if suppressed is None:
            legacy += n
            continue
        total += n
        sends += n if action == "send" else 0
        explored += n if was_explored else 0
        for reason in suppressed.split():
            reasons[reason] = reasons.get(reason, 0) + n
    if legacy:
        for action, campaign, channel, text in iter_rows(
            conn,
            # As text: psycopg's own json loader is the stdlib's.
            "SELECT action, campaign, channel, CAST(explanation AS TEXT) FROM "
            + newest("action, campaign, channel, explanation, suppressed")
            + " WHERE suppressed IS NULL",
            (since_ms, until_ms, limit),
        ):
            total += 1
            explanation = orjson.loads(text) or {}
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
