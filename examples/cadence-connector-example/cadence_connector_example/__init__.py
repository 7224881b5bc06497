"""A sample cadence connector: each message becomes a signed JSON POST to a URL you choose.

cadence finds this module through the ``cadence`` entry point declared in
pyproject.toml and calls its ``@hookimpl`` functions.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import ClassVar

import httpx
import orjson

from cadence.channels import Feedback
from cadence.connectors.base import (
    Capabilities,
    Connector,
    OutgoingMessage,
    ProviderEvent,
    SendResult,
    WebhookRequest,
    classify_http_error,
    transport_error,
)
from cadence.errors import WebhookRejected
from cadence.plugins import hookimpl
from cadence.settings import Settings

__all__ = ["ExampleWebhook", "cadence_register_connectors"]


class ExampleWebhook(Connector):
    """POST each message to ``settings.connectors.example_webhook.url``."""

    name: ClassVar[str] = "example_webhook"
    channels: ClassVar[frozenset[str]] = frozenset({"webhook"})
    capabilities: ClassVar[Capabilities] = Capabilities(
        max_batch_size=100, rate_limit_per_second=20.0, burst=20, provider_deduplicates=True
    )
    settings_help: ClassVar[dict[str, str]] = {
        "url": "where to POST messages (required)",
        "secret": "HMAC-SHA256 key for the X-Signature header, both ways",
    }

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        """One POST with every message of the batch; 2xx accepts them all."""
        body = orjson.dumps(
            {
                "messages": [
                    {
                        "id": m.idempotency_key,
                        "decision_id": m.decision_id,
                        "campaign": m.campaign,
                        "user_id": m.user_id,
                        "template": m.template,
                        "variables": dict(m.variables),
                    }
                    for m in batch
                ]
            }
        )
        headers = {"Content-Type": "application/json", "Idempotency-Key": batch[0].idempotency_key}
        if self.setting("secret"):
            headers["X-Signature"] = hmac.new(
                str(self.setting("secret")).encode(), body, hashlib.sha256
            ).hexdigest()
        try:
            response = await self.client.post(
                str(self.setting("url", required=True)), content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.name) from exc
        if response.status_code >= 300:
            raise classify_http_error(response)
        return [SendResult(m.idempotency_key, True, provider_message_id=m.idempotency_key) for m in batch]

    def verify_webhook(self, request: WebhookRequest) -> None:
        """Receipts must carry ``X-Signature``: hex HMAC-SHA256 of the raw body."""
        secret = self.setting("secret")
        expected = hmac.new(str(secret or "").encode(), request.body, hashlib.sha256).hexdigest()
        if not secret or not hmac.compare_digest(expected, request.header("x-signature") or ""):
            raise WebhookRejected("bad or missing X-Signature")

    def parse_webhook(self, request: WebhookRequest) -> list[ProviderEvent]:
        """``{"id", "message_id", "decision_id", "status": "delivered"|"opened"|"clicked", "ts_ms"}``."""
        try:
            item = orjson.loads(request.body)
            kind = Feedback(item["status"])
            return [
                ProviderEvent(
                    event_id=str(item["id"]),
                    kind=kind,
                    channel="webhook",
                    ts_ms=int(item["ts_ms"]),
                    decision_id=item.get("decision_id"),
                    provider_message_id=item.get("message_id"),
                )
            ]
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
            raise WebhookRejected(f"malformed receipt: {exc}", status=400) from exc


@hookimpl
def cadence_register_connectors(settings: Settings) -> list[type[Connector]]:
    """This plugin's one connector."""
    return [ExampleWebhook]
