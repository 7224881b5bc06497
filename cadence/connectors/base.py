"""The connector contract: what every channel connector, built-in or third-party, provides.

A connector is a class with a ``name``, the ``channels`` it offers and its
:class:`Capabilities`; an instance sends batches of :class:`OutgoingMessage` and turns
provider webhooks into :class:`ProviderEvent` objects. It never retries, sleeps or
checks consent: the delivery layer (:mod:`cadence.connectors.delivery`) does that for
every connector alike. A request-level failure raises a
:class:`~cadence.errors.ConnectorError` subclass; a per-message failure inside an
accepted request comes back as a failed :class:`SendResult`.

Connectors take an injected :class:`httpx.AsyncClient` so tests swap the transport or
point the base URL at a local server.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import httpx
import orjson
from sqlalchemy import Engine

from cadence.channels import Feedback
from cadence.errors import (
    AuthenticationFailure,
    ConfigError,
    ConnectorError,
    DeliveryInDoubt,
    PermanentFailure,
    RateLimited,
    TransientFailure,
    WebhookRejected,
)

__all__ = [
    "Capabilities",
    "Connector",
    "InDoubt",
    "OutgoingMessage",
    "ProviderEvent",
    "SendResult",
    "WebhookRequest",
    "AUDIENCE_TARGET_KEYS",
    "as_bool",
    "as_list",
    "classify_http_error",
    "retry_after_seconds",
    "sha256_normalised",
]


@dataclass(frozen=True)
class Capabilities:
    """What a connector can do; the rule checker and the dispatcher read these.

    :param max_batch_size: most messages one :meth:`Connector.send` call accepts.
    :param rate_limit_per_second: provider requests per second we allow ourselves
        (None: no client-side limit).
    :param burst: requests that may go at once before the rate limit applies.
    :param supports_scheduling: the provider can hold a message until a send time.
    :param required_fields: customer traits a message needs (``email``, ``phone``).
    :param consent_required: the channel needs an explicit opt-in, not just no opt-out.
    :param provider_deduplicates: the provider drops a repeated idempotency key (so an
        interrupted send may safely be retried after a crash or a timeout).
    :param concurrency: requests in flight at once for this connector.
    """

    max_batch_size: int = 1
    rate_limit_per_second: float | None = None
    burst: int = 1
    supports_scheduling: bool = False
    required_fields: tuple[str, ...] = ()
    consent_required: bool = False
    provider_deduplicates: bool = False
    concurrency: int = 4


@dataclass(frozen=True)
class OutgoingMessage:
    """One message to deliver: the send row plus what the customer profile says.

    ``recipient`` holds the customer's traits (email, phone, first_name, ...) and
    ``user_id`` their user id, so connectors never read the database.

    An erased customer's removal from an ad audience has no customer left: ``send_id`` is
    the negative id of its ``audience_removals`` row, ``customer_id`` is 0, ``recipient``
    is empty and ``hashed_identifiers`` holds what the connector's own
    :meth:`Connector.audience_identifiers` computed at erasure.
    """

    send_id: int
    idempotency_key: str
    campaign: str
    channel: str
    customer_id: int
    decision_id: str | None = None
    user_id: str | None = None
    template: str | None = None
    variables: Mapping[str, Any] = field(default_factory=dict)
    recipient: Mapping[str, Any] = field(default_factory=dict)
    send_at_ms: int | None = None
    hashed_identifiers: Mapping[str, str] = field(default_factory=dict)


#: The variables of an audience campaign that name the platform's audience (``sync audience to
#: facebook with { audience_id: ... }``, ``google_ads`` ``user_list``): all an erased customer's
#: removal keeps of them.
AUDIENCE_TARGET_KEYS = ("audience_id", "user_list")


@dataclass(frozen=True)
class SendResult:
    """What happened to one message of a batch.

    ``ok`` with the provider's message id; otherwise ``error`` in the provider's words,
    ``retryable`` when trying again may help, and ``opted_out`` when the provider says
    the recipient opted out (Twilio 21610): the delivery layer records an unsubscribe.
    """

    idempotency_key: str
    ok: bool
    provider_message_id: str | None = None
    error: str | None = None
    retryable: bool = False
    opted_out: bool = False


@dataclass(frozen=True)
class InDoubt:
    """A connector's verdict on a send interrupted mid-delivery (claimed, then the process died).

    ``verdict`` is ``resend`` (sending again cannot deliver twice: the provider drops a
    repeated key, or it has no record of the message), ``sent`` (the provider has it;
    ``provider_message_id`` says which), or ``unknown`` (cannot tell: the send is
    dead-lettered with reason ``in_doubt`` for an operator). ``reason`` says why.
    """

    verdict: str
    reason: str
    provider_message_id: str | None = None


@dataclass(frozen=True)
class WebhookRequest:
    """A provider's HTTP request as received: raw body, lower-case header names, full URL."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """A header by case-insensitive name."""
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class ProviderEvent:
    """A provider's report about a message, before it becomes a cadence event.

    ``event_id`` is the provider's own id for the report (the dedupe key); the webhook
    router links it to the send through ``decision_id`` or ``provider_message_id``.
    """

    event_id: str
    kind: Feedback
    channel: str
    ts_ms: int
    decision_id: str | None = None
    campaign: str | None = None
    provider_message_id: str | None = None
    user_id: str | None = None
    recipient: str | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)


class Connector(ABC):
    """Base class of every connector. Subclasses set the class attributes and ``send``.

    Construct with the connector's settings (``settings.connectors[name]``), an
    optional shared :class:`httpx.AsyncClient` and the database engine (only the
    outbox and stateful webhooks use it).
    """

    name: ClassVar[str]
    channels: ClassVar[frozenset[str]]
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: Setting names this connector reads, with a one-line description (shown in docs and ``plugins list``).
    settings_help: ClassVar[Mapping[str, str]] = {}
    #: Settings it cannot send without (see :meth:`missing_settings`).
    required_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        config: Mapping[str, Any] | None = None,
        client: httpx.AsyncClient | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.config: Mapping[str, Any] = dict(config or {})
        self._client = client
        self._owns_client = client is None
        self.engine = engine

    @property
    def client(self) -> httpx.AsyncClient:
        """The HTTP client (created on first use when none was injected)."""
        if self._client is None:
            timeout = float(self.config.get("timeout_seconds", 10.0))
            self._client = httpx.AsyncClient(timeout=timeout)
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client if this connector created it."""
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    def flag(self, key: str, default: bool = False) -> bool:
        """A boolean setting (``true``/``1``/``yes``/``on`` from the environment count as true)."""
        return as_bool(self.config.get(key, default))

    def setting(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        """One of this connector's settings; a missing required one is a :class:`ConfigError`."""
        value = self.config.get(key, default)
        if required and (value is None or value == ""):
            raise ConfigError(f"{self.variable(key)}: required by the {self.name} connector")
        return value

    def variable(self, key: str) -> str:
        """The environment variable of setting ``key`` (``CADENCE_CONNECTORS__SENDGRID__API_KEY``)."""
        return f"CADENCE_CONNECTORS__{self.name.upper()}__{key.upper()}"

    def missing_settings(self) -> list[str]:
        """The environment variables of required settings that are not set (checked at start).

        The default checks :attr:`required_settings`; a connector whose settings are
        alternatives (an auth token or an API key pair) overrides this.
        """
        return [self.variable(key) for key in self.required_settings if self.config.get(key) in (None, "")]

    @abstractmethod
    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Deliver ``batch`` (at most ``capabilities.max_batch_size`` messages).

        Returns one result per message, in order. Raises a ConnectorError subclass
        when the whole request failed.
        """

    async def check_in_doubt(self, batch: Sequence[OutgoingMessage], *, claimed_ms: int) -> list[InDoubt]:
        """Decide, per message, what to do with sends a crash left in doubt (one result each, in order).

        ``claimed_ms`` is when the dispatcher claimed them (the provider call came after).
        The default: ``resend`` when ``capabilities.provider_deduplicates``, else
        ``unknown``. A connector whose provider can be asked (a message list, a lookup by
        our key) overrides this and answers ``sent`` or ``resend`` from the provider's records.
        """
        if self.capabilities.provider_deduplicates:
            verdict = InDoubt("resend", f"{self.name} drops a repeated idempotency key")
        else:
            verdict = InDoubt("unknown", f"{self.name} has no idempotency key and no lookup")
        return [verdict] * len(batch)

    @classmethod
    def audience_identifiers(cls, recipient: Mapping[str, Any]) -> dict[str, str] | None:
        """The customer's hashed ad-audience identifiers, as this connector sends them; None: no audiences.

        The one place a connector that syncs ad audiences normalises and hashes a
        customer's traits: its membership calls use it, and erasure calls it before the
        traits go, to store what the platform needs to remove the customer (and nothing
        else). An empty dict: the customer has nothing the platform could match.
        """
        return None

    def identifiers_of(self, message: OutgoingMessage) -> dict[str, str]:
        """A membership message's hashed identifiers: stored at erasure, else from its recipient."""
        if message.hashed_identifiers:
            return dict(message.hashed_identifiers)
        return self.audience_identifiers(message.recipient) or {}

    def verify_webhook(self, request: WebhookRequest) -> None:
        """Check the request's signature on the raw body; raise :class:`WebhookRejected` if bad."""
        raise WebhookRejected(f"the {self.name} connector takes no webhooks", status=404)

    def parse_webhook(self, request: WebhookRequest) -> list[ProviderEvent]:
        """Turn a verified webhook into provider events (raise WebhookRejected(400) if malformed)."""
        raise WebhookRejected(f"the {self.name} connector takes no webhooks", status=404)

    def webhook_challenge(self, request: WebhookRequest) -> str | None:
        """Answer a provider's GET verification handshake, or None when it is not one of ours."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} channels={sorted(self.channels)}>"


def as_bool(value: Any) -> bool:
    """A setting as a boolean; environment variables arrive as text.

    >>> [as_bool(v) for v in (True, "true", "1", "yes", "on", False, "false", "0", "", None)]
    [True, True, True, True, True, False, False, False, False, False]
    """
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def as_list(value: Any) -> list[Any]:
    """A setting as a list: a list, a JSON array, or comma-separated text.

    >>> as_list('["a", "b"]'), as_list("a, b"), as_list(None)
    (['a', 'b'], ['a', 'b'], [])
    """
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = orjson.loads(text)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return parsed
        return [part.strip() for part in text.split(",") if part.strip()]
    return list(value)


def retry_after_seconds(
    headers: Mapping[str, str], *, now: float | None = None, default: float = 1.0
) -> float:
    """The wait a throttled response asks for: ``Retry-After`` or SendGrid's ``X-RateLimit-Reset``.

    ``Retry-After`` may be seconds or an HTTP date; ``X-RateLimit-Reset`` is a Unix epoch.

    >>> retry_after_seconds({"retry-after": "7"})
    7.0
    >>> retry_after_seconds({"x-ratelimit-reset": "1000"}, now=990.5)
    9.5
    >>> retry_after_seconds({}, default=2.0)
    2.0
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    now = time.time() if now is None else now
    value = lowered.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError):
                pass
    reset = lowered.get("x-ratelimit-reset")
    if reset:
        try:
            return max(0.0, float(reset) - now)
        except ValueError:
            pass
    return default


def classify_http_error(response: httpx.Response, *, provider_error: object | None = None) -> ConnectorError:
    """The connector error for a failed HTTP response, per the shared conventions.

    429 -> RateLimited (with the wait), 401/403 -> AuthenticationFailure, 408 and 5xx
    -> TransientFailure, other 4xx -> PermanentFailure.
    """
    status = response.status_code
    detail = provider_error if provider_error is not None else _body_of(response)
    message = f"HTTP {status} from {response.request.url.host}: {str(detail)[:500]}"
    if status == 429:
        return RateLimited(message, retry_after=retry_after_seconds(response.headers), provider_error=detail)
    if status in (401, 403):
        return AuthenticationFailure(message, provider_error=detail)
    if status == 408 or status >= 500:
        return TransientFailure(message, provider_error=detail)
    return PermanentFailure(message, provider_error=detail)


def _body_of(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return response.text[:1000]


def sha256_normalised(value: str) -> str:
    """Lower-case and trim, then SHA-256 hex; a value already 64 hex characters passes through.

    >>> sha256_normalised("  Jane@Example.com ") == hashlib.sha256(b"jane@example.com").hexdigest()
    True
    >>> sha256_normalised("a" * 64) == "a" * 64
    True
    """
    text = value.strip().lower()
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text
    return hashlib.sha256(text.encode()).hexdigest()


#: Transport errors raised before any byte of the request reached the provider.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol,
             httpx.LocalProtocolError, httpx.ProxyError)  # fmt: skip


def transport_error(exc: httpx.HTTPError, name: str) -> TransientFailure:
    """A timeout or connection error as a retryable failure.

    A connection that could not be made (refused, connect or pool timeout) means the
    provider never saw the request: :class:`~cadence.errors.TransientFailure`. Anything
    later (a read timeout, a connection dropped before the answer) means it may have
    accepted it: :class:`~cadence.errors.DeliveryInDoubt`, which the delivery layer
    retries only for a provider that drops a repeated idempotency key.

    >>> request = httpx.Request("POST", "https://api.example/send")
    >>> type(transport_error(httpx.ConnectError("refused", request=request), "x")).__name__
    'TransientFailure'
    >>> type(transport_error(httpx.ReadTimeout("slow", request=request), "x")).__name__
    'DeliveryInDoubt'
    """
    text = f"{name}: {type(exc).__name__}: {exc}"
    if isinstance(exc, _NOT_SENT):
        return TransientFailure(text, provider_error=str(exc))
    return DeliveryInDoubt(text, provider_error=str(exc))


def as_dict_list(value: Any) -> list[dict[str, Any]]:
    """``value`` if it is a list of objects, else an empty list."""
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def headers_of(items: Mapping[str, str] | Sequence[tuple[str, str]]) -> dict[str, str]:
    """Lower-case header names."""
    pairs = items.items() if isinstance(items, Mapping) else items
    return {k.lower(): v for k, v in pairs}
