"""Test kit for connectors: fake providers on loopback over real HTTP, and signed webhooks.

Used by cadence's own tests and benchmark, and by plugin authors who want to test a
connector the same way. Each fake follows the provider's documented contract (see /work/shared/CONNECTORS.md):
auth headers, request shapes, success codes, error envelopes, SendGrid's rate-limit
headers, Meta's 7-day rule, Google Ads' ``partialFailureError``. Tests script failures
with :meth:`FakeProviders.fail_next` and read what arrived in :attr:`FakeProviders.calls`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import socket
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import orjson
import uvicorn
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cadence.connectors.base import Connector, WebhookRequest
from cadence.connectors.sms import twilio_signature
from cadence.plugins.manager import connector_classes, make_plugin_manager
from cadence.settings import Settings

__all__ = [
    "BUILTINS",
    "FakeProviders",
    "LoopbackServer",
    "SigningKey",
    "build_connector",
    "connector_config",
    "google_oauth_config",
    "run_dispatcher",
    "meta_request",
    "sendgrid_request",
    "twilio_request",
]

SENDGRID_KEY = "SG.test-key"
TWILIO_SID = "AC0123456789abcdef0123456789abcdef"
TWILIO_TOKEN = "twilio-auth-token"
META_TOKEN = "meta-token"
#: Custom audience users schemas (Meta's business SDK: CustomAudience.Schema and its MultiKeySchema).
META_SINGLE_KEYS = frozenset({"UID", "EMAIL_SHA256", "PHONE_SHA256", "MOBILE_ADVERTISER_ID"})
META_MULTI_KEYS = frozenset(
    {"EXTERN_ID", "EMAIL", "PHONE", "GEN", "DOBY", "DOBM", "DOBD", "LN", "FN", "FI", "CT", "ST", "ZIP"}
    | {"MADID", "COUNTRY", "APPUID"}
)
GOOGLE_TOKEN = "ya29.test"
GOOGLE_DEV = "dev-token"
GOOGLE_CLIENT_ID = "1234-test.apps.googleusercontent.com"
GOOGLE_CLIENT_SECRET = "GOCSPX-test-secret"
GOOGLE_REFRESH_TOKEN = "1//test-refresh-token"


@dataclass
class Call:
    """One request a fake received."""

    provider: str
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0


@dataclass
class Scripted:
    """A response forced on the next request to a provider."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class FakeProviders:
    """All four providers in one Starlette app; state is reset per test."""

    def __init__(self) -> None:
        self.reset()
        self.app = Starlette(routes=[Route("/{path:path}", self.dispatch, methods=["GET", "POST", "DELETE"])])
        self.base_url = ""

    def reset(self) -> None:
        """Forget calls, scripts and deliveries."""
        self.calls: list[Call] = []
        self.scripts: dict[str, deque[Scripted]] = defaultdict(deque)
        self.delivered: Counter[str] = Counter()  # provider-side delivery count per idempotency key
        self.sendgrid_remaining = 600
        self.twilio_opted_out: set[str] = set()
        self.twilio_messages: list[dict[str, Any]] = []  # newest last
        self.meta_seen: set[tuple[Any, Any]] = set()
        self.google_conversions: set[tuple[Any, Any, Any]] = set()
        # Ad audiences as the platforms hold them: "meta:<audience id>" or "google:<user list>"
        # -> the (identifier, hash) pairs of their members.
        self.audiences: defaultdict[str, set[tuple[str, str]]] = defaultdict(set)
        # Google offline user data jobs by resource name: user list, operations, whether run.
        self.google_jobs: dict[str, dict[str, Any]] = {}
        self.latency = 0.0
        # Google OAuth: access tokens issued from the refresh token, with their expiry (epoch s).
        self.google_tokens: dict[str, float] = {}
        self.google_token_lifetime = 3599
        self.google_refresh_revoked = False

    def expire_google_tokens(self) -> None:
        """Make every access token issued so far invalid now (as if its hour ran out early)."""
        self.google_tokens = {token: 0.0 for token in self.google_tokens}

    def fail_next(
        self, provider: str, status: int, body: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        """Answer the next request to ``provider`` with ``status`` (then behave normally again)."""
        self.scripts[provider].append(Scripted(status, body, headers or {}))

    def calls_to(self, provider: str) -> list[Call]:
        """Requests ``provider`` received, scripted failures included."""
        return [c for c in self.calls if c.provider == provider]

    # -- routing --------------------------------------------------------------------

    async def dispatch(self, request: Request) -> Response:
        path = "/" + request.path_params["path"]
        if path == "/_fake/stats":  # for a fake running in another process (benchmarks)
            return JSONResponse(
                {
                    "delivered": sum(self.delivered.values()),
                    "keys": len(self.delivered),
                    "max_per_key": max(self.delivered.values(), default=0),
                }
            )
        raw = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        provider, handler = self._route(request.method, path)
        body: Any
        if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            body = dict(parse_qsl(raw.decode()))
        else:
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                body = raw
        call = Call(provider, request.method, path, headers, body)
        self.calls.append(call)
        if self.latency:
            time.sleep(self.latency)
        if self.scripts[provider]:
            scripted = self.scripts[provider].popleft()
            call.status = scripted.status
            return JSONResponse(scripted.body, status_code=scripted.status, headers=scripted.headers)
        response: Response = handler(request, path, headers, body)
        call.status = response.status_code
        return response

    def _route(self, method: str, path: str) -> tuple[str, Any]:
        if path == "/token":
            return "google_oauth", self.google_oauth
        if path.endswith("/mail/send"):
            return "sendgrid", self.sendgrid
        if "/Accounts/" in path and path.endswith("/Messages.json"):
            return "twilio", self.twilio
        if re.search(r"/customers/\d+", path):
            return "google_ads", self.google_ads
        if path.endswith("/events") or path.endswith("/users"):
            return "facebook", self.facebook
        return "unknown", lambda *a: JSONResponse({"error": "no such route"}, status_code=404)

    # -- SendGrid v3 mail send -------------------------------------------------------

    def sendgrid(self, request: Request, path: str, headers: dict[str, str], body: Any) -> Response:
        reset = str(int(time.time()) + 60)
        limits = {"X-RateLimit-Limit": "600", "X-RateLimit-Reset": reset}
        if headers.get("authorization") != f"Bearer {SENDGRID_KEY}":
            return JSONResponse({"errors": [{"field": None, "message": "authorization required"}]}, 401)
        if self.sendgrid_remaining <= 0:
            return JSONResponse(
                {"errors": [{"field": None, "message": "too many requests"}]},
                429,
                headers={**limits, "X-RateLimit-Remaining": "0"},
            )
        self.sendgrid_remaining -= 1
        limits["X-RateLimit-Remaining"] = str(self.sendgrid_remaining)
        errors = []
        if not isinstance(body, dict):
            errors.append({"field": None, "message": "Bad Request"})
            body = {}
        personalizations = body.get("personalizations") or []
        if not personalizations or len(personalizations) > 1000:
            errors.append({"field": "personalizations", "message": "between 1 and 1000 personalizations"})
        if not (body.get("from") or {}).get("email"):
            errors.append(
                {"field": "from.email", "message": "The from email does not contain a valid address."}
            )
        if not body.get("template_id") and not (body.get("subject") and body.get("content")):
            errors.append({"field": "content", "message": "subject and content or template_id required"})
        for i, p in enumerate(personalizations):
            if not p.get("to") or not all("@" in str(t.get("email", "")) for t in p["to"]):
                errors.append(
                    {"field": f"personalizations.{i}.to", "message": "Does not contain a valid address."}
                )
            for k, v in (p.get("custom_args") or {}).items():
                if not isinstance(v, str):
                    errors.append(
                        {"field": f"personalizations.{i}.custom_args.{k}", "message": "must be a string"}
                    )
        if errors:
            return JSONResponse({"errors": errors}, 400, headers=limits)
        if (body.get("mail_settings") or {}).get("sandbox_mode", {}).get("enable"):
            return Response(status_code=200, headers=limits)
        for p in personalizations:
            self.delivered[p["custom_args"].get("send_key", "")] += 1
        return Response(status_code=202, headers={**limits, "X-Message-Id": f"sg{len(self.calls)}"})

    # -- Twilio Messages ---------------------------------------------------------------

    def twilio(self, request: Request, path: str, headers: dict[str, str], body: Any) -> Response:
        expected = "Basic " + base64.b64encode(f"{TWILIO_SID}:{TWILIO_TOKEN}".encode()).decode()
        if headers.get("authorization") != expected or f"/Accounts/{TWILIO_SID}/" not in path:
            return JSONResponse({"code": 20003, "message": "Authenticate", "status": 401}, 401)
        if request.method == "GET":  # Read multiple Message resources: filters To, From; newest first
            wanted = {k: request.query_params.get(k) for k in ("To", "From") if request.query_params.get(k)}
            size = int(request.query_params.get("PageSize", "50"))
            found = [
                m for m in reversed(self.twilio_messages) if all(m[k.lower()] == v for k, v in wanted.items())
            ]
            return JSONResponse({"messages": found[:size], "page_size": size, "next_page_uri": None})
        to = body.get("To", "") if isinstance(body, dict) else ""
        if not re.fullmatch(r"\+\d{8,15}", to):
            return JSONResponse(
                {"code": 21211, "message": f"The 'To' number {to} is not valid.", "status": 400}, 400
            )
        if not body.get("Body"):
            return JSONResponse({"code": 21602, "message": "Message body is required.", "status": 400}, 400)
        if not body.get("From") and not body.get("MessagingServiceSid"):
            return JSONResponse(
                {"code": 21603, "message": "A 'From' phone number is required.", "status": 400}, 400
            )
        if to in self.twilio_opted_out:
            return JSONResponse(
                {"code": 21610, "message": "Attempt to send to unsubscribed recipient", "status": 400}, 400
            )
        key = dict(parse_qsl((body.get("StatusCallback") or "?").split("?", 1)[1])).get("send_key", to)
        self.delivered[str(key)] += 1
        sid = f"SM{len(self.calls):032d}"
        resource = {
            "sid": sid,
            "status": "queued",
            "to": to,
            "from": body.get("From"),
            "body": body["Body"],
            "date_created": formatdate(time.time(), usegmt=False).replace("-0000", "+0000"),
        }
        self.twilio_messages.append(resource)
        return JSONResponse(resource, 201)

    # -- Meta Graph ------------------------------------------------------------------

    def facebook(self, request: Request, path: str, headers: dict[str, str], body: Any) -> Response:
        if request.query_params.get("access_token") != META_TOKEN:
            return _graph_error(400, 190, "Invalid OAuth access token.", "OAuthException")
        if path.endswith("/users"):
            payload = (body or {}).get("payload") or {}
            rows = payload.get("data") or []
            schema = payload.get("schema")
            if not schema or len(rows) > 10000:
                return _graph_error(400, 100, "Invalid parameter", "OAuthException")
            # A list is a multi-key schema, whose keys are MultiKeySchema's (EMAIL, PHONE, FN...);
            # the *_SHA256 names are single-key schemas, a string with a flat list of values.
            if isinstance(schema, str):
                if schema not in META_SINGLE_KEYS:
                    return _graph_error(400, 100, f"Invalid schema: {schema}", "OAuthException")
                schema, rows = [schema], [[value] for value in rows]
            elif any(key not in META_MULTI_KEYS for key in schema):
                return _graph_error(400, 100, f"Invalid multi-key schema: {schema}", "OAuthException")
            audience = path.split("/")[-2]
            members = self.audiences[f"meta:{audience}"]
            for row in rows:
                pairs = {(key, value) for key, value in zip(schema, row, strict=False) if value}
                # POST adds the users, DELETE removes them (Marketing API, custom audience users).
                if request.method == "DELETE":
                    members.difference_update(pairs)
                else:
                    members.update(pairs)
            return JSONResponse(
                {
                    "audience_id": audience,
                    "session_id": 42,
                    "num_received": len(rows),
                    "num_invalid_entries": 0,
                }
            )
        data = (body or {}).get("data")
        if not isinstance(data, list) or not data or len(data) > 1000:
            return _graph_error(400, 100, "Invalid parameter: data", "OAuthException")
        now = time.time()
        for event in data:
            if now - event.get("event_time", 0) > 7 * 86400:
                return _graph_error(
                    400, 100, "Invalid parameter: event_time too old", "OAuthException", 2804003
                )
            for key in ("event_name", "event_time", "action_source", "user_data"):
                if key not in event:
                    return _graph_error(400, 100, f"Invalid parameter: {key} is required", "OAuthException")
        for event in data:
            # Meta drops an event whose event_id and event_name it has already received.
            seen = (event.get("event_name"), event.get("event_id"))
            if event.get("event_id") and seen in self.meta_seen:
                continue
            self.meta_seen.add(seen)
            self.delivered[event.get("event_id", "")] += 1
        return JSONResponse({"events_received": len(data), "messages": [], "fbtrace_id": "AbCdEf"})

    # -- Google Ads REST ---------------------------------------------------------------

    def google_oauth(self, request: Request, path: str, headers: dict[str, str], body: Any) -> Response:
        """Google's OAuth 2 token endpoint, refresh-token grant only (form-encoded in, JSON out)."""
        form = body if isinstance(body, dict) else {}
        if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return JSONResponse({"error": "invalid_request", "error_description": "form body required"}, 400)
        if form.get("grant_type") != "refresh_token":
            return JSONResponse(
                {"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}, 400
            )
        if form.get("client_id") != GOOGLE_CLIENT_ID or form.get("client_secret") != GOOGLE_CLIENT_SECRET:
            return JSONResponse({"error": "invalid_client", "error_description": "Unauthorized"}, 401)
        if form.get("refresh_token") != GOOGLE_REFRESH_TOKEN or self.google_refresh_revoked:
            return JSONResponse(
                {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}, 400
            )
        token = f"ya29.fake-{len(self.google_tokens) + 1}"
        self.google_tokens[token] = time.time() + self.google_token_lifetime
        return JSONResponse(
            {
                "access_token": token,
                "expires_in": self.google_token_lifetime,
                "scope": "https://www.googleapis.com/auth/adwords",
                "token_type": "Bearer",
            }
        )

    def _google_token_ok(self, authorization: str | None) -> bool:
        token = (authorization or "").removeprefix("Bearer ")
        if token == GOOGLE_TOKEN:  # the static token of the plain configuration
            return True
        return self.google_tokens.get(token, 0.0) > time.time()

    def google_ads(self, request: Request, path: str, headers: dict[str, str], body: Any) -> Response:
        if (
            not self._google_token_ok(headers.get("authorization"))
            or headers.get("developer-token") != GOOGLE_DEV
        ):
            return JSONResponse(
                {
                    "error": {
                        "code": 401,
                        "message": "Request had invalid authentication credentials. Expected OAuth 2 access "
                        "token, login cookie or other valid authentication credential.",
                        "status": "UNAUTHENTICATED",
                    }
                },
                401,
            )
        if path.endswith(":uploadClickConversions"):
            if not isinstance(body, dict) or body.get("partialFailure") is not True:
                return JSONResponse(
                    {
                        "error": {
                            "code": 400,
                            "message": "partial_failure must be true",
                            "status": "INVALID_ARGUMENT",
                        }
                    },
                    400,
                )
            results: list[dict[str, Any]] = []
            errors: list[dict[str, Any]] = []
            for index, conversion in enumerate(body.get("conversions") or []):
                gclid = conversion.get("gclid", "")
                valid_time = re.fullmatch(
                    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d", conversion.get("conversionDateTime", "")
                )
                if not gclid or gclid.startswith("bad") or not valid_time:
                    results.append({})
                    errors.append(
                        {
                            "errorCode": {"conversionUploadError": "UNPARSEABLE_GCLID"},
                            "message": "The click identifier could not be parsed.",
                            "trigger": {"stringValue": gclid},
                            "location": {
                                "fieldPathElements": [
                                    {"fieldName": "conversions", "index": index},
                                    {"fieldName": "gclid"},
                                ]
                            },
                        }
                    )
                    continue
                seen = (gclid, conversion.get("conversionDateTime"), conversion.get("conversionAction"))
                if seen in self.google_conversions:
                    results.append({})
                    errors.append(
                        {
                            "errorCode": {"conversionUploadError": "CLICK_CONVERSION_ALREADY_EXISTS"},
                            "message": "The imported event has the same click and conversion_date_time as an "
                            "existing conversion.",
                            "location": {"fieldPathElements": [{"fieldName": "conversions", "index": index}]},
                        }
                    )
                    continue
                self.google_conversions.add(seen)
                self.delivered[conversion.get("orderId", "")] += 1
                results.append(
                    {
                        "gclid": gclid,
                        "conversionAction": conversion["conversionAction"],
                        "conversionDateTime": conversion["conversionDateTime"],
                    }
                )
            answer: dict[str, Any] = {"results": results}
            if errors:
                first = errors[0]["location"]["fieldPathElements"][0]["index"]
                answer["partialFailureError"] = {
                    "code": 3,
                    "message": f"{errors[0]['message']}, at conversions[{first}].gclid",
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.ads.googleads.v18.errors.GoogleAdsFailure",
                            "errors": errors,
                            "requestId": "req-1",
                        }
                    ],
                }
            return JSONResponse(answer)
        if path.endswith("offlineUserDataJobs:create"):
            customer = re.search(r"/customers/(\d+)", path).group(1)  # type: ignore[union-attr]
            resource = f"customers/{customer}/offlineUserDataJobs/{77 + len(self.google_jobs)}"
            metadata = ((body or {}).get("job") or {}).get("customerMatchUserListMetadata") or {}
            self.google_jobs[resource] = {
                "user_list": metadata.get("userList"),
                "operations": [],
                "run": False,
            }
            return JSONResponse({"resourceName": resource})
        if path.endswith(":addOperations"):
            operations = (body or {}).get("operations") or []
            job = self.google_jobs.get(path.split("/", 2)[-1].removesuffix(":addOperations"))
            if job is None or job["run"]:
                # Operations go to a created job that has not run yet (OfflineUserDataJobService).
                status = "NOT_FOUND" if job is None else "FAILED_PRECONDITION"
                return JSONResponse({"error": {"code": 400, "message": "bad job", "status": status}}, 400)
            job["operations"].extend(operations)
            errors = []
            for index, op in enumerate(operations):
                ids = (op.get("create") or op.get("remove") or {}).get("userIdentifiers") or []
                if not ids:
                    errors.append(
                        {
                            "errorCode": {"offlineUserDataJobError": "INVALID_USER_IDENTIFIER"},
                            "message": "no identifiers",
                            "location": {"fieldPathElements": [{"fieldName": "operations", "index": index}]},
                        }
                    )
            answer = {}
            if errors:
                answer["partialFailureError"] = {"code": 3, "message": "x", "details": [{"errors": errors}]}
            return JSONResponse(answer)
        if path.endswith(":run"):
            job = self.google_jobs.get(path.split("/", 2)[-1].removesuffix(":run"))
            if job is None or job["run"]:
                status = "NOT_FOUND" if job is None else "FAILED_PRECONDITION"
                return JSONResponse({"error": {"code": 400, "message": "bad job", "status": status}}, 400)
            job["run"] = True
            members = self.audiences[f"google:{job['user_list']}"]
            for op in job["operations"]:
                for change, apply in (("create", members.update), ("remove", members.difference_update)):
                    ids = (op.get(change) or {}).get("userIdentifiers") or []
                    apply({(key, value) for identifier in ids for key, value in identifier.items()})
            return JSONResponse({"name": "operations/1"})
        return JSONResponse({"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}, 404)


def _graph_error(status: int, code: int, message: str, kind: str, subcode: int | None = None) -> Response:
    error: dict[str, Any] = {"message": message, "type": kind, "code": code, "fbtrace_id": "Ftrace"}
    if subcode:
        error["error_subcode"] = subcode
    return JSONResponse({"error": error}, status)


def serve_in_process(ready: Any, sendgrid_remaining: int = 10**9) -> None:
    """Run :class:`FakeProviders` until killed, putting its URL on ``ready`` (a multiprocessing queue)."""
    fake = FakeProviders()
    fake.sendgrid_remaining = sendgrid_remaining
    server = LoopbackServer(fake.app)
    fake.base_url = server.url
    ready.put(server.url)
    server.server.run(sockets=[server.sock])


class LoopbackServer:
    """Serve an ASGI app with uvicorn in a thread on 127.0.0.1, on a free port."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", ws="none", http="h11", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LoopbackServer:
        """Start and wait until the server accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop the server and its thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


APP_SECRET = "meta-app-secret"
WEBHOOK_URL = "https://cadence.example.com/v1/webhooks/sms"


class SigningKey:
    """A locally generated ECDSA P-256 key standing in for SendGrid's."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_b64 = base64.b64encode(der).decode()

    def sign(self, timestamp: str, body: bytes) -> str:
        signature = self.private.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode()


SENDGRID_SIGNER = SigningKey()


def connector_config(name: str, base_url: str) -> dict[str, Any]:
    """Settings for connector ``name`` pointing at the fake providers."""
    return {
        "outbox": {},
        "sendgrid": {
            "api_key": SENDGRID_KEY,
            "from_email": "news@shop.example",
            "from_name": "Shop",
            "base_url": base_url,
            "webhook_public_key": SENDGRID_SIGNER.public_b64,
            "rate_limit_per_second": 1000,
            "burst": 100,
        },
        "sms": {
            "account_sid": TWILIO_SID,
            "auth_token": TWILIO_TOKEN,
            "from_number": "+15005550006",
            "base_url": base_url,
            "status_callback_url": WEBHOOK_URL,
            "rate_limit_per_second": 1000,
            "burst": 100,
        },
        "facebook": {
            "access_token": META_TOKEN,
            "pixel_id": "1234567890",
            "base_url": base_url,
            "api_version": "v21.0",
            "app_secret": APP_SECRET,
            "verify_token": "let-me-in",
            "throttle_wait_seconds": 0.05,
            "rate_limit_per_second": 1000,
            "burst": 100,
        },
        "google_ads": {
            "access_token": GOOGLE_TOKEN,
            "developer_token": GOOGLE_DEV,
            "customer_id": "123-456-7890",
            "login_customer_id": "999-000-1111",
            "conversion_action": "customers/1234567890/conversionActions/55",
            "user_list": "customers/1234567890/userLists/66",
            "base_url": base_url,
            "rate_limit_per_second": 1000,
            "burst": 100,
        },
    }[name]


def google_oauth_config(base_url: str) -> dict[str, Any]:
    """Google Ads settings that get access tokens from the fake token endpoint with a refresh token."""
    config = {k: v for k, v in connector_config("google_ads", base_url).items() if k != "access_token"}
    return config | {
        "refresh_token": GOOGLE_REFRESH_TOKEN,
        "client_id": GOOGLE_CLIENT_ID,
        "client_secret": GOOGLE_CLIENT_SECRET,
        "token_url": f"{base_url}/token",
    }


def run_dispatcher(database_url: str, connectors_json: str) -> None:
    """Run a dispatcher until the process is killed (crash tests start it in a subprocess).

    ``connectors_json`` is ``settings.connectors`` as JSON. Prints ``ready`` once running.
    """
    import asyncio

    from cadence.connectors.delivery import Dispatcher
    from cadence.plugins.manager import build_connectors
    from cadence.store.db import create_db_engine

    async def main() -> None:
        engine = create_db_engine(database_url)
        settings = Settings(
            disable_plugin_autoload=True, connectors=orjson.loads(connectors_json), _env_file=None
        )  # type: ignore[call-arg]
        async with httpx.AsyncClient(timeout=30) as client:
            registry = build_connectors(
                settings, pm=make_plugin_manager(settings), engine=engine, client=client
            )
            dispatcher = Dispatcher(engine=engine, route=registry.route, batch_limit=50)
            print("ready", flush=True)
            await dispatcher.run(stop=asyncio.Event(), poll_seconds=0.05)

    asyncio.run(main())


BUILTINS = ("outbox", "sendgrid", "sms", "facebook", "google_ads")


def build_connector(
    name: str, base_url: str, client: httpx.AsyncClient, engine: Engine | None, **overrides: Any
) -> Connector:
    """Connector ``name`` as the plugin manager registers it, configured for the fakes."""
    settings = Settings(disable_plugin_autoload=True, _env_file=None)  # type: ignore[call-arg]
    cls = connector_classes(make_plugin_manager(settings), settings)[name]
    return cls(config={**connector_config(name, base_url), **overrides}, client=client, engine=engine)


# -- signed webhook requests, as each provider would send them --------------------------


def sendgrid_request(
    events: list[dict[str, Any]],
    *,
    ts: int | None = None,
    signer: SigningKey = SENDGRID_SIGNER,
    body: bytes | None = None,
) -> WebhookRequest:
    raw = body if body is not None else orjson.dumps(events) + b"\r\n"
    timestamp = str(ts if ts is not None else int(time.time()))
    return WebhookRequest(
        method="POST",
        url="https://cadence.example.com/v1/webhooks/sendgrid",
        headers={
            "content-type": "application/json",
            "x-twilio-email-event-webhook-signature": signer.sign(timestamp, raw),
            "x-twilio-email-event-webhook-timestamp": timestamp,
        },
        body=raw,
    )


def twilio_request(
    params: dict[str, str], *, query: str = "", token: str = TWILIO_TOKEN, url: str = WEBHOOK_URL
) -> WebhookRequest:
    full = f"{url}?{query}" if query else url
    body = urlencode(params).encode()
    return WebhookRequest(
        method="POST",
        url=full,
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "x-twilio-signature": twilio_signature(full, params, token),
        },
        body=body,
    )


def meta_request(payload: Any, *, secret: str = APP_SECRET, body: bytes | None = None) -> WebhookRequest:
    raw = body if body is not None else orjson.dumps(payload)
    digest = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return WebhookRequest(
        method="POST",
        url="https://cadence.example.com/v1/webhooks/facebook",
        headers={"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"},
        body=raw,
    )
