"""The scheduler's jobs inside the API process."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cadence.api.app import create_app
from cadence.engine.learning import LearnerSubscriber, pin_snapshot, save_snapshot, unpin
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
    follow(False)
    assert loads == []
    with runtime.engine.begin() as conn:  # the leader stores a snapshot where these learners are
        save_snapshot(conn, name=learners.name, learner=learners.learner, now_ms=0)
    follow(False)
    assert loads == []
    learners.learner.position = 7
    with runtime.engine.begin() as conn:  # and one further on
        save_snapshot(conn, name=learners.name, learner=learners.learner, now_ms=0)
    learners.learner.position = 0
    follow(False)
    assert len(loads) == 1 and loop.positions()[learners.name] == 7
    follow(False)
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
        app.state.scheduler.follow(False)
        assert len(loads) == 1


def test_the_leading_process_serves_a_pin_without_a_restart(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cadence models pin`` / ``rollback`` / ``unpin`` write the pin in the database: the leader's follow
    job serves it (it used to serve a rollback only after a restart), and keeps its live learner."""
    app = create_app(runtime=runtime, background=False)
    loop = app.state.engine_loop
    learners = next(s for s in loop.subscribers if isinstance(s, LearnerSubscriber))
    loop.positions()
    with runtime.engine.begin() as conn:
        learners.learner.labels = 5
        version = save_snapshot(conn, name=learners.name, learner=learners.learner, now_ms=0)
    learners.learner.labels = 9  # the live learner learned on
    live = learners.learner
    loads = _count_loads(monkeypatch)
    follow = app.state.scheduler.follow
    follow(True)
    assert learners.scorer() is live  # nothing pinned
    with runtime.engine.begin() as conn:  # what the CLI does
        pin_snapshot(conn, name=learners.name, version=version)
    follow(True)
    assert learners.scorer() is not live and learners.scorer().labels == 5
    assert learners.learner is live and loads == []  # the live learner keeps learning, not reloaded
    pinned = learners.scorer()
    follow(True)
    assert learners.scorer() is pinned  # read once
    with runtime.engine.begin() as conn:
        unpin(conn, name=learners.name)
    follow(True)
    assert learners.scorer() is live
