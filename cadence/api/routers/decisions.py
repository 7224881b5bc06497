"""``/v1/decisions``: decide for a customer (preview or commit), in batches, and read a decision back.

The ruleset is the loaded rule files' (``runtime.extensions["rules"]``, or
``app.state.ruleset`` when set); the learners are the engine loop's
:class:`LearnerSubscriber`; the channels offered are the installed connectors'
(``app.state.available_channels`` overrides).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, overload

import orjson
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import Gauge
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as ASGIScope

from cadence.api.commitpipe import CommitPipeline
from cadence.api.httpproto import DEFERRED
from cadence.api.loopconn import LoopConnection
from cadence.api.metrics import Metrics
from cadence.api.previewbatch import PreviewBatcher
from cadence.api.routers.engine import caught_up
from cadence.api.security import Principal, Scope
from cadence.dsl.diagnostics import did_you_mean
from cadence.engine.campaign import CompiledRuleset
from cadence.engine.decision_state import DecisionState
from cadence.engine.decisions_service import (
    AfterCommit,
    DecisionRequestSpec,
    PreparedDecision,
    RawTransaction,
    commit_prepared,
    get_decision,
    make_decision,
    prepare_commit,
    preview_from,
    record_decision,
    record_decisions,
)
from cadence.engine.learning import LearnerSubscriber
from cadence.errors import IdentityError
from cadence.store.db import begin_write, read_connection

router = APIRouter(prefix="/v1", tags=["decisions"])

log = logging.getLogger("cadence.api.decisions")

MAX_BATCH = 1000

#: How a queued request gets its answer (or exception) back on the event loop.
Settle = Callable[[Any], None]


class TriggerEvent(BaseModel):
    """The event a triggered campaign reacts to."""

    model_config = ConfigDict(extra="forbid")

    event: str = Field(max_length=200)
    properties: dict[str, Any] = Field(default_factory=dict)
    timestamp: datetime | None = None


class DecisionRequest(BaseModel):
    """Decide for one customer.

    A field it does not know is a 422 naming it: a misspelt ``"modes": "commit"`` was answered as
    a preview, recording nothing (an outside check).
    """

    model_config = ConfigDict(extra="forbid")

    customer_id: str = Field(min_length=1, max_length=200, description="user id or anonymous id")
    context: dict[str, Any] = Field(default_factory=dict)
    campaigns: list[str] | None = Field(default=None, description="only consider these campaigns")
    at: datetime | None = Field(default=None, description="decide as of this time (simulation, replay)")
    mode: Literal["preview", "commit"] = "preview"
    event: TriggerEvent | None = None
    fresh: bool | None = Field(
        default=None,
        description="wait until the engine has applied every event accepted before this request "
        "(default: yes when `at` is given)",
    )

    @field_validator("at", mode="before")
    @classmethod
    def _at_is_text(cls, value: Any) -> Any:
        # A number would be read as epoch seconds or milliseconds, by its size: say what is wanted.
        if value is not None and not isinstance(value, str):
            raise ValueError("give an ISO-8601 time with an offset, e.g. 2026-03-05T08:00:00+01:00")
        return value

    @property
    def waits(self) -> bool:
        """Whether this decision waits for the events accepted before it (see ``fresh``)."""
        return self.fresh if self.fresh is not None else self.at is not None


class BatchDecisionRequest(BaseModel):
    """Decide for up to 1,000 customers in one call."""

    model_config = ConfigDict(extra="forbid")

    requests: list[DecisionRequest] = Field(min_length=1, max_length=MAX_BATCH)


#: The range of ``at``: a decision looks 35 days back and days ahead, in local times.
AT_FIRST = datetime(1970, 1, 1, tzinfo=UTC)
AT_END = datetime(9000, 1, 1, tzinfo=UTC)


def _ms(at: datetime | None, app: FastAPI) -> int:
    if at is None:
        return int(app.state.runtime.clock.now_ms())
    if at.tzinfo is None:
        raise HTTPException(422, detail="at: give a time zone offset, e.g. 2026-03-05T08:00:00+01:00")
    return _ranged_ms(at, "at")


def _ranged_ms(when: datetime, field: str) -> int:
    """``when`` (zone-aware) in epoch ms, or a 422 naming ``field`` when it is outside :data:`AT_FIRST`..:data:`AT_END`.

    >>> _ranged_ms(datetime(9999, 12, 31, 23, tzinfo=UTC), "event.timestamp")
    Traceback (most recent call last):
    ...
    fastapi.exceptions.HTTPException: 422: event.timestamp: a time between 1970-01-01 and 8999-12-31 (UTC)
    """
    if not AT_FIRST <= when < AT_END:
        # the send times, quiet hours and calendar days around it must be datetimes too (year 1..9999)
        raise HTTPException(422, detail=f"{field}: a time between 1970-01-01 and 8999-12-31 (UTC)")
    return int(when.timestamp() * 1000)


def _campaigns(item: DecisionRequest, ruleset: CompiledRuleset) -> list[str] | None:
    """``item``'s campaign filter, every name a campaign of ``ruleset`` (a typo would decide nothing, silently).

    >>> from cadence.engine.campaign import GlobalSettings
    >>> rules = CompiledRuleset(hash="h", campaigns={"winback": None}, segments={}, settings=GlobalSettings(),
    ...                         aggregates=frozenset())
    >>> _campaigns(DecisionRequest(customer_id="u", campaigns=["winback"]), rules)
    ['winback']
    >>> _campaigns(DecisionRequest(customer_id="u", campaigns=["winbak", "zzz"]), rules)
    Traceback (most recent call last):
    ...
    fastapi.exceptions.HTTPException: 422: campaigns: no campaign 'winbak' (did you mean 'winback'?), no campaign 'zzz' in the loaded rules
    >>> _campaigns(DecisionRequest(customer_id="u", campaigns=[]), rules)
    Traceback (most recent call last):
    ...
    fastapi.exceptions.HTTPException: 422: campaigns: an empty list selects no campaign (leave it out to consider every campaign)
    """
    wanted = item.campaigns
    if wanted is None:
        return None
    if not wanted:  # it answered "Nothing to send." with no reason
        raise HTTPException(
            422,
            detail="campaigns: an empty list selects no campaign (leave it out to consider every campaign)",
        )
    unknown = [name for name in wanted if name not in ruleset.campaigns]
    if unknown:
        said = []
        for name in unknown:
            hint = did_you_mean(name, ruleset.campaigns)
            said.append(f"no campaign {name!r}" + (f" ({hint})" if hint else ""))
        raise HTTPException(422, detail="campaigns: " + ", ".join(said) + " in the loaded rules")
    return wanted


def _learners(app: FastAPI) -> LearnerSubscriber | None:
    state = app.state
    loop = getattr(state, "engine_loop", None)
    found = getattr(state, "_decision_learners", None)
    if found is not None and found[0] is loop:  # the loop's subscribers are fixed once built
        return found[1]  # type: ignore[no-any-return]
    learners = next(
        (s for s in getattr(loop, "subscribers", ()) or () if isinstance(s, LearnerSubscriber)), None
    )
    state._decision_learners = (loop, learners)
    return learners


def _loaded(app: FastAPI) -> CompiledRuleset | None:
    """The ruleset decisions use: ``app.state.ruleset`` when set, else the rules holder's (None: none loaded)."""
    ruleset = getattr(app.state, "ruleset", None)
    if ruleset is None:
        holder = getattr(app.state.runtime, "extensions", {}).get("rules")
        ruleset = getattr(holder, "current", None)
    return ruleset


def _ruleset(app: FastAPI) -> CompiledRuleset:
    ruleset = _loaded(app)
    if ruleset is None:
        raise HTTPException(
            503, detail="no ruleset is loaded: add rule files and restart (or reload) cadence"
        )
    return ruleset  # type: ignore[no-any-return]


def setup(app: FastAPI) -> None:
    """Give the app its per-process decision-state cache (closed at shutdown) and the fast path."""
    # On PostgreSQL it listens for the customers other processes change (migration notify13_0004), so
    # that a preview of a customer nothing changed for needs no round trip (cadence.engine.decision_state).
    state = app.state.decision_state = DecisionState(app.state.runtime.engine, listen=True)
    # A process with a cold cache sends every commit through the thread path, which reads each
    # customer's profile: under load that is a stall of seconds (session 12), so it is worth seeing.
    Gauge(
        "cadence_decision_cache_entries",
        "Customers whose decision inputs this process has cached",
        registry=app.state.metrics.registry,
    ).set_function(lambda: len(state))
    # PostgreSQL: previews answered without the check (their customer clean since its last check, the
    # listener connected) and the notifications of changed customers heard (cadence.engine.decision_state).
    Gauge(
        "cadence_decision_previews_unchecked",
        "Previews this process answered from clean cached inputs, without a database check",
        registry=app.state.metrics.registry,
    ).set_function(lambda: state.listened)
    Gauge(
        "cadence_decision_change_notifications",
        "Notifications of changed customers this process's decision cache heard",
        registry=app.state.metrics.registry,
    ).set_function(lambda: state.notified)

    def close(app: FastAPI) -> None:
        groups = getattr(app.state, "decision_groups", None)
        if groups is not None:
            groups.close()
        batcher = getattr(app.state, "preview_batcher", None)
        if batcher is not None:
            batcher.close()
        pipeline = getattr(app.state, "commit_pipeline", None)
        if pipeline is not None:
            pipeline.close()
        app.state.decision_state.close()

    app.state.on_shutdown.append(close)
    fast_paths = getattr(app, "fast_paths", None)
    if fast_paths is not None:  # a CadenceAPI: tried before the middleware stack
        handler = DecisionFastPath(app.full_stack, metrics=app.state.metrics)  # type: ignore[attr-defined]
        fast_paths["/v1/decisions"] = handler
        app.post_answers["/v1/decisions"] = handler.answer_preview  # type: ignore[attr-defined]
    else:
        app.add_middleware(DecisionFastPath)


#: Bodies larger than this take the ordinary route (a preview request is a few hundred bytes).
FAST_PATH_MAX_BODY = 64 * 1024


class DecisionFastPath:
    """Answer ``POST /v1/decisions`` without the framework's routing and dependency machinery.

    At a thousand decisions a second the framework's per-request work (route matching,
    dependency solving, response validation) costs as much CPU as the decision. This
    ASGI middleware answers the common case itself: a cached key holding the ``decide``
    scope, a body that validates as :class:`DecisionRequest`, a decision that succeeds.
    It answers exactly what the route would (the same JSON body; the rate limit's 429
    with the same detail and ``Retry-After``). Anything else (an unknown or uncached key,
    a body that does not validate, a fresh decision, which waits for the engine loop in a
    thread, an unknown customer, an ``at`` without offset, and
    for previews any error) is handed to the ordinary route with the body replayed: a
    preview writes nothing, and a commit that failed that way wrote nothing either (its
    transaction rolled back before anything was recorded), so deciding again there
    changes nothing. A commit's other errors propagate as the route's would.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics | None = None) -> None:
        self.app = app
        #: Set when this runs before the middleware stack (a :class:`~cadence.api.app.CadenceAPI` fast
        #: path): the request metrics the stack's timing middleware would have recorded are ours to record.
        self.metrics = metrics
        self._children: dict[int, Any] = {}
        self._route: Any = None

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/decisions" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.metrics is None:
            await self._serve(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        try:
            await self._serve(scope, receive, send, status)
        finally:
            if status[0] != 0:  # 0: handed to the stack, whose timing middleware recorded it
                self._histogram(status[0]).observe(time.perf_counter() - started)

    def _histogram(self, status: int) -> Any:
        """The request-latency histogram's child for this route and ``status`` (looked up once)."""
        child = self._children.get(status)
        if child is None:
            assert self.metrics is not None
            child = self._children[status] = self.metrics.requests.labels("/v1/decisions", str(status))
        return child

    async def _serve(
        self, scope: ASGIScope, receive: Receive, send: Send, status: list[int] | None = None
    ) -> None:
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > FAST_PATH_MAX_BODY or not message.get("more_body", False):
                break
        last = messages[-1]
        answer = None
        if last["type"] == "http.request" and not last.get("more_body", False):
            answer = await self._answer(scope, b"".join(m.get("body", b"") for m in messages))
        if answer is None:
            if status is not None:
                status[0] = 0
            await self.app(scope, _replay(messages, receive), send)
            return
        code, content, headers = answer
        if status is not None:
            status[0] = code
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [
                    (b"content-length", str(len(content)).encode()),
                    (b"content-type", b"application/json"),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})

    async def _answer(
        self, scope: ASGIScope, body: bytes
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        checked = self._checked(scope, body)
        if checked is None:
            return None
        app, principal, item = checked
        if item.mode != "commit":
            return self._preview(app, principal, item)
        admitted = _admit_commit(app, principal, item)
        if not isinstance(admitted, _Admitted):
            return admitted
        try:
            decided = await _groups(app).decide(item, admitted.prepared)
        except (HTTPException, IdentityError):
            # The route answers (and reports) it, charging the rate limit again: give this token back.
            app.state.rate_limiter.acquire(principal.name, cost=-1.0)
            return None
        return 200, orjson.dumps(decided), []

    def answer_preview(
        self, scope: ASGIScope, body: bytes
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        """Answer a preview or commit without an ASGI request (:mod:`cadence.api.httpproto`'s path).

        ``scope`` needs ``app`` and ``headers``. Returns (status, body, extra headers) and
        records the request metrics, or None for anything the ASGI path must answer (a
        declined request: see the class): nothing was charged or recorded then. With
        ``scope["reply"]`` (the protocol's), a commit, and on PostgreSQL a preview of a cached
        customer, is answered later through it (:data:`~cadence.api.httpproto.DEFERRED`): a
        commit once its group's transaction committed, a preview once its batch's check returned.
        """
        started = time.perf_counter()
        checked = self._checked(scope, body)
        if checked is None:
            return None
        reply = scope.get("reply")
        if checked[2].mode == "commit":
            return None if reply is None else self._commit_later(*checked, reply, started)
        if reply is not None and checked[0].state.decision_state.postgres:
            deferred = self._batched(*checked, reply, started)
            if deferred is not None:
                return deferred
        answer = self._preview(*checked)
        if answer is not None and self.metrics is not None:
            self._histogram(answer[0]).observe(time.perf_counter() - started)
        return answer

    def _checked(self, scope: ASGIScope, body: bytes) -> tuple[Any, Principal, DecisionRequest] | None:
        """(app, principal, request) when the key may decide and the body validates; else None."""
        app = scope["app"]
        state = getattr(app.state, "decision_state", None)
        if state is None:
            return None
        key = _scope_key(scope)
        # Refreshed here when stale (every few seconds): otherwise every request arriving while the
        # route's thread reloads the keys would take the slow route.
        principal = app.state.keyring.cached_or_refreshed(key) if key is not None else None
        if principal is None or ("decide" not in principal.scopes and "admin" not in principal.scopes):
            return None
        try:
            item = DecisionRequest.model_validate_json(body)
        except ValidationError:
            return None
        if item.waits:  # the route waits for the engine loop, off the event loop
            return None
        scope["route"] = self._route or self._find_route()  # the request metrics' route label
        return app, principal, item

    def _preview(
        self, app: Any, principal: Principal, item: DecisionRequest
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        """Charge the rate limit and decide the preview ``item``; None (token given back) on any error."""
        limiter = app.state.rate_limiter
        wait = limiter.acquire(principal.name)
        if wait > 0:
            return _limited(principal.name, wait)
        try:
            # A preview reads one statement through the cache and writes nothing: SQLite answers
            # from a local file in microseconds, PostgreSQL in one loopback round trip, and a
            # thread hand-off costs more CPU than either (measured: 0.2 ms a decision).
            decided = _decide_many(app, [item])[0]
        except Exception:  # noqa: BLE001 - the route answers (and reports) it
            limiter.acquire(principal.name, cost=-1.0)  # and charges it again: give this token back
            return None
        return 200, orjson.dumps(decided), []

    def _commit_later(
        self, app: Any, principal: Principal, item: DecisionRequest, reply: Any, started: float
    ) -> Any:
        """Queue a commit for its group (as :meth:`_answer` does) and answer it through ``reply`` once committed.

        On PostgreSQL a commit of a cached customer is recorded by a group on the event loop
        (:meth:`_pipelined`); any other by :class:`DecisionGroups`' threads. Returns
        :data:`~cadence.api.httpproto.DEFERRED`, a 429 answer, or None (nothing charged or written:
        the route answers it) when deciding it on arrival (SQLite) failed.
        """

        def settle(result: Any) -> None:
            if isinstance(result, HTTPException):  # a customer unknown in the transaction: as the route says
                answer = (
                    result.status_code,
                    orjson.dumps({"detail": result.detail}),
                    list(_header_items(result.headers)),
                )
            elif isinstance(result, BaseException):
                log.error("commit for %r failed", item.customer_id, exc_info=result)
                answer = 500, orjson.dumps({"detail": "Internal Server Error"}), []
            else:
                answer = 200, orjson.dumps(result), []
            if self.metrics is not None:
                self._histogram(answer[0]).observe(time.perf_counter() - started)
            try:
                reply(answer)
            except Exception:  # noqa: BLE001 - the connection's failure is its own
                log.exception("answering a commit failed")

        loop = asyncio.get_running_loop()
        pipelined = self._pipelined(app, principal, item, settle, loop)
        if pipelined is not None:
            return pipelined
        admitted = _admit_commit(app, principal, item)
        if not isinstance(admitted, _Admitted):
            return admitted
        _groups(app).submit(item, admitted.prepared, settle, loop)
        return DEFERRED

    @staticmethod
    def _pipelined(
        app: Any, principal: Principal, item: DecisionRequest, settle: Settle, loop: asyncio.AbstractEventLoop
    ) -> Any:
        """Queue a PostgreSQL commit of a cached customer for a group on the event loop (:mod:`cadence.api.commitpipe`).

        Returns :data:`~cadence.api.httpproto.DEFERRED`, a 429 answer, or None when it takes the thread
        path instead (SQLite, a customer not cached, no ruleset, an ``at`` without offset): then
        nothing was charged. A commit the group hands back (its cached entry changed, its group
        failed before committing) is queued for the thread path then, charged once.
        """
        state: DecisionState = app.state.decision_state
        if not state.postgres or not getattr(app.state, "pipeline_commits", True):
            return None
        found = _on_loop(app, "commit_pipeline", CommitPipeline, item)
        if found is None:
            return None
        pipeline, customer, spec = found
        wait = app.state.rate_limiter.acquire(principal.name)
        if wait > 0:
            return _limited(principal.name, wait)
        groups = _groups(app)
        pipeline.submit(customer, spec, settle, functools.partial(groups.submit, item, None, settle, loop))
        return DEFERRED

    def _batched(
        self, app: Any, principal: Principal, item: DecisionRequest, reply: Any, started: float
    ) -> Any:
        """Queue a PostgreSQL preview for a batched check (:mod:`cadence.api.previewbatch`).

        Returns :data:`~cadence.api.httpproto.DEFERRED` (``reply`` gets the answer later), a 429
        answer, or None when the request cannot be batched (its customer is not cached, no
        ruleset, an ``at`` without offset): then nothing was charged and it takes the usual path.
        """
        state: DecisionState = app.state.decision_state
        found = _on_loop(app, "preview_batcher", PreviewBatcher, item)
        if found is None:
            return None
        batcher, customer, spec = found
        limiter = app.state.rate_limiter
        wait = limiter.acquire(principal.name)
        if wait > 0:
            return _limited(principal.name, wait)
        clean = state.listened_inputs(spec.customer_ref, now_ms=spec.now_ms, ruleset=spec.ruleset)
        if clean is not None:  # nothing notified for the customer since checked: no round trip
            try:
                answer = 200, orjson.dumps(preview_from(spec, inputs=clean)), []
            except Exception:  # noqa: BLE001 - the route answers (and reports) it
                limiter.acquire(principal.name, cost=-1.0)
                return None
            if self.metrics is not None:
                self._histogram(200).observe(time.perf_counter() - started)
            return answer

        def finish(rows: dict[int, list[Any]] | None) -> None:
            try:
                answer = self._finish_batched(state, spec, rows)
            except Exception:  # noqa: BLE001 - the route would answer a 500 too; the batch goes on
                log.exception("preview of %r failed", spec.customer_ref)
                answer = 500, orjson.dumps({"detail": "Internal Server Error"}), []
            if self.metrics is not None:
                self._histogram(answer[0]).observe(time.perf_counter() - started)
            try:
                reply(answer)
            except Exception:  # noqa: BLE001 - one connection's failure must not stop the batch
                log.exception("answering a preview failed")

        batcher.submit(customer, spec.now_ms, finish)
        return DEFERRED

    @staticmethod
    def _finish_batched(
        state: DecisionState, spec: DecisionRequestSpec, rows: dict[int, list[Any]] | None
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """The answer of a batched preview: from the batch's rows, else read the usual way (as the route)."""
        inputs = None
        if rows is not None:
            inputs = state.inputs_from(spec.customer_ref, rows, now_ms=spec.now_ms, ruleset=spec.ruleset)
        if inputs is None:  # the entry changed (or the statement failed): read (and reload) as usual
            inputs = state.inputs(spec.customer_ref, now_ms=spec.now_ms, ruleset=spec.ruleset)
        if inputs is None:
            detail = f"customer_id: no customer with user or anonymous id {spec.customer_ref!r}"
            return 404, orjson.dumps({"detail": detail}), []
        return 200, orjson.dumps(preview_from(spec, inputs=inputs)), []

    def _find_route(self) -> Any:
        for route in router.routes:
            if getattr(route, "path", None) == "/v1/decisions" and "POST" in getattr(route, "methods", ()):
                self._route = route
        return self._route


class _Admitted:
    """A commit charged to its key's rate limit, decided already (SQLite) or not (PostgreSQL: None)."""

    __slots__ = ("prepared",)

    def __init__(self, prepared: PreparedDecision | None) -> None:
        self.prepared = prepared


def _on_loop(
    app: Any, attr: str, make: Callable[[DecisionState], LoopConnection], item: DecisionRequest
) -> tuple[Any, int, DecisionRequestSpec] | None:
    """The event loop's path for ``item`` (``app.state.<attr>``, made on first use), its customer and spec.

    None when the request takes the usual path instead: its customer is not cached, no ruleset,
    an ``at`` without offset (nothing charged yet).
    """
    path = getattr(app.state, attr, None)
    if path is None:
        path = make(app.state.decision_state)
        setattr(app.state, attr, path)
    customer = path.customer_of(item.customer_id)
    if customer is None:
        return None
    try:
        return path, customer, _spec(app, item)
    except HTTPException:
        return None


def _admit_commit(
    app: Any, principal: Principal, item: DecisionRequest
) -> _Admitted | tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
    """Charge the rate limit for the commit ``item`` and, on SQLite, decide it now (both entry points).

    A 429 answer when the key is over its limit; None (the token given back: the route charges
    it again) when deciding it failed (no ruleset, an ``at`` without offset, an unknown customer).

    On SQLite a commit is decided here, on the event loop, as a preview is (one read through the
    cache); only the transaction, which may wait for the write lock, goes to a thread, with the
    other commits of this event-loop iteration (one transaction: see :class:`DecisionGroups`). It
    records the decision if its inputs still hold, or decides again. On PostgreSQL a commit is
    decided in its transaction, after its customer's row is locked: deciding first would cost a
    second read per commit, and rows lock one customer only.
    """
    limiter = app.state.rate_limiter
    wait = limiter.acquire(principal.name)
    if wait > 0:
        return _limited(principal.name, wait)
    try:
        return _Admitted(None if app.state.decision_state.postgres else _prepare_one(app, item))
    except (HTTPException, IdentityError):
        limiter.acquire(principal.name, cost=-1.0)
        return None


def _limited(name: str, wait: float) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The rate limit's 429, as the route's key check answers it."""
    detail = {"detail": f"rate limit exceeded for key {name!r}"}
    return 429, orjson.dumps(detail), [(b"retry-after", str(max(1, round(wait + 0.5))).encode())]


def _groups(app: FastAPI) -> DecisionGroups:
    groups: DecisionGroups | None = getattr(app.state, "decision_groups", None)
    if groups is None:
        groups = app.state.decision_groups = DecisionGroups(app)
    return groups


class DecisionGroups:
    """Decide the requests that arrive together in one thread hand-off; commits in one transaction.

    A request that must not run on the event loop (a commit: it may wait for the write lock)
    is queued; a worker thread takes everything queued (up to ``max_group``), decides it and
    answers each request, then takes what arrived meanwhile (on PostgreSQL a backlog starts
    more threads, up to four, so that database round trips overlap). Commits of a
    group are recorded in **one** transaction (*group commit*), and each request is
    answered only after that transaction committed. Within it, each decision reads the
    customer's sends on the transaction's connection, so it counts the sends queued by the
    group's earlier decisions: caps hold exactly as with one transaction per decision (on
    SQLite the transaction holds the write lock; on PostgreSQL each customer's row is locked,
    in customer id order so that two workers' groups wait for each other rather than deadlock).
    A request whose customer is unknown (or whose ``at`` lacks an offset) gets its error
    without spoiling the rest; if the transaction fails otherwise (a deadlock between two
    workers' groups, say), it rolled back and each request is decided again on its own.
    Previews given to it share the thread hand-off and nothing else.
    """

    def __init__(self, app: FastAPI, *, max_group: int = 64, backlog: int = 8) -> None:
        self.app = app
        self.max_group = max_group
        #: More requests than this waiting start another worker thread (PostgreSQL only: its round
        #: trips overlap; SQLite has one writer, and its reads take microseconds).
        self.backlog = backlog
        dialect = getattr(app.state.runtime.engine.dialect, "name", "")
        self.max_threads = 4 if dialect == "postgresql" else 1
        #: SQLite: groups of prepared commits are written on the event loop (see :meth:`_next_on_loop`).
        self.on_loop = dialect == "sqlite"
        #: (request, what gets its result on the event loop, the commit decided already or None)
        self._pending: list[tuple[DecisionRequest, Settle, PreparedDecision | None]] = []
        self._lock = threading.Lock()
        self._threads = 0
        #: How many groups ran, and how many requests they held (the mean group size is their ratio).
        self.groups = 0
        self.requests = 0
        #: DBAPI connections the groups of prepared commits write on, one per running thread (idle ones here).
        self._writers: list[Any] = []
        self._finalizer = weakref.finalize(self, _close_all, self._writers)

    def close(self) -> None:
        """Close the idle writer connections (at shutdown)."""
        with self._lock:
            _close_all(self._writers)

    def _take_writer(self) -> Any:
        with self._lock:
            if self._writers:
                return self._writers.pop()
        proxied = self.app.state.runtime.engine.raw_connection()
        raw = proxied.driver_connection
        proxied.detach()  # ours: the pool neither resets nor hands it out
        return raw

    def _give_back(self, raw: Any) -> None:
        with self._lock:
            self._writers.append(raw)

    async def decide(self, item: DecisionRequest, prepared: PreparedDecision | None = None) -> dict[str, Any]:
        """The decision for ``item``, decided (and, for a commit, committed) in a worker thread.

        With ``prepared`` (a commit already decided, by :func:`prepare_commit`), the thread only
        records it, in the group's transaction, if its inputs still hold (else decides it again there).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.submit(item, prepared, functools.partial(_settle, future), loop)
        return await future

    def submit(
        self,
        item: DecisionRequest,
        prepared: PreparedDecision | None,
        settle: Settle,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Queue ``item`` for a group; ``settle`` gets its answer or exception, on ``loop``, once."""
        with self._lock:
            self._pending.append((item, settle, prepared))
            start = self._threads == 0 or (
                self._threads < self.max_threads and len(self._pending) > self.backlog
            )
            if start:
                self._threads += 1
        if start:
            # At the end of this event-loop iteration: the other requests that arrived with this one
            # are decided first (their tasks run in this iteration) and join the same group.
            loop.call_soon(self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.on_loop:
            self._next_on_loop(loop)
            return
        try:
            loop.run_in_executor(None, self._drain, loop)
        except RuntimeError as exc:  # the executor is shut down (the server is stopping): answer what waits
            with self._lock:
                self._threads -= 1
                waiting, self._pending = self._pending, []
            for _, settle, _ in waiting:
                settle(exc)

    # -- SQLite: groups of prepared commits written on the event loop
    #: While another writer holds SQLite's write lock, the loop tries again after this many seconds,
    #: doubling up to :attr:`lock_retry_max` (a writer's transaction takes a few milliseconds).
    lock_retry = 0.0005
    lock_retry_max = 0.004

    def _next_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write the next group on the event loop, once its writer holds the write lock (SQLite).

        Each SQLite statement lets go of the interpreter lock, and a thread that wants it back
        waits for the busy event loop to give it up: up to a switch interval (5 ms) each time. A
        group written by a thread held the write lock for a dozen of those waits (p50 5-7 ms, p90
        20-30 ms, p99 55-100 ms for a median group of six to eight commits, session 11's trace), and
        the other workers' groups waited for it. Written by the event loop itself, the group holds
        it for its statements. The lock is only ever *tried* here (never waited for: the loop must
        not block): while another writer holds it, the loop tries again a moment later (see
        :attr:`lock_retry`), serving requests meanwhile; the group grows with what arrives. A
        group with anything but prepared commits is run by a thread as before; so is the per-commit
        redo of a failed group. (A thread that took the lock for the loop and handed it over
        deadlocked with any read on the loop that takes the write lock, as SQLAlchemy's
        ``engine.connect()`` does on SQLite: tried and dropped.)
        """
        with self._lock:
            group = self._pending[: self.max_group]
            del self._pending[: self.max_group]
            if not group:
                self._threads -= 1
                return
        if any(prepared is None or item.mode != "commit" for item, _, prepared in group):
            self._in_thread(loop, group)
            return
        self._try_write(loop, group, self.lock_retry)

    def _try_write(self, loop: asyncio.AbstractEventLoop, group: list[Any], retry: float) -> None:
        """Write ``group`` on the loop if the write lock is free now, else try again in ``retry`` seconds."""
        try:
            raw = self._take_writer()
        except Exception as exc:  # noqa: BLE001 - no connection: every waiting request must be answered
            self._settle_all(loop, group, [exc] * len(group))
            return
        try_lock = getattr(raw, "try_lock_for_write", None)
        if try_lock is None:  # not cadence's SQLite connection (no write lock of ours to try)
            self._give_back(raw)
            self._in_thread(loop, group)
        elif try_lock():
            self._write_on_loop(loop, group, raw)
        else:
            self._give_back(raw)
            # The prepared commits that arrived meanwhile join the group when it is retried (up to max_group).
            with self._lock:
                room = self.max_group - len(group)
                joining = 0
                while (
                    joining < min(room, len(self._pending))
                    and self._pending[joining][2] is not None
                    and self._pending[joining][0].mode == "commit"
                ):
                    joining += 1
                if joining:
                    group = group + self._pending[:joining]
                    del self._pending[:joining]
            loop.call_later(retry, self._try_write, loop, group, min(2 * retry, self.lock_retry_max))

    def _in_thread(self, loop: asyncio.AbstractEventLoop, group: list[Any]) -> None:
        """Run ``group`` in a thread, as every group ran before; then the loop takes the next group."""

        def run() -> None:
            loop.call_soon_threadsafe(self._settle_all, loop, group, self._run_group(group))

        try:
            loop.run_in_executor(None, run)
        except RuntimeError as exc:  # the executor is shut down (the server is stopping)
            with self._lock:
                self._threads -= 1
                waiting, self._pending = self._pending, []
            for _, settle, _ in group + waiting:
                settle(exc)

    def _run_group(self, group: list[Any]) -> list[Any]:
        """Run ``group``'s transaction (in a thread) and count it: each answer, or the error for all."""
        self.groups += 1
        self.requests += len(group)
        try:
            return self._run([(item, prepared) for item, _, prepared in group])
        except BaseException as exc:  # noqa: BLE001 - every waiting request must be answered
            return [exc] * len(group)

    def _write_on_loop(self, loop: asyncio.AbstractEventLoop, group: list[Any], raw: Any) -> None:
        """Record the prepared commits of ``group`` in one transaction on ``raw`` (write lock held), on the loop."""
        state: DecisionState = self.app.state.decision_state
        commits = [item for item, _, _ in group]
        ready = {id(item): prepared for item, _, prepared in group}
        self.groups += 1
        self.requests += len(group)
        try:
            results = self._record(raw, commits, ready, state)
        except Exception:  # noqa: BLE001 - rolled back: a thread records each again on its own
            _discard(raw)

            def redo() -> None:
                out = [_outcome(self.app, [item], ready) for item in commits]
                loop.call_soon_threadsafe(self._settle_all, loop, group, out)

            try:
                loop.run_in_executor(None, redo)
            except RuntimeError as exc:  # shutting down
                self._settle_all(loop, group, [exc] * len(group))
            return
        self._give_back(raw)
        self._settle_all(loop, group, results)

    def _settle_all(self, loop: asyncio.AbstractEventLoop, group: list[Any], results: list[Any]) -> None:
        """Answer ``group`` (on the loop), then take the next group at the end of this iteration."""
        for (_, settle, _), result in zip(group, results, strict=True):
            try:
                settle(result)
            except Exception:  # noqa: BLE001 - one request's failure must not stop the others
                log.exception("answering a commit failed")
        loop.call_soon(self._next_on_loop, loop)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        done = False
        try:
            while True:
                with self._lock:
                    group = self._pending[: self.max_group]
                    del self._pending[: self.max_group]
                    if not group:  # checked and counted under the lock ``decide`` queues under
                        self._threads -= 1
                        done = True
                        return
                results = self._run_group(group)
                for (_, settle, _), result in zip(group, results, strict=True):
                    loop.call_soon_threadsafe(settle, result)
        finally:
            if not done:  # the loop closed under us (shutdown): let a later request start a thread
                with self._lock:
                    self._threads -= 1

    def _run(
        self, entries: list[tuple[DecisionRequest, PreparedDecision | None]]
    ) -> list[dict[str, Any] | BaseException]:
        items = [item for item, _ in entries]
        ready = {id(item): prepared for item, prepared in entries if prepared is not None}
        previews = [item for item in items if item.mode != "commit"]
        commits = [item for item in items if item.mode == "commit"]
        done: dict[int, dict[str, Any] | BaseException] = {}
        for item in previews:
            done[id(item)] = _outcome(self.app, [item])
        state: DecisionState | None = getattr(self.app.state, "decision_state", None)
        if commits and state is not None:
            # One transaction on a DBAPI connection of our own (SQLAlchemy's layers cost as much as the
            # writes), customers in id order.
            for item, result in zip(commits, self._write(commits, ready, state), strict=True):
                done[id(item)] = result
        elif len(commits) == 1:
            done[id(commits[0])] = _outcome(self.app, commits, ready)
        elif commits:  # (an app without the decision state: each commit through the engine)
            try:
                for item, result in zip(
                    commits, _decide_many(self.app, commits, errors=True, ready=ready), strict=True
                ):
                    done[id(item)] = result
            except Exception:  # noqa: BLE001 - rolled back: decide each again on its own
                for item in commits:
                    done[id(item)] = _outcome(self.app, [item], ready)
        return [done[id(item)] for item in items]

    def _write(
        self, commits: list[DecisionRequest], ready: dict[int, PreparedDecision], state: DecisionState
    ) -> list[dict[str, Any] | BaseException]:
        """Record commits in one transaction, customers in id order; each answer or error in place.

        A commit in ``ready`` was decided already: it is recorded if its inputs still hold, or
        decided again in the transaction (:func:`commit_prepared`); any other is decided in it
        (on PostgreSQL after its customer's row is locked). Customers are taken in id order (a
        stable sort: one customer's commits keep their order), so two workers' groups lock
        rows in the same order and one waits for the other instead of both deadlocking. If the
        transaction fails (a deadlock, a broken connection), it rolled back, its connection is
        dropped, and each commit is decided and recorded again on its own.
        """
        raw = self._take_writer()
        try:
            out = self._record(raw, commits, ready, state)
        except Exception:  # noqa: BLE001 - rolled back: record each again on its own
            _discard(raw)
            return [_outcome(self.app, [item], ready) for item in commits]
        self._give_back(raw)
        return out

    def _record(
        self,
        raw: Any,
        commits: list[DecisionRequest],
        ready: dict[int, PreparedDecision],
        state: DecisionState,
    ) -> list[dict[str, Any] | BaseException]:
        """:meth:`_write`'s transaction on ``raw``: each answer or error in place; raises if it must roll back."""

        def customer(i: int) -> tuple[bool, int]:
            made = ready.get(id(commits[i]))
            known = made.customer_id if made is not None else state.customer_of(commits[i].customer_id)
            return (known is None, known or 0)

        order = sorted(range(len(commits)), key=customer)
        out: list[dict[str, Any] | BaseException] = [None] * len(commits)  # type: ignore[list-item]
        begin_write(raw)
        tx = RawTransaction(raw, postgres=state.postgres)
        if state.postgres and not ready:  # a few statements for the whole group (see record_decisions)
            specs: list[tuple[int, DecisionRequestSpec]] = []
            for i in order:
                try:
                    specs.append((i, _spec(self.app, commits[i])))
                except HTTPException as exc:  # no ruleset, an ``at`` without offset
                    out[i] = exc
            results = record_decisions(tx, [spec for _, spec in specs], state=state)
            for (i, _), result in zip(specs, results, strict=True):
                out[i] = (
                    HTTPException(404, detail=str(result)) if isinstance(result, IdentityError) else result
                )
            order = []
        for i in order:
            item = commits[i]
            try:
                made = ready.get(id(item))
                if made is not None:
                    out[i] = commit_prepared(tx, made, state=state)
                else:
                    out[i] = record_decision(tx, _spec(self.app, item), state=state)
            except IdentityError as exc:  # unknown, or erased or merged away since it was decided
                out[i] = HTTPException(404, detail=str(exc))
            except HTTPException as exc:  # no ruleset, an ``at`` without offset
                out[i] = exc
        tx.commit()  # then tells the learners about the decisions it recorded
        return out


def _discard(raw: Any) -> None:
    """Roll back and close a writer whose transaction failed (it may be broken: dropped either way)."""
    with contextlib.suppress(Exception):
        raw.rollback()
    with contextlib.suppress(Exception):
        raw.close()


def _close_all(raws: list[Any]) -> None:
    while raws:
        with contextlib.suppress(Exception):  # closing at shutdown; nothing to recover
            raws.pop().close()


def _outcome(
    app: FastAPI, items: list[DecisionRequest], ready: dict[int, PreparedDecision] | None = None
) -> dict[str, Any] | BaseException:
    try:
        return _decide_many(app, items, ready=ready)[0]
    except Exception as exc:  # noqa: BLE001 - handed to the waiting request
        return exc


def _header_items(headers: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    """An exception's extra headers as the protocol writes them.

    >>> _header_items({"Retry-After": "2"}), _header_items(None)
    ([(b'retry-after', b'2')], [])
    """
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]


def _settle(future: asyncio.Future[dict[str, Any]], result: dict[str, Any] | BaseException) -> None:
    if future.done():  # the request went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _scope_key(scope: ASGIScope) -> str | None:
    """The key in the Authorization (Basic or Bearer) or X-API-Key header, as ``presented_key`` reads it.

    None when there is none: the route then looks further (a ``key`` query parameter).

    >>> _scope_key({"headers": [(b"authorization", b"Basic azE6")]})
    'k1'
    >>> _scope_key({"headers": [(b"x-api-key", b"k2")]}), _scope_key({"headers": []})
    ('k2', None)
    """
    fallback = None
    name: bytes
    value: bytes
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            if scheme.lower() == "basic" and rest:
                try:
                    user: str = base64.b64decode(rest).decode().partition(":")[0]
                except (ValueError, UnicodeDecodeError):
                    return None
                return user or None
            if scheme.lower() == "bearer" and rest:
                return rest.strip()
        elif name == b"x-api-key":
            fallback = value.decode("latin-1") or None
    return fallback


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives back ``messages`` already read, then reads on."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _event_of(item: DecisionRequest, now: int) -> dict[str, Any] | None:
    """The trigger event of ``item`` as ``decide()`` reads it; a 422 naming ``event.timestamp`` out of range.

    A timestamp without offset is UTC, as the ingestion API reads event times (events.md), not the
    server's own zone; without a timestamp the event happens at the decision's time.

    >>> item = DecisionRequest(customer_id="u", event={"event": "Cart Abandoned", "timestamp": "2027-03-10T12:00:00"})
    >>> _event_of(item, 0)["ts_ms"] == datetime(2027, 3, 10, 12, tzinfo=UTC).timestamp() * 1000
    True
    """
    if item.event is None:
        return None
    stamp = item.event.timestamp
    if stamp is None:
        ts = now
    else:
        ts = _ranged_ms(stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC), "event.timestamp")
    return {"event": item.event.event, "ts_ms": ts, "properties": item.event.properties}


def _spec(app: FastAPI, item: DecisionRequest) -> DecisionRequestSpec:
    """What ``item`` asks for, with this process's ruleset, learners and channels."""
    now = _ms(item.at, app)
    ruleset = _ruleset(app)
    return DecisionRequestSpec(
        ruleset=ruleset,
        customer_ref=item.customer_id,
        now_ms=now,
        available_channels=app.state.available_channels,
        learners=_learners(app),
        opt_in_channels=getattr(app.state, "opt_in_channels", ()),
        mode=item.mode,
        context=item.context,
        campaigns=_campaigns(item, ruleset),
        event=_event_of(item, now),
    )


def _prepare_one(app: FastAPI, item: DecisionRequest) -> PreparedDecision:
    """Decide the commit ``item`` from what the cache reads now, to be recorded by a transaction later.

    Raises :class:`HTTPException` (no ruleset, ``at`` without offset) or
    :class:`~cadence.errors.IdentityError` (unknown customer); nothing is written.
    """
    state: DecisionState = app.state.decision_state
    return prepare_commit(_spec(app, item), state=state)


@overload
def _decide_many(
    app: FastAPI, items: list[DecisionRequest], *, ready: dict[int, PreparedDecision] | None = None
) -> list[dict[str, Any]]: ...


@overload
def _decide_many(
    app: FastAPI,
    items: list[DecisionRequest],
    *,
    errors: Literal[True],
    ready: dict[int, PreparedDecision] | None = None,
) -> list[dict[str, Any] | BaseException]: ...


def _decide_many(
    app: FastAPI,
    items: list[DecisionRequest],
    *,
    errors: bool = False,
    ready: dict[int, PreparedDecision] | None = None,
) -> list[Any]:
    """Decide for each item: previews read through the cache; any commit writes in one transaction.

    On SQLite the commits are decided first, outside the transaction (the write lock is one
    for the whole database: held while deciding, it serialises every worker's commits on
    the CPU time of ``decide()``); the transaction then re-reads each customer's sends and
    profile and records the decision if they are unchanged, or decides again in it (see
    :func:`~cadence.engine.decisions_service.commit_prepared`), so caps hold as before.
    ``ready`` gives commits decided that way already (on the event loop, any database), by
    ``id()`` of their item.

    An unknown customer is a 404 for a single item, an ``action: "error"`` entry in a batch,
    and with ``errors`` the item's :class:`HTTPException` in place (as is an ``at`` without offset).
    """
    ruleset = _ruleset(app)
    learners = _learners(app)
    channels = app.state.available_channels
    opt_in = getattr(app.state, "opt_in_channels", ())
    state: DecisionState | None = getattr(app.state, "decision_state", None)
    out: list[Any] = []  # answers, and with ``errors`` an item's HTTPException in its place
    engine = app.state.runtime.engine
    writes = any(item.mode == "commit" for item in items)
    after_commit: AfterCommit = []  # tells the learners about the decisions recorded, once committed
    prepared: dict[int, PreparedDecision | HTTPException | IdentityError] = {}
    for index, item in enumerate(items):
        if ready is not None and id(item) in ready:
            prepared[index] = ready[id(item)]
    if writes and state is not None and not state.postgres:
        for index, item in enumerate(items):
            if item.mode != "commit" or index in prepared:
                continue
            try:
                prepared[index] = prepare_commit(_spec(app, item), state=state)
            except (HTTPException, IdentityError) as exc:
                prepared[index] = exc
    with engine.begin() if writes else nullcontext() as conn:
        for index, item in enumerate(items):
            made = prepared.get(index)
            try:
                if isinstance(made, HTTPException | IdentityError):
                    raise made
                now = _ms(item.at, app)
                if made is not None:
                    assert state is not None and conn is not None
                    out.append(commit_prepared(conn, made, state=state, after_commit=after_commit))
                    continue
                out.append(
                    make_decision(
                        conn=conn,
                        ruleset=ruleset,
                        customer_ref=item.customer_id,
                        now_ms=now,
                        available_channels=channels,
                        opt_in_channels=opt_in,
                        learners=learners,
                        mode=item.mode,
                        context=item.context,
                        campaigns=_campaigns(item, ruleset),
                        event=_event_of(item, now),
                        state=state,
                        after_commit=after_commit,
                    )
                )
            except HTTPException as exc:
                if not errors:
                    raise
                out.append(exc)
            except IdentityError as exc:
                if errors:
                    out.append(HTTPException(404, detail=str(exc)))
                    continue
                if len(items) == 1:
                    raise HTTPException(404, detail=str(exc)) from exc
                out.append({"customer_id": item.customer_id, "action": "error", "error": str(exc)})
    for hook in after_commit:  # the transaction committed
        hook()
    return out


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.post("/decisions", response_model=None)
async def decide_one(
    body: DecisionRequest, request: Request, _p: Annotated[Principal, Scope("decide")]
) -> Response:
    """Decide which campaign, channel and time (or nothing) for one customer, with the explanation."""
    if body.waits:
        await caught_up(request.app, hint="retry, or ask with fresh: false")
    state = getattr(request.app.state, "decision_state", None)
    if body.mode == "preview" and state is not None and not state.postgres:
        # A preview on SQLite reads one statement through the cache and writes nothing: decided on
        # the event loop, without a thread hand-off (a commit may wait for locks, PostgreSQL answers
        # over the network).
        return _json(_decide_many(request.app, [body])[0])
    return _json((await run_in_threadpool(_decide_many, request.app, [body]))[0])


@router.post("/decisions/batch", response_model=None)
async def decide_batch(
    body: BatchDecisionRequest, request: Request, _p: Annotated[Principal, Scope("decide")]
) -> Response:
    """Decide for up to 1,000 customers; unknown customers get ``action: "error"`` in place."""
    ruleset = _loaded(request.app)
    for index, item in enumerate(body.requests):
        # a request the whole batch is refused for is named, as pydantic names its own errors
        try:
            _event_of(item, _ms(item.at, request.app))
            if ruleset is not None:
                _campaigns(item, ruleset)
        except HTTPException as exc:
            raise HTTPException(exc.status_code, detail=f"requests.{index}.{exc.detail}") from exc
    if any(item.waits for item in body.requests):
        await caught_up(request.app, hint="retry, or ask with fresh: false")
    return _json({"decisions": await run_in_threadpool(_decide_many, request.app, body.requests)})


@router.get("/decisions/{decision_id}")
async def read_decision(
    decision_id: str, request: Request, _p: Annotated[Principal, Scope("decide")]
) -> dict[str, Any]:
    """A committed decision with its outcome so far (send status, delivered/clicked/... times)."""

    def load() -> dict[str, Any] | None:
        # A customer without a (known) zone was decided in the ruleset's zone: answered in it again.
        ruleset = _loaded(request.app)
        zone = ruleset.settings.default_zone if ruleset is not None else "UTC"
        with read_connection(request.app.state.runtime.engine) as conn:
            return get_decision(conn, decision_id=decision_id, fallback_zone=zone)

    found = await run_in_threadpool(load)
    if found is None:
        raise HTTPException(404, detail=f"no committed decision {decision_id!r}")
    return found
