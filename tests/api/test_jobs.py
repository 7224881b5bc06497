"""The scheduler's jobs inside the API process."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cadence.api.app import create_app
from cadence.engine.learning import LearnerSubscriber, save_snapshot
from cadence.engine.loop import EngineLoop
from cadence.runtime import Runtime


def _count_loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The checkpoints the learners are loaded from from now on (a list that grows with each load)."""
    loads: list[int] = []
    start = LearnerSubscriber.start

    def counted(self: LearnerSubscriber, conn: object, checkpoint: int) -> int:
        loads.append(checkpoint)
        return start(self, conn, checkpoint)  # type: ignore[arg-type]

    monkeypatch.setattr(LearnerSubscriber, "start", counted)
    return loads


def test_a_follower_reloads_the_learners_only_when_another_snapshot_was_stored(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reloading unpickles the whole learner while requests wait: not for the snapshot already loaded,
    nor for one no further in the log than the learners this process follows the log with."""
    app = create_app(runtime=runtime, background=False)
    loop = app.state.engine_loop
    learners = next(s for s in loop.subscribers if isinstance(s, LearnerSubscriber))
    loop.positions()  # what a serving process loads at start-up
    loads = _count_loads(monkeypatch)
    follow = app.state.scheduler.follow
    follow()
    assert loads == []
    with runtime.engine.begin() as conn:  # the leader stores a snapshot where these learners are
        save_snapshot(conn, name=learners.name, learner=learners.learner, now_ms=0)
    follow()
    assert loads == []
    learners.learner.position = 7
    with runtime.engine.begin() as conn:  # and one further on
        save_snapshot(conn, name=learners.name, learner=learners.learner, now_ms=0)
    learners.learner.position = 0
    follow()
    assert len(loads) == 1 and loop.positions()[learners.name] == 7
    follow()
    assert len(loads) == 1


def test_a_serving_process_loads_the_learners_before_its_first_request(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower decides with the stored learners from the start, and its first follow job finds them loaded."""
    app = create_app(runtime=runtime, background=True)
    loads = _count_loads(monkeypatch)
    monkeypatch.setattr(EngineLoop, "_is_leader", lambda _self: False)  # another process leads
    with TestClient(app):
        assert len(loads) == 1
        app.state.scheduler.follow()
        assert len(loads) == 1
