"""What the rules read back in time: the windows of their profile aggregates, from the syntax tree.

Compaction may drop a profile day bucket only when no rule can read it. The compiled
ruleset says which events the rules count (``CompiledRuleset.aggregates``) but not how
far back; :func:`rule_needs` walks the checked syntax tree of every rule file and
records, per event, the longest window any ``count``/``sum``/``within``/``between``
reads. A read it cannot bound (``count(x)`` over all time, a window that is not a
literal duration, a construct it does not know) marks the event, or everything,
unbounded: compaction then keeps those buckets.

>>> from cadence.dsl.loader import load_source
>>> r = load_source('segment s = count(email.opened within 30d) > 0 and sum(purchased.revenue) > 5'
...                 '\\nevent purchased = "Order Completed"')
>>> needs = rule_needs([s.module for s in r.scopes])
>>> needs.window_days("email.opened"), needs.window_days("Order Completed"), needs.everything
(30, None, False)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cadence.engine.campaign import DAY_MS, CompiledRuleset

__all__ = ["RuleNeeds", "duration_of", "event_of", "needs_of_holder", "rule_needs"]

log = logging.getLogger("cadence.scheduler")

#: Calls that read day buckets (``last``/``first`` read the running totals only).
WINDOWED_CALLS = ("count", "sum")


@dataclass
class RuleNeeds:
    """How far back the rules read each event's day buckets, and the longest cap.

    ``windows`` maps an event to its longest window in ms, or None when some read of
    it has no bound; ``everything`` is True when the rules could not be analysed (then
    nothing may be dropped).
    """

    windows: dict[str, int | None] = field(default_factory=dict)
    everything: bool = False
    cap_ms: int = 0

    def window_days(self, event: str) -> int | None:
        """The longest window on ``event`` in whole days (rounded up); None when unbounded.

        >>> RuleNeeds(windows={"a": DAY_MS + 1}).window_days("a")
        2
        """
        ms = self.windows.get(event, 0)
        return None if ms is None else math.ceil(ms / DAY_MS)

    def unbounded(self) -> list[str]:
        """Events some rule reads over all of history."""
        return sorted(e for e, w in self.windows.items() if w is None)

    def longest_days(self) -> int:
        """The longest bounded window, in days (0 when none)."""
        return max((math.ceil(w / DAY_MS) for w in self.windows.values() if w is not None), default=0)

    def _read(self, event: str | None, window_ms: int | None) -> None:
        if event is None:
            self.everything = True
            return
        if event in self.windows and self.windows[event] is None:
            return
        self.windows[event] = None if window_ms is None else max(window_ms, self.windows.get(event) or 0)


def _children(node: Any) -> Iterator[Any]:
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            if f.name not in ("ref", "line", "column"):
                yield getattr(node, f.name)
    elif isinstance(node, list | tuple):
        yield from node
    elif isinstance(node, dict):
        yield from node.values()


def event_of(node: Any) -> str | None:
    """The event name a syntax node names (a string literal or an event path), else None."""
    kind = type(node).__name__
    if kind == "Lit" and node.kind == "string":
        return str(node.value)
    ref = getattr(node, "ref", None)
    if kind == "Path" and isinstance(ref, tuple) and len(ref) >= 2 and ref[0] in ("event", "eventprop"):
        return str(ref[1])
    return None


def duration_of(node: Any) -> int | None:
    """The milliseconds of a duration literal node, else None."""
    if type(node).__name__ == "Lit" and node.kind == "duration":
        return int(node.value)
    return None


def _walk(node: Any, needs: RuleNeeds) -> None:
    kind = type(node).__name__
    if kind == "Binary" and node.op == "within":
        needs._read(event_of(node.left), duration_of(node.right))
        _walk(node.right, needs)
        return
    if kind == "Between":
        needs._read(event_of(node.subject), duration_of(node.older))
        _walk(node.older, needs)
        _walk(node.newer, needs)
        return
    if kind == "Call" and node.name in WINDOWED_CALLS:
        arg: Any = node.args[0] if node.args else None
        inner = type(arg).__name__
        if not (inner == "Between" or (inner == "Binary" and arg.op == "within")):
            needs._read(event_of(arg), None)  # all of history
    for child in _children(node):
        if child is not None and not isinstance(child, str | int | float | bool):
            _walk(child, needs)


def rule_needs(modules: Iterable[Any], ruleset: CompiledRuleset | None = None) -> RuleNeeds:
    """What the checked modules (``ParsedModule`` with ``blocks``) read; caps from ``ruleset``."""
    needs = RuleNeeds()
    for module in modules:
        for block in module.blocks:
            if type(block).__name__ == "Test":
                continue  # rule tests run on their own fixtures, not on stored profiles
            _walk(block, needs)
    if ruleset is not None:
        caps = [*ruleset.settings.caps, *(c for camp in ruleset.campaigns.values() for c in camp.caps)]
        needs.cap_ms = max((c.window_ms for c in caps), default=0)
    return needs


def needs_of_holder(holder: Any) -> RuleNeeds:
    """What the holder's current rules read: the rule files are loaded again for their syntax tree.

    When the files no longer compile to the ruleset the holder serves (edited since,
    or broken), the answer is :attr:`RuleNeeds.everything` (drop nothing of profiles).
    """
    from cadence.dsl.loader import load_rules

    current = getattr(holder, "current", None)
    if current is None:
        holder.reload()
        current = holder.current
    if current is None:
        return RuleNeeds(everything=True)
    result = load_rules(
        holder.paths, available_channels=holder.available_channels, default_zone=holder.default_zone
    )
    if result.ruleset is None or result.hash != current.hash:
        log.info("rule files changed since they were loaded: profile buckets are kept this time")
        return RuleNeeds(everything=True)
    return rule_needs([s.module for s in result.scopes], current)
