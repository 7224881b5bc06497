"""Dashboard authentication: signed session cookies, and keys in the URL for read-only links.

A session cookie carries the SHA-256 of the API key that logged in (never the key) and
when it was issued, signed with HMAC-SHA256 under the UI secret (``ui_secret`` in the
settings, else a random one generated once and kept in the ``ui_secrets`` table). Each
request looks the digest up in the key ring again, so revoking the key
(``cadence keys revoke``) ends its sessions and its links within the ring's refresh.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import orjson
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from cadence.api.security import Principal
from cadence.clock import now_ms
from cadence.settings import Settings
from cadence.store.schema.dashboard import ui_secrets

__all__ = ["SESSION_COOKIE", "SESSION_SECONDS", "Viewer", "csrf_token", "load_secret", "sign", "unsign"]

SESSION_COOKIE = "cadence_session"
SESSION_SECONDS = 12 * 3600
_SECRET_NAME = "session"


@dataclass(frozen=True)
class Viewer:
    """Who is looking at the dashboard, and how they got in.

    ``via`` is ``"session"`` (logged in through the form) or ``"url"`` (a read-only
    link carrying ``?key=``); ``link_key`` is that key, which the pages put in their links.
    """

    principal: Principal
    via: str
    link_key: str | None = None
    session: str | None = None

    def may(self, scope: str) -> bool:
        """True when this viewer may use ``scope``: URL keys only ever read."""
        if self.via != "session":
            return False
        return scope in self.principal.scopes or "admin" in self.principal.scopes


def load_secret(settings: Settings, engine: Engine) -> bytes:
    """The signing secret: from the settings, else the stored one (created on first use)."""
    if settings.ui_secret is not None:
        return settings.ui_secret.get_secret_value().encode()
    with engine.begin() as conn:
        found = conn.scalar(select(ui_secrets.c.value).where(ui_secrets.c.name == _SECRET_NAME))
        if found is not None:
            return str(found).encode()
        value = secrets.token_urlsafe(48)
        try:
            conn.execute(insert(ui_secrets).values(name=_SECRET_NAME, value=value, created_ms=now_ms()))
        except IntegrityError:  # another worker created it first: use theirs
            conn.rollback()
            return load_secret(settings, engine)
    return value.encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())


def sign(secret: bytes, *, digest: str, issued_ms: int) -> str:
    """A cookie value holding a key digest and its issue time.

    >>> value = sign(b"s", digest="ab" * 32, issued_ms=1000)
    >>> unsign(b"s", value, now_ms=2000, max_age_s=60)
    'abababababababababababababababababababababababababababababababab'
    >>> unsign(b"other", value, now_ms=2000, max_age_s=60) is None
    True
    >>> unsign(b"s", value, now_ms=1000 + 61_000, max_age_s=60) is None
    True
    """
    payload = _b64(orjson.dumps({"d": digest, "t": issued_ms}))
    return f"{payload}.{_mac(secret, payload)}"


def unsign(secret: bytes, value: str, *, now_ms: int, max_age_s: int) -> str | None:
    """The key digest in a cookie value, or None when it is forged, malformed or expired."""
    payload, _, mac = value.partition(".")
    if not payload or not mac or not hmac.compare_digest(mac, _mac(secret, payload)):
        return None
    try:
        data = orjson.loads(_unb64(payload))
        digest, issued = str(data["d"]), int(data["t"])
    except (ValueError, KeyError, TypeError):
        return None
    if not 0 <= now_ms - issued <= max_age_s * 1000:
        return None
    return digest


def csrf_token(secret: bytes, session: str) -> str:
    """The token a session's forms carry, so another site cannot post them.

    >>> csrf_token(b"s", "a") == csrf_token(b"s", "a") != csrf_token(b"s", "b")
    True
    """
    return _mac(secret, "csrf:" + session)[:32]
