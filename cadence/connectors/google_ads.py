"""The ``google_ads`` connector: offline click conversions and Customer Match through the REST API.

Authentication: with ``refresh_token``, ``client_id`` and ``client_secret`` set, the
connector gets its OAuth 2 access token from Google's token endpoint
(``grant_type=refresh_token``), caches it, refreshes it ``token_refresh_margin_seconds``
before it expires, and once more when the API answers 401 ``UNAUTHENTICATED`` (a token
revoked or expired early). A refresh token the endpoint refuses (``invalid_grant``:
revoked, expired, or issued to another client) is :class:`OAuthRefreshRejected`: never
retried, the batch is dead-lettered and the connector's circuit opens. Without a
refresh token, a static ``access_token`` is used as it is.

A send becomes a click conversion (``customers/{id}:uploadClickConversions`` with
``partialFailure: true``) whose ``orderId`` is derived from the send's idempotency key,
so Google drops a repeat; row errors in ``partialFailureError`` are mapped back to the
messages they belong to. A send whose variables say ``operation: add`` or ``remove``
goes to Customer Match instead: an offline user data job is created, given the hashed
identifiers, and run.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx
import orjson

from cadence.connectors.base import (
    Capabilities,
    Connector,
    OutgoingMessage,
    SendResult,
    classify_http_error,
    sha256_normalised,
    transport_error,
)
from cadence.errors import AuthenticationFailure, ConnectorError, PermanentFailure, RateLimited
from cadence.plugins.hookspecs import hookimpl
from cadence.settings import Settings

__all__ = [
    "GoogleAds",
    "OAuthRefreshRejected",
    "TOKEN_URL",
    "cadence_register_connectors",
    "conversion_time",
    "row_errors",
]

#: The row error Google gives a conversion it already has (same click and time): delivered before.
ALREADY_UPLOADED = "CLICK_CONVERSION_ALREADY_EXISTS"

#: Google's OAuth 2 token endpoint (``token_url`` overrides it).
TOKEN_URL = "https://oauth2.googleapis.com/token"


class OAuthRefreshRejected(AuthenticationFailure, PermanentFailure):
    """Google's token endpoint refused the refresh token or the client (``invalid_grant``, ``invalid_client``).

    Permanent: the refresh token was revoked, expired, or belongs to another OAuth
    client. Nothing is retried until an operator sets a new one.
    """


def conversion_time(ms: int) -> str:
    """Google's ``yyyy-mm-dd hh:mm:ss+hh:mm`` in UTC.

    >>> conversion_time(1767225600000)
    '2026-01-01 00:00:00+00:00'
    """
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")


def row_errors(partial_failure: Any, field: str) -> dict[int, list[str]]:
    """Per-row messages from a ``partialFailureError``, keyed by the index in ``field``.

    >>> row_errors({"code": 3, "message": "x", "details": [{"errors": [{"message": "bad gclid",
    ...     "errorCode": {"conversionUploadError": "UNPARSEABLE_GCLID"},
    ...     "location": {"fieldPathElements": [{"fieldName": "conversions", "index": 1},
    ...                                        {"fieldName": "gclid"}]}}]}]}, "conversions")
    {1: ['UNPARSEABLE_GCLID: bad gclid']}
    """
    found: dict[int, list[str]] = {}
    if not isinstance(partial_failure, dict):
        return found
    for detail in partial_failure.get("details") or []:
        for error in (detail or {}).get("errors") or []:
            path = ((error.get("location") or {}).get("fieldPathElements")) or []
            index = next((p.get("index") for p in path if p.get("fieldName") == field and "index" in p), None)
            if index is None:
                continue
            codes = ", ".join(str(v) for v in (error.get("errorCode") or {}).values())
            found.setdefault(int(index), []).append(
                f"{codes}: {error.get('message')}" if codes else str(error.get("message"))
            )
    return found


def _order_id(key: str) -> str:
    return key if len(key) <= 64 else hashlib.sha256(key.encode()).hexdigest()[:64]


def _digits(value: Any) -> str:
    return re.sub(r"\D", "", str(value))


class GoogleAds(Connector):
    """Google Ads offline conversions and Customer Match."""

    name: ClassVar[str] = "google_ads"
    channels: ClassVar[frozenset[str]] = frozenset({"google_ads"})
    capabilities: ClassVar[Capabilities] = Capabilities(
        max_batch_size=2000,
        rate_limit_per_second=5.0,
        burst=5,
        supports_scheduling=False,
        required_fields=(),
        consent_required=False,
        provider_deduplicates=True,
        concurrency=2,
    )
    settings_help: ClassVar[dict[str, str]] = {
        "developer_token": "Google Ads API developer token (required)",
        "refresh_token": "OAuth 2 refresh token with the adwords scope (with client_id and client_secret)",
        "client_id": "OAuth 2 client id the refresh token was issued to",
        "client_secret": "OAuth 2 client secret",
        "token_url": "OAuth 2 token endpoint (default https://oauth2.googleapis.com/token)",
        "token_refresh_margin_seconds": "refresh the access token this long before it expires (default 300)",
        "access_token": "static OAuth 2 access token, used only when no refresh_token is set",
        "customer_id": "account that owns the conversion actions, digits only (required)",
        "login_customer_id": "manager account id, when acting through one",
        "conversion_action": "default conversion action resource name (customers/X/conversionActions/Y)",
        "user_list": "Customer Match user list resource name (customers/X/userLists/Y)",
        "base_url": "API root (default https://googleads.googleapis.com)",
        "api_version": "API version (default v18)",
        "validate_only": "validate uploads without applying them (default false)",
        "ad_user_data_consent": "consent.adUserData sent with conversions (GRANTED, DENIED; default unset)",
    }

    @classmethod
    def audience_identifiers(cls, recipient: Mapping[str, Any]) -> dict[str, str]:
        """``hashedEmail`` (trimmed, lower-case) and ``hashedPhoneNumber`` (E.164: ``+`` and digits).

        >>> import hashlib
        >>> ids = GoogleAds.audience_identifiers({"email": "Jo@X.com ", "phone": "1 (650) 555-1212"})
        >>> ids == {"hashedEmail": hashlib.sha256(b"jo@x.com").hexdigest(),
        ...         "hashedPhoneNumber": hashlib.sha256(b"+16505551212").hexdigest()}
        True
        """
        found = {}
        if recipient.get("email"):
            found["hashedEmail"] = sha256_normalised(str(recipient["email"]))
        if recipient.get("phone"):
            found["hashedPhoneNumber"] = sha256_normalised("+" + _digits(recipient["phone"]))
        return found

    def _url(self, action: str) -> str:
        base = str(self.setting("base_url", "https://googleads.googleapis.com")).rstrip("/")
        return f"{base}/{self.setting('api_version', 'v18')}/{action}"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._token: str | None = None
        self._refresh_at = 0.0  # monotonic seconds: refresh the cached token from then on
        self._token_lock = asyncio.Lock()
        #: How many access tokens this connector obtained from the token endpoint.
        self.refreshes = 0

    def missing_settings(self) -> list[str]:
        """Developer token and account; a refresh token with its client, or a static access token."""
        wanted = ["developer_token"]
        wanted += ["client_id", "client_secret"] if self.uses_refresh_token else ["access_token"]
        wanted.append("customer_id")
        return [self.variable(key) for key in wanted if self.config.get(key) in (None, "")]

    @property
    def uses_refresh_token(self) -> bool:
        """True when access tokens come from a refresh token rather than a static setting."""
        return bool(self.setting("refresh_token"))

    async def access_token(self, *, rejected: str | None = None) -> str:
        """A valid access token: the cached one, or a fresh one from the token endpoint.

        ``rejected`` is a token the API just refused (401): it is replaced even if it
        has not expired yet, unless another request already replaced it.
        """
        if not self.uses_refresh_token:
            return str(self.setting("access_token", required=True))
        async with self._token_lock:
            fresh_enough = time.monotonic() < self._refresh_at
            if self._token is not None and fresh_enough and self._token != rejected:
                return self._token
            token, lifetime = await self._refresh()
            margin = min(float(self.setting("token_refresh_margin_seconds", 300)), lifetime / 2)
            self._token = token
            self._refresh_at = time.monotonic() + lifetime - margin
            self.refreshes += 1
            return token

    async def _refresh(self) -> tuple[str, float]:
        """POST the refresh token to the token endpoint; (access token, lifetime in seconds)."""
        form = {
            "grant_type": "refresh_token",
            "refresh_token": str(self.setting("refresh_token", required=True)),
            "client_id": str(self.setting("client_id", required=True)),
            "client_secret": str(self.setting("client_secret", required=True)),
        }
        url = str(self.setting("token_url", TOKEN_URL))
        try:
            response = await self.client.post(url, data=form)
        except httpx.HTTPError as exc:
            raise transport_error(exc, f"{self.name} token endpoint") from exc
        try:
            payload = response.json()
        except ValueError:
            payload = response.text[:1000]
        if response.status_code == 200 and isinstance(payload, dict) and payload.get("access_token"):
            try:
                lifetime = float(payload.get("expires_in", 3600))
            except (TypeError, ValueError):
                lifetime = 3600.0
            return str(payload["access_token"]), lifetime
        code = payload.get("error") if isinstance(payload, dict) else None
        if response.status_code in (400, 401) and code in (
            "invalid_grant",
            "invalid_client",
            "unauthorized_client",
        ):
            detail = payload.get("error_description", "") if isinstance(payload, dict) else ""
            fix = "REFRESH_TOKEN" if code == "invalid_grant" else "CLIENT_ID and CLIENT_SECRET"
            raise OAuthRefreshRejected(
                f"google_ads: the OAuth token endpoint refused the refresh ({code}: {detail}); "
                f"check CADENCE_CONNECTORS__GOOGLE_ADS__{fix}",
                provider_error=payload,
            )
        if response.status_code == 200:
            raise PermanentFailure(
                "google_ads: the OAuth token endpoint answered without an access_token",
                provider_error=payload,
            )
        error = classify_http_error(response, provider_error=payload)
        if isinstance(error, (AuthenticationFailure, PermanentFailure)) and not isinstance(
            error, RateLimited
        ):
            raise OAuthRefreshRejected(
                f"google_ads: the OAuth token endpoint refused the request (HTTP {response.status_code}: "
                f"{str(payload)[:300]})",
                provider_error=payload,
            )
        raise error

    def _headers(self, token: str) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {token}",
            "developer-token": str(self.setting("developer_token", required=True)),
            "Content-Type": "application/json",
        }
        if self.setting("login_customer_id"):
            headers["login-customer-id"] = _digits(self.setting("login_customer_id"))
        return headers

    def conversion_for(self, message: OutgoingMessage) -> dict[str, Any]:
        """One ``ClickConversion``."""
        v = message.variables
        conversion: dict[str, Any] = {
            "conversionAction": v.get("conversion_action")
            or self.setting("conversion_action", required=True),
            "conversionDateTime": conversion_time(
                int(v.get("conversion_time_ms") or message.send_at_ms or _now_ms())
            ),
            "orderId": _order_id(message.idempotency_key),
        }
        for ours, theirs in (("gclid", "gclid"), ("gbraid", "gbraid"), ("wbraid", "wbraid")):
            value = v.get(ours) or message.recipient.get(ours)
            if value:
                conversion[theirs] = str(value)
        if v.get("value") is not None:
            conversion["conversionValue"] = float(v["value"])
            conversion["currencyCode"] = str(v.get("currency", "USD"))
        if self.setting("ad_user_data_consent"):
            conversion["consent"] = {"adUserData": self.setting("ad_user_data_consent")}
        return conversion

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Conversions in one upload; Customer Match through one offline user data job per operation."""
        results: dict[str, SendResult] = {}
        conversions = [m for m in batch if m.variables.get("operation") not in ("add", "remove")]
        matches = [m for m in batch if m.variables.get("operation") in ("add", "remove")]
        customer = _digits(self.setting("customer_id", required=True))
        if conversions:
            body = {
                "conversions": [self.conversion_for(m) for m in conversions],
                "partialFailure": True,
                "validateOnly": self.flag("validate_only"),
            }
            answer = await self._post(f"customers/{customer}:uploadClickConversions", body)
            errors = row_errors(answer.get("partialFailureError"), "conversions")
            for index, message in enumerate(conversions):
                results[message.idempotency_key] = self._result(
                    message, errors.get(index), f"order:{_order_id(message.idempotency_key)}"
                )
        # One job per operation and user list: a batch may hold several campaigns' lists.
        jobs: dict[tuple[str, str], list[OutgoingMessage]] = {}
        for message in matches:
            user_list = str(message.variables.get("user_list") or self.setting("user_list", required=True))
            jobs.setdefault((str(message.variables["operation"]), user_list), []).append(message)
        for (op, user_list), members in sorted(jobs.items()):
            results.update(await self._customer_match(customer, op, user_list, members))
        return [results[m.idempotency_key] for m in batch]

    def _result(self, message: OutgoingMessage, errors: list[str] | None, provider_id: str) -> SendResult:
        if errors and all(e.startswith(ALREADY_UPLOADED) for e in errors):
            # Google already has this conversion (a resend after a crash or a lost answer): delivered.
            return SendResult(message.idempotency_key, True, provider_message_id=provider_id)
        if errors:
            return SendResult(message.idempotency_key, False, error="; ".join(errors))
        return SendResult(message.idempotency_key, True, provider_message_id=provider_id)

    async def _customer_match(
        self, customer: str, op: str, user_list: str, members: Sequence[OutgoingMessage]
    ) -> dict[str, SendResult]:
        job = await self._post(
            f"customers/{customer}/offlineUserDataJobs:create",
            {
                "job": {
                    "type": "CUSTOMER_MATCH_USER_LIST",
                    "customerMatchUserListMetadata": {"userList": user_list},
                }
            },
        )
        resource = str(job.get("resourceName") or "")
        if not resource:
            raise ConnectorError(
                "google_ads: offlineUserDataJobs:create returned no resourceName", provider_error=job
            )
        operations = []
        for message in members:
            identifiers = [{key: value} for key, value in self.identifiers_of(message).items()]
            operations.append({"create" if op == "add" else "remove": {"userIdentifiers": identifiers}})
        answer = await self._post(
            f"{resource}:addOperations", {"operations": operations, "enablePartialFailure": True}
        )
        errors = row_errors(answer.get("partialFailureError"), "operations")
        await self._post(f"{resource}:run", {})
        return {m.idempotency_key: self._result(m, errors.get(i), resource) for i, m in enumerate(members)}

    async def _post(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        content = orjson.dumps(body)
        token = await self.access_token()
        response = await self._call(action, content, token)
        if response.status_code == 401 and self.uses_refresh_token:
            # The token expired or was revoked before we expected: refresh once and try again.
            response = await self._call(action, content, await self.access_token(rejected=token))
        if response.status_code == 200:
            payload = response.json()
            return payload if isinstance(payload, dict) else {}
        error = classify_http_error(response)
        if isinstance(error, RateLimited) and "retry-after" not in response.headers:
            error.retry_after = _retry_delay(error.provider_error) or error.retry_after
        raise error

    async def _call(self, action: str, content: bytes, token: str) -> httpx.Response:
        try:
            return await self.client.post(self._url(action), content=content, headers=self._headers(token))
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.name) from exc


def _retry_delay(payload: Any) -> float | None:
    """``google.rpc.RetryInfo.retryDelay`` ("30s") from an error body, if present."""
    if not isinstance(payload, dict):
        return None
    for detail in (payload.get("error") or {}).get("details") or []:
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return float(delay[:-1])
            except ValueError:
                return None
    return None


def _now_ms() -> int:
    return int(datetime.now(tz=UTC).timestamp() * 1000)


@hookimpl
def cadence_register_connectors(settings: Settings) -> list[type[Connector]]:
    """Google Ads for the google_ads channel."""
    return [GoogleAds]
