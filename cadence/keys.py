"""API keys: hashed storage, scopes, resolution to principals, and a per-key rate limit.

Keys are never stored in clear: configuration carries their SHA-256 (``CADENCE_API_KEYS``)
and ``cadence keys create`` stores the hash in the ``api_keys`` table. The HTTP side
(how a request presents a key, FastAPI dependencies) lives in ``cadence.api.security``.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update

from cadence.clock import now_ms
from cadence.settings import SCOPES, Settings
from cadence.store.db import read_connection
from cadence.store.schema.core import api_keys

__all__ = ["KeyRing", "Principal", "RateLimiter", "create_key", "hash_key", "revoke_key"]


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
        # Read-only: on SQLite a plain connection's transaction takes the write lock, and this runs on
        # the event loop (every ``refresh_seconds``), which must not wait for another process's writes.
        with read_connection(self._engine) as conn:
            rows = conn.execute(
                select(api_keys.c.name, api_keys.c.sha256, api_keys.c.scopes).where(
                    api_keys.c.revoked_ms.is_(None)
                )
            )
            for name, digest, scopes in rows:
                keys[digest] = Principal(name, frozenset(s for s in scopes.split(",") if s))
        return keys

    def _refresh_if_stale(self) -> None:
        """Reload the keys when the cache is older than ``refresh_seconds`` (call with the lock held)."""
        if time.monotonic() - self._loaded_at > self._refresh_seconds:
            self._keys = self._load()
            self._misses = set()
            self._loaded_at = time.monotonic()

    def lookup(self, key: str) -> Principal | None:
        """The principal for ``key``, or None for an unknown or revoked key."""
        with self._lock:
            self._refresh_if_stale()
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

    def cached(self, key: str) -> Principal | None:
        """The principal for ``key`` when the ring knows it and is fresh, else None (without I/O).

        A None means "ask :meth:`lookup`", which may read the database; request handlers on
        the event loop take this path first and hand only the rest to a thread.
        """
        digest = hash_key(key)
        with self._lock:
            if time.monotonic() - self._loaded_at > self._refresh_seconds:
                return None
            return self._keys.get(digest)

    def cached_or_refreshed(self, key: str) -> Principal | None:
        """:meth:`cached`, reloading the keys first when the cache is only stale (one read per interval).

        An unknown key is not looked up (that is :meth:`lookup`'s work, which remembers misses): a
        caller on the event loop reads the database at most once per ``refresh_seconds`` here.
        """
        return self.lookup_digest(hash_key(key))

    def lookup_digest(self, digest: str) -> Principal | None:
        """The principal whose key hashes to ``digest`` (what a session cookie holds), or None.

        Revocations take effect at the next refresh, within ``refresh_seconds``.
        """
        with self._lock:
            self._refresh_if_stale()
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
