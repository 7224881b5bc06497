"""Read routes read a snapshot: on SQLite they neither take nor wait for the database's write lock.

Every decision commit of every ``cadence serve`` worker waits for SQLite's write lock; a read
route that began its transaction with it (``BEGIN IMMEDIATE``) stalled them, and waited for them.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.runtime import Runtime
from tests.conftest import holding_write_lock

RULES = Path(__file__).resolve().parents[2] / "rules"


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


@pytest.fixture
def served(runtime: Runtime, tmp_path: Path) -> tuple[TestClient, dict[str, str], str, list[str]]:
    """An app with the example rules, a customer, a committed decision; the read routes to ask."""
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    runtime.settings = runtime.settings.model_copy(update={"rules_paths": [rules]})
    app = create_app(runtime=runtime, background=False)
    client = TestClient(app)
    key = create_key(runtime.engine, name="admin", scopes=["admin"])
    admin = basic(key)
    r = client.post(
        "/v1/identify",
        json={"userId": "u1", "traits": {"first_name": "Ada", "timezone": "Europe/Berlin"}},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    r = client.post(
        "/v1/track", json={"userId": "u1", "event": "Email Opened", "messageId": "m1"}, headers=admin
    )
    assert r.status_code == 200, r.text
    app.state.engine_loop.catch_up()
    assert client.get("/v1/rules", headers=admin).json()["ok"]
    decided = client.post(
        "/v1/decisions",
        json={"customer_id": "u1", "mode": "commit", "at": "2026-03-04T12:00:00+01:00"},
        headers=admin,
    )
    assert decided.status_code == 200, decided.text
    decision_id = decided.json()["decision_id"]
    routes = [
        f"/v1/decisions/{decision_id}",
        "/v1/attribution?model=last_touch&model=linear&group_by=campaign",
        "/v1/customers/u1",
        "/v1/sends/in-doubt",
        "/v1/sends/removals",
        "/v1/jobs",
        "/v1/engine",
        "/v1/explain/winback?customer=u1&at=2026-03-04T12:00:00%2B01:00",
        "/readyz",
        f"/ui/attribution?key={key}",
        f"/ui/campaigns?key={key}",
        f"/ui/decisions?customer=u1&key={key}",
        f"/ui/rules?key={key}",
    ]
    return client, admin, decision_id, routes


def _answer(client: TestClient, route: str, headers: dict[str, str]) -> Any:
    r = client.get(route, headers=headers)
    assert r.status_code == 200, (route, r.status_code, r.text[:500])
    return r.json() if r.headers["content-type"].startswith("application/json") else None


def test_read_routes_take_no_write_lock(
    served: tuple[TestClient, dict[str, str], str, list[str]], write_locks: list[str]
) -> None:
    """Both databases: the routes answer as before; on SQLite none of them takes the write lock."""
    client, admin, decision_id, routes = served
    write_locks.clear()
    answers = {route: _answer(client, route, admin) for route in routes}
    assert write_locks == []
    assert answers[routes[0]]["decision_id"] == decision_id
    assert answers["/v1/customers/u1"]["identities"] == [{"kind": "user", "value": "u1"}]
    assert answers["/readyz"] == {"status": "ready"}
    assert "winback" in {job["campaign"] for job in answers["/v1/jobs"]["campaigns"]}


def test_read_routes_answer_while_another_connection_holds_the_write_lock(
    served: tuple[TestClient, dict[str, str], str, list[str]], runtime: Runtime
) -> None:
    """SQLite: with a ``BEGIN IMMEDIATE`` held open elsewhere, each route answers the same data (not 'locked')."""
    if runtime.engine.dialect.name != "sqlite":
        pytest.skip("SQLite's write lock")
    client, admin, _decision_id, routes = served
    before = {route: _answer(client, route, admin) for route in routes}
    with holding_write_lock(runtime.engine):
        during = {route: _answer(client, route, admin) for route in routes}
    assert during == before
