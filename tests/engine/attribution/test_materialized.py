"""Materialised attribution: exposures kept per event, fits refreshed, served by the API."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.engine.attribution.journeys import DAY_MS, Journeys
from cadence.engine.attribution.materialized import (
    FitRefresher,
    ordered_shapley_credit,
    read_fits,
    refresh_fits,
)
from cadence.engine.attribution.online import default_specs
from cadence.engine.attribution.shapley import shapley_ordered
from cadence.engine.events import parse_call
from cadence.engine.ingest import record_events
from cadence.engine.loop import EngineLoop
from cadence.runtime import Runtime

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def click(n: int, user: str, day: float, channel: str) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": f"m{n}",
        "userId": user,
        "timestamp": (T0 + day * DAY_MS) / 1000,
        "event": "Message Clicked",
        "properties": {"channel": channel, "campaign": "spring"},
    }


def order(n: int, user: str, day: float, revenue: float) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": f"m{n}",
        "userId": user,
        "timestamp": (T0 + day * DAY_MS) / 1000,
        "event": "Order Completed",
        "properties": {"revenue": revenue},
    }


def ingest(runtime: Runtime, calls: list[dict[str, Any]]) -> None:
    record_events(engine=runtime.engine, batch=[parse_call(c, received_ms=T0) for c in calls])
    EngineLoop(runtime).catch_up()


def market(customers: int, seed: int) -> list[dict[str, Any]]:
    """Customers with random email/sms/search clicks; email and search raise the chance to buy."""
    rng = np.random.default_rng(seed)
    calls: list[dict[str, Any]] = []
    n = 0
    for c in range(customers):
        user = f"u{c}"
        day = float(rng.random() * 5)
        chance = 0.1
        for channel in rng.choice(["email", "sms", "search"], size=int(rng.integers(0, 4))):
            day += float(rng.random() * 3)
            calls.append(click(n := n + 1, user, day, str(channel)))
            chance += {"email": 0.25, "search": 0.2, "sms": 0.0}[str(channel)]
        if rng.random() < chance:
            calls.append(order(n := n + 1, user, day + float(rng.random()), 10.0))
    return calls


def test_ordered_shapley_from_tallies_matches_the_journey_model() -> None:
    paths = [["a", "b", "a"], ["b"], ["a", "c"], ["c", "a", "b"], ["a"], ["b", "c"], ["a", "b"]]
    converted = [1, 0, 1, 1, 0, 1, 0]
    j = Journeys.from_paths(paths, converted=converted)
    credit = shapley_ordered(j)
    expected = {ch: float(credit[j.touch_channel == i].sum()) for i, ch in enumerate(j.channels)}
    conv: dict[tuple[str, ...], float] = {}
    open_: dict[tuple[str, ...], float] = {}
    for p, c in zip(paths, converted, strict=True):
        seq = tuple(dict.fromkeys(p))
        target = conv if c else open_
        target[seq] = target.get(seq, 0.0) + 1.0
    got = ordered_shapley_credit(conv, open_)
    assert got == pytest.approx({k: v for k, v in expected.items() if v > 0})
    assert sum(got.values()) == pytest.approx(sum(converted))


def test_refresh_materialises_every_model_with_its_position(runtime: Runtime) -> None:
    ingest(runtime, market(400, seed=1))
    spec = default_specs()[0]
    fits = refresh_fits(runtime.engine, spec=spec, windows=[30, 7])
    assert {(f.model, f.window_days) for f in fits} == {
        (m, w) for m in ("shapley", "shapley_ordered", "markov", "causal") for w in (7, 30)
    }
    with runtime.engine.connect() as conn:
        stored = read_fits(conn, spec="default", models=["causal", "shapley_ordered"], window_days=30)
        newest = conn.exec_driver_sql("SELECT MAX(id) FROM events").scalar()
        converted = conn.exec_driver_sql(
            "SELECT COUNT(*) FROM attribution_exposures WHERE channel = ''"
        ).scalar()
    causal = stored[("causal", 30)]
    assert causal.position == newest
    # Exposures hold every conversion; the fit saw them all and split them into
    # baseline and channel credit; sms, which does nothing here, earns the least.
    assert causal.result["observed_conversions"] == converted
    credit = {r["key"]: r["conversions"] for r in causal.rows}
    assert set(credit) == {"email", "search", "sms"}
    assert credit["sms"] < min(credit["email"], credit["search"])
    assert 0.0 < causal.result["share_anyway"] < 1.0
    ordered = stored[("shapley_ordered", 30)]
    with runtime.engine.connect() as conn:
        touched = conn.exec_driver_sql(
            "SELECT SUM(conversions) FROM attribution_paths WHERE spec = 'default' AND window_days = 30"
        ).scalar()
    # Every conversion with a touch in the window is handed out, no more.
    assert sum(r["conversions"] for r in ordered.rows) == pytest.approx(touched)


def test_the_refresher_refits_only_when_the_log_moved(runtime: Runtime) -> None:
    ingest(runtime, market(150, seed=2))
    refresher = FitRefresher(runtime, interval_s=60)
    first = refresher.refresh_once()
    assert first and all(f.window_days == 30 for f in first)
    assert refresher.refresh_once() == []  # nothing new
    ingest(runtime, [click(10_000, "late", 20, "email"), order(10_001, "late", 20.5, 5.0)])
    again = refresher.refresh_once()
    assert again and all(f.position > first[0].position for f in again)


def test_api_serves_causal_and_ordered_shapley_with_freshness(runtime: Runtime) -> None:
    ingest(runtime, market(300, seed=3))
    client = TestClient(create_app(runtime=runtime, background=False))
    key = create_key(runtime.engine, name="analyst", scopes=["admin"])
    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    r = client.get("/v1/attribution?model=last_touch,causal,shapley_ordered&window=14d", headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["models"]) == {"last_touch", "causal", "shapley_ordered"}
    fit = body["fits"]["causal"]
    with runtime.engine.connect() as conn:
        newest = conn.exec_driver_sql("SELECT MAX(id) FROM events").scalar()
    assert fit["position"] == newest and fit["fitted_at"] and 0 < fit["share_anyway"] < 1
    assert fit["events_behind"] == 0
    causal_total = sum(row["conversions"] for row in body["models"]["causal"])
    assert 0 < causal_total < fit["observed_conversions"]
    # New events: the stored fit is served (and says how far behind it is) until refreshed.
    ingest(runtime, [click(20_000, "new", 30, "email"), order(20_001, "new", 30.2, 5.0)])
    stale = client.get("/v1/attribution?model=causal&window=14d", headers=auth).json()
    assert stale["fits"]["causal"]["events_behind"] == 2
    fresh = client.get("/v1/attribution?model=causal&window=14d&refresh=true", headers=auth).json()
    assert fresh["fits"]["causal"]["events_behind"] == 0
    by_day = client.get("/v1/attribution?model=causal&group_by=day", headers=auth)
    assert by_day.status_code == 422 and "channel" in by_day.json()["detail"]


def test_a_window_asked_for_is_fitted_from_then_on(runtime: Runtime) -> None:
    ingest(runtime, market(120, seed=4))
    refresher = FitRefresher(runtime, interval_s=60)
    assert {f.window_days for f in refresher.refresh_once()} == {30}
    refresher.want("default", 7)  # the dashboard found no 7-day fit
    assert {f.window_days for f in refresher.refresh_once()} == {7, 30}
    with runtime.engine.connect() as conn:
        assert set(read_fits(conn, spec="default", models=["causal"])) == {("causal", 7), ("causal", 30)}


def test_tally_models_are_fitted_only_at_the_windows_their_tallies_are_kept(runtime: Runtime) -> None:
    # Shapley and Markov tallies exist for 1, 7, 14, 30, 60, 90 days and the block's own
    # window: at 45 days they were solved from the open journeys alone (0 credit each).
    ingest(runtime, market(150, seed=5))
    spec = default_specs()[0]
    fits = refresh_fits(runtime.engine, spec=spec, windows=[45, 30])
    assert {(f.model, f.window_days) for f in fits} == {
        ("causal", 45),
        *((m, 30) for m in ("shapley", "shapley_ordered", "markov", "causal")),
    }
    causal45 = next(f for f in fits if f.window_days == 45)
    assert sum(r["conversions"] for r in causal45.rows) > 0
    # The refresher does not take the never-stored 45-day tally fits for stale ones.
    refresher = FitRefresher(runtime, interval_s=60)
    assert refresher.refresh_once() == []
    client = TestClient(create_app(runtime=runtime, background=False))
    key = create_key(runtime.engine, name="analyst", scopes=["admin"])
    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    assert client.get("/v1/attribution?model=causal&window=45d", headers=auth).status_code == 200
    bad = client.get("/v1/attribution?model=causal,markov&window=45d", headers=auth)
    assert bad.status_code == 422 and "markov" in bad.json()["detail"]


def test_too_many_channels_for_exact_shapley_leaves_the_other_fits_alone(runtime: Runtime) -> None:
    # Sixteen channels (the fourteen default groups plus our own sends' channels get there):
    # exact Shapley refused, and the exception aborted the whole refresh, so Markov,
    # ordered Shapley and causal were never fitted either, in the background for ever.
    calls: list[dict[str, Any]] = []
    for c in range(16):
        calls.append(click(2 * c, f"u{c}", 1, f"ch{c:02d}"))
        calls.append(order(2 * c + 1, f"u{c}", 2, 10.0))
    ingest(runtime, calls)
    refresher = FitRefresher(runtime, interval_s=60)
    fits = {f.model: f for f in refresher.refresh_once()}
    assert set(fits) == {"shapley", "shapley_ordered", "markov", "causal"}
    assert fits["shapley"].rows == [] and "got 16" in fits["shapley"].result["note"]
    assert sum(r["conversions"] for r in fits["markov"].rows) == pytest.approx(16.0)
    client = TestClient(create_app(runtime=runtime, background=False))
    key = create_key(runtime.engine, name="analyst", scopes=["admin"])
    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    r = client.get("/v1/attribution?model=shapley,markov", headers=auth)
    assert r.status_code == 200, r.text
    assert "got 16" in r.json()["fits"]["shapley"]["note"]
