"""The FastAPI application, built by :func:`create_app` from settings or a runtime."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cadence import __version__
from cadence.api.metrics import Metrics
from cadence.api.security import KeyRing, RateLimiter
from cadence.errors import CadenceError, EventError, PayloadTooLarge
from cadence.runtime import Runtime, open_runtime
from cadence.settings import Settings, load_settings

__all__ = ["ROUTERS", "CadenceAPI", "create_app"]

log = logging.getLogger("cadence.api")

# Each module exposes ``router``; plugins add more through ``cadence_register_routers``.
ROUTERS = (
    "cadence.api.routers.health",
    "cadence.api.routers.engine",
    "cadence.api.routers.ingest",
    "cadence.api.routers.customers",
    "cadence.api.routers.sdk",
    "cadence.api.routers.rules",
    "cadence.api.routers.webhooks",
    "cadence.api.routers.attribution",
    "cadence.api.routers.decisions",
    "cadence.api.routers.jobs",
    "cadence.api.routers.sends",
    "cadence.api.routers.ui",
)

# Hooks run at startup and shutdown, in order, each given the app. Later parts (the
# engine loop, the scheduler) register themselves here from their own modules.
Lifecycle = Callable[[FastAPI], Awaitable[None] | None]


class _Timing:
    """Observe each request's latency by route and status (plain ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path: Any = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).observe(time.perf_counter() - started)


class CadenceAPI(FastAPI):
    """FastAPI with *fast paths*: plain ASGI handlers for a few hot routes, tried before the middleware stack.

    ``fast_paths`` maps a request path to a handler ``(scope, receive, send)`` that answers
    the common case itself (and records its own request metrics) or hands the request to
    :meth:`full_stack`, the ordinary app with every middleware, route and exception handler.

    ``post_answers`` maps a path to a function ``(scope, body) -> (status, body, headers) | None``
    that answers a complete ``POST`` at once, without an ASGI request at all: ``cadence serve``'s
    protocol (:mod:`cadence.api.httpproto`) calls it and, on None, serves the request as usual.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast_paths: dict[str, ASGIApp] = {}
        self.post_answers: dict[
            str, Callable[[Scope, bytes], tuple[int, bytes, list[tuple[bytes, bytes]]] | None]
        ] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.fast_paths.get(scope["path"])
            if handler is not None:
                scope["app"] = self
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def full_stack(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app without its fast paths."""
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    background: bool = True,
) -> FastAPI:
    """Build the API.

    :param settings: used to open a runtime when ``runtime`` is not given.
    :param runtime: an open runtime (tests pass one with a fresh database).
    :param background: start the engine loop (and later the scheduler) in-process.
    """
    if runtime is None:
        runtime = open_runtime(settings or load_settings())
    settings = runtime.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for hook in app.state.on_startup:
            result = hook(app)
            if result is not None:
                await result
        try:
            yield
        finally:
            for hook in reversed(app.state.on_shutdown):
                result = hook(app)
                if result is not None:
                    await result

    app = CadenceAPI(
        title="cadence",
        version=__version__,
        description="Decisions, events and attribution for marketing.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.keyring = KeyRing(settings, runtime.engine)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    app.state.on_startup = []
    app.state.on_shutdown = []
    app.state.background = background
    # the installed connectors do not change while the process runs: ask the plugins once,
    # not per decision (building a plugin manager scans every package's entry points)
    # the plugin host imports the rule language: imported here, not at the top
    from cadence.plugins.manager import available_channels, make_plugin_manager, opt_in_channels

    plugins = make_plugin_manager(settings)  # one scan of the installed packages' entry points
    app.state.available_channels = available_channels(settings, pm=plugins)
    app.state.opt_in_channels = opt_in_channels(settings, pm=plugins)

    for name in ROUTERS:
        module = importlib.import_module(name)
        app.include_router(module.router)
        setup = getattr(module, "setup", None)
        if setup is not None:
            setup(app)

    @app.exception_handler(PayloadTooLarge)
    async def _too_large(_request: Request, exc: PayloadTooLarge) -> JSONResponse:
        return JSONResponse(
            status_code=400, content={"error": str(exc), "field": exc.field, "code": "too_large"}
        )

    @app.exception_handler(EventError)
    async def _bad_event(_request: Request, exc: EventError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": str(exc), "field": exc.field})

    @app.exception_handler(CadenceError)
    async def _cadence_error(_request: Request, exc: CadenceError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": str(exc)})

    app.add_middleware(_Timing, metrics=app.state.metrics)
    return app
