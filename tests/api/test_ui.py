"""The dashboard routes without a browser: who may see what, and what the pages say."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cadence.api.app import create_app
from cadence.api.security import KeyRing, create_key, revoke_key
from cadence.api.ui_auth import SESSION_COOKIE
from cadence.clock import now_ms
from cadence.engine.decisions_service import make_decision
from cadence.runtime import Runtime
from cadence.sim.demo import demo_events
from cadence.store.schema.connectors import connector_state

RULES = Path(__file__).resolve().parents[2] / "rules"
PAGES = ("/ui/attribution", "/ui/campaigns", "/ui/decisions", "/ui/rules")


@pytest.fixture
def client(runtime: Runtime, tmp_path: Path) -> Iterator[TestClient]:
    """The app over a seeded database (demo events through the engine loop) and the example rules."""
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    runtime.settings = runtime.settings.model_copy(update={"rules_paths": [rules]})
    app = create_app(runtime=runtime, background=False)
    # Revocations are seen at the key ring's next refresh; make that every request here.
    app.state.keyring = KeyRing(runtime.settings, runtime.engine, refresh_seconds=0)
    with TestClient(app) as c:
        ingest = {"X-API-Key": create_key(runtime.engine, name="ingest", scopes=["ingest"])}
        calls = demo_events(now_ms=now_ms(), customers=30, days=10)
        stored = c.post("/v1/batch", json={"batch": calls}, headers=ingest)
        assert stored.status_code == 200, stored.text
        app.state.engine_loop.catch_up()
        yield c


def _login(client: TestClient, key: str) -> None:
    response = client.post("/ui/login", data={"key": key, "next": "/ui/rules"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui/rules"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "Path=/ui" in cookie and "samesite=lax" in cookie.lower()
    assert key not in cookie  # the cookie holds a signed digest, never the key


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no csrf field on the page"
    return found.group(1)


def test_pages_need_a_key(client: TestClient) -> None:
    for page in PAGES:
        response = client.get(page, follow_redirects=False)
        assert response.status_code == 303, page
        assert response.headers["location"].startswith("/ui/login?next=")
    assert client.get("/ui/login").status_code == 200
    bad = client.post("/ui/login", data={"key": "cdk_wrong"}, follow_redirects=False)
    assert bad.status_code == 401 and "Unknown or revoked" in bad.text
    client.cookies.set(SESSION_COOKIE, "eyJkIjoiYSIsInQiOjF9.forged", path="/ui")
    forged = client.get("/ui/rules")
    assert forged.status_code == 401 and "session ended" in forged.text
    client.cookies.clear()
    assert (
        client.post("/ui/decisions/preview", data={"customer": "demo-1"}, follow_redirects=False).status_code
        == 303
    )


def test_login_shows_every_page_with_data_then_logout(client: TestClient) -> None:
    _login(client, create_key(client.app.state.runtime.engine, name="analyst", scopes=["ingest"]))
    attribution = client.get("/ui/attribution")
    assert attribution.status_code == 200
    assert "paid_search" in attribution.text and 'data-chart="chart-credit"' in attribution.text
    assert attribution.headers["referrer-policy"] == "no-referrer"
    campaigns = client.get("/ui/campaigns")
    assert campaigns.status_code == 200 and "welcome" in campaigns.text and "cart_rescue" in campaigns.text
    decisions = client.get("/ui/decisions", params={"customer": "demo-3"})
    assert decisions.status_code == 200 and "user: demo-3" in decisions.text and "signed_up" in decisions.text
    assert "need a login with a key holding the <code>decide</code> scope" in decisions.text
    assert "No customer with the id nobody" in client.get("/ui/decisions", params={"customer": "nobody"}).text
    rules = client.get("/ui/rules")
    assert rules.status_code == 200 and "campaign:newsletter" in rules.text and "winback" in rules.text
    assert client.get("/ui/static/chart.umd.min.js").status_code == 200

    out = client.post("/ui/logout", data={"csrf": _csrf(rules.text)}, follow_redirects=False)
    assert out.status_code == 303 and SESSION_COOKIE in out.headers["set-cookie"]
    assert client.get("/ui/rules", follow_redirects=False).status_code == 303


def test_read_only_links_work_until_the_key_is_revoked(client: TestClient) -> None:
    engine = client.app.state.runtime.engine
    key = create_key(engine, name="board-link", scopes=["admin"])
    page = client.get("/ui/campaigns", params={"key": key})
    assert page.status_code == 200 and "read-only link" in page.text
    assert f"/ui/rules?key={key}" in page.text  # navigation keeps the link's key
    # A link never previews, even with a key that could.
    decisions = client.get("/ui/decisions", params={"key": key, "customer": "demo-1"})
    assert 'action="/ui/decisions/preview"' not in decisions.text
    refused = client.post(f"/ui/decisions/preview?key={key}", data={"customer": "demo-1"})
    assert refused.status_code == 403
    assert revoke_key(engine, name="board-link") == 1
    gone = client.get("/ui/campaigns", params={"key": key})
    assert gone.status_code == 401 and "revoked" in gone.text


def test_revoking_a_key_ends_its_sessions(client: TestClient) -> None:
    engine = client.app.state.runtime.engine
    _login(client, create_key(engine, name="temp", scopes=["admin"]))
    assert client.get("/ui/attribution").status_code == 200
    revoke_key(engine, name="temp")
    assert client.get("/ui/attribution").status_code == 401


def test_preview_needs_the_decide_scope_and_a_form_token(client: TestClient) -> None:
    engine = client.app.state.runtime.engine
    _login(client, create_key(engine, name="reader", scopes=["ingest"]))
    page = client.get("/ui/decisions", params={"customer": "demo-2"})
    forbidden = client.post("/ui/decisions/preview", data={"customer": "demo-2", "csrf": _csrf(page.text)})
    assert forbidden.status_code == 403 and "lacks the &#39;decide&#39; scope" in forbidden.text

    _login(client, create_key(engine, name="decider", scopes=["decide"]))
    page = client.get("/ui/decisions", params={"customer": "demo-2"})
    assert client.post("/ui/decisions/preview", data={"customer": "demo-2", "csrf": "x"}).status_code == 403
    done = client.post(
        "/ui/decisions/preview",
        data={
            "customer": "demo-2",
            "csrf": _csrf(page.text),
            "at": "2026-03-02T10:00",
            "zone": "Europe/Berlin",
        },
    )
    assert done.status_code == 200
    action = re.search(r'id="preview-action">(\w+)<', done.text)
    assert action and action.group(1) in {"send", "none"}
    assert "2026-03-02" in done.text  # decided at the chosen time, not now
    bad_time = client.post(
        "/ui/decisions/preview", data={"customer": "demo-2", "csrf": _csrf(page.text), "at": "yesterday"}
    )
    assert "is not a date and time" in bad_time.text


def test_login_never_redirects_off_site(client: TestClient) -> None:
    key = create_key(client.app.state.runtime.engine, name="k", scopes=["ingest"])
    for target in ("https://evil.example/", "//evil.example/ui/", "/v1/rules"):
        response = client.post("/ui/login", data={"key": key, "next": target}, follow_redirects=False)
        assert response.headers["location"] == "/ui/attribution", target


PROMO = """
campaign promo "Spring promo" {
    send      template "promo_a"
    channel   email
    priority  5
    split     holdout 30%, promo_a 70%
}
"""


def app_with_rules(runtime: Runtime, tmp_path: Path, **files: str) -> FastAPI:
    """An app serving ``files`` (name -> rule text) as its rules."""
    rules = tmp_path / "rules"
    rules.mkdir()
    for name, text in files.items():
        (rules / f"{name}.cadence").write_text(text)
    runtime.settings = runtime.settings.model_copy(update={"rules_paths": [rules]})
    return create_app(runtime=runtime, background=False)


def test_committed_decisions_feed_the_pages(runtime: Runtime, tmp_path: Path) -> None:
    app = app_with_rules(runtime, tmp_path, promo=PROMO)
    with TestClient(app) as client:
        engine = runtime.engine
        ingest = {"X-API-Key": create_key(engine, name="ingest", scopes=["ingest"])}
        now = now_ms()
        calls = demo_events(now_ms=now - 3_600_000, customers=40, days=5)
        assert client.post("/v1/batch", json={"batch": calls}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()
        ruleset = runtime.extensions["rules"].reload().raise_for_errors()
        held = treated = held_buyers = treated_buyers = 0
        with engine.begin() as conn:
            for i in range(40):
                body = make_decision(
                    conn=conn,
                    ruleset=ruleset,
                    customer_ref=f"demo-{i}",
                    now_ms=now - 7_200_000,
                    available_channels=["email"],
                    learners=None,
                    mode="commit",
                )
                held += "promo" in body["explanation"]["holdout"]
                treated += body["action"] == "send"
                if i < 10:  # these buy after the decision, below
                    held_buyers += "promo" in body["explanation"]["holdout"]
                    treated_buyers += body["action"] == "send"
        assert held > 0 and treated > 0  # (a few demo customers unsubscribed: neither)
        # Conversions after the decisions: every demo customer with an index below 10 buys.
        orders = [
            {
                "type": "track",
                "event": "Order Completed",
                "userId": f"demo-{i}",
                "messageId": f"o{i}",
                "properties": {"revenue": 10},
            }
            for i in range(10)
        ]
        assert client.post("/v1/batch", json={"batch": orders}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()

        key = create_key(engine, name="viewer", scopes=["ingest"])
        campaigns = client.get("/ui/campaigns", params={"key": key}).text
        assert f"0 explored, {treated} exploited" in campaigns  # no learner: every send exploits
        assert '<td>holdout</td><td class="n">' + str(held) + "</td>" in campaigns
        attribution = client.get("/ui/attribution", params={"key": key}).text
        assert 'id="lifts"' in attribution and "<td>promo</td>" in attribution
        assert f'<td class="n">{treated}</td><td class="n">{held}</td>' in attribution
        rates = f'<td class="n">{100 * treated_buyers / treated:.1f}%</td><td class="n">{100 * held_buyers / held:.1f}%</td>'
        assert rates in attribution
        decisions = client.get("/ui/decisions", params={"key": key, "customer": "demo-0"}).text
        assert 'class="decision"' in decisions and "promo" in decisions


def test_rules_page_shows_an_open_circuit(client: TestClient) -> None:
    engine = client.app.state.runtime.engine
    with engine.begin() as conn:  # what the dispatcher records when a connector keeps failing
        conn.execute(
            connector_state.insert().values(
                connector="sendgrid",
                circuit="open",
                failures=5,
                open_until_ms=now_ms() + 30_000,
                last_error="401 unauthorized",
                updated_ms=now_ms(),
            )
        )
    page = client.get("/ui/rules", params={"key": create_key(engine, name="ops", scopes=["ingest"])}).text
    circuits = page[page.index('id="circuits"') :]
    assert '<td>sendgrid</td><td class="bad">open</td><td class="n">5</td>' in circuits
    assert "401 unauthorized" in circuits


def test_attribution_page_opens_on_the_first_block_of_the_rules(client: TestClient) -> None:
    # The example rules define the blocks fair_search and first_and_last and no "default":
    # the page opened on "default", which the engine loop never credits, so it was empty.
    key = create_key(client.app.state.runtime.engine, name="viewer", scopes=["ingest"])
    page = client.get("/ui/attribution", params={"key": key})
    assert page.status_code == 200
    assert "· fair_search ·" in page.text, re.findall(r"<h1>.*?</h1>", page.text)
    assert '<option value="first_and_last"' in page.text
    unknown = client.get("/ui/attribution", params={"key": key, "spec": "nope"}).text
    assert "unknown attribution block" in unknown and "fair_search" in unknown
    typo = client.get("/ui/attribution", params={"key": key, "model": "markof"}).text
    assert "unknown model &#39;markof&#39;" in typo


def test_date_ranges_at_the_calendars_ends_or_spanning_centuries_are_bounded(client: TestClient) -> None:
    # to=0001-01-01: the default start (29 days earlier) overflowed: 500. from=0001-01-01:
    # a chart point for each of 739,000 days, a 12 MB attribution page and 37 MB campaigns page.
    key = create_key(client.app.state.runtime.engine, name="viewer", scopes=["ingest"])
    for page in ("/ui/attribution", "/ui/campaigns"):
        early = client.get(page, params={"key": key, "to": "0001-01-01"})
        assert early.status_code == 200, (page, early.status_code)
        wide = client.get(page, params={"key": key, "from": "0001-01-01", "to": "2026-11-27"})
        assert wide.status_code == 200 and len(wide.text) < 2_000_000, (page, len(wide.text))
        assert 'name="from" value="2024-11-27"' in wide.text, page


def test_holdout_lift_counts_the_blocks_conversion_event(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lift table counted "Order Completed" whatever the shown block converts on.
    from datetime import date

    from cadence.api import ui_pages

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "signup.cadence").write_text(
        'event signed_up = "Signed Up"\n\nattribution signups "Sign-ups" {\n    conversion  signed_up\n}\n'
    )
    runtime.settings = runtime.settings.model_copy(update={"rules_paths": [rules]})
    seen: list[str] = []
    real = ui_pages.holdout_lifts

    def spy(conn: object, **kw: object) -> object:
        seen.append(str(kw.get("conversion_event")))
        return real(conn, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ui_pages, "holdout_lifts", spy)
    page = ui_pages.attribution_page(
        runtime,
        spec=None,
        models=["last_touch"],
        window_days=30,
        since=date(2026, 1, 1),
        until=date(2026, 1, 31),
    )
    assert page["spec"] == "signups" and seen == ["Signed Up"]


RESCUE = """
campaign rescue "Rescue big carts" {
    trigger   on "Cart Abandoned" where event.value ?? 0 >= 50
    audience  count("Cart Abandoned") >= 0
    unless    "Order Completed" within 1h
    send      template "cart_reminder"
    channel   email
}
"""


def test_decisions_page_names_each_conditions_clause(runtime: Runtime, tmp_path: Path) -> None:
    # The explanation's conditions carry their clause ("stage"); the page showed every condition
    # alike, so "yes: "Order Completed" within 1h = False" read as if the purchase were required.
    app = app_with_rules(runtime, tmp_path, rescue=RESCUE)
    with TestClient(app) as client:
        engine = runtime.engine
        ingest = {"X-API-Key": create_key(engine, name="ingest", scopes=["ingest"])}
        shopper = {
            "type": "identify",
            "userId": "shopper",
            "messageId": "s1",
            "traits": {"email": "s@example.com"},
        }
        assert client.post("/v1/batch", json={"batch": [shopper]}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()
        runtime.extensions["rules"].reload().raise_for_errors()
        decide = {"X-API-Key": create_key(engine, name="decide", scopes=["decide"])}
        body = {
            "customer_id": "shopper",
            "mode": "commit",
            "event": {"event": "Cart Abandoned", "properties": {"value": 80}},
        }
        decided = client.post("/v1/decisions", json=body, headers=decide)
        assert decided.status_code == 200 and decided.json()["action"] == "send", decided.text
        stages = [c["stage"] for c in decided.json()["explanation"]["conditions"]["rescue"]]
        assert set(stages) == {"where", "audience", "unless"}, stages

        page = client.get(
            "/ui/decisions",
            params={"key": create_key(engine, name="v", scopes=["ingest"]), "customer": "shopper"},
        )
        assert page.status_code == 200
        conditions = page.text[page.text.index('class="conditions"') :]
        for words, text in (
            ("trigger condition", "event.value ?? 0 &gt;= 50"),
            ("audience", "count(&#34;Cart Abandoned&#34;) &gt;= 0"),
            ("unless", "&#34;Order Completed&#34; within 1h"),
        ):
            assert re.search(
                rf'yes: <span class="pill clause" title="[^"]+">{words}</span> <code>{re.escape(text)}</code>',
                conditions,
            ), (words, conditions[:2000])
