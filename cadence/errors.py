"""Every exception cadence raises on purpose.

The tree::

    CadenceError
    ├── ConfigError                 a setting is missing or wrong (names the setting)
    ├── StorageError                the database is unreachable or its schema is behind
    ├── EventError                  an event is malformed (names the field)
    │   └── PayloadTooLarge         a call or batch is over the Segment limits
    ├── IdentityError               an identity link is impossible (e.g. an id is erased)
    ├── RuleError                   a rule file is wrong (carries diagnostics)
    │   ├── RuleSyntaxError
    │   └── RuleTypeError
    ├── PluginError                 a plugin failed to load or misbehaved
    ├── WebhookRejected             a provider webhook is forged, stale or malformed (401/400)
    └── ConnectorError              a provider call failed
        ├── RateLimited             wait ``retry_after`` seconds, then try again
        ├── TransientFailure        5xx, timeouts, connection errors: retry
        ├── PermanentFailure        4xx other than 408/429: never retry
        └── AuthenticationFailure   credentials rejected: never retry, alert

Callers catch the narrowest class they can handle; the CLI and the API turn any
``CadenceError`` into a message (or a 4xx) rather than a traceback.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailure",
    "CadenceError",
    "ConfigError",
    "ConnectorError",
    "DeliveryInDoubt",
    "EventError",
    "IdentityError",
    "PayloadTooLarge",
    "PermanentFailure",
    "PluginError",
    "RateLimited",
    "RuleError",
    "RuleSyntaxError",
    "RuleTypeError",
    "StorageError",
    "TransientFailure",
    "WebhookRejected",
]


class CadenceError(Exception):
    """Base class of every error cadence raises on purpose."""


class ConfigError(CadenceError):
    """A setting is missing or invalid; the message names the setting."""


class StorageError(CadenceError):
    """The database cannot be used as configured."""


class EventError(CadenceError):
    """An incoming event is malformed.

    ``field`` is the dotted path of the offending field (``"batch.3.userId"``).
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PayloadTooLarge(EventError):
    """A call or a batch exceeds the configured size limits."""


class IdentityError(CadenceError):
    """Two identities cannot be linked."""


class RuleError(CadenceError):
    """A rule file has errors; ``diagnostics`` lists each one with its position."""

    def __init__(self, message: str, *, diagnostics: list[object] | None = None) -> None:
        super().__init__(message)
        self.diagnostics = diagnostics or []


class RuleSyntaxError(RuleError):
    """A rule file does not parse."""


class RuleTypeError(RuleError):
    """A rule file parses but does not type-check."""


class PluginError(CadenceError):
    """A plugin failed to load or returned something unusable."""


class WebhookRejected(CadenceError):
    """A webhook request failed verification or parsing.

    ``status`` is the HTTP answer: 401 for a missing, forged or stale signature, 400
    for a body that is not what the provider sends. The message says why (it is logged).
    """

    def __init__(self, message: str, *, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


class ConnectorError(CadenceError):
    """A provider call failed. ``provider_error`` keeps the provider's own words."""

    retryable: bool = False

    def __init__(self, message: str, *, provider_error: object | None = None) -> None:
        super().__init__(message)
        self.provider_error = provider_error


class RateLimited(ConnectorError):
    """The provider throttled us; ``retry_after`` is the wait in seconds."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float, provider_error: object | None = None) -> None:
        super().__init__(message, provider_error=provider_error)
        self.retry_after = retry_after


class TransientFailure(ConnectorError):
    """5xx, timeout or connection error: worth retrying."""

    retryable = True


class DeliveryInDoubt(TransientFailure):
    """The request may have reached the provider: a timeout or lost connection after it was sent.

    Retried only by connectors whose provider drops a repeated idempotency key
    (``provider_deduplicates``); for the others the sends are left in doubt, as after a
    crash, and settled by the connector's ``check_in_doubt`` once their lease runs out.
    """


class PermanentFailure(ConnectorError):
    """The provider rejected the request for good (4xx other than 408/429)."""


class AuthenticationFailure(ConnectorError):
    """The provider rejected our credentials."""
