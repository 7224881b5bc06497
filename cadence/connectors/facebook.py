"""The ``facebook`` connector: Meta's Conversions API and Custom Audiences, and Meta webhooks.

A send whose variables name an ``audience_id`` adds the customer to (or, with
``operation: remove``, removes them from) that Custom Audience; any other send becomes
a Conversions API event whose ``event_id`` is the send's idempotency key, so Meta drops
a repeat. User data is normalised and SHA-256 hashed as Meta specifies. Events older
than seven days are split out (one would fail the whole request). Webhooks are checked
with ``X-Hub-Signature-256`` and the GET subscription handshake is answered.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import httpx
import orjson

from cadence.channels import Feedback
from cadence.connectors.base import (
    Capabilities,
    Connector,
    InDoubt,
    OutgoingMessage,
    ProviderEvent,
    SendResult,
    WebhookRequest,
    sha256_normalised,
    transport_error,
)
from cadence.errors import (
    AuthenticationFailure,
    ConnectorError,
    PermanentFailure,
    RateLimited,
    TransientFailure,
    WebhookRejected,
)
from cadence.plugins.hookspecs import hookimpl
from cadence.settings import Settings

__all__ = ["Facebook", "cadence_register_connectors", "normalise_user_data"]

SEVEN_DAYS_MS = 7 * 24 * 3600 * 1000
#: Meta deduplicates events with the same event_id and event_name within this window.
DEDUPE_WINDOW_HOURS = 48
#: Graph rate limits: application, user, page, call-type, and the business-use-case limits of
#: custom audiences (80003) and ads management (80004).
THROTTLE_CODES = {4, 17, 32, 613, 80003, 80004}
AUTH_CODES = {190, 102}
#: The custom-audience schema our membership rows use, in column order: a multi-key payload, whose
#: columns take Meta's multi-key names (``EMAIL``, ``PHONE``: SHA-256 hashes, as every key but
#: ``EXTERN_ID``); ``EMAIL_SHA256``/``PHONE_SHA256`` name a single-key payload only (its ``schema`` a
#: string, not a list), as the Marketing API's custom-audience users edge and Meta's business SDK
#: (``CustomAudience.Schema`` against ``CustomAudience.Schema.MultiKeySchema``) define them.
AUDIENCE_SCHEMA = ("EMAIL", "PHONE")
#: Our trait names -> Meta's user_data keys, for the fields Meta wants hashed.
HASHED_FIELDS = {
    "email": "em",
    "phone": "ph",
    "first_name": "fn",
    "last_name": "ln",
    "city": "ct",
    "state": "st",
    "zip": "zp",
    "country": "country",
    "birthday": "db",
    "gender": "ge",
    "external_id": "external_id",
}
PLAIN_FIELDS = {"ip": "client_ip_address", "user_agent": "client_user_agent", "fbc": "fbc", "fbp": "fbp"}


def _normalise(field: str, value: str) -> str:
    """Meta's per-field normalisation before hashing.

    >>> _normalise("ph", "+1 (650) 555-1212"), _normalise("zp", "94025-1234")
    ('16505551212', '94025')
    >>> _normalise("ct", "San Francisco")
    'sanfrancisco'
    """
    text = value.strip().lower()
    if field == "ph":
        return re.sub(r"\D", "", text)
    if field == "zp":
        return text.split("-", 1)[0].strip()
    if field in ("ct", "st"):
        return re.sub(r"[^a-z]", "", text)
    if field == "ge":
        return text[:1]
    if field == "db":
        return re.sub(r"\D", "", text)
    return text


def normalise_user_data(recipient: dict[str, Any]) -> dict[str, Any]:
    """``user_data`` for a customer: hashed where Meta asks, plain where it must not be hashed.

    >>> import hashlib
    >>> data = normalise_user_data({"email": " Jane@Example.com", "ip": "1.2.3.4"})
    >>> data["em"] == [hashlib.sha256(b"jane@example.com").hexdigest()], data["client_ip_address"]
    (True, '1.2.3.4')
    >>> normalise_user_data({"ip": "1.2.3.4"})
    {'client_ip_address': '1.2.3.4'}
    """
    data: dict[str, Any] = {}
    for trait, key in HASHED_FIELDS.items():
        value = recipient.get(trait)
        if value in (None, ""):
            continue
        text = str(value)
        if len(text) == 64 and re.fullmatch(r"[0-9a-fA-F]{64}", text):
            data[key] = [text.lower()]
        else:
            data[key] = [sha256_normalised(_normalise(key, text))]
    for trait, key in PLAIN_FIELDS.items():
        if recipient.get(trait):
            data[key] = str(recipient[trait])
    return data


class Facebook(Connector):
    """Meta Conversions API events and Custom Audience membership."""

    name: ClassVar[str] = "facebook"
    channels: ClassVar[frozenset[str]] = frozenset({"facebook"})
    capabilities: ClassVar[Capabilities] = Capabilities(
        max_batch_size=1000,
        rate_limit_per_second=20.0,
        burst=20,
        supports_scheduling=False,
        required_fields=(),
        consent_required=False,
        provider_deduplicates=True,
        concurrency=4,
    )
    required_settings: ClassVar[tuple[str, ...]] = ("access_token",)  # pixel_id only for events
    settings_help: ClassVar[dict[str, str]] = {
        "access_token": "system-user access token (required for sends)",
        "pixel_id": "dataset / pixel id that receives Conversions API events",
        "base_url": "Graph API root (default https://graph.facebook.com)",
        "api_version": "Graph API version (default v21.0)",
        "test_event_code": "send events as test events (Events Manager > Test events)",
        "action_source": "default action_source (default system_generated)",
        "app_secret": "app secret that signs webhooks (X-Hub-Signature-256)",
        "verify_token": "token you typed in the webhook subscription (GET handshake)",
        "throttle_wait_seconds": "wait after a Graph throttling error (default 60)",
    }

    @classmethod
    def audience_identifiers(cls, recipient: Mapping[str, Any]) -> dict[str, str]:
        """``EMAIL`` (trimmed, lower-case) and ``PHONE`` (digits only), SHA-256, for the traits given.

        >>> import hashlib
        >>> ids = Facebook.audience_identifiers({"email": " Jo@X.com", "phone": "+1 (650) 555-1212"})
        >>> ids == {"EMAIL": hashlib.sha256(b"jo@x.com").hexdigest(),
        ...         "PHONE": hashlib.sha256(b"16505551212").hexdigest()}
        True
        """
        found = {}
        if recipient.get("email"):
            found["EMAIL"] = sha256_normalised(str(recipient["email"]))
        if recipient.get("phone"):
            found["PHONE"] = sha256_normalised(_normalise("ph", str(recipient["phone"])))
        return found

    def _url(self, node: str, edge: str) -> str:
        base = str(self.setting("base_url", "https://graph.facebook.com")).rstrip("/")
        return f"{base}/{self.setting('api_version', 'v21.0')}/{node}/{edge}"

    def event_for(self, message: OutgoingMessage, now_s: int) -> dict[str, Any]:
        """The Conversions API event of one message."""
        variables = dict(message.variables)
        event_ms = variables.pop("event_time_ms", None)
        custom: dict[str, Any] = {
            k: variables[k] for k in ("value", "currency", "content_ids") if k in variables
        }
        custom.update({"decision_id": message.decision_id, "campaign": message.campaign})
        event: dict[str, Any] = {
            "event_name": variables.get("event_name") or message.template or "CadenceMessage",
            "event_time": int(event_ms) // 1000 if event_ms is not None else now_s,
            "event_id": message.idempotency_key,
            "action_source": variables.get("action_source")
            or self.setting("action_source", "system_generated"),
            "user_data": normalise_user_data(dict(message.recipient)),
            "custom_data": {k: v for k, v in custom.items() if v is not None},
        }
        if variables.get("event_source_url"):
            event["event_source_url"] = variables["event_source_url"]
        return event

    async def check_in_doubt(self, batch: Sequence[OutgoingMessage], *, claimed_ms: int) -> list[InDoubt]:
        """Resend within Meta's 48-hour ``event_id`` dedupe window; audience adds and removes always.

        Meta drops a Conversions API event whose ``event_id`` and ``event_name`` it saw
        in the last 48 hours; adding or removing an audience member twice changes nothing.
        """
        age_hours = (time.time() * 1000 - claimed_ms) / 3_600_000
        results = []
        for message in batch:
            if message.variables.get("audience_id"):
                results.append(InDoubt("resend", "custom audience add/remove is idempotent"))
            elif age_hours < DEDUPE_WINDOW_HOURS:
                results.append(InDoubt("resend", "meta drops a repeated event_id within 48 hours"))
            else:
                results.append(InDoubt("unknown", "older than meta's 48-hour event_id dedupe window"))
        return results

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Conversions API events in one request, audience changes in one request per audience."""
        results: dict[str, SendResult] = {}
        now_s = int(time.time())
        events: list[tuple[OutgoingMessage, dict[str, Any]]] = []
        audiences: dict[tuple[str, str], list[OutgoingMessage]] = {}
        for message in batch:
            audience = message.variables.get("audience_id")
            if audience:
                op = "remove" if message.variables.get("operation") == "remove" else "add"
                audiences.setdefault((str(audience), op), []).append(message)
                continue
            event = self.event_for(message, now_s)
            if now_s - event["event_time"] > SEVEN_DAYS_MS // 1000:
                # One stale event fails the whole request at Meta: keep it out.
                results[message.idempotency_key] = SendResult(
                    message.idempotency_key, False, error="event_time is older than 7 days: Meta refuses it"
                )
                continue
            events.append((message, event))
        if events:
            body: dict[str, Any] = {"data": [e for _, e in events]}
            if self.setting("test_event_code"):
                body["test_event_code"] = self.setting("test_event_code")
            answer = await self._call(
                "POST", self._url(str(self.setting("pixel_id", required=True)), "events"), body
            )
            trace = answer.get("fbtrace_id")
            for message, _ in events:
                results[message.idempotency_key] = SendResult(
                    message.idempotency_key, True, provider_message_id=trace
                )
        for (audience, op), members in audiences.items():
            rows = [[self.identifiers_of(m).get(key, "") for key in AUDIENCE_SCHEMA] for m in members]
            payload = {"payload": {"schema": list(AUDIENCE_SCHEMA), "data": rows}}
            answer = await self._call(
                "DELETE" if op == "remove" else "POST", self._url(audience, "users"), payload
            )
            session = str(answer.get("session_id") or answer.get("audience_id") or "")
            for message in members:
                results[message.idempotency_key] = SendResult(
                    message.idempotency_key, True, provider_message_id=session
                )
        return [results[m.idempotency_key] for m in batch]

    async def _call(self, method: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
        params = {"access_token": str(self.setting("access_token", required=True))}
        try:
            response = await self.client.request(
                method,
                url,
                params=params,
                content=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.name) from exc
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": {"message": response.text[:500]}}
        if response.status_code < 300 and "error" not in payload:
            return payload if isinstance(payload, dict) else {}
        raise self._graph_error(response.status_code, payload)

    def _graph_error(self, status: int, payload: Any) -> ConnectorError:
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):  # a proxy or load balancer answered, not the Graph API
            error = {"message": str(payload)[:500]}
        code = error.get("code")
        message = (
            f"Graph API {status} code {code}: {error.get('message')} (fbtrace {error.get('fbtrace_id')})"
        )
        if code in THROTTLE_CODES or status == 429:
            wait = float(self.setting("throttle_wait_seconds", 60))
            return RateLimited(message, retry_after=wait, provider_error=error)
        if code in AUTH_CODES or status == 401:
            return AuthenticationFailure(message, provider_error=error)
        if status >= 500 or error.get("is_transient"):
            return TransientFailure(message, provider_error=error)
        return PermanentFailure(message, provider_error=error)

    def webhook_challenge(self, request: WebhookRequest) -> str | None:
        """Echo ``hub.challenge`` when ``hub.verify_token`` matches the configured one."""
        if request.query.get("hub.mode") != "subscribe":
            return None
        expected = self.setting("verify_token")
        token = request.query.get("hub.verify_token", "")
        if not expected or not hmac.compare_digest(str(expected), token):
            raise WebhookRejected("hub.verify_token does not match", status=403)
        return request.query.get("hub.challenge", "")

    def verify_webhook(self, request: WebhookRequest) -> None:
        """Check ``X-Hub-Signature-256: sha256=<hex HMAC of the raw body with the app secret>``."""
        secret = self.setting("app_secret")
        if not secret:
            raise WebhookRejected("facebook app_secret is not configured: cannot verify webhooks")
        header = request.header("x-hub-signature-256") or ""
        if not header.startswith("sha256="):
            raise WebhookRejected("missing or malformed X-Hub-Signature-256 header")
        expected = hmac.new(str(secret).encode(), request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, header[len("sha256=") :].strip().lower()):
            raise WebhookRejected("X-Hub-Signature-256 does not match the body (forged or altered)")

    def parse_webhook(self, request: WebhookRequest) -> list[ProviderEvent]:
        """Lead-ads changes (``field: leadgen``) become conversions; other changes are ignored."""
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise WebhookRejected(f"body is not JSON: {exc}", status=400) from exc
        if not isinstance(body, dict) or not isinstance(body.get("entry"), list):
            raise WebhookRejected("body must be an object with an 'entry' list", status=400)
        found = []
        for entry in body["entry"]:
            if not isinstance(entry, dict):
                raise WebhookRejected("every entry must be an object", status=400)
            for change in entry.get("changes") or []:
                value = change.get("value") if isinstance(change, dict) else None
                if not isinstance(value, dict) or change.get("field") != "leadgen":
                    continue
                lead = str(value.get("leadgen_id") or "")
                if not lead:
                    continue
                found.append(
                    ProviderEvent(
                        event_id=f"lead:{lead}",
                        kind=Feedback.CONVERTED,
                        channel="facebook",
                        ts_ms=int(value.get("created_time") or entry.get("time") or time.time()) * 1000,
                        properties={
                            "provider_event": "leadgen",
                            **{
                                k: value[k]
                                for k in ("leadgen_id", "form_id", "ad_id", "page_id")
                                if k in value
                            },
                        },
                    )
                )
        return found


@hookimpl
def cadence_register_connectors(settings: Settings) -> list[type[Connector]]:
    """Meta for the facebook channel."""
    return [Facebook]
