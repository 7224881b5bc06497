"""HTTP side of API keys: how a request presents its key, and the scope dependencies.

A request presents its key as HTTP Basic user name with an empty password (what Segment
libraries send), as ``Authorization: Bearer KEY``, as ``X-API-Key: KEY``, or as a batch
body's ``writeKey``. Key storage and resolution live in :mod:`cadence.keys`.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from cadence.keys import KeyRing, Principal, RateLimiter, create_key, hash_key, revoke_key

__all__ = [
    "KeyRing",
    "Principal",
    "RateLimiter",
    "check_key",
    "create_key",
    "hash_key",
    "require_scope",
    "revoke_key",
]


def presented_key(request: Request) -> str | None:
    """The key a request carries, from Basic, Bearer or ``X-API-Key``."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic" and value:
        try:
            user, _, _password = base64.b64decode(value).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user or None
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return request.headers.get("x-api-key") or request.query_params.get("key")


def check_key(
    request: Request, key: str | None, scope: str, *, principal: Principal | None = None
) -> Principal:
    """The principal for ``key`` if it holds ``scope``; raises 401, 403 or 429 otherwise.

    ``principal`` is the key's principal when the caller already found it in the key ring's
    cache (:meth:`KeyRing.cached`); otherwise the key ring looks it up (possibly in the database).
    """
    keyring: KeyRing = request.app.state.keyring
    if key is None:
        raise HTTPException(
            401,
            detail="missing API key: send it as HTTP Basic user name, Bearer token or X-API-Key",
            headers={"WWW-Authenticate": 'Basic realm="cadence"'},
        )
    if principal is None:
        principal = keyring.lookup(key)
    if principal is None:
        raise HTTPException(401, detail="unknown or revoked API key")
    if scope not in principal.scopes and "admin" not in principal.scopes:
        raise HTTPException(403, detail=f"this key lacks the {scope!r} scope")
    wait = request.app.state.rate_limiter.acquire(principal.name)
    if wait > 0:
        raise HTTPException(
            429,
            detail=f"rate limit exceeded for key {principal.name!r}",
            headers={"Retry-After": str(max(1, round(wait + 0.5)))},
        )
    request.state.principal = principal
    return principal


def require_scope(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: the caller must hold ``scope`` (``admin`` holds all).

    Asynchronous, so that a key the key ring has cached is checked on the event loop (a
    synchronous dependency costs every request a thread hand-off); a key it must look up
    in the database is checked in a worker thread.
    """

    async def dependency(request: Request) -> Principal:
        key = presented_key(request)
        if key is not None:
            cached = request.app.state.keyring.cached(key)
            if cached is not None:
                return check_key(request, key, scope, principal=cached)
        return await run_in_threadpool(check_key, request, key, scope)

    return dependency


def Scope(scope: str) -> object:  # noqa: N802 - reads like a type in route signatures
    """``principal: Annotated[Principal, Scope("ingest")]`` in a route signature."""
    return Depends(require_scope(scope))
