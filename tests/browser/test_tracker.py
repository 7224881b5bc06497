"""cadence.js in real headless Chromium, on a page served from another origin than cadence.

The page loads the tracker from cadence's ``/sdk/cadence.js`` with the snippet API and
sends to ``/v1/batch`` across origins (CORS); the assertions read cadence's event log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from cadence.api.security import RateLimiter

if TYPE_CHECKING:
    from tests.browser.conftest import Site

pytestmark = pytest.mark.browser

UTM = "utm_source=newsletter&utm_medium=email&utm_campaign=spring-sale&utm_term=shoes&utm_content=hero"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font:16px system-ui;margin:2em}} pre{{background:#f4f4f4;padding:1em}}</style></head>
<body><h1>{title}</h1><p>A plain page on another origin that includes the cadence tracker.</p>
<pre id="state">loading...</pre>
<script>
  window.cadence = window.cadence || [];
  ["load", "page", "track", "identify", "alias", "consent", "optOut", "optIn", "reset", "flush"]
    .forEach(function (m) {{
      cadence[m] = cadence[m] || function () {{ cadence.push([m].concat([].slice.call(arguments))); }};
    }});
  var q = new URLSearchParams(location.search);
  cadence.load({{
    writeKey: "{key}",
    host: "{host}",
    consentRequired: q.get("consent") === "required",
    flushAt: Number(q.get("at") || 20),
    flushInterval: Number(q.get("interval") || 150),
    retryBaseMs: 200
  }});
  cadence.page();
  setInterval(function () {{
    if (window.cadence.state) {{
      var s = window.cadence.state();
      s.anonymousId = cadence.anonymousId();
      s.userId = cadence.userId();
      document.getElementById("state").textContent = JSON.stringify(s, null, 2);
    }}
  }}, 50);
</script>
<script async src="{host}/sdk/cadence.js"></script>
</body></html>
"""

# The simplest include: one tag, the host is the script's origin, a page view is sent at once.
TAG_ONLY = """<!doctype html>
<html><head><meta charset="utf-8"><title>Tag only</title>
<script src="{host}/sdk/cadence.src.js" data-write-key="{key}"></script></head>
<body><h1>Tag only</h1></body></html>
"""

BYE = "<!doctype html><html><head><title>Bye</title></head><body><h1>Another page</h1></body></html>"


@pytest.fixture(scope="module")
def site(cadence_site: Site) -> Site:
    cadence_site.pages["/shop.html"] = PAGE.format(
        title="Test shop", key=cadence_site.write_key, host=cadence_site.cadence_url
    )
    cadence_site.pages["/tag.html"] = TAG_ONLY.format(
        key=cadence_site.write_key, host=cadence_site.cadence_url
    )
    cadence_site.pages["/bye.html"] = BYE
    return cadence_site


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser context: no cookies, no storage."""
    ctx = browser.new_context()
    yield ctx
    ctx.close()


class Requests:
    """Every request the page made to cadence's ingestion API, with its answer status."""

    def __init__(self, context: Any, site: Site) -> None:
        self.sent: list[Any] = []
        self.statuses: list[int] = []
        prefix = site.cadence_url + "/v1/"
        # On the context, not the page: a beacon from a document being unloaded is still seen.
        context.on("request", lambda r: self.sent.append(r) if r.url.startswith(prefix) else None)
        context.on("response", lambda r: self.statuses.append(r.status) if r.url.startswith(prefix) else None)

    def posts(self) -> list[Any]:
        return [r for r in self.sent if r.method == "POST"]


def open_shop(context: Any, site: Site, query: str = "") -> tuple[Any, Requests]:
    requests = Requests(context, site)
    page = context.new_page()
    page.goto(f"{site.site_url}/shop.html{'?' + query if query else ''}")
    page.wait_for_function("window.cadence && window.cadence.VERSION")
    return page, requests


def anonymous_id(page: Any) -> str:
    value = page.evaluate("cadence.anonymousId()")
    assert isinstance(value, str) and len(value) == 36
    return value


def cadence_cookies(context: Any) -> dict[str, str]:
    return {c["name"]: c["value"] for c in context.cookies() if c["name"].startswith("cadence_")}


def names(found: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(e["type"], e["event"]) for e in found]


def shot(page: Any, artifacts: Path, name: str) -> None:
    page.wait_for_timeout(120)  # let the state panel repaint
    page.screenshot(path=str(artifacts / f"tracker-{name}.png"), full_page=True)


def test_calls_arrive_with_utm_and_page_context_and_a_stable_anonymous_id(
    context: Any, site: Site, artifacts: Path
) -> None:
    page, requests = open_shop(context, site, UTM)
    aid = anonymous_id(page)
    page.evaluate("cadence.track('Product Viewed', {sku: 'A1', price: 30})")
    page.evaluate("cadence.identify('user-42', {email: 'ann@example.com', plan: 'pro'})")
    found = site.wait_for(aid, lambda e: len(e) >= 3)
    assert names(found) == [("page", None), ("track", "Product Viewed"), ("identify", None)]
    shot(page, artifacts, "calls")

    page_call = found[0]["payload"]["context"]
    assert page_call["campaign"] == {
        "name": "spring-sale",
        "source": "newsletter",
        "medium": "email",
        "term": "shoes",
        "content": "hero",
    }
    assert page_call["page"]["path"] == "/shop.html"
    assert page_call["page"]["title"] == "Test shop"
    assert page_call["page"]["search"] == "?" + UTM
    assert page_call["page"]["url"] == f"{site.site_url}/shop.html?{UTM}"
    assert page_call["library"]["name"] == "cadence.js"
    assert found[0]["payload"]["properties"]["path"] == "/shop.html"
    assert found[1]["payload"]["properties"] == {"sku": "A1", "price": 30}
    assert found[2]["user_id"] == "user-42"
    assert found[2]["payload"]["traits"] == {"email": "ann@example.com", "plan": "pro"}
    assert len({e["message_id"] for e in found}) == 3
    # Cross-origin POSTs with the key in an Authorization header (after a CORS preflight).
    assert requests.posts() and all(
        r.headers.get("authorization", "").startswith("Basic ") for r in requests.posts()
    )
    assert cadence_cookies(context)["cadence_anonymous_id"] == aid

    page.reload()
    page.wait_for_function("window.cadence && window.cadence.VERSION")
    assert anonymous_id(page) == aid
    page.evaluate("cadence.alias('user-99')")
    after = site.wait_for(aid, lambda e: len(e) >= 5)
    assert names(after[3:]) == [("page", None), ("alias", None)]
    assert after[3]["user_id"] == "user-42"  # the identified user is remembered across pages
    assert after[4]["user_id"] == "user-99" and after[4]["payload"]["previousId"] == "user-42"
    # The cookie is the first choice; localStorage keeps the id when cookies are cleared.
    context.clear_cookies()
    page.reload()
    page.wait_for_function("window.cadence && window.cadence.VERSION")
    assert anonymous_id(page) == aid


def test_client_clock_skew_is_corrected_with_sent_at(context: Any, site: Site) -> None:
    # The visitor's clock runs three hours fast; the stored time must be the server's.
    context.add_init_script(
        """(() => {
          const Real = Date, skew = 3 * 3600 * 1000;
          class Skewed extends Real {
            constructor(...a) { if (a.length) super(...a); else super(Real.now() + skew); }
            static now() { return Real.now() + skew; }
          }
          window.Date = Skewed;
        })();"""
    )
    page, _ = open_shop(context, site)
    aid = anonymous_id(page)
    before_ms = time.time() * 1000
    page.evaluate("cadence.track('Skewed Clock')")
    found = site.wait_for(aid, lambda e: any(x["event"] == "Skewed Clock" for x in e))
    skewed = next(x for x in found if x["event"] == "Skewed Clock")
    assert abs(skewed["ts_ms"] - before_ms) < 2000, skewed["ts_ms"] - before_ms


def test_consent_mode_sends_and_stores_nothing_until_consent(
    context: Any, site: Site, artifacts: Path
) -> None:
    page, requests = open_shop(context, site, "consent=required")
    aid = anonymous_id(page)
    assert page.evaluate("cadence.state().pending") == 1  # the page view, in memory only
    page.evaluate("cadence.consent(false)")
    assert page.evaluate("cadence.state().pending") == 0  # refused: forgotten
    page.evaluate("cadence.track('Before Consent')")
    page.wait_for_timeout(600)  # several flush intervals
    state = page.evaluate("cadence.state()")
    assert state["collecting"] is False and state["pending"] == 1 and state["queued"] == 0
    assert requests.sent == []
    assert site.events_of(aid) == []
    assert cadence_cookies(context) == {}
    assert page.evaluate("Object.keys(localStorage).filter(k => k.startsWith('cadence_'))") == []
    shot(page, artifacts, "consent-waiting")

    page.evaluate("cadence.consent({email: true, sms: false})")
    found = site.wait_for(aid, lambda e: len(e) >= 2)
    assert names(found) == [("track", "Before Consent"), ("track", "Consent Updated")]
    assert found[1]["payload"]["properties"] == {
        "consent": {"email": True, "sms": False},
        "source": "cadence.js",
    }
    assert cadence_cookies(context)["cadence_anonymous_id"] == aid
    shot(page, artifacts, "consent-given")

    # Consent is remembered: the next page view is sent without asking again.
    page.reload()
    page.wait_for_function("window.cadence && window.cadence.VERSION")
    assert anonymous_id(page) == aid
    assert names(site.wait_for(aid, lambda e: len(e) >= 3))[2] == ("page", None)


def test_opt_out_stops_collection_and_is_recorded(context: Any, site: Site, artifacts: Path) -> None:
    # A long interval: the page view and both calls are still queued at the opt-out.
    page, requests = open_shop(context, site, "interval=60000&at=1000")
    aid = anonymous_id(page)
    page.evaluate("cadence.track('Before Opt Out')")
    page.evaluate("cadence.track('Queued At Opt Out')")
    assert page.evaluate("cadence.state().queued") == 3
    page.evaluate("cadence.optOut()")  # the queue is dropped, only the opt-out is sent
    found = site.wait_for(aid, lambda e: any(x["event"] == "Consent Updated" for x in e))
    assert names(found) == [("track", "Consent Updated")]
    assert found[0]["payload"]["properties"] == {"consent": {"all": False}, "source": "cadence.js"}

    page.evaluate("cadence.track('After Opt Out'); cadence.page(); cadence.flush()")
    page.wait_for_timeout(600)
    assert page.evaluate("cadence.state()")["optedOut"] is True
    assert len(site.events_of(aid)) == 1
    shot(page, artifacts, "opted-out")

    page.reload()  # the opt-out is remembered: not even the page view is sent
    page.wait_for_function("window.cadence && window.cadence.VERSION")
    page.wait_for_timeout(500)
    assert len(site.events_of(aid)) == 1
    assert len(requests.posts()) == 1  # only the opt-out record ever left

    page.evaluate("cadence.optIn(); cadence.track('After Opt In'); cadence.flush()")
    back = site.wait_for(aid, lambda e: len(e) >= 3)
    assert names(back[1:]) == [("track", "Consent Updated"), ("track", "After Opt In")]
    assert back[1]["payload"]["properties"]["consent"] == {"all": True}


def test_queued_calls_are_beaconed_when_the_page_is_hidden(context: Any, site: Site, artifacts: Path) -> None:
    # Log, in sessionStorage (it survives the navigation), how each batch left the page.
    # Playwright does not report a beacon sent by a document that is being unloaded.
    context.add_init_script(
        """(() => {
          const log = (entry) => {
            const all = JSON.parse(sessionStorage.getItem("sent") || "[]");
            all.push(entry);
            sessionStorage.setItem("sent", JSON.stringify(all));
          };
          const beacon = navigator.sendBeacon.bind(navigator);
          navigator.sendBeacon = (url, data) => {
            const ok = beacon(url, data);
            log({how: "beacon", url: String(url), type: data && data.type, ok: ok});
            return ok;
          };
          const fetch0 = window.fetch.bind(window);
          window.fetch = (url, init) => { log({how: "fetch", url: String(url)}); return fetch0(url, init); };
        })();"""
    )
    # A long interval and a large batch: nothing goes out before the visitor leaves.
    page, _ = open_shop(context, site, "interval=60000&at=1000")
    aid = anonymous_id(page)
    page.evaluate("cadence.track('Added To Cart', {sku: 'B2'})")
    page.wait_for_timeout(300)
    assert page.evaluate("cadence.state().queued") == 2
    assert site.events_of(aid) == []
    shot(page, artifacts, "before-leaving")

    page.goto(f"{site.site_url}/bye.html")  # pagehide: the queue leaves by sendBeacon
    found = site.wait_for(aid, lambda e: len(e) >= 2)
    assert names(found) == [("page", None), ("track", "Added To Cart")]
    sent = json.loads(page.evaluate("sessionStorage.getItem('sent')"))
    assert sent == [
        {
            "how": "beacon",
            "url": f"{site.cadence_url}/v1/batch",
            "type": "text/plain;charset=utf-8",
            "ok": True,
        }
    ]


def test_rate_limited_batches_are_retried_after_retry_after(context: Any, site: Site) -> None:
    saved = site.app.state.rate_limiter
    site.app.state.rate_limiter = RateLimiter(rate=1.0, burst=1)
    try:
        page, requests = open_shop(context, site, "at=1")
        aid = anonymous_id(page)
        site.wait_for(aid, lambda e: len(e) >= 1)
        page.evaluate("cadence.track('First'); cadence.track('Second')")
        found = site.wait_for(aid, lambda e: len(e) >= 3, timeout=15)
        page.wait_for_timeout(100)
    finally:
        site.app.state.rate_limiter = saved
    assert names(found) == [("page", None), ("track", "First"), ("track", "Second")]
    assert 429 in requests.statuses


def test_a_single_script_tag_with_data_attributes_sends_a_page_view(context: Any, site: Site) -> None:
    page = context.new_page()
    page.goto(f"{site.site_url}/tag.html?utm_source=ads")
    page.wait_for_function("window.cadence && window.cadence.VERSION")
    aid = anonymous_id(page)
    page.evaluate("cadence.flush()")
    found = site.wait_for(aid, lambda e: len(e) >= 1)
    assert names(found) == [("page", None)]
    assert found[0]["payload"]["context"]["campaign"] == {"source": "ads"}
    assert found[0]["payload"]["context"]["page"]["title"] == "Tag only"


def test_a_hidden_tab_flushes_by_beacon_and_a_visible_one_resumes(context: Any, site: Site) -> None:
    page, _ = open_shop(context, site, "interval=60000&at=1000")
    aid = anonymous_id(page)
    page.evaluate("cadence.track('Read Article')")
    page.wait_for_timeout(200)
    assert site.events_of(aid) == []
    # Switch the tab to the background as the browser would (visibilitychange to hidden).
    page.evaluate(
        """Object.defineProperty(document, "visibilityState", {configurable: true, get: () => "hidden"});
           document.dispatchEvent(new Event("visibilitychange"));"""
    )
    found = site.wait_for(aid, lambda e: len(e) >= 2)
    assert names(found) == [("page", None), ("track", "Read Article")]
    assert page.evaluate("cadence.state().queued") == 0


def test_network_errors_and_5xx_are_retried_honouring_retry_after(context: Any, site: Site) -> None:
    attempts: list[tuple[float, str]] = []

    def flaky(route: Any) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        attempts.append((time.monotonic(), route.request.post_data or ""))
        if len(attempts) == 1:
            route.abort("connectionreset")
        elif len(attempts) == 2:
            route.fulfill(
                status=503,
                headers={
                    "Retry-After": "1",
                    "Access-Control-Allow-Origin": site.site_url,
                    "Access-Control-Expose-Headers": "Retry-After",
                },
                body="busy",
            )
        else:
            route.continue_()

    context.route(f"{site.cadence_url}/v1/batch", flaky)
    page, _ = open_shop(context, site, "at=1")
    aid = anonymous_id(page)
    found = site.wait_for(aid, lambda e: len(e) >= 1, page=page)
    page.wait_for_timeout(300)  # would a duplicate follow?
    assert names(site.events_of(aid)) == names(found) == [("page", None)]
    assert len(attempts) == 3
    # The same calls each time (same messageIds): the server dedupes a retry that did arrive.
    ids = [[m["messageId"] for m in json.loads(body)["batch"]] for _, body in attempts]
    assert ids[0] == ids[1] == ids[2]
    assert attempts[2][0] - attempts[1][0] >= 0.95  # Retry-After: 1


def test_calls_a_refused_beacon_left_behind_are_sent_from_the_next_page(context: Any, site: Site) -> None:
    # The browser refuses beacons (as it does over its quota): the queue must survive.
    context.add_init_script("navigator.sendBeacon = () => false;")
    page, _ = open_shop(context, site, "interval=60000&at=1000")
    aid = anonymous_id(page)
    page.evaluate("cadence.track('Left Behind')")
    page.goto(f"{site.site_url}/bye.html")
    page.wait_for_timeout(300)
    assert site.events_of(aid) == []
    stored = json.loads(page.evaluate("localStorage.getItem('cadence_queue')"))
    assert [m.get("event") for m in stored] == [None, "Left Behind"]

    page.goto(f"{site.site_url}/shop.html")  # the next page sends what was left, then its own
    page.wait_for_function("window.cadence && window.cadence.VERSION")
    page.evaluate("cadence.flush()")
    found = site.wait_for(aid, lambda e: len(e) >= 3, page=page)
    assert names(found) == [("page", None), ("track", "Left Behind"), ("page", None)]
    assert page.evaluate("localStorage.getItem('cadence_queue')") is None
