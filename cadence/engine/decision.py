"""What a decision is: the contract between the decision pipeline and its callers.

``cadence.engine.decide.decide()`` returns a :class:`Decision`; the API, the
scheduler, rule tests (``cadence test``) and ``cadence explain`` read it. The pipeline
signature is::

    decide(
        *,
        ruleset: CompiledRuleset,
        profile: ProfileView,
        now_ms: int,
        history: Sequence[PastSend],          # this customer's recent sends, any campaign
        available_channels: Collection[str],  # offered by an installed connector
        scorer: Scorer | None = None,         # learners; None = deterministic order
        event: Mapping[str, Any] | None = None,  # the triggering event, if any
        campaigns: Collection[str] | None = None,  # restrict to these campaigns
        context: Mapping[str, Any] | None = None,
        seed: int = 0,
        explain: bool = True,                 # False: no per-condition record (bulk pushes)
    ) -> Decision

It is pure: everything it needs is passed in; it writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from cadence.engine.campaign import ConditionResult

__all__ = ["Candidate", "Decision", "PastSend", "Scorer", "Suppression", "SUPPRESSION_REASONS"]

#: Why a campaign or a candidate was not chosen. Every suppression names one.
SUPPRESSION_REASONS = (
    "audience",  # not in the audience
    "trigger",  # no matching triggering event
    "unless",  # the unless condition held
    "not_started",
    "ended",
    "holdout",  # the customer is in the holdout arm
    "consent",  # opted out of the channel, or no channel with consent
    "no_channel",  # no allowed channel is offered by an installed connector
    "bounced",  # the address bounced
    "quiet",  # inside quiet hours and the rule says drop (or no slot left in the window)
    "cap",  # a campaign, channel or global cap is reached
    "spacing",  # too soon after the last message
    "exclusive",  # another campaign of the same exclusive group won or was sent today
    "priority",  # another campaign won on priority (or the tie-break)
    "score",  # the learners expect more unsubscribe cost than engagement value
)


@dataclass(frozen=True)
class PastSend:
    """A send that already happened (or is queued) for this customer."""

    ts_ms: int
    campaign: str
    channel: str
    exclusive: str | None = None


@dataclass(frozen=True)
class Suppression:
    """One reason one campaign (or one of its candidates) was not chosen."""

    campaign: str
    reason: str  # one of SUPPRESSION_REASONS
    detail: str
    channel: str | None = None


@dataclass(frozen=True)
class Candidate:
    """One (campaign, channel, send time) triple with its score and the parts of it."""

    campaign: str
    channel: str
    send_at_ms: int
    score: float
    engagement: float = 0.0  # expected engagement probability
    unsubscribe: float = 0.0  # expected unsubscribe probability
    explored: bool = False  # chosen by exploration rather than exploitation
    arm: str | None = None  # split arm / variant
    # What the score was made from (None without the learners). ``score`` is the drawn value,
    # except where the learners rank by something else: a draw at or below zero of an option
    # worth sending scores a millionth of its value (above every option not worth it, below every
    # positive draw), a positive draw of one not worth sending scores 0, a variant held back by
    # the minimum exploration share scores -inf. These say what the learners saw there.
    draw: float | None = None  # the posterior draw's value: click value x drawn P(engagement) - risk
    mean: float | None = None  # the value at the posterior mean: click value x engagement - risk


class Scorer(Protocol):
    """Scores candidates; the learners implement it."""

    def score(
        self, *, profile: Any, candidates: Sequence[Candidate], now_ms: int, seed: int
    ) -> Sequence[Candidate]:
        """Return the candidates with ``score`` (and its parts) filled in."""
        ...


@dataclass(frozen=True)
class Decision:
    """The answer: send this campaign on this channel at this time, or nothing, and why."""

    action: Literal["send", "none"]
    ruleset_hash: str
    customer_id: int
    decided_at_ms: int
    campaign: str | None = None
    channel: str | None = None
    send_at_ms: int | None = None
    template: str | None = None
    variables: Mapping[str, Any] = field(default_factory=dict)
    arm: str | None = None
    conditions: Mapping[str, Sequence[ConditionResult]] = field(default_factory=dict)
    candidates: Sequence[Candidate] = ()
    suppressions: Sequence[Suppression] = ()
    holdout: Sequence[str] = ()  # campaigns this customer is held out of (recorded for lift)
    notes: Sequence[str] = ()  # further explanation, e.g. the winning variant's margin
    #: Campaigns with a holdout arm that drew this customer a sending arm (sent or not: capped,
    #: out-bid, without consent). With :attr:`holdout`, the arms a holdout lift counts.
    assigned: Sequence[str] = ()

    def chosen(self) -> Candidate | None:
        """The candidate that was chosen (None when nothing is sent, or it was not scored)."""
        if self.action != "send":
            return None
        return next(
            (
                c
                for c in self.candidates
                if c.campaign == self.campaign
                and c.channel == self.channel
                and c.send_at_ms == self.send_at_ms
            ),
            None,
        )

    def suppressed(self, campaign: str, reason: str | None = None) -> bool:
        """True when ``campaign`` was suppressed (for ``reason``, if given)."""
        return any(
            s.campaign == campaign and (reason is None or s.reason == reason) for s in self.suppressions
        )
