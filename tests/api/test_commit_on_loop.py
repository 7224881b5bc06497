"""SQLite groups of commits written on the event loop (``DecisionGroups._next_on_loop``).

A thread writing a group held SQLite's write lock through a wait for the interpreter lock at
each statement; the event loop now writes the group itself once its writer holds the write
lock (only tried: while another writer holds it, tried again a moment later). These
tests check where the group is written, that caps hold and each commit is recorded once when
the lock is busy at first, and that a failed group is recorded again commit by commit. SQLite
only (PostgreSQL commits take ``cadence.api.commitpipe`` or the threads).
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cadence.api.routers import decisions as router
from cadence.api.routers.decisions import _learners
from cadence.runtime import Runtime
from tests.api.test_decisions_cache import Api, post_commits, reasons

USERS = [f"u{i}" for i in range(4)]


@pytest.fixture
def api(runtime: Runtime) -> Iterator[Api]:
    if runtime.engine.dialect.name != "sqlite":
        pytest.skip("SQLite groups are written on the event loop")
    api = Api(runtime)
    for i, user in enumerate(USERS):
        api.identify(userId=user, traits={"name": f"N{i}", "timezone": "Europe/Berlin"})
    yield api
    api.state.close()


def recorded(runtime: Runtime) -> tuple[int, int]:
    with runtime.engine.connect() as conn:
        decisions = conn.exec_driver_sql("SELECT COUNT(*) FROM decisions").scalar()
        sends = conn.exec_driver_sql("SELECT COUNT(*) FROM sends").scalar()
    return int(decisions or 0), int(sends or 0)


@pytest.fixture
def writers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread each group's transaction ran on."""
    names: list[str] = []
    record = router.DecisionGroups._record

    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        names.append(threading.current_thread().name)
        return record(self, *args, **kwargs)

    monkeypatch.setattr(router.DecisionGroups, "_record", traced)
    return names


def answers(api: Api, refs: list[str]) -> list[dict[str, Any]]:
    got = post_commits(api.app, api, refs)
    assert all(r.status_code == 200 for r in got), [r.text for r in got]
    return [r.json() for r in got]


def test_a_group_is_written_on_the_event_loop_and_caps_hold(
    api: Api, runtime: Runtime, writers: list[str]
) -> None:
    bodies = answers(api, USERS * 3)  # each customer three times in one burst
    # (post_commits runs its event loop on this thread)
    assert writers and all(name == threading.current_thread().name for name in writers), writers
    for customer in {b["customer_id"] for b in bodies}:
        mine = [b for b in bodies if b["customer_id"] == customer]
        assert sorted(str(b["action"]) for b in mine) == ["none", "none", "send"]
        assert all("cap" in reasons(b) for b in mine if b["action"] == "none")
    assert recorded(runtime) == (3 * len(USERS), len(USERS))
    learners = _learners(api.app)
    assert learners is not None
    sent = {b["decision_id"] for b in bodies if b["action"] == "send"}
    assert set(learners.learner.pending) == sent  # told once committed, and only of the sends


def test_a_busy_write_lock_is_tried_again_and_the_group_written_on_the_loop(
    api: Api, runtime: Runtime, writers: list[str]
) -> None:
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with runtime.engine.begin():  # the write lock, as another worker's transaction
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    timer = threading.Timer(0.3, release.set)
    timer.start()
    started = time.monotonic()
    try:
        bodies = answers(api, USERS + USERS[:2])
    finally:
        release.set()
        holder.join(10)
        timer.cancel()
    assert time.monotonic() - started >= 0.2  # they waited for the lock (not a timing claim on speed)
    assert writers and all(name == threading.current_thread().name for name in writers), writers
    assert sorted(str(b["action"]) for b in bodies) == ["none", "none"] + ["send"] * len(USERS)
    assert recorded(runtime) == (len(USERS) + 2, len(USERS))


def test_a_failed_group_on_the_loop_is_recorded_again_commit_by_commit(
    api: Api, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    commit_prepared = router.commit_prepared

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        out = commit_prepared(*args, **kwargs)  # the first commit is written, then the group fails
        if calls["n"] == 1:
            raise RuntimeError("the group's transaction fails")
        return out

    monkeypatch.setattr(router, "commit_prepared", failing_once)
    bodies = answers(api, USERS)
    assert calls["n"] >= 1
    assert all(b["action"] == "send" and b["queued"] is True for b in bodies)
    assert recorded(runtime) == (len(USERS), len(USERS))  # the rolled-back group left nothing twice
    learners = _learners(api.app)
    assert learners is not None
    assert set(learners.learner.pending) == {b["decision_id"] for b in bodies}


def test_the_key_ring_reloads_without_the_write_lock(
    api: Api, runtime: Runtime, write_locks: list[str]
) -> None:
    """The key ring reloads on the event loop: it must not wait for another writer (nor deadlock with the loop's group)."""
    from cadence.keys import KeyRing

    ring = KeyRing(runtime.settings, runtime.engine, refresh_seconds=0.0)
    taken = write_locks
    key = api.keys["decide"]["Authorization"]
    presented = base64.b64decode(key.split(" ", 1)[1]).decode().partition(":")[0]
    assert ring.cached_or_refreshed(presented) is not None  # reloaded (stale at once), and found
    assert taken == []
