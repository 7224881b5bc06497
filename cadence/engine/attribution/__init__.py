"""Multi-touch attribution: journeys, every model, holdout lift, online aggregates.

The models are importable from here under their API names (loaded on first use, so
importing :mod:`cadence.engine.attribution.spec` stays light)::

    from cadence.engine.attribution import linear, markov, causal

See ``docs/attribution.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "causal",
    "first_touch",
    "last_non_direct",
    "last_touch",
    "linear",
    "markov",
    "position",
    "shapley",
    "shapley_ordered",
    "shapley_simplified",
    "time_decay",
]

_HOME = {
    "first_touch": "heuristics",
    "last_touch": "heuristics",
    "last_non_direct": "heuristics",
    "linear": "heuristics",
    "time_decay": "heuristics",
    "position": "heuristics",
    "shapley_simplified": "heuristics",
    "shapley": "shapley",
    "shapley_ordered": "shapley",
    "markov": "markov",
    "causal": "causal",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'cadence.engine.attribution' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cadence.engine.attribution.{home}"), name)
