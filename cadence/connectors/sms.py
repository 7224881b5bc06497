"""The ``sms`` connector: text messages through Twilio's Messages API, with verified status callbacks.

Each message is one form-encoded ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``
whose ``StatusCallback`` carries the decision id, campaign and idempotency key in its
query string. Twilio error 21610 (the recipient replied STOP) is recorded as an
opt-out. Status callbacks are verified with ``X-Twilio-Signature`` and only move a
message's status forward: a late ``sent`` after ``delivered`` is ignored.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import string
from collections.abc import Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from cadence.channels import Feedback
from cadence.clock import now_ms
from cadence.connectors.base import (
    Capabilities,
    Connector,
    InDoubt,
    OutgoingMessage,
    ProviderEvent,
    SendResult,
    WebhookRequest,
    classify_http_error,
    retry_after_seconds,
    transport_error,
)
from cadence.errors import RateLimited, WebhookRejected
from cadence.plugins.hookspecs import hookimpl
from cadence.settings import Settings
from cadence.store.schema.connectors import provider_messages

__all__ = ["STATUS_RANK", "TwilioSms", "cadence_register_connectors", "twilio_signature"]

#: How far along each Twilio status is; callbacks only ever move a message forward.
STATUS_RANK = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "canceled": 4,
    "failed": 4,
    "undelivered": 4,
    "delivered": 4,
    "read": 5,
}
STATUS_KINDS = {
    "sent": Feedback.SENT,
    "delivered": Feedback.DELIVERED,
    "undelivered": Feedback.FAILED,
    "failed": Feedback.FAILED,
    "read": Feedback.OPENED,
}
OPT_OUT_CODE = 21610
THROTTLED_CODE = 20429


def twilio_signature(url: str, params: Mapping[str, str] | Sequence[tuple[str, str]], auth_token: str) -> str:
    """Twilio's signature: HMAC-SHA1 of the URL followed by each parameter's name and value, sorted.

    >>> params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234",
    ...     "From": "+14158675309", "To": "+18005551212"}
    >>> twilio_signature("https://mycompany.com/myapp.php?foo=1&bar=2", params, "12345")
    'RSOYDt4T1cUTdK1PDd93/VVr8B8='
    """
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    data = url + "".join(name + value for name, value in sorted(pairs))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _url_variants(url: str) -> list[str]:
    """The URL as given, and with the default port added or removed (Twilio's SDK accepts both)."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    variants = [url]
    if parts.port is None and default is not None and parts.hostname:
        variants.append(urlunsplit(parts._replace(netloc=f"{parts.netloc}:{default}")))
    elif parts.port == default and parts.hostname:
        netloc = parts.netloc.rsplit(":", 1)[0]
        variants.append(urlunsplit(parts._replace(netloc=netloc)))
    return variants


class _Blank(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return ""


class TwilioSms(Connector):
    """SMS through Twilio."""

    name: ClassVar[str] = "sms"
    channels: ClassVar[frozenset[str]] = frozenset({"sms"})
    capabilities: ClassVar[Capabilities] = Capabilities(
        max_batch_size=1,
        rate_limit_per_second=50.0,
        burst=50,
        supports_scheduling=False,
        required_fields=("phone",),
        consent_required=True,
        provider_deduplicates=False,
        concurrency=16,
    )
    settings_help: ClassVar[dict[str, str]] = {
        "account_sid": "Twilio Account SID (required)",
        "auth_token": "Auth Token: sends and verifies X-Twilio-Signature (required)",
        "api_key_sid": "optional API key SID used instead of the Account SID for HTTP Basic auth",
        "api_key_secret": "secret of api_key_sid",
        "from_number": "sender number in E.164 (or set messaging_service_sid)",
        "messaging_service_sid": "Messaging Service that picks the sender",
        "base_url": "API root (default https://api.twilio.com)",
        "api_version": "path version (default 2010-04-01)",
        "status_callback_url": "public URL of POST /v1/webhooks/sms, given to Twilio with each message",
        "webhook_url": "URL Twilio signs, if it differs from status_callback_url (behind a proxy)",
    }

    def missing_settings(self) -> list[str]:
        """The Account SID; the Auth Token or an API key pair; a sender number or a Messaging Service."""

        def unset(key: str) -> bool:
            return self.config.get(key) in (None, "")

        wanted = ["account_sid"]
        if unset("api_key_sid") or unset("api_key_secret"):
            wanted.append("auth_token")
        if unset("messaging_service_sid"):
            wanted.append("from_number")
        return [self.variable(key) for key in wanted if unset(key)]

    def _messages_url(self) -> str:
        base = str(self.setting("base_url", "https://api.twilio.com")).rstrip("/")
        sid = self.setting("account_sid", required=True)
        return f"{base}/{self.setting('api_version', '2010-04-01')}/Accounts/{sid}/Messages.json"

    def form_for(self, message: OutgoingMessage) -> dict[str, str]:
        """The form fields of one message."""
        values = _Blank({**message.recipient, **message.variables})
        text = message.variables.get("body") or message.template or ""
        form = {
            "To": str(message.recipient["phone"]),
            "Body": string.Formatter().vformat(str(text), (), values),
        }
        if self.setting("messaging_service_sid"):
            form["MessagingServiceSid"] = str(self.setting("messaging_service_sid"))
        else:
            form["From"] = str(self.setting("from_number", required=True))
        callback = self.setting("status_callback_url")
        if callback:
            link = {
                "decision_id": message.decision_id,
                "campaign": message.campaign,
                "send_key": message.idempotency_key,
            }
            query = urlencode({k: v for k, v in link.items() if v})
            form["StatusCallback"] = f"{callback}{'&' if '?' in str(callback) else '?'}{query}"
        return form

    async def check_in_doubt(self, batch: Sequence[OutgoingMessage], *, claimed_ms: int) -> list[InDoubt]:
        """Ask Twilio's message list whether each interrupted message was created.

        ``GET Messages.json?To=..&From=..`` (newest first): a message to the same number
        with the same body created since the claim means it was sent (its SID is kept);
        none means Twilio never accepted it, so it is safe to send again. A failed
        lookup leaves the message ``unknown``.
        """
        gate = asyncio.Semaphore(8)  # a few lookups at once: a crash may leave many messages in doubt

        async def one(message: OutgoingMessage) -> InDoubt:
            async with gate:
                return await self._look_up(message, claimed_ms)

        return list(await asyncio.gather(*(one(m) for m in batch)))

    async def _look_up(self, message: OutgoingMessage, claimed_ms: int) -> InDoubt:
        form = self.form_for(message)
        params = {"To": form["To"], "PageSize": "50"}
        if "From" in form:
            params["From"] = form["From"]
        try:
            response = await self.client.get(self._messages_url(), params=params, auth=self._auth())
            payload = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            return InDoubt("unknown", f"twilio message lookup failed: {type(exc).__name__}: {exc}")
        if not isinstance(payload, dict):
            return InDoubt("unknown", f"twilio message lookup answered HTTP {response.status_code}")
        since = claimed_ms / 1000 - 60  # clock skew between us and Twilio
        for found in payload.get("messages") or []:
            if not isinstance(found, dict) or found.get("body") != form["Body"]:
                continue
            try:
                created = parsedate_to_datetime(str(found.get("date_created"))).timestamp()
            except (TypeError, ValueError):
                continue
            if created >= since:
                return InDoubt("sent", "twilio lists the message", provider_message_id=found.get("sid"))
        return InDoubt("resend", "twilio lists no such message since the claim")

    def _auth(self) -> tuple[str, str]:
        user = self.setting("api_key_sid") or self.setting("account_sid", required=True)
        secret = (
            self.setting("api_key_secret")
            if self.setting("api_key_sid")
            else self.setting("auth_token", required=True)
        )
        return str(user), str(secret)

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        """One request per message; 201 returns the message SID."""
        results = []
        for message in batch:
            results.append(await self._send_one(message))
        return results

    async def _send_one(self, message: OutgoingMessage) -> SendResult:
        try:
            response = await self.client.post(
                self._messages_url(), data=self.form_for(message), auth=self._auth()
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.name) from exc
        if response.status_code in (200, 201):
            payload = response.json()
            return SendResult(message.idempotency_key, True, provider_message_id=payload.get("sid"))
        try:
            error = response.json()
        except ValueError:
            error = {"message": response.text[:500]}
        code = error.get("code") if isinstance(error, dict) else None
        if code == THROTTLED_CODE:
            raise RateLimited(
                f"twilio throttled us (20429): {error.get('message')}",
                retry_after=retry_after_seconds(response.headers, default=1.0),
                provider_error=error,
            )
        if code == OPT_OUT_CODE:
            return SendResult(
                message.idempotency_key, False, error=f"twilio 21610: {error.get('message')}", opted_out=True
            )
        raise classify_http_error(response, provider_error=error)

    def verify_webhook(self, request: WebhookRequest) -> None:
        """Check ``X-Twilio-Signature`` against the configured (or received) URL and the form parameters."""
        token = self.setting("auth_token")
        if not token:
            raise WebhookRejected("sms auth_token is not configured: cannot verify Twilio callbacks")
        signature = request.header("x-twilio-signature")
        if not signature:
            raise WebhookRejected("missing X-Twilio-Signature header")
        params = _form(request.body)
        base = self.setting("webhook_url") or self.setting("status_callback_url")
        url = request.url
        if base:
            # Twilio signs the URL it called: our configured public URL plus the query we gave it.
            query = urlsplit(request.url).query
            url = urlunsplit(urlsplit(str(base))._replace(query=query)) if query else str(base).split("?")[0]
        for candidate in _url_variants(url):
            if hmac.compare_digest(twilio_signature(candidate, params, str(token)), signature):
                return
        raise WebhookRejected("X-Twilio-Signature does not match (forged, altered, or wrong webhook_url)")

    def parse_webhook(self, request: WebhookRequest) -> list[ProviderEvent]:
        """A status callback as at most one provider event; stale (backward) statuses yield none."""
        params = dict(_form(request.body))
        if params.get("OptOutType", "").upper() == "STOP":
            return [
                ProviderEvent(
                    event_id=f"optout:{params.get('MessageSid') or params.get('SmsSid', '')}",
                    kind=Feedback.UNSUBSCRIBED,
                    channel="sms",
                    ts_ms=now_ms(),
                    recipient=params.get("From"),
                    properties={"provider_event": "STOP"},
                )
            ]
        sid = params.get("MessageSid") or params.get("SmsSid")
        status = (params.get("MessageStatus") or params.get("SmsStatus") or "").lower()
        if not sid or status not in STATUS_RANK:
            raise WebhookRejected("status callback without MessageSid and a known MessageStatus", status=400)
        error_code = params.get("ErrorCode") or None
        if not self._moves_forward(sid, status, error_code):
            return []
        kind = STATUS_KINDS.get(status)
        if kind is None:
            return []
        if error_code == str(OPT_OUT_CODE):
            kind = Feedback.UNSUBSCRIBED
        link = dict(parse_qsl(urlsplit(request.url).query))
        properties: dict[str, Any] = {"provider_event": status}
        if error_code:
            properties["error_code"] = error_code
        return [
            ProviderEvent(
                event_id=f"{sid}:{status}",
                kind=kind,
                channel="sms",
                ts_ms=now_ms(),
                decision_id=link.get("decision_id"),
                campaign=link.get("campaign"),
                provider_message_id=sid,
                recipient=params.get("To"),
                properties=properties,
            )
        ]

    def _moves_forward(self, sid: str, status: str, error_code: str | None) -> bool:
        """Record ``status`` for ``sid`` if it is further along than the one stored."""
        if self.engine is None:
            return True
        try:
            return self._record_status(sid, status, error_code)
        except IntegrityError:
            # Two callbacks for a new message raced to insert it: the loser compares again.
            return self._record_status(sid, status, error_code)

    def _record_status(self, sid: str, status: str, error_code: str | None) -> bool:
        rank = STATUS_RANK[status]
        now = now_ms()
        assert self.engine is not None
        with self.engine.begin() as conn:
            stored = conn.execute(
                select(provider_messages.c.rank)
                .where(
                    provider_messages.c.connector == self.name, provider_messages.c.provider_message_id == sid
                )
                .with_for_update()
            ).scalar()
            if stored is None:
                conn.execute(
                    provider_messages.insert().values(
                        connector=self.name,
                        provider_message_id=sid,
                        status=status,
                        rank=rank,
                        error_code=error_code,
                        updated_ms=now,
                    )
                )
                return True
            if rank <= stored:
                return False
            conn.execute(
                update(provider_messages)
                .where(
                    provider_messages.c.connector == self.name, provider_messages.c.provider_message_id == sid
                )
                .values(status=status, rank=rank, error_code=error_code, updated_ms=now)
            )
            return True


def _form(body: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise WebhookRejected("form body is not UTF-8", status=400) from exc


@hookimpl
def cadence_register_connectors(settings: Settings) -> list[type[Connector]]:
    """Twilio for SMS."""
    return [TwilioSms]
