"""The dashboard in real headless Chromium: log in, see every page with real data, charts drawn.

The data goes the way production data goes: demo calls posted to ``/v1/batch``, the
engine loop (profiles, attribution, campaign counts), and the example rules. Each page
is saved as a screenshot under ``test-artifacts/``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cadence.api.app import create_app
from cadence.api.security import KeyRing, create_key, revoke_key
from cadence.clock import now_ms
from cadence.runtime import Runtime, open_runtime
from cadence.settings import Settings
from cadence.sim.demo import demo_events
from cadence.store.db import create_db_engine, migrate

pytestmark = pytest.mark.browser

RULES = Path(__file__).resolve().parents[2] / "rules"
CHARTS = {
    "attribution": ("chart-credit", "chart-daily"),
    "campaigns": ("chart-funnel", "chart-sends"),
    "decisions?customer=demo-3": ("chart-activity",),
    "rules": (),
}

# How many pixels of a chart's canvas are painted (not fully transparent).
PAINTED = """(id) => {
  const canvas = document.querySelector(`canvas[data-chart="${id}"]`);
  const ctx = canvas.getContext("2d");
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < data.length; i += 4) { if (data[i] !== 0) painted++; }
  return {painted, total: canvas.width * canvas.height, chart: !!(window.cadenceCharts || {})[id]};
}"""


@dataclass
class Dashboard:
    """cadence with seeded data under uvicorn, and keys of each kind."""

    url: str
    runtime: Runtime
    admin: str
    decider: str
    reader: str


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory, serve_app: Any) -> Iterator[Dashboard]:
    """A fresh database seeded through ingestion and the engine loop, served on loopback."""
    root = tmp_path_factory.mktemp("dashboard")
    shutil.copytree(RULES, root / "rules")
    settings = Settings(
        database_url=f"sqlite:///{root}/cadence.db",
        rules_paths=[root / "rules"],
        disable_plugin_autoload=True,
        _env_file=None,  # type: ignore[call-arg]
    )
    engine = create_db_engine(settings.database_url)
    migrate(engine)
    runtime = open_runtime(settings, engine=engine)
    app = create_app(runtime=runtime, background=False)
    app.state.keyring = KeyRing(settings, engine, refresh_seconds=0.2)
    ingest = create_key(engine, name="ingest", scopes=["ingest"])
    with serve_app(app) as url:
        calls = demo_events(now_ms=now_ms(), customers=60, days=14)
        response = httpx.post(f"{url}/v1/batch", json={"batch": calls}, auth=(ingest, ""), timeout=30)
        assert response.status_code == 200, response.text
        app.state.engine_loop.catch_up()
        app.state.attribution_refresher.refresh_once()  # what the leader does in the background
        yield Dashboard(
            url=url,
            runtime=runtime,
            admin=create_key(engine, name="admin", scopes=["admin"]),
            decider=create_key(engine, name="decider", scopes=["decide"]),
            reader=create_key(engine, name="reader", scopes=["ingest"]),
        )
    engine.dispose()


def _login(page: Any, dashboard: Dashboard, key: str, target: str = "/ui/attribution") -> None:
    page.goto(dashboard.url + target)
    assert "/ui/login" in page.url  # sent to the form first
    page.fill("#key", key)
    page.click("#login")
    page.wait_for_url(dashboard.url + target)


def _charts_drawn(page: Any, ids: tuple[str, ...]) -> None:
    for chart_id in ids:
        page.wait_for_function("(id) => !!(window.cadenceCharts || {})[id]", arg=chart_id)
        found = page.evaluate(PAINTED, chart_id)
        assert found["chart"], f"{chart_id}: no Chart.js instance"
        assert found["painted"] > found["total"] * 0.01, f"{chart_id} looks blank: {found}"


def test_every_page_renders_real_data_and_draws_its_charts(
    browser: Any, dashboard: Dashboard, artifacts: Path
) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        _login(page, dashboard, dashboard.reader)
        for target, charts in CHARTS.items():
            started = time.perf_counter()
            page.goto(f"{dashboard.url}/ui/{target}")
            _charts_drawn(page, charts)
            elapsed = time.perf_counter() - started
            name = target.split("?")[0]
            page.screenshot(path=str(artifacts / f"dashboard-{name}.png"), full_page=True)
            assert elapsed < 5, f"{target} took {elapsed:.1f}s"
        page.goto(f"{dashboard.url}/ui/attribution")
        rows = page.locator("#credit-table tbody tr")
        assert rows.count() >= 2 and "paid_search" in page.inner_text("#credit-table")
        assert float(page.inner_text("#kpi-conversions").replace(",", "")) > 0
        # The causal model side by side with the rule models, its baseline, and how fresh it is.
        assert "causal" in page.inner_text("#credit-table thead")
        anyway = page.inner_text("#kpi-anyway")
        assert anyway.endswith("%") and 0 <= float(anyway[:-1]) <= 100
        assert "causal" in page.inner_text("#freshness")
        page.goto(f"{dashboard.url}/ui/campaigns")
        table = page.inner_text("#campaign-table")
        assert "welcome" in table and "cart_rescue" in table
        page.goto(f"{dashboard.url}/ui/rules")
        assert page.inner_text("#check-status") == "ok"
        assert "campaign:newsletter" in page.inner_text("#jobs")
        assert "passed" in page.inner_text("#test-status")
        page.click("#logout")
        page.wait_for_url(f"{dashboard.url}/ui/login")
        page.goto(f"{dashboard.url}/ui/campaigns")
        assert "/ui/login" in page.url  # logged out: back to the form
        assert not errors, errors
    finally:
        context.close()


def test_decision_preview(browser: Any, dashboard: Dashboard, artifacts: Path) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    try:
        _login(page, dashboard, dashboard.decider, "/ui/decisions")
        page.fill("#customer", "demo-5")
        page.click("#lookup")
        page.wait_for_selector("#profile")
        assert "demo-5" in page.inner_text("#profile")
        page.fill("#at", "2026-03-02T10:00")
        page.click("#preview")
        page.wait_for_selector("#preview-result")
        assert page.inner_text("#preview-action") in {"send", "none"}
        assert "2026-03-02" in page.inner_text("#preview-result")
        explanation = page.inner_text("#preview-result")
        assert "Not chosen" in explanation or "Candidate" in explanation or "Conditions" in explanation
        page.screenshot(path=str(artifacts / "dashboard-decision-preview.png"), full_page=True)
    finally:
        context.close()


def test_login_refuses_a_wrong_key(browser: Any, dashboard: Dashboard) -> None:
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"{dashboard.url}/ui/login")
        page.fill("#key", "cdk_not_a_key")
        page.click("#login")
        page.wait_for_selector("#login-error")
        assert "Unknown or revoked" in page.inner_text("#login-error")
        cookies = context.cookies()
        assert not [c for c in cookies if c["name"] == "cadence_session"]
    finally:
        context.close()


def test_read_only_link_until_revoked(browser: Any, dashboard: Dashboard, artifacts: Path) -> None:
    key = create_key(dashboard.runtime.engine, name="shared-link", scopes=["admin"])
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    try:
        page.goto(f"{dashboard.url}/ui/campaigns?key={key}")
        assert "read-only link" in page.inner_text("header")
        _charts_drawn(page, CHARTS["campaigns"])
        page.click("nav >> text=Rules & health")  # navigation keeps the key
        page.wait_for_selector("#jobs")
        assert f"key={key}" in page.url
        page.screenshot(path=str(artifacts / "dashboard-read-only-link.png"), full_page=True)
        assert not context.cookies()  # a link sets no session
        revoke_key(dashboard.runtime.engine, name="shared-link")
        deadline = time.monotonic() + 5
        while True:
            response = page.goto(f"{dashboard.url}/ui/campaigns?key={key}")
            if response is not None and response.status == 401:
                break
            assert time.monotonic() < deadline, "the revoked key still opens the page"
            page.wait_for_timeout(100)
        assert "revoked" in page.inner_text("body")
    finally:
        context.close()
