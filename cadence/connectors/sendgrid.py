"""The ``sendgrid`` connector: email through SendGrid's v3 Mail Send API and its signed Event Webhook.

A batch becomes one ``POST /v3/mail/send`` with one personalization per recipient (at
most 1,000), the campaign's dynamic template, and ``custom_args`` carrying the decision
id, campaign and idempotency key (never PII), which SendGrid flattens into every event
it posts back. Webhooks are verified with the account's ECDSA P-256 public key over
``timestamp + raw body`` and refused when the timestamp is outside the tolerance.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cadence.channels import Feedback
from cadence.connectors.base import (
    Capabilities,
    Connector,
    OutgoingMessage,
    ProviderEvent,
    SendResult,
    WebhookRequest,
    as_list,
    classify_http_error,
    transport_error,
)
from cadence.errors import ConfigError, WebhookRejected
from cadence.plugins.hookspecs import hookimpl
from cadence.settings import Settings

__all__ = ["SendGrid", "cadence_register_connectors", "load_public_key", "verify_signature"]

SIGNATURE_HEADER = "x-twilio-email-event-webhook-signature"
TIMESTAMP_HEADER = "x-twilio-email-event-webhook-timestamp"

#: SendGrid event -> cadence feedback (events not listed are accepted and ignored).
EVENT_KINDS = {
    "processed": Feedback.SENT,
    "delivered": Feedback.DELIVERED,
    "open": Feedback.OPENED,
    "click": Feedback.CLICKED,
    "bounce": Feedback.BOUNCED,
    "dropped": Feedback.FAILED,
    "spamreport": Feedback.SPAM_REPORT,
    "unsubscribe": Feedback.UNSUBSCRIBED,
    "group_unsubscribe": Feedback.UNSUBSCRIBED,
}
OWN_ARGS = ("decision_id", "campaign", "send_key", "customer_id")


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key from its base64 DER (as SendGrid shows it) or PEM form."""
    try:
        if "BEGIN PUBLIC KEY" in text:
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text.strip()))
    except (ValueError, binascii.Error) as exc:
        raise ConfigError(
            f"CADENCE_CONNECTORS__SENDGRID__WEBHOOK_PUBLIC_KEY: not a public key ({exc})"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError("CADENCE_CONNECTORS__SENDGRID__WEBHOOK_PUBLIC_KEY: not an ECDSA key")
    return key


def verify_signature(
    key: ec.EllipticCurvePublicKey, *, payload: bytes, signature: str, timestamp: str
) -> bool:
    """True when ``signature`` (base64 DER ECDSA/SHA-256) signs ``timestamp + payload``."""
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, timestamp.encode() + payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


class SendGrid(Connector):
    """Email through SendGrid."""

    name: ClassVar[str] = "sendgrid"
    channels: ClassVar[frozenset[str]] = frozenset({"email"})
    capabilities: ClassVar[Capabilities] = Capabilities(
        max_batch_size=1000,
        rate_limit_per_second=10.0,
        burst=10,
        supports_scheduling=True,
        required_fields=("email",),
        consent_required=False,
        provider_deduplicates=False,
        concurrency=4,
    )
    required_settings: ClassVar[tuple[str, ...]] = ("api_key", "from_email")
    settings_help: ClassVar[dict[str, str]] = {
        "api_key": "SendGrid API key with Mail Send permission (required)",
        "from_email": "sender address (required)",
        "from_name": "sender display name",
        "base_url": "API root (default https://api.sendgrid.com; EU: https://api.eu.sendgrid.com)",
        "api_version": "path version (default v3)",
        "sandbox_mode": "validate only, deliver nothing (default false)",
        "asm_group_id": "unsubscribe group id added to every message",
        "categories": "list of categories added to every message",
        "webhook_public_key": "Event Webhook verification key (base64 DER or PEM)",
        "webhook_tolerance_seconds": "oldest accepted webhook timestamp, in seconds (default 300)",
    }

    def _url(self) -> str:
        base = str(self.setting("base_url", "https://api.sendgrid.com")).rstrip("/")
        return f"{base}/{self.setting('api_version', 'v3')}/mail/send"

    def request_body(self, batch: Sequence[OutgoingMessage]) -> dict[str, Any]:
        """The Mail Send JSON for ``batch`` (all messages share the first one's template)."""
        template = batch[0].template
        personalizations = []
        for message in batch:
            recipient = message.recipient
            to: dict[str, Any] = {"email": recipient["email"]}
            name = recipient.get("name")
            if not name:
                first, last = recipient.get("first_name"), recipient.get("last_name")
                name = f"{first} {last}" if first and last else first or last
            if name:
                to["name"] = str(name)
            # Plain loop, not a comprehension over a dict: this runs for every message of a push.
            custom_args = {"campaign": message.campaign, "send_key": message.idempotency_key}
            if message.decision_id is not None:
                custom_args["decision_id"] = message.decision_id
            custom_args["customer_id"] = str(message.customer_id)
            item: dict[str, Any] = {
                "to": [to],
                "dynamic_template_data": dict(message.variables),
                "custom_args": custom_args,
            }
            if message.send_at_ms is not None:
                item["send_at"] = message.send_at_ms // 1000
            personalizations.append(item)
        sender: dict[str, Any] = {"email": self.setting("from_email", required=True)}
        if self.setting("from_name"):
            sender["name"] = self.setting("from_name")
        body: dict[str, Any] = {"personalizations": personalizations, "from": sender}
        if template and template.startswith("d-"):
            body["template_id"] = template
        else:
            subject = str(batch[0].variables.get("subject") or template or batch[0].campaign)
            text = str(batch[0].variables.get("text") or subject)
            body["subject"] = subject
            body["content"] = [{"type": "text/plain", "value": text}]
        if self.setting("categories"):
            body["categories"] = [str(c) for c in as_list(self.setting("categories"))]
        if self.setting("asm_group_id") is not None:
            body["asm"] = {"group_id": int(self.setting("asm_group_id"))}
        if self.flag("sandbox_mode"):
            body["mail_settings"] = {"sandbox_mode": {"enable": True}}
        return body

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        """One Mail Send request for the batch; 202 (200 in sandbox) means every message is accepted."""
        if not batch:
            return []
        headers = {
            "Authorization": f"Bearer {self.setting('api_key', required=True)}",
            "Content-Type": "application/json",
        }
        content = orjson.dumps(self.request_body(batch))
        try:
            response = await self.client.post(self._url(), content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.name) from exc
        if response.status_code == 400:
            refused = _refused_recipients(response, len(batch))
            if refused:
                return [
                    SendResult(m.idempotency_key, False, error=f"HTTP 400 from SendGrid: {refused[i]}")
                    if i in refused
                    else SendResult(
                        m.idempotency_key,
                        False,
                        error="not sent: SendGrid refused the request for another recipient's address",
                        retryable=True,
                    )
                    for i, m in enumerate(batch)
                ]
        if response.status_code not in (200, 202):
            raise classify_http_error(response)
        message_id = response.headers.get("x-message-id")
        return [SendResult(m.idempotency_key, True, provider_message_id=message_id) for m in batch]

    def verify_webhook(self, request: WebhookRequest) -> None:
        """Check the ECDSA signature of ``timestamp + raw body`` and the timestamp's age."""
        key_text = self.setting("webhook_public_key")
        if not key_text:
            raise WebhookRejected("sendgrid webhook_public_key is not configured: refusing unsigned events")
        signature = request.header(SIGNATURE_HEADER)
        timestamp = request.header(TIMESTAMP_HEADER)
        if not signature or not timestamp:
            raise WebhookRejected("missing X-Twilio-Email-Event-Webhook-Signature or -Timestamp header")
        try:
            sent = int(timestamp)
        except ValueError as exc:
            raise WebhookRejected(f"webhook timestamp {timestamp[:20]!r} is not an integer") from exc
        tolerance = float(self.setting("webhook_tolerance_seconds", 300))
        if tolerance > 0 and abs(time.time() - sent) > tolerance:
            raise WebhookRejected(
                f"webhook timestamp {sent} is outside the {tolerance:.0f}s tolerance (replay?)"
            )
        if not verify_signature(
            load_public_key(str(key_text)), payload=request.body, signature=signature, timestamp=timestamp
        ):
            raise WebhookRejected("webhook signature does not match the body (forged or altered)")

    def parse_webhook(self, request: WebhookRequest) -> list[ProviderEvent]:
        """The Event Webhook's JSON array as provider events (unknown event types are skipped)."""
        try:
            items = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise WebhookRejected(f"body is not JSON: {exc}", status=400) from exc
        if not isinstance(items, list):
            raise WebhookRejected("body must be a JSON array of events", status=400)
        found = []
        for index, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("event"), str):
                raise WebhookRejected(f"event {index} has no 'event' field", status=400)
            kind = EVENT_KINDS.get(item["event"])
            if kind is None:
                continue
            if kind is Feedback.BOUNCED and item.get("type") == "blocked":
                # A block: a receiving server refused this message (sender reputation, content),
                # not an address that does not exist; the address stays deliverable.
                kind = Feedback.FAILED
            try:
                ts_ms = int(float(item.get("timestamp", time.time())) * 1000)
            except (TypeError, ValueError) as exc:
                raise WebhookRejected(f"event {index}: bad timestamp", status=400) from exc
            event_id = (
                item.get("sg_event_id")
                or hashlib.sha256(orjson.dumps(item, option=orjson.OPT_SORT_KEYS)).hexdigest()[:40]
            )
            message_id = item.get("sg_message_id")
            properties: dict[str, Any] = {"provider_event": item["event"]}
            for extra in ("url", "reason", "type", "asm_group_id", "useragent"):
                if item.get(extra) is not None:
                    properties[extra] = item[extra]
            if item.get("sg_machine_open") is True:
                # Apple Mail Privacy Protection fetched the message, not the reader (SendGrid's flag).
                properties["machine_open"] = True
            found.append(
                ProviderEvent(
                    event_id=str(event_id),
                    kind=kind,
                    channel="email",
                    ts_ms=ts_ms,
                    decision_id=_str_or_none(item.get("decision_id")),
                    campaign=_str_or_none(item.get("campaign")),
                    provider_message_id=str(message_id).split(".", 1)[0] if message_id else None,
                    recipient=_str_or_none(item.get("email")),
                    properties=properties,
                )
            )
        return found


_PERSONALIZATION_FIELD = re.compile(r"personalizations\.(\d+)\.")


def _refused_recipients(response: httpx.Response, size: int) -> dict[int, str]:
    """A 400 that names only recipients (``personalizations.N....`` fields): their errors, by index.

    SendGrid refuses a whole request for one bad address; when every error names a
    recipient, the batch's others can go again without it. Empty when any error is
    about the request itself (then the whole batch failed, as before).

    >>> r = httpx.Response(400, json={"errors": [{"field": "personalizations.1.to.0.email",
    ...     "message": "Does not contain a valid address."}]})
    >>> _refused_recipients(r, 3)
    {1: 'Does not contain a valid address. (personalizations.1.to.0.email)'}
    >>> _refused_recipients(httpx.Response(400, json={"errors": [{"field": "from.email", "message": "x"}]}), 3)
    {}
    """
    try:
        errors = response.json().get("errors")
    except (ValueError, AttributeError):
        return {}
    if not isinstance(errors, list) or not errors:
        return {}
    refused: dict[int, str] = {}
    for error in errors:
        field = str(error.get("field") or "") if isinstance(error, dict) else ""
        found = _PERSONALIZATION_FIELD.match(field + ".")
        if found is None or int(found.group(1)) >= size:
            return {}
        index = int(found.group(1))
        text = f"{error.get('message')} ({field})"
        refused[index] = f"{refused[index]}; {text}" if index in refused else text
    return refused


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


@hookimpl
def cadence_register_connectors(settings: Settings) -> list[type[Connector]]:
    """SendGrid for email."""
    return [SendGrid]
