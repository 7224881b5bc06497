"""The engine loop as the API shows it: status route and Prometheus gauges."""

from __future__ import annotations

import base64

from fastapi.testclient import TestClient

from cadence.api.app import create_app
from cadence.api.security import create_key
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
