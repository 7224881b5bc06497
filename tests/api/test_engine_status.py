"""The engine loop as the API shows it: status route and Prometheus gauges."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.engine.loop import LoopFailure
from cadence.runtime import Runtime


def test_status_and_metrics_follow_the_loop(runtime: Runtime) -> None:
    client = TestClient(create_app(runtime=runtime, background=False))
    key = create_key(runtime.engine, name="admin", scopes=["admin"])
    headers = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    batch = {
        "batch": [{"type": "track", "userId": f"u{i}", "event": "E", "messageId": str(i)} for i in range(5)]
    }
    assert client.post("/v1/batch", json=batch, headers=headers).status_code == 200
    before = client.get("/v1/engine", headers=headers).json()
    assert before["lag"] == 5 and before["running"] is False
    client.app.state.engine_loop.catch_up()  # type: ignore[attr-defined]
    after = client.get("/v1/engine", headers=headers).json()
    assert after["lag"] == 0 and set(after["positions"]) >= {"identity", "profiles", "consent"}
    metrics = client.get("/metrics").text
    assert "cadence_engine_lag_events 0.0" in metrics
    assert 'cadence_events_accepted_total{source="api"} 5.0' in metrics
    assert client.get("/v1/engine").status_code == 401


def test_a_failing_loop_and_the_events_it_set_aside_show_in_status_and_metrics(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cadence.engine.profiles import ProfilesSubscriber

    client = TestClient(create_app(runtime=runtime, background=False))
    key = create_key(runtime.engine, name="admin", scopes=["admin"])
    headers = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    batch = {
        "batch": [
            {"type": "track", "userId": f"u{i}", "event": f"E{i}", "messageId": str(i)} for i in range(5)
        ]
    }
    assert client.post("/v1/batch", json=batch, headers=headers).status_code == 200
    apply = ProfilesSubscriber.apply

    def broken(self: ProfilesSubscriber, conn: Any, events: Any) -> None:
        if any(e.event == "E3" for e in events):
            raise KeyError("E3")
        apply(self, conn, events)

    monkeypatch.setattr(ProfilesSubscriber, "apply", broken)
    loop = client.app.state.engine_loop  # type: ignore[attr-defined]
    with pytest.raises(KeyError):
        loop.catch_up()
    loop.failure = LoopFailure("KeyError: 'E3'", 0, 3, 3, 0.0, 0.0)  # as the background loop records it
    assert "cadence_engine_failing 1.0" in client.get("/metrics").text
    aside = loop.set_aside_failing()
    loop.failure = None
    loop.catch_up()  # the events after it (the background loop goes on at once)
    status = client.get("/v1/engine", headers=headers).json()
    assert status["lag"] == 0 and status["failing"] is None
    assert [(r["event_id"], r["subscriber"]) for r in status["quarantined"]["recent"]] == [
        (aside, "profiles")
    ]
    metrics = client.get("/metrics").text
    assert "cadence_engine_failing 0.0" in metrics and "cadence_engine_events_set_aside 1.0" in metrics
