"""Why a campaign would or would not fire for one customer at one moment.

:func:`eligibility` evaluates a compiled campaign's own conditions (dates, audience,
trigger, unless) with every part's actual value; :func:`explain_campaign` adds the
decision pipeline's verdict (caps, quiet hours, consent, priority...) when
``cadence.engine.decide`` is installed, and returns the record ``cadence explain``
prints and the API serves as JSON.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cadence.clock import ms_to_datetime
from cadence.engine.campaign import Campaign, CompiledRuleset, ConditionResult, EvalContext, ProfileView

__all__ = [
    "Check",
    "Eligibility",
    "eligibility",
    "explain_campaign",
    "explain_from_database",
    "find_decide",
    "installed_channels",
    "render_explain",
]


@dataclass(frozen=True)
class Check:
    """One condition of one stage, with its actual value."""

    stage: str  # dates, audience, trigger, where, unless
    text: str
    value: Any
    passed: bool
    at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "stage": self.stage,
            "text": self.text,
            "value": _jsonable(self.value),
            "passed": self.passed,
            "at": self.at,
        }


@dataclass
class Eligibility:
    """Whether the campaign's own conditions hold, and each of them."""

    eligible: bool
    checks: list[Check] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # SUPPRESSION_REASONS names


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _checks(stage: str, results: Sequence[ConditionResult]) -> list[Check]:
    return [Check(stage, r.text, r.value, r.passed, str(r.pos) if r.pos else None) for r in results]


def eligibility(campaign: Campaign, ctx: EvalContext, *, detail: bool = True) -> Eligibility:
    """Evaluate dates, audience, trigger and unless; with ``detail`` every part is explained."""
    out = Eligibility(True)
    now = ctx.now_ms
    if campaign.starts_ms is not None and now < campaign.starts_ms:
        out.eligible = False
        out.reasons.append("not_started")
        out.checks.append(
            Check("dates", f"starts {ms_to_datetime(campaign.starts_ms).isoformat()}", now, False)
        )
    if campaign.ends_ms is not None and now >= campaign.ends_ms:
        out.eligible = False
        out.reasons.append("ended")
        out.checks.append(Check("dates", f"ends {ms_to_datetime(campaign.ends_ms).isoformat()}", now, False))
    if campaign.audience is not None:
        passed = campaign.audience(ctx)
        if detail:
            out.checks.extend(_checks("audience", campaign.audience.explain(ctx)))
        else:
            out.checks.append(Check("audience", campaign.audience.source, passed, passed))
        if not passed:
            out.eligible = False
            out.reasons.append("audience")
    if campaign.trigger is not None:
        event = ctx.event
        name = event.get("event") if event else None
        matched = name == campaign.trigger.event
        out.checks.append(Check("trigger", f'on "{campaign.trigger.event}"', name, matched))
        if matched and campaign.trigger.where is not None:
            passed = campaign.trigger.where(ctx)
            out.checks.extend(
                _checks("where", campaign.trigger.where.explain(ctx))
                if detail
                else [Check("where", campaign.trigger.where.source, passed, passed)]
            )
            matched = passed
        if not matched:
            out.eligible = False
            out.reasons.append("trigger")
    if campaign.unless is not None:
        held = campaign.unless(ctx)
        if detail:
            # compiled unless parts pass when they do not hold; another predicate's say whether they hold
            out.checks.extend(
                Check(
                    "unless",
                    r.text,
                    r.value,
                    r.passed if r.stage == "unless" else not r.passed,
                    str(r.pos) if r.pos else None,
                )
                for r in campaign.unless.explain(ctx)
            )
        else:
            out.checks.append(Check("unless", campaign.unless.source, held, not held))
        if held:
            out.eligible = False
            out.reasons.append("unless")
    return out


def find_decide() -> Callable[..., Any] | None:
    """``cadence.engine.decide.decide`` when that module is installed, else None."""
    try:
        module = importlib.import_module("cadence.engine.decide")
    except ImportError:
        return None
    fn = getattr(module, "decide", None)
    return fn if callable(fn) else None


def explain_campaign(
    *,
    ruleset: CompiledRuleset,
    campaign: str,
    profile: ProfileView,
    now_ms: int,
    available_channels: Collection[str],
    event: Mapping[str, Any] | None = None,
    history: Sequence[Any] = (),
    decide: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """The explain record: every condition with its value, the decision, and why not."""
    compiled = ruleset.campaigns[campaign]
    ctx = EvalContext(profile=profile, now_ms=now_ms, event=event)
    result = eligibility(compiled, ctx)
    record: dict[str, Any] = {
        "campaign": campaign,
        "title": compiled.title,
        "customer_id": profile.customer_id,
        "at": ms_to_datetime(now_ms).isoformat(),
        "at_ms": now_ms,
        "ruleset_hash": ruleset.hash,
        "priority": compiled.priority,
        "exclusive": compiled.exclusive,
        "eligible": result.eligible,
        "checks": [c.to_dict() for c in result.checks],
        "why_not": [],
        "decision": None,
    }
    why_not: list[dict[str, Any]] = [
        {"reason": r, "detail": _detail(r, result.checks)} for r in result.reasons
    ]
    decide = decide or find_decide()
    if decide is not None:
        decision = decide(
            ruleset=ruleset,
            profile=profile,
            now_ms=now_ms,
            history=history,
            available_channels=available_channels,
            event=event,
            campaigns=[campaign],
        )
        record["decision"] = {
            "action": decision.action,
            "campaign": decision.campaign,
            "channel": decision.channel,
            "send_at": ms_to_datetime(decision.send_at_ms).isoformat() if decision.send_at_ms else None,
            "template": decision.template,
            "arm": decision.arm,
            "suppressions": [
                {"campaign": s.campaign, "reason": s.reason, "detail": s.detail, "channel": s.channel}
                for s in decision.suppressions
            ],
        }
        for s in decision.suppressions:
            if s.campaign == campaign and not any(w["reason"] == s.reason for w in why_not):
                why_not.append({"reason": s.reason, "detail": s.detail})
    else:
        record["decision_note"] = (
            "cadence.engine.decide is not installed: caps, quiet hours, consent and priority "
            "were not evaluated"
        )
    record["why_not"] = why_not
    return record


def _detail(reason: str, checks: list[Check]) -> str:
    stage = {
        "audience": "audience",
        "trigger": "trigger",
        "unless": "unless",
        "not_started": "dates",
        "ended": "dates",
    }.get(reason, reason)
    failed = [
        c for c in checks if c.stage in (stage, "where" if stage == "trigger" else stage) and not c.passed
    ]
    return "; ".join(f"{c.text} (value: {c.value!r})" for c in failed)


def render_explain(record: Mapping[str, Any]) -> str:
    """The record as text for a terminal."""
    lines = [
        f"campaign {record['campaign']} for customer {record['customer_id']} at {record['at']}",
        f"ruleset {str(record['ruleset_hash'])[:12]}, priority {record['priority']}"
        + (f", exclusive group {record['exclusive']!r}" if record.get("exclusive") else ""),
    ]
    for c in record["checks"]:
        mark = "ok " if c["passed"] else "NO "
        lines.append(
            f"  {mark} {c['stage']:<8} {c['text']}  = {c['value']!r}" + (f"  ({c['at']})" if c["at"] else "")
        )
    decision = record.get("decision")
    if decision is not None:
        if decision["action"] == "send" and decision["campaign"] == record["campaign"]:
            lines.append(f"decision: send via {decision['channel']} at {decision['send_at']}")
        else:
            lines.append(
                f"decision: {decision['action']}"
                + (f" ({decision['campaign']})" if decision["campaign"] else "")
            )
    elif record.get("decision_note"):
        lines.append(f"note: {record['decision_note']}")
    if record["why_not"]:
        lines.append("why not:")
        lines.extend(f"  - {w['reason']}: {w['detail']}" for w in record["why_not"])
    elif record["eligible"]:
        lines.append("eligible: every condition holds")
    return "\n".join(lines)


def installed_channels(settings: Any) -> tuple[str, ...]:
    """Channels an installed connector offers (``cadence.plugins.available_channels``)."""
    from cadence.plugins import available_channels  # the plugin host imports the rule language

    return available_channels(settings)


def explain_from_database(
    conn: Any,
    *,
    ruleset: CompiledRuleset,
    campaign: str,
    customer: str,
    now_ms: int,
    available_channels: Collection[str],
) -> dict[str, Any]:
    """The explain record for a customer named by user id, anonymous id or numeric id.

    Reads the profile tables (:func:`~cadence.engine.profiles.load_profile`) and the
    customer's queued and sent messages (for caps); raises ``LookupError`` when the
    customer or the campaign is unknown.
    """
    from sqlalchemy import select

    from cadence.dsl.diagnostics import did_you_mean
    from cadence.engine.decision import PastSend
    from cadence.engine.identity import customer_by_ref
    from cadence.engine.profiles import load_profile
    from cadence.store.schema.sends import sends

    if campaign not in ruleset.campaigns:
        hint = did_you_mean(campaign, ruleset.campaigns)
        raise LookupError(f"no campaign named {campaign!r}" + (f"; {hint}" if hint else ""))
    customer_id = customer_by_ref(conn, customer)
    if customer_id is None:
        raise LookupError(f"no customer with the id {customer!r}")
    profile = load_profile(conn, customer_id, now_ms=now_ms)
    history = [
        PastSend(
            row.due_ms,
            row.campaign,
            row.channel,
            ruleset.campaigns[row.campaign].exclusive if row.campaign in ruleset.campaigns else None,
        )
        for row in conn.execute(
            select(sends.c.due_ms, sends.c.campaign, sends.c.channel).where(
                sends.c.customer_id == customer_id,
                sends.c.status.in_(("queued", "sending", "sent")),
                sends.c.due_ms <= now_ms,
            )
        )
    ]
    return explain_campaign(
        ruleset=ruleset,
        campaign=campaign,
        profile=profile,
        now_ms=now_ms,
        available_channels=available_channels,
        history=history,
    )
