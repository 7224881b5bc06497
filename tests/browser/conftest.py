"""Real headless Chromium for the browser tests, and a cadence server for it to talk to.

Chromium is Debian's ``chromium`` package, installed by ``scripts/ensure-chromium.sh``
when absent, and driven by Playwright for Python (never ``playwright install``: we use
the system browser). Without a browser the tests skip with the reason, unless
``CADENCE_REQUIRE_BROWSER=1`` turns that into a failure.

Fixtures: ``browser`` (one per session), ``serve(app)`` (a context manager running an
app under uvicorn on a free loopback port), ``cadence_site`` (cadence under uvicorn on a
loopback port with a fresh SQLite database, plus a static web server on another port
whose origin is allowed by ``cors_origins``), and ``artifacts`` (where screenshots go).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import Engine, select

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.runtime import Runtime, open_runtime
from cadence.settings import Settings
from cadence.store.db import create_db_engine, migrate
from cadence.store.schema.core import events

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CADENCE_CHROMIUM", "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("CADENCE_REQUIRE_BROWSER") == "1"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``browser`` mark (``-m "not browser"`` leaves these tests out)."""
    config.addinivalue_line("markers", "browser: drives a real headless Chromium")


def _unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"CADENCE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the whole session, with a fresh profile."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright for Python is not installed (pip install playwright)")
    ensure = subprocess.run(
        [str(ROOT / "scripts" / "ensure-chromium.sh")], capture_output=True, text=True, check=False
    )
    if ensure.returncode != 0 or not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"Chromium is not installed and could not be: {ensure.stderr.strip()}")
    with sync_playwright() as playwright:
        # Playwright gives each launch a fresh temporary profile (user-data-dir) of its own.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Site:
    """cadence on one loopback port, the test website on another."""

    cadence_url: str
    site_url: str
    write_key: str
    runtime: Runtime
    app: Any
    pages: dict[str, str] = field(default_factory=dict)

    @property
    def engine(self) -> Engine:
        """The cadence database."""
        return self.runtime.engine

    def events_of(self, anonymous_id: str) -> list[dict[str, Any]]:
        """Every stored call of one visitor, in log order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(events).where(events.c.anonymous_id == anonymous_id).order_by(events.c.id)
            ).mappings()
            return [dict(row) for row in rows]

    def wait_for(
        self,
        anonymous_id: str,
        done: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 10.0,
        page: Any = None,
    ) -> list[dict[str, Any]]:
        """Poll the event log until ``done(events)`` holds; fail with what arrived otherwise.

        Pass ``page`` when Playwright handlers (routes, listeners) must run meanwhile: the
        sync API only dispatches them inside its own calls.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.events_of(anonymous_id)
            if done(found):
                return found
            if time.monotonic() > deadline:
                summary = [(e["type"], e["event"]) for e in found]
                pytest.fail(f"timed out waiting for events of {anonymous_id}; got {summary}")
            if page is not None:
                page.wait_for_timeout(50)
            else:
                time.sleep(0.05)


def _static_server(pages: dict[str, str]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            body = pages.get(path)
            if body is None:
                self.send_error(404)
                return
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base signature
            return

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="session")
def cadence_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """cadence (uvicorn, fresh SQLite) and a static site on another port that may call it."""
    pages: dict[str, str] = {}
    static = _static_server(pages)
    site_url = f"http://127.0.0.1:{static.server_address[1]}"
    static_thread = threading.Thread(target=static.serve_forever, daemon=True)
    static_thread.start()

    db = tmp_path_factory.mktemp("cadence") / "cadence.db"
    settings = Settings(
        database_url=f"sqlite:///{db}",
        rules_paths=[],
        disable_plugin_autoload=True,
        cors_origins=[site_url],
        _env_file=None,  # type: ignore[call-arg]
    )
    engine = create_db_engine(settings.database_url)
    migrate(engine)
    runtime = open_runtime(settings, engine=engine)
    key = create_key(engine, name="website", scopes=["ingest"])
    app = create_app(runtime=runtime, background=False)

    try:
        with serve(app) as cadence_url:
            yield Site(
                cadence_url=cadence_url,
                site_url=site_url,
                write_key=key,
                runtime=runtime,
                app=app,
                pages=pages,
            )
    finally:
        static.shutdown()
        static.server_close()
        engine.dispose()


@pytest.fixture(scope="session")
def serve_app() -> Callable[[Any], Any]:
    """:func:`serve`, for tests that run an app of their own."""
    return serve


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """``test-artifacts/`` (git-ignored): screenshots of what the browser showed."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
