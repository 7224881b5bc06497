"""CORS for the ingestion routes only, so websites on other origins can send events.

Browsers send ``POST /v1/batch`` from a page's origin with an ``Authorization``
header, which needs a preflight. Only the origins in ``Settings.cors_origins``
(``CADENCE_CORS_ORIGINS``) are allowed; ``"*"`` allows any. Every other route keeps
the browser's same-origin default.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["PathCORS"]


class PathCORS:
    """Apply Starlette's CORS middleware to the given paths, pass everything else through."""

    def __init__(self, app: ASGIApp, *, origins: Iterable[str], paths: Iterable[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_methods=["POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
            max_age=86400,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route a request through CORS handling when its path is an ingestion route."""
        if scope["type"] == "http" and scope["path"] in self.paths:
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
