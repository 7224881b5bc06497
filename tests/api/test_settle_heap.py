"""``settle_heap`` and ``prepare_serving``: what a served process does before its first request."""

from __future__ import annotations

import gc

from cadence.api.workers import YOUNG_THRESHOLD, settle_heap


def test_settle_heap_freezes_what_is_alive_and_later_cycles_are_still_collected() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    kept = [Node() for _ in range(100)]
    before = gc.get_freeze_count()
    threshold = gc.get_threshold()
    try:
        settle_heap()
        frozen = gc.get_freeze_count()
        assert frozen >= before + len(kept)  # the long-lived objects moved to the permanent generation
        late = Node()
        del late
        assert gc.collect() >= 1  # a cycle made after start-up is still found and freed
        # ... and the collection left the frozen objects frozen (the count alone can fall: other
        # threads of the process free frozen objects by reference counting meanwhile)
        kept_ids = {id(node) for node in kept}
        assert not any(id(obj) in kept_ids for obj in gc.get_objects())
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD  # young collections no longer every 700 objects
    finally:
        gc.unfreeze()  # the rest of the suite runs with an ordinary heap
        gc.set_threshold(*threshold)


def test_a_serving_process_has_the_compiled_valuation_before_its_first_request() -> None:
    from cadence.api.workers import prepare_serving
    from cadence.engine import valuation

    threshold = gc.get_threshold()
    parts = valuation.set_parts(False)
    try:
        prepare_serving()
        assert valuation.kernel() is not None  # loaded at start-up, not after 1,000 decisions
        assert valuation.parts_kernel() is not None  # and the score parts with it, from the first request
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        valuation.set_parts(parts)
