"""What a compiled ``attribution`` block is: the contract between the rule compiler and
the attribution engine (as :mod:`cadence.engine.campaign` is for campaigns).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cadence.engine.campaign import SourcePos

__all__ = ["MODELS", "AttributionSpec", "ChannelRule", "CreditRule", "Touch"]

#: Model names, exactly as the API and the CLI accept them.
MODELS = (
    "first_touch",
    "last_touch",
    "last_non_direct",
    "linear",
    "time_decay",
    "position",
    "shapley_simplified",
    "shapley",
    "shapley_ordered",
    "markov",
    "causal",
)


@dataclass(frozen=True)
class Touch:
    """One touchpoint of a journey."""

    ts_ms: int
    channel: str
    campaign: str | None = None
    source: str | None = None
    medium: str | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChannelRule:
    """Channel grouping: an event whose fields match ``when`` is a touch on ``channel``.

    ``when`` maps a field (``"source"``, ``"medium"``, ``"event"``, ``"referrer"``,
    ``"campaign"``) to a glob pattern; all must match. Rules are tried in order.
    """

    channel: str
    when: Mapping[str, str]


@dataclass(frozen=True)
class CreditRule:
    """A custom credit rule, applied after any model.

    ``action="fixed"`` gives ``channel`` exactly ``value`` of each conversion (0
    removes its credit and re-spreads it), ``"weight"`` multiplies its credit by
    ``value`` before renormalising, ``"exclude"`` drops its touches before the model
    runs. ``when`` is a predicate over the journey's touches (None: always).
    """

    channel: str
    action: Literal["fixed", "weight", "exclude"]
    value: float = 0.0
    when: Callable[[Sequence[Touch]], bool] | None = None
    source: str = ""


@dataclass(frozen=True)
class AttributionSpec:
    """A compiled ``attribution`` block."""

    name: str
    title: str
    conversion_event: str
    value_prop: str | None = None
    window_ms: int = 30 * 86_400_000
    model: str = "last_touch"
    params: Mapping[str, Any] = field(default_factory=dict)  # half_life_ms, weights, order...
    channel_rules: Sequence[ChannelRule] = ()
    credit_rules: Sequence[CreditRule] = ()
    pos: SourcePos | None = None
