"""API keys with scopes, and a per-key rate limit.

Keys are never stored in clear: configuration carries their SHA-256 (``CADENCE_API_KEYS``)
and ``cadence keys create`` stores the hash in the ``api_keys`` table. A request presents
its key as HTTP Basic user name with an empty password (what Segment libraries send),
as ``Authorization: Bearer KEY``, or as ``X-API-Key: KEY``.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from sqlalchemy import Engine, insert, select, update

from cadence.clock import now_ms
from cadence.settings import SCOPES, Settings
from cadence.store.schema.core import api_keys

__all__ = ["KeyRing", "Principal", "RateLimiter", "check_key", "create_key", "hash_key", "require_scope"]


def hash_key(key: str) -> str:
    """The hex SHA-256 under which ``key`` is stored.

    >>> hash_key("k")[:12]
    '8254c329a928'
    """
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name and what it may do."""

    name: str
    scopes: frozenset[str]


class KeyRing:
    """Resolves presented keys to principals, from settings and the database."""

    def __init__(self, settings: Settings, engine: Engine, *, refresh_seconds: float = 5.0) -> None:
        self._settings = settings
        self._engine = engine
        self._refresh_seconds = refresh_seconds
        self._loaded_at = 0.0
        self._keys: dict[str, Principal] = {}
        self._misses: set[str] = set()  # unknown keys, not looked up again until a refresh
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Principal]:
        keys = {k.sha256: Principal(k.name, frozenset(k.scopes)) for k in self._settings.api_keys}
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(api_keys.c.name, api_keys.c.sha256, api_keys.c.scopes).where(
                    api_keys.c.revoked_ms.is_(None)
                )
            )
            for name, digest, scopes in rows:
                keys[digest] = Principal(name, frozenset(s for s in scopes.split(",") if s))
        return keys

    def lookup(self, key: str) -> Principal | None:
        """The principal for ``key``, or None for an unknown or revoked key."""
        with self._lock:
            if time.monotonic() - self._loaded_at > self._refresh_seconds:
                self._keys = self._load()
                self._misses = set()
                self._loaded_at = time.monotonic()
            digest = hash_key(key)
            found = self._keys.get(digest)
            if found is None and digest not in self._misses:
                # A key created since the last load (by another process, say) works at once.
                self._keys = self._load()
                self._loaded_at = time.monotonic()
                found = self._keys.get(digest)
                if found is None:
                    self._misses.add(digest)
            return found

    def lookup_digest(self, digest: str) -> Principal | None:
        """The principal whose key hashes to ``digest`` (what a session cookie holds), or None.

        Revocations take effect at the next refresh, within ``refresh_seconds``.
        """
        with self._lock:
            if time.monotonic() - self._loaded_at > self._refresh_seconds:
                self._keys = self._load()
                self._misses = set()
                self._loaded_at = time.monotonic()
            return self._keys.get(digest)

    def invalidate(self) -> None:
        """Forget the cache (after a key was created or revoked)."""
        with self._lock:
            self._loaded_at = 0.0

    def is_empty(self) -> bool:
        """True when no key at all is configured or stored."""
        with self._lock:
            self._keys = self._load()
            self._loaded_at = time.monotonic()
            return not self._keys


def create_key(engine: Engine, *, name: str, scopes: list[str]) -> str:
    """Create, store (hashed) and return a new API key.

    Raises ValueError for an unknown scope.
    """
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}: choose from {', '.join(SCOPES)}")
    key = "cdk_" + secrets.token_urlsafe(24)
    with engine.begin() as conn:
        conn.execute(
            insert(api_keys).values(
                name=name, sha256=hash_key(key), scopes=",".join(scopes), created_ms=now_ms()
            )
        )
    return key


def revoke_key(engine: Engine, *, name: str) -> int:
    """Revoke every active key called ``name``; returns how many were revoked."""
    with engine.begin() as conn:
        result = conn.execute(
            update(api_keys)
            .where(api_keys.c.name == name, api_keys.c.revoked_ms.is_(None))
            .values(revoked_ms=now_ms())
        )
    return result.rowcount


class RateLimiter:
    """A token bucket per key: ``rate`` requests a second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; return 0 if allowed, else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, stamp = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (cost - tokens) / self.rate


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


def check_key(request: Request, key: str | None, scope: str) -> Principal:
    """The principal for ``key`` if it holds ``scope``; raises 401, 403 or 429 otherwise."""
    keyring: KeyRing = request.app.state.keyring
    if key is None:
        raise HTTPException(
            401,
            detail="missing API key: send it as HTTP Basic user name, Bearer token or X-API-Key",
            headers={"WWW-Authenticate": 'Basic realm="cadence"'},
        )
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


def require_scope(scope: str) -> Callable[[Request], Principal]:
    """A FastAPI dependency: the caller must hold ``scope`` (``admin`` holds all)."""

    def dependency(request: Request) -> Principal:
        return check_key(request, presented_key(request), scope)

    return dependency


def Scope(scope: str) -> object:  # noqa: N802 - reads like a type in route signatures
    """``principal: Annotated[Principal, Scope("ingest")]`` in a route signature."""
    return Depends(require_scope(scope))
