"""The dashboard at ``/ui``: server-rendered pages over the aggregates the engine keeps.

* ``GET /ui/login``, ``POST /ui/login``, ``POST /ui/logout``: a form that takes an API
  key and sets a signed, HttpOnly session cookie (see :mod:`cadence.api.ui_auth`).
* ``GET /ui/attribution``, ``/ui/campaigns``, ``/ui/decisions``, ``/ui/rules``: the pages.
  Any valid key may read them, through the session or as ``?key=`` in the URL (a
  read-only link, revoked with the key).
* ``POST /ui/decisions/preview``: a decision preview; needs a session whose key holds
  the ``decide`` scope.

Pages call the service functions of the owning modules; they read aggregates
(attribution credits and tallies, campaign day counts, one customer's profile), never
the event log. Charts are drawn by Chart.js (``static/ui/chart.umd.min.js``, MIT).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from cadence.api.security import hash_key
from cadence.api.ui_auth import SESSION_COOKIE, SESSION_SECONDS, Viewer, csrf_token, load_secret, sign, unsign
from cadence.api.ui_pages import (
    DEFAULT_PAGE_MODELS,
    attribution_page,
    campaigns_page,
    customer_page,
    preview_decision,
    rules_page,
)
from cadence.clock import now_ms
from cadence.engine.learning import LearnerSubscriber

router = APIRouter(prefix="/ui", include_in_schema=False)

STATIC = Path(__file__).resolve().parents[1] / "static" / "ui"
PAGES = (
    ("attribution", "Attribution"),
    ("campaigns", "Campaigns"),
    ("decisions", "Decisions"),
    ("rules", "Rules & health"),
)
SECURITY_HEADERS = {
    # Chart.js sizes its canvases through style attributes, hence 'unsafe-inline' for styles only.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",  # read-only links carry a key: never send it elsewhere
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


#: How a condition's clause (an explanation's ``stage``, see docs/decisions.md) is named on the pages, with
#: the hint shown on hover: in the words of the rule language, which is what the marketer wrote.
CLAUSES = {
    "audience": ("audience", "the campaign's audience: who may receive it"),
    "where": ("trigger condition", "the where of the campaign's trigger: what the triggering event must be"),
    "unless": (
        "unless",
        "holds the campaign back when it holds: it lets the campaign through (yes) when it is false",
    ),
}


class _LoginRequired(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _json_script(value: Any) -> Markup:
    """JSON safe to embed in a ``<script type="application/json">``."""
    text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _fmt_ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def _num(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def setup(app: FastAPI) -> None:
    """Templates, static files, and the signing secret (read on first use)."""
    env = Environment(
        loader=PackageLoader("cadence.api", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["json_script"] = _json_script
    env.filters["ms"] = _fmt_ms
    env.filters["num"] = _num
    env.filters["pct"] = _pct
    env.globals["clauses"] = CLAUSES
    app.state.ui_templates = env
    app.state.ui_secret = None
    app.state.ui_cache = {}
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")

    @app.exception_handler(_LoginRequired)
    async def _login_required(_request: Request, exc: _LoginRequired) -> Response:
        return exc.response


def _secret(request: Request) -> bytes:
    state = request.app.state
    if state.ui_secret is None:
        state.ui_secret = load_secret(state.settings, state.runtime.engine)
    secret: bytes = state.ui_secret
    return secret


def _render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    env: Environment = request.app.state.ui_templates
    viewer: Viewer | None = context.get("viewer")
    context.setdefault("pages", PAGES)
    context.setdefault("link", _linker(viewer))
    if viewer is not None and viewer.session is not None:
        context.setdefault("csrf", csrf_token(_secret(request), viewer.session))
    html = env.get_template(f"ui/{template}").render(request=request, **context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def _linker(viewer: Viewer | None) -> Callable[..., str]:
    """``link("campaigns", customer="x")``: a page URL that keeps a read-only link's key."""

    def link(page: str, **params: Any) -> str:
        query = {k: v for k, v in params.items() if v is not None and v != ""}
        if viewer is not None and viewer.link_key is not None:
            query["key"] = viewer.link_key
        return f"/ui/{page}" + (f"?{urlencode(query, doseq=True)}" if query else "")

    return link


def _refuse(request: Request, status: int, message: str) -> _LoginRequired:
    return _LoginRequired(_render(request, "login.html", status=status, error=message, next=request.url.path))


async def viewer_of(request: Request) -> Viewer:
    """Who is asking: a URL key wins over the session; none sends the browser to the login form."""
    keyring = request.app.state.keyring
    url_key = request.query_params.get("key")
    if url_key:
        principal = await run_in_threadpool(keyring.lookup, url_key)
        if principal is None:
            raise _refuse(request, 401, "This link's key is unknown or was revoked.")
        return Viewer(principal=principal, via="url", link_key=url_key)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        digest = unsign(_secret(request), cookie, now_ms=now_ms(), max_age_s=SESSION_SECONDS)
        principal = None if digest is None else await run_in_threadpool(keyring.lookup_digest, digest)
        if principal is not None:
            return Viewer(principal=principal, via="session", session=cookie)
        response = _render(request, "login.html", status=401, error="Your session ended: log in again.")
        response.delete_cookie(SESSION_COOKIE, path="/ui")
        raise _LoginRequired(response)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise _LoginRequired(RedirectResponse(f"/ui/login?next={quote(target)}", status_code=303))


def _safe_next(target: str | None) -> str:
    """Only local dashboard paths: a login must never bounce the browser to another site."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/attribution"


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
async def index(request: Request) -> Response:
    """The dashboard's front page is the attribution page."""
    key = request.query_params.get("key")
    return RedirectResponse("/ui/attribution" + (f"?key={quote(key)}" if key else ""), status_code=303)


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str | None = None) -> Response:  # noqa: A002 - the query name
    """The login form."""
    return _render(request, "login.html", next=_safe_next(next))


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the key; on success set the session cookie and go where the user was going."""
    form = await request.form()
    key = str(form.get("key") or "").strip()
    target = _safe_next(str(form.get("next") or ""))
    principal = await run_in_threadpool(request.app.state.keyring.lookup, key) if key else None
    if principal is None:
        return _render(request, "login.html", status=401, error="Unknown or revoked API key.", next=target)
    value = sign(_secret(request), digest=hash_key(key), issued_ms=now_ms())
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=SESSION_SECONDS,
        path="/ui",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", response_class=HTMLResponse)
async def logout(request: Request) -> Response:
    """Forget the session cookie."""
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ui")
    return response


def _parse_day(text: str | None, default: date) -> date:
    if not text:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        return default


#: The longest range a page shows (days): its charts have a point per day.
MAX_RANGE_DAYS = 731


def _range(request: Request, days: int = 30) -> tuple[date, date]:
    """From and to (UTC days) of the query, swapped when reversed; the last 30 days by
    default; at most :data:`MAX_RANGE_DAYS` long, ending at ``to``."""
    today = datetime.now(UTC).date()
    until = _parse_day(request.query_params.get("to"), today)
    since = _parse_day(
        request.query_params.get("from"), until - timedelta(days=min(days - 1, until.toordinal() - 1))
    )
    if since > until:
        since, until = until, since
    if (until - since).days >= MAX_RANGE_DAYS:
        since = until - timedelta(days=MAX_RANGE_DAYS - 1)
    return since, until


def _timed(build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``build()``, with how long it took (shown at the foot of the page)."""
    started = time.perf_counter()
    data = build()
    data["elapsed_ms"] = (time.perf_counter() - started) * 1000
    return data


@router.get("/attribution", response_class=HTMLResponse)
async def attribution(request: Request) -> Response:
    """Credit by channel per model, interactions, unattributed share, holdout lift."""
    viewer = await viewer_of(request)
    since, until = _range(request)
    q = request.query_params
    models = [m for m in q.getlist("model") if m] or list(DEFAULT_PAGE_MODELS)
    try:
        window = int(q.get("window", "30"))
    except ValueError:
        window = 30
    spec = q.get("spec") or None  # None: the first block of the loaded rules
    data = await run_in_threadpool(
        _timed,
        lambda: attribution_page(
            request.app.state.runtime,
            spec=spec,
            models=models,
            window_days=window,
            since=since,
            until=until,
            on_missing_fit=_wake_refresher(request),
        ),
    )
    return _render(
        request, "attribution.html", viewer=viewer, page="attribution", since=since, until=until, **data
    )


def _wake_refresher(request: Request) -> Callable[[str, int], None] | None:
    """Ask the background refresher of materialised fits for a missing fit, when it runs in this process."""
    refresher = getattr(request.app.state, "attribution_refresher", None)
    return refresher.want if refresher is not None and refresher.running else None


@router.get("/campaigns", response_class=HTMLResponse)
async def campaigns(request: Request) -> Response:
    """Funnel counts per campaign and channel over time, queue outcomes, exploration share."""
    viewer = await viewer_of(request)
    since, until = _range(request)
    data = await run_in_threadpool(
        _timed,
        lambda: campaigns_page(request.app.state.runtime, since=since, until=until),
    )
    return _render(
        request, "campaigns.html", viewer=viewer, page="campaigns", since=since, until=until, **data
    )


@router.get("/decisions", response_class=HTMLResponse)
async def decisions(request: Request) -> Response:
    """Look a customer up: profile aggregates, last decisions, and the preview form."""
    viewer = await viewer_of(request)
    customer = (request.query_params.get("customer") or "").strip()
    data = await run_in_threadpool(
        _timed, lambda: customer_page(request.app.state.runtime, customer=customer)
    )
    return _render(
        request,
        "decisions.html",
        viewer=viewer,
        page="decisions",
        customer=customer,
        may_preview=viewer.may("decide"),
        **data,
    )


@router.post("/decisions/preview", response_class=HTMLResponse)
async def preview(request: Request) -> Response:
    """Decide for the customer now or at a chosen time, without recording or sending anything."""
    viewer = await viewer_of(request)
    form = await request.form()
    customer = str(form.get("customer") or "").strip()
    if viewer.via != "session":
        return _render(request, "error.html", status=403, viewer=viewer, message="Previews need a login.")
    if str(form.get("csrf") or "") != csrf_token(_secret(request), viewer.session or ""):
        return _render(request, "error.html", status=403, viewer=viewer, message="The form expired: reload.")
    if not viewer.may("decide"):
        return _render(
            request,
            "error.html",
            status=403,
            viewer=viewer,
            message=f"The key {viewer.principal.name!r} lacks the 'decide' scope needed for previews.",
        )
    at_text = str(form.get("at") or "").strip()
    zone = str(form.get("zone") or "UTC").strip() or "UTC"
    runtime = request.app.state.runtime

    def build() -> dict[str, Any]:
        data = customer_page(runtime, customer=customer)
        data["preview"] = preview_decision(
            runtime,
            holder=runtime.extensions["rules"],
            customer=customer,
            at=at_text,
            zone=zone,
            learners=_learners(request),
            opt_in_channels=request.app.state.opt_in_channels,
        )
        return data

    data = await run_in_threadpool(_timed, build)
    return _render(
        request,
        "decisions.html",
        viewer=viewer,
        page="decisions",
        customer=customer,
        may_preview=True,
        at=at_text,
        **data,
    )


def _learners(request: Request) -> LearnerSubscriber | None:
    """The engine loop's learners when the loop runs in this process, else None (deterministic order)."""
    loop = getattr(request.app.state, "engine_loop", None)
    for sub in getattr(loop, "subscribers", ()) or ():
        if isinstance(sub, LearnerSubscriber):
            return sub
    return None


@router.get("/rules", response_class=HTMLResponse)
async def rules(request: Request) -> Response:
    """The loaded ruleset, check and test results, scheduled jobs, connector health."""
    viewer = await viewer_of(request)
    recheck = request.query_params.get("recheck") == "1"
    app = request.app
    data = await run_in_threadpool(
        _timed,
        lambda: rules_page(
            app.state.runtime,
            holder=app.state.runtime.extensions["rules"],
            cache=app.state.ui_cache,
            scheduler=getattr(app.state, "scheduler", None),
            recheck=recheck,
        ),
    )
    return _render(request, "rules.html", viewer=viewer, page="rules", **data)
