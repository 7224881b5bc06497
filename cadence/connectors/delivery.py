"""Reliable delivery, shared by every connector: retries, rate limits, circuit breaker, dispatcher.

The pieces, from the inside out:

- :func:`backoff_delay` - jittered exponential backoff (pure, doctested).
- :class:`TokenBucket` - the client-side rate limit of one connector; a 429 pauses it
  for everyone until the provider's reset time.
- :class:`CircuitBreaker` - after ``failure_threshold`` consecutive transient failures
  the connector is paused for ``reset_seconds``, then one trial batch decides whether
  it resumes.
- :class:`Deliverer` - sends one batch through a connector with all of the above:
  transient failures and 429s are retried (the 429 wait honours ``Retry-After`` and
  SendGrid's ``X-RateLimit-Reset``), permanent 4xx and auth failures are not.
- :class:`Dispatcher` - takes due ``queued`` rows of the ``sends`` table (``FOR UPDATE
  SKIP LOCKED`` on PostgreSQL), re-checks consent with
  :func:`cadence.engine.consent.may_send` and the campaign rules (quiet hours, global caps
  and spacing: :mod:`cadence.connectors.dispatch_rules`) as the customer it now is (merges
  followed), batches them per connector, delivers, and records each outcome: ``sent`` with
  the provider's id, ``failed`` (the dead letter, with the provider's error), ``suppressed``
  (opted out, dropped or capped), or back to ``queued`` with a later ``next_attempt_ms``
  (or, held by quiet hours or spacing, a later ``due_ms``).

Idempotency: a row is claimed (``queued`` -> ``sending``) in one transaction before
any provider call, so two dispatchers never take the same row and a retry or restart
never re-sends a ``sent`` row. A batch in flight when the dispatcher is cancelled is
finished and recorded first (shielded). A row left ``sending`` by a crash is *in
doubt*: once its lease has run out, :meth:`Dispatcher.recover_in_doubt` asks its
connector (:meth:`~cadence.connectors.base.Connector.check_in_doubt`) and re-queues it
when sending again cannot deliver twice (the provider drops a repeated key, or has no
record of it), records it as sent when the provider has it, and otherwise dead-letters
it with ``last_error`` starting ``in_doubt:`` for an operator to check and re-queue.
A provider call that timed out after the request went out
(:class:`~cadence.errors.DeliveryInDoubt`) leaves its rows ``sending`` the same way,
unless the provider drops a repeated key, in which case it is retried.

An erased customer's removals from ad audiences (``audience_removals``, queued by
:func:`cadence.engine.privacy.erase_customer`) go through the same rounds, deliverers and
outcomes: each round also claims the due ones, as messages with a negative ``send_id`` and
the stored ``hashed_identifiers`` (no customer is left to check consent or rules for), in
the same batches as the sends of their connector. One the platform accepted is deleted
(its hashes have served their purpose); a retry goes back to ``queued`` with a later
``next_attempt_ms``; a dead letter stays ``failed`` with the error (``cadence sends
removals``, ``GET /v1/sends/removals``). Removing a customer from an audience twice changes
nothing, so one left ``sending`` past the lease is simply queued again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, case, delete, or_, select, text, update

from cadence.channels import CHANNELS
from cadence.clock import Clock
from cadence.connectors.base import Connector, InDoubt, OutgoingMessage, SendResult
from cadence.connectors.dispatch_rules import Held, RulesCheck, history_horizon_ms
from cadence.engine.campaign import CompiledRuleset
from cadence.engine.campaign_stats import count_dispatched
from cadence.engine.consent import consent_allows
from cadence.engine.events import NewEvent
from cadence.engine.identity import canonical_of
from cadence.engine.ingest import append_events
from cadence.engine.sendqueue import is_replay
from cadence.errors import (
    AuthenticationFailure,
    ConfigError,
    ConnectorError,
    DeliveryInDoubt,
    PermanentFailure,
    RateLimited,
    TransientFailure,
)
from cadence.store.db import read_connection
from cadence.store.schema.connectors import connector_state
from cadence.store.schema.core import consent, customers, identities, profiles
from cadence.store.schema.sends import audience_removals, sends

__all__ = [
    "circuit_states",
    "CircuitBreaker",
    "CircuitOpen",
    "DeliveryPolicy",
    "Deliverer",
    "DispatchReport",
    "Dispatcher",
    "IN_DOUBT_PREFIX",
    "InDoubtReport",
    "in_doubt_error",
    "TokenBucket",
    "backoff_delay",
]

log = logging.getLogger("cadence.delivery")


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): full jitter, capped.

    The upper bound doubles each attempt (``base * 2**attempt``, at most ``cap``) and the
    wait is drawn uniformly below it, so many clients retrying at once spread out.

    >>> rng = random.Random(7)
    >>> waits = [backoff_delay(a, base=0.5, cap=4.0, rng=rng) for a in range(40)]
    >>> all(0 <= w <= min(4.0, 0.5 * 2**a) for a, w in enumerate(waits))
    True
    >>> backoff_delay(3, base=0.5, cap=4.0, rng=random.Random(1)) != backoff_delay(3, base=0.5, cap=4.0)
    True
    """
    bound = min(cap, base * (2**attempt))
    return (rng or random).uniform(0, bound)


@dataclass(frozen=True)
class DeliveryPolicy:
    """How hard to try: read per connector from ``settings.connectors[name]``.

    :param max_attempts: provider calls per batch before a transient failure is final
        for this dispatch round (the row is retried later until ``max_row_attempts``).
    :param max_row_attempts: dispatch rounds a row may take before it is dead-lettered.
    :param backoff_base_seconds: first retry waits up to this long.
    :param backoff_max_seconds: no single wait is longer.
    :param max_inline_wait_seconds: a 429 asking for a longer wait puts the rows back on
        the queue for later instead of holding the dispatcher.
    :param circuit_failure_threshold: consecutive failed batches that open the circuit.
    :param circuit_reset_seconds: how long an open circuit pauses the connector.
    """

    max_attempts: int = 4
    max_row_attempts: int = 8
    backoff_base_seconds: float = 0.2
    backoff_max_seconds: float = 30.0
    max_inline_wait_seconds: float = 30.0
    circuit_failure_threshold: int = 5
    circuit_reset_seconds: float = 30.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, connector: str = "?") -> DeliveryPolicy:
        """The policy for a connector's settings, defaults for what is not given.

        >>> DeliveryPolicy.from_config({"max_attempts": "6", "api_key": "x"}).max_attempts
        6
        """
        defaults = cls()
        known: dict[str, Any] = {}
        for key, value in config.items():
            if key in cls.__dataclass_fields__:
                kind = type(getattr(defaults, key))
                try:
                    known[key] = kind(float(value)) if kind is int else kind(value)
                except (TypeError, ValueError) as exc:
                    variable = f"CADENCE_CONNECTORS__{connector.upper()}__{key.upper()}"
                    raise ConfigError(f"{variable}: expected a number, got {value!r}") from exc
        return cls(**known)


class CircuitOpen(ConnectorError):
    """The connector is paused by its circuit breaker until ``until`` (monotonic seconds)."""

    retryable = True

    def __init__(self, message: str, *, until: float) -> None:
        super().__init__(message)
        self.until = until


class TokenBucket:
    """An async token bucket: ``rate`` requests a second, ``burst`` at once.

    :meth:`pause` holds every caller until a time (a provider's rate-limit reset).
    """

    def __init__(
        self,
        rate: float | None,
        burst: int = 1,
        *,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._now = now
        self._sleep = sleep
        self._tokens = float(self.burst)
        self._stamp = now()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        """Let nobody through for ``seconds`` (extends, never shortens, a pause)."""
        self._paused_until = max(self._paused_until, self._now() + seconds)

    def wait_time(self) -> float:
        """Seconds until the next request may go (0 when it may go now); takes a token if so."""
        now = self._now()
        if now < self._paused_until:
            return self._paused_until - now
        if self.rate is None:
            return 0.0
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    async def acquire(self) -> None:
        """Wait for a token."""
        async with self._lock:
            while (wait := self.wait_time()) > 0:
                await self._sleep(wait)


class CircuitBreaker:
    """Closed -> open after repeated failures -> half-open after a pause -> closed on success.

    >>> t = [0.0]
    >>> cb = CircuitBreaker(failure_threshold=2, reset_seconds=10, now=lambda: t[0])
    >>> cb.record_failure("boom"); cb.state
    'closed'
    >>> cb.record_failure("boom"); cb.state
    'open'
    >>> cb.allow()
    False
    >>> t[0] = 11; cb.allow(), cb.state
    (True, 'half_open')
    >>> cb.allow()  # one trial batch at a time while half-open
    False
    >>> cb.record_success(); cb.state
    'closed'
    """

    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_seconds: float,
        now: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitBreaker], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self._now = now
        self._on_change = on_change
        self.state = "closed"
        self.failures = 0
        self.open_until = 0.0
        self.last_error: str | None = None
        self._trial = False

    def allow(self) -> bool:
        """True when a batch may be sent now.

        When the pause is over the circuit turns half-open and lets exactly one trial
        batch through; the others wait for its outcome.
        """
        if self.state == "open":
            if self._now() < self.open_until:
                return False
            self._set("half_open")
            self._trial = True
            return True
        if self.state == "half_open":
            if self._trial:
                return False
            self._trial = True
        return True

    def record_success(self) -> None:
        """A batch went through: close the circuit."""
        self.failures = 0
        self._trial = False
        if self.state != "closed":
            self._set("closed")

    def record_failure(self, error: str) -> None:
        """A batch failed for a reason the provider may recover from."""
        self.failures += 1
        self.last_error = error
        self._trial = False
        if self.state == "half_open" or self.failures >= self.failure_threshold:
            self.open_until = self._now() + self.reset_seconds
            self._set("open")

    def _set(self, state: str) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(self)


@dataclass
class Deliverer:
    """One connector with its policy, rate limit and circuit breaker."""

    connector: Connector
    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    limiter: TokenBucket | None = None
    breaker: CircuitBreaker | None = None
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
    now: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        caps = self.connector.capabilities
        rate = self.connector.config.get("rate_limit_per_second", caps.rate_limit_per_second)
        if self.limiter is None:
            self.limiter = TokenBucket(
                float(rate) if rate else None,
                int(self.connector.config.get("burst", caps.burst)),
                now=self.now,
                sleep=self.sleep,
            )
        if self.breaker is None:
            self.breaker = CircuitBreaker(
                failure_threshold=self.policy.circuit_failure_threshold,
                reset_seconds=self.policy.circuit_reset_seconds,
                now=self.now,
            )
        self.semaphore = asyncio.Semaphore(int(self.connector.config.get("concurrency", caps.concurrency)))

    @property
    def batch_size(self) -> int:
        """Messages per provider call: the capability, or less if configured."""
        cap = self.connector.capabilities.max_batch_size
        return max(1, min(cap, int(self.connector.config.get("batch_size", cap))))

    async def deliver(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Send ``batch`` with retries; raise the last ConnectorError if it finally failed.

        Raises :class:`CircuitOpen` without calling the provider when the connector is
        paused, and :class:`RateLimited` when the provider asks for a wait longer than
        ``max_inline_wait_seconds`` (the dispatcher re-queues the rows for then).
        """
        assert self.limiter is not None and self.breaker is not None
        async with self.semaphore:
            return await self._deliver(batch)

    async def _deliver(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        assert self.limiter is not None and self.breaker is not None
        attempt = 0
        while True:
            if not self.breaker.allow():
                until = self.breaker.open_until
                if self.breaker.state == "half_open":  # a trial batch is deciding: look again soon
                    until = self.now() + 1.0
                raise CircuitOpen(
                    f"{self.connector.name} is paused after repeated failures: {self.breaker.last_error}",
                    until=until,
                )
            await self.limiter.acquire()
            try:
                results = await self.connector.send(batch)
            except RateLimited as exc:
                wait = min(exc.retry_after, self.policy.backoff_max_seconds * 10)
                # Pause every sender of this connector (not just this batch) until the reset,
                # plus a little jitter so the waiting batches do not all fire at once.
                self.limiter.pause(wait + self.rng.uniform(0, min(1.0, wait / 10 + 0.01)))
                attempt += 1
                if wait > self.policy.max_inline_wait_seconds or attempt >= self.policy.max_attempts:
                    raise
                log.info("%s throttled, waiting %.2fs (attempt %d)", self.connector.name, wait, attempt)
                continue
            except TransientFailure as exc:
                self.breaker.record_failure(str(exc))
                attempt += 1
                if attempt >= self.policy.max_attempts or self.breaker.state == "open":
                    raise
                if isinstance(exc, DeliveryInDoubt) and not self.connector.capabilities.provider_deduplicates:
                    raise  # the provider may have it: sending again could deliver twice
                delay = backoff_delay(
                    attempt - 1,
                    base=self.policy.backoff_base_seconds,
                    cap=self.policy.backoff_max_seconds,
                    rng=self.rng,
                )
                log.info("%s transient failure (%s), retry in %.2fs", self.connector.name, exc, delay)
                await self.sleep(delay)
                continue
            except (AuthenticationFailure, ConfigError) as exc:
                # Bad credentials or a missing setting will not fix themselves: pause the connector at once.
                self.breaker.failures = self.breaker.failure_threshold - 1
                self.breaker.record_failure(str(exc))
                raise
            if len(results) != len(batch):
                raise PermanentFailure(
                    f"{self.connector.name} returned {len(results)} results for {len(batch)} messages"
                )
            self.breaker.record_success()
            return results


@dataclass
class DispatchReport:
    """What one dispatch round did."""

    claimed: int = 0
    sent: int = 0
    failed: int = 0
    suppressed: int = 0
    deferred: int = 0  # back on the queue for later: a retry, or held by quiet hours or spacing
    expired: int = 0  # quiet hours held it until after its campaign's end
    opted_out: int = 0
    in_doubt: int = 0  # left ``sending``: the provider may have them (see DeliveryInDoubt)
    audience_removals: int = 0  # erased customers' audience removals claimed (also in the counts above)

    def add(self, other: DispatchReport) -> None:
        """Accumulate another round's counts."""
        for name in (
            "audience_removals",
            "claimed",
            "sent",
            "failed",
            "suppressed",
            "deferred",
            "expired",
            "opted_out",
            "in_doubt",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class _Outcome:
    send_id: int
    status: str  # sent | failed | queued | sending (in doubt: not recorded, settled after the lease)
    provider_message_id: str | None = None
    error: str | None = None
    next_attempt_ms: int | None = None
    opted_out: bool = False
    refund_attempt: bool = False


RouteFn = Callable[[str, str | None], Connector | None]


#: SQLite: a round's rows marked in one statement each, their new states one JSON array parameter
#: (each statement run under the write lock gives up the interpreter lock, which a busy thread
#: of this process may keep for a switch interval: a statement per row made the lock wait for
#: that many). Each row is found by its key; ``+status`` keeps the planner off the status index,
#: which would join every queued (or sending) row to the whole array.
#: How long a send the rules defer waits when the deferral names no time after now (a rule's
#: bug: quiet hours deferred into the past in the repeated hour of a fall-back night until
#: session 24): it is checked again then. Left due, it was claimed and deferred again by every
#: round, and ``drain`` went round back to back until its budget of rounds ran out.
_HOLD_RECHECK_MS = 60_000

_MARK_FINALS_SQLITE = (
    "UPDATE sends SET status = json_extract(v.value, '$[1]'), last_error = json_extract(v.value, '$[2]'),"
    " due_ms = COALESCE(json_extract(v.value, '$[4]'), sends.due_ms),"
    " updated_ms = ? FROM json_each(?) AS v WHERE sends.id = json_extract(v.value, '$[0]')"
    " AND +sends.status = 'queued'"
)
_MARK_CLAIMED_SQLITE = (
    "UPDATE sends SET status = 'sending', attempts = attempts + 1, connector = json_extract(v.value, '$[1]'),"
    " updated_ms = ? FROM json_each(?) AS v WHERE sends.id = json_extract(v.value, '$[0]')"
    " AND +sends.status = 'queued'"
)
#: A row read outside the lock is marked only at the version read (its ``updated_ms``, the array's 4th item).
_VERSION_GUARD = " AND sends.updated_ms = json_extract(v.value, '$[3]')"
_RECORD_SQLITE = (
    "UPDATE sends SET status = json_extract(v.value, '$.st'), provider_message_id = json_extract(v.value, '$.pmid'),"
    " last_error = json_extract(v.value, '$.err'), next_attempt_ms = json_extract(v.value, '$.nxt'),"
    " attempts = attempts - json_extract(v.value, '$.refund'), updated_ms = ?"
    " FROM json_each(?) AS v WHERE sends.id = json_extract(v.value, '$.sid') AND +sends.status = 'sending'"
    " RETURNING sends.status, sends.campaign, sends.channel"
)


#: The sends the global caps and spacing count for a round's customers ({ids}: a query of their ids):
#: those ``sent`` or ``sending`` (not this round's own, which PostgreSQL's claim marked ``sending``
#: at ``now``), of each customer and, recursively, every customer merged into them (rows queued
#: before merges moved sends to the customer merged into), by the customer they are now (``owner``).
_HISTORY_SQL = (
    "WITH RECURSIVE members(id, owner) AS ("
    " SELECT id, id FROM customers WHERE id IN ({ids})"
    " UNION ALL SELECT c.id, m.owner FROM customers c JOIN members m ON c.merged_into = m.id"
    ") SELECT s.id, m.owner, s.channel, s.due_ms, s.campaign FROM sends s JOIN members m ON s.customer_id = m.id"
    " WHERE s.status IN ('sent', 'sending') AND s.due_ms > %(since)s"
    " AND (s.status = 'sent' OR s.updated_ms <> %(now)s)"
)


def _removal_due(now: int) -> tuple[Any, ...]:
    """The conditions of an audience removal due at ``now``: queued, and no retry pending later."""
    return (
        audience_removals.c.status == "queued",
        or_(audience_removals.c.next_attempt_ms.is_(None), audience_removals.c.next_attempt_ms <= now),
    )


def _first_identity(customer_id: Any) -> Any:
    """The customer's first identity, user ids first, as "kind:value" (a scalar subquery on ``customer_id``).

    Filtering on kind in SQL would let PostgreSQL (without statistics, e.g. right after a large
    push) AND in the whole primary-key range of that kind for every row.
    """
    return (
        select(identities.c.kind + ":" + identities.c.value)
        .where(identities.c.customer_id == customer_id)
        .order_by(
            case((identities.c.kind == "user", 0), else_=1),
            identities.c.first_seen_ms,
            identities.c.value,
        )
        .limit(1)
        .scalar_subquery()
    )


def _has_consent(customer_id: Any) -> Any:
    """Whether the customer has any consent row (an ``EXISTS`` on ``customer_id``)."""
    return select(consent.c.customer_id).where(consent.c.customer_id == customer_id).exists()


class _Changed(Exception):
    """A row claimed from a snapshot changed before the write lock was taken (nothing is marked)."""


def _due(now: int) -> tuple[Any, ...]:
    """The conditions of a send due at ``now``: queued, its time come, and no retry pending later."""
    return (
        sends.c.status == "queued",
        sends.c.due_ms <= now,
        or_(sends.c.next_attempt_ms.is_(None), sends.c.next_attempt_ms <= now),
    )


class Dispatcher:
    """Takes due sends off the queue and delivers them through their connectors.

    :param engine: the database.
    :param route: ``route(channel, connector_name) -> Connector | None``: the connector
        for a row (its own ``connector`` column wins; else the channel's default).
    :param clock: "now" for due times and bookkeeping.
    :param batch_limit: rows claimed per round.
    :param parallel_rounds: rounds in flight at once (claims never take the same row: SKIP
        LOCKED on PostgreSQL, the write lock on SQLite); default 2 on PostgreSQL, 1 on SQLite.
    :param before_round: run (in a thread) before each round: ``cadence serve`` passes the
        engine loop's ``catch_up``, so an opt-out already in the event log is applied to
        consent before any send is claimed.
    :param rules: ``rules() -> CompiledRuleset | None``, the loaded rules, asked once per claim:
        each claimed send is checked against its campaign's quiet hours and the global caps
        and spacing (:mod:`cadence.connectors.dispatch_rules`). Without rules, nothing is.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        route: RouteFn,
        clock: Clock | None = None,
        batch_limit: int = 1000,
        lease_ms: int = 5 * 60 * 1000,
        deliverers: dict[str, Deliverer] | None = None,
        parallel_rounds: int | None = None,
        before_round: Callable[[], object] | None = None,
        rules: Callable[[], CompiledRuleset | None] | None = None,
    ) -> None:
        self.engine = engine
        self.before_round = before_round
        self.rules = rules
        self.route = route
        self.clock = clock or Clock()
        self.batch_limit = batch_limit
        self.lease_ms = lease_ms
        self.deliverers: dict[str, Deliverer] = deliverers if deliverers is not None else {}
        # SQLite serialises writers, so a second round only waits; PostgreSQL overlaps them.
        default_rounds = 2 if engine.dialect.name == "postgresql" else 1
        self.parallel_rounds = max(1, parallel_rounds or default_rounds)
        self._row_attempts: dict[int, int] = {}
        self._channels: set[str] = set(CHANNELS)
        self._claim_lock = asyncio.Lock()
        #: How often :meth:`run` looks for erased customers' audience removals while none is due.
        self.removals_poll_seconds = 5.0
        self._removals_next_look = 0.0  # monotonic seconds

    def deliverer_for(self, connector: Connector) -> Deliverer:
        """The (cached) deliverer of ``connector``, its breaker persisted to ``connector_state``."""
        found = self.deliverers.get(connector.name)
        if found is None or found.connector is not connector:
            policy = DeliveryPolicy.from_config(connector.config, connector=connector.name)
            name = connector.name

            def on_change(cb: CircuitBreaker) -> None:
                self._save_circuit(name, cb)

            breaker = CircuitBreaker(
                failure_threshold=policy.circuit_failure_threshold,
                reset_seconds=policy.circuit_reset_seconds,
                on_change=on_change,
            )
            found = Deliverer(connector, policy, breaker=breaker)
            self.deliverers[connector.name] = found
        return found

    def _save_circuit(self, name: str, breaker: CircuitBreaker) -> None:
        now = self.clock.now_ms()
        until = now + int(max(0.0, breaker.open_until - time.monotonic()) * 1000)
        values = {
            "circuit": breaker.state,
            "failures": breaker.failures,
            "open_until_ms": until if breaker.state == "open" else None,
            "last_error": breaker.last_error,
            "updated_ms": now,
        }
        try:
            with self.engine.begin() as conn:
                done = conn.execute(
                    update(connector_state).where(connector_state.c.connector == name).values(**values)
                ).rowcount
                if not done:
                    conn.execute(connector_state.insert().values(connector=name, **values))
        except Exception:  # noqa: BLE001 - bookkeeping must never stop delivery
            log.exception("could not record the circuit state of %s", name)
        log.warning("connector %s circuit is now %s (%s)", name, breaker.state, breaker.last_error)

    # -- claiming -------------------------------------------------------------------

    def _claim_all(
        self, limit: int, *, every_round: bool
    ) -> tuple[
        list[tuple[Connector, OutgoingMessage]], DispatchReport, list[tuple[Connector, OutgoingMessage]]
    ]:
        """A round's claims, in one thread: the due sends, then the due audience removals.

        A running dispatcher looks for removals at most every ``removals_poll_seconds`` while
        it finds none (``every_round``: :meth:`drain` looks each round). Looking costs a read
        (0.8 ms on SQLite, 3 ms on PostgreSQL, measured) for a table empty but for a few
        seconds after an erasure, which a round every half second would pay for nothing.
        """
        claimed, report = self._claim(limit)
        if not every_round and time.monotonic() < self._removals_next_look:
            return claimed, report, []
        removals = self._claim_removals(limit)
        self._removals_next_look = 0.0 if removals else time.monotonic() + self.removals_poll_seconds
        return claimed, report, removals

    def _claim(self, limit: int) -> tuple[list[tuple[Connector, OutgoingMessage]], DispatchReport]:
        now = self.clock.now_ms()
        if self.engine.dialect.name == "sqlite":
            if not self._any_due(now):
                return [], DispatchReport()
            found = self._claim_sqlite(now, limit)
            if found is not None:
                return found
        with self.engine.begin() as conn:
            postgres = conn.dialect.name == "postgresql"
            rows = (
                self._claim_rows_postgres(conn, now, limit) if postgres else self._due_rows(conn, now, limit)
            )
            if not rows:
                return [], DispatchReport()
            rows = self._canonical(conn, rows)
            check = self._rules_check(conn, rows, now)
            claimed, finals, rerouted, report = self._prepare(rows, self._consents(conn, rows), now, check)
            if postgres:
                # The claim already marked every row ``sending``: settle the ones not sent after
                # all (their attempt is given back), and name the connector where the claim could not.
                if finals:
                    conn.exec_driver_sql(
                        "UPDATE sends SET status = v.st, last_error = v.err, attempts = sends.attempts - 1, "
                        "due_ms = COALESCE(v.due, sends.due_ms), updated_ms = %s "
                        "FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::bigint[]) AS v(id, st, err, due) "
                        "WHERE sends.id = v.id",
                        (
                            now,
                            [f["sid"] for f in finals],
                            [f["st"] for f in finals],
                            [f["err"] for f in finals],
                            [f.get("due") for f in finals],
                        ),
                    )
                if rerouted:
                    conn.exec_driver_sql(
                        "UPDATE sends SET connector = v.conn FROM unnest(%s::bigint[], %s::text[]) AS v(id, conn) "
                        "WHERE sends.id = v.id",
                        ([i for i, _ in rerouted], [c for _, c in rerouted]),
                    )
                return claimed, report
            self._mark_sqlite(conn, now, claimed, finals, versions=None)
        return claimed, report

    def _claim_sqlite(
        self, now: int, limit: int
    ) -> tuple[list[tuple[Connector, OutgoingMessage]], DispatchReport] | None:
        """SQLite: read and prepare the due rows in a snapshot, then mark them under the write lock.

        The write transaction is two statements (the rows' new states as one JSON parameter),
        each marking a row only if it is still ``queued`` with the ``updated_ms`` read. Before,
        the whole claim (the rows read with their traits, identities and consent, the messages
        built, a statement per row) held the write lock, in a thread that gives up the
        interpreter lock at every row it reads or writes: with a push deciding in the same
        process each such hand-off could wait a switch interval, and every decision commit
        of every worker waited behind it. None when a row changed between the read and the
        lock (nothing was marked): the caller claims under the lock as before.
        """
        with read_connection(self.engine) as conn:
            rows = self._due_rows(conn, now, limit)
            if not rows:
                return [], DispatchReport()
            rows = self._canonical(conn, rows)
            consents = self._consents(conn, rows)
            check = self._rules_check(conn, rows, now)
        claimed, finals, _rerouted, report = self._prepare(rows, consents, now, check)
        versions = {r["id"]: r["updated_ms"] for r in rows}
        try:
            with self.engine.begin() as conn:
                self._mark_sqlite(conn, now, claimed, finals, versions=versions)
        except _Changed:
            for _connector, message in claimed:
                self._row_attempts.pop(message.send_id, None)
            return None
        return claimed, report

    @staticmethod
    def _consents(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, bool]]:
        """Everyone's consent rows in one query (a query per row would dominate a large push)."""
        with_consent_rows = sorted({r["customer_id"] for r in rows if r["_has_consent"]})
        consents: dict[int, dict[str, bool]] = {}
        if with_consent_rows:
            for cid, channel, granted in conn.execute(
                select(consent.c.customer_id, consent.c.channel, consent.c.granted).where(
                    consent.c.customer_id.in_(with_consent_rows)
                )
            ):
                consents.setdefault(cid, {})[channel] = bool(granted)
        return consents

    def _prepare(
        self,
        rows: Sequence[Mapping[str, Any]],
        consents: Mapping[int, dict[str, bool]],
        now: int,
        check: RulesCheck | None = None,
    ) -> tuple[
        list[tuple[Connector, OutgoingMessage]], list[dict[str, Any]], list[tuple[int, str]], DispatchReport
    ]:
        """The claimed rows' messages, the rows settled without a provider call, the rows to re-route."""
        report = DispatchReport(claimed=len(rows))
        traits = {r["customer_id"]: dict(r["_traits"] or {}) for r in rows}
        user_ids = {
            r["customer_id"]: r["_identity"][len("user:") :]
            for r in rows
            if (r["_identity"] or "").startswith("user:")
        }
        with_consent_rows = {r["customer_id"] for r in rows if r["_has_consent"]}
        claimed: list[tuple[Connector, OutgoingMessage]] = []
        finals: list[dict[str, Any]] = []
        rerouted: list[tuple[int, str]] = []  # claimed rows whose connector column is not yet right
        overdue: list[Held] = []  # deferrals to no time after now (see _HOLD_RECHECK_MS)
        for row in rows:
            self._channels.add(row["channel"])
            connector = self.route(row["channel"], row["connector"])
            if connector is None:
                finals.append(_final(row["id"], "failed", f"no connector offers channel {row['channel']!r}"))
                report.failed += 1
                continue
            caps = connector.capabilities
            customer = row["customer_id"]
            # Taking a customer out of an ad audience honours an opt-out (the audience sync queues
            # it for one); suppressed like a message, it left them in the platform's audience.
            removal = (row["variables"] or {}).get("operation") == "remove"
            allowed = (
                consent_allows(
                    consents.get(customer, {}), row["channel"], require_opt_in=caps.consent_required
                )
                if (customer in with_consent_rows or caps.consent_required) and not removal
                else True
            )
            if not allowed:
                finals.append(
                    _final(row["id"], "suppressed", f"customer has no consent for {row['channel']}")
                )
                report.suppressed += 1
                continue
            recipient = traits.get(customer, {})
            missing = [f for f in caps.required_fields if not recipient.get(f)]
            if missing:
                finals.append(
                    _final(row["id"], "failed", f"customer {customer} has no {', '.join(missing)} trait")
                )
                report.failed += 1
                continue
            held: Held | None = None
            # A send decided as of the past (``at``: a simulation, a replay) is not late by the
            # decision's clock: judged by this one, a real night deferred it out of its timeline.
            if check is not None and not is_replay(row["created_ms"], row["queued_ms"]):
                held = check.check(
                    campaign=row["campaign"],
                    channel=row["channel"],
                    customer_id=customer,
                    timezone=row["_timezone"],
                    membership=removal or (row["variables"] or {}).get("operation") == "add",
                )
            if held is not None:
                due = held.due_ms
                if held.status == "queued" and (due is None or due <= now):
                    overdue.append(held)
                    due = now + _HOLD_RECHECK_MS
                finals.append(_final(row["id"], held.status, held.reason, due_ms=due))
                if held.status == "queued":
                    report.deferred += 1
                elif held.status == "expired":
                    report.expired += 1
                else:
                    report.suppressed += 1
                continue
            if row["connector"] != connector.name:
                rerouted.append((row["id"], connector.name))
            self._row_attempts[row["id"]] = row["attempts"] + 1
            claimed.append(
                (
                    connector,
                    OutgoingMessage(
                        send_id=row["id"],
                        idempotency_key=row["idempotency_key"],
                        campaign=row["campaign"],
                        channel=row["channel"],
                        customer_id=customer,
                        decision_id=row["decision_id"],
                        user_id=user_ids.get(customer),
                        template=row["template"],
                        variables=row["variables"] or {},
                        recipient=recipient,
                        send_at_ms=row["due_ms"] if row["due_ms"] > now else None,
                    ),
                )
            )
        if overdue:
            log.warning(
                "%d sends deferred by the rules to no time after now (%s): checked again in %d s",
                len(overdue),
                overdue[0].reason,
                _HOLD_RECHECK_MS // 1000,
            )
        return claimed, finals, rerouted, report

    @staticmethod
    def _mark_sqlite(
        conn: Connection,
        now: int,
        claimed: Sequence[tuple[Connector, OutgoingMessage]],
        finals: Sequence[Mapping[str, Any]],
        *,
        versions: Mapping[int, int] | None,
    ) -> None:
        """SQLite: the claimed rows ``sending`` (with their connector), the others settled; one statement each.

        With ``versions`` (``{send id: updated_ms}`` as read outside the lock), a row is marked
        only if it is still ``queued`` at that version, and :class:`_Changed` is raised (the
        transaction then rolls back) unless every row was.
        """
        guard = _VERSION_GUARD if versions is not None else ""
        marked = 0
        if finals:
            rows = [
                [f["sid"], f["st"], f["err"], (versions or {}).get(f["sid"]), f.get("due")] for f in finals
            ]
            marked += conn.exec_driver_sql(
                _MARK_FINALS_SQLITE + guard, (now, orjson.dumps(rows).decode())
            ).rowcount
        if claimed:
            rows = [[m.send_id, c.name, None, (versions or {}).get(m.send_id)] for c, m in claimed]
            marked += conn.exec_driver_sql(
                _MARK_CLAIMED_SQLITE + guard, (now, orjson.dumps(rows).decode())
            ).rowcount
        if versions is not None and marked != len(finals) + len(claimed):
            raise _Changed

    def _any_due(self, now: int) -> bool:
        """SQLite: whether any ``queued`` row is due, read without the write lock.

        A claim is a write transaction, and an SQLite write transaction holds the database's
        write lock, which every decision commit of every worker waits for; most rounds of an
        idle dispatcher find nothing due, and each such claim held the lock for its reads, in a
        thread that waits for the interpreter lock between them (p50 2-3 ms, up to 17 ms in
        session 12's trace). A row that becomes due after this read is claimed by a later round.
        """
        with read_connection(self.engine) as conn:
            return conn.execute(select(sends.c.id).where(*_due(now)).limit(1)).first() is not None

    def _routes(self) -> str:
        """``{channel: connector}`` for rows that name no connector, as JSON (for the claim statement)."""
        routes = {}
        for channel in sorted(self._channels):
            connector = self.route(channel, None)
            if connector is not None:
                routes[channel] = connector.name
        return orjson.dumps(routes).decode()

    def _claim_rows_postgres(self, conn: Connection, now: int, limit: int) -> list[dict[str, Any]]:
        """Take due rows and mark them ``sending`` in one statement, with what the messages need.

        ``FOR UPDATE SKIP LOCKED`` picks rows no other dispatcher holds; the ``UPDATE``
        marks them ``sending`` (with the connector their channel routes to) and returns
        them, joined to the customer's traits, first identity and whether any consent
        row exists. One round trip per claim, whatever the batch size.
        """
        result = conn.exec_driver_sql(
            "WITH picked AS ("
            " SELECT id FROM sends WHERE status = 'queued' AND due_ms <= %(now)s"
            " AND (next_attempt_ms IS NULL OR next_attempt_ms <= %(now)s)"
            " ORDER BY due_ms, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
            "), claimed AS ("
            " UPDATE sends SET status = 'sending', attempts = sends.attempts + 1, updated_ms = %(now)s,"
            " connector = COALESCE(sends.connector, CAST(%(routes)s AS jsonb) ->> sends.channel)"
            " FROM picked WHERE sends.id = picked.id"
            " RETURNING sends.id, sends.idempotency_key, sends.decision_id, sends.campaign, sends.customer_id,"
            " sends.channel, sends.connector, sends.template, sends.variables, sends.due_ms, sends.attempts - 1,"
            " sends.created_ms, sends.queued_ms"
            ") SELECT c.*, p.traits,"
            " (SELECT i.kind || ':' || i.value FROM identities i WHERE i.customer_id = c.customer_id"
            "  ORDER BY CASE WHEN i.kind = 'user' THEN 0 ELSE 1 END, i.first_seen_ms, i.value LIMIT 1),"
            " EXISTS (SELECT 1 FROM consent k WHERE k.customer_id = c.customer_id),"
            " p.timezone, (SELECT m.merged_into FROM customers m WHERE m.id = c.customer_id)"
            " FROM claimed c LEFT JOIN profiles p ON p.customer_id = c.customer_id",
            {"now": now, "limit": limit, "routes": self._routes()},
        )
        names = (
            "id", "idempotency_key", "decision_id", "campaign", "customer_id", "channel", "connector",
            "template", "variables", "due_ms", "attempts", "created_ms", "queued_ms", "_traits", "_identity",
            "_has_consent",
            "_timezone", "_merged_into",
        )  # fmt: skip
        rows = [dict(zip(names, row, strict=True)) for row in result.fetchall()]
        rows.sort(key=lambda r: (r["due_ms"], r["id"]))
        return rows

    def _due_rows(self, conn: Connection, now: int, limit: int) -> list[Any]:
        """Due ``queued`` rows with the customer's traits, first identity and consent flag (SQLite)."""
        first_identity = _first_identity(sends.c.customer_id)
        has_consent = _has_consent(sends.c.customer_id)
        merged_into = select(customers.c.merged_into).where(customers.c.id == sends.c.customer_id)
        due = (
            select(
                sends,
                profiles.c.traits.label("_traits"),
                first_identity.label("_identity"),
                has_consent.label("_has_consent"),
                profiles.c.timezone.label("_timezone"),
                merged_into.scalar_subquery().label("_merged_into"),
            )
            .select_from(sends.outerjoin(profiles, profiles.c.customer_id == sends.c.customer_id))
            .where(*_due(now))
            .order_by(sends.c.due_ms, sends.c.id)
            .limit(limit)
        )
        return list(conn.execute(due).mappings().all())

    # -- erased customers' audience removals -----------------------------------------

    def _claim_removals(self, limit: int) -> list[tuple[Connector, OutgoingMessage]]:
        """Take due audience removals and mark them ``sending``; a cheap read when none is due.

        Each becomes a message with ``send_id`` the negative of its row id (so the round's
        bookkeeping, keyed by send id, never confuses it with a send) and the identifiers
        stored at erasure. One whose connector is not installed is dead-lettered at once.
        """
        now = self.clock.now_ms()
        with read_connection(self.engine) as conn:
            if (
                conn.execute(select(audience_removals.c.id).where(*_removal_due(now)).limit(1)).first()
                is None
            ):
                return []
        claimed: list[tuple[Connector, OutgoingMessage]] = []
        with self.engine.begin() as conn:
            query = select(audience_removals).where(*_removal_due(now)).order_by(audience_removals.c.id)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            for row in conn.execute(query.limit(limit)).mappings().all():
                connector = self.route(row["channel"], row["connector"])
                values: dict[str, Any] = {"updated_ms": now, "attempts": audience_removals.c.attempts + 1}
                if connector is None:
                    values |= {
                        "status": "failed",
                        "last_error": f"connector {row['connector']!r} is not installed",
                    }
                else:
                    values["status"] = "sending"
                taken = conn.execute(
                    update(audience_removals)
                    .where(audience_removals.c.id == row["id"], audience_removals.c.status == "queued")
                    .values(**values)
                ).rowcount
                if not taken or connector is None:
                    continue  # another dispatcher took it first, or it is dead-lettered
                self._row_attempts[-row["id"]] = row["attempts"] + 1
                claimed.append(
                    (
                        connector,
                        OutgoingMessage(
                            send_id=-row["id"],
                            idempotency_key=f"erasure-removal:{row['id']}",
                            campaign=row["campaign"],
                            channel=row["channel"],
                            customer_id=0,
                            variables=row["variables"] or {},
                            hashed_identifiers=row["identifiers"] or {},
                        ),
                    )
                )
        return claimed

    @staticmethod
    def _record_removals(conn: Connection, outcomes: Sequence[_Outcome], now: int) -> None:
        """Delete the removals the platform accepted; put the others back or dead-letter them."""
        accepted = [-o.send_id for o in outcomes if o.status == "sent"]
        if accepted:
            conn.execute(
                delete(audience_removals).where(
                    audience_removals.c.id.in_(accepted), audience_removals.c.status == "sending"
                )
            )
        for o in outcomes:
            if o.status in ("sent", "sending"):  # sending: in doubt, queued again after the lease
                continue
            conn.execute(
                update(audience_removals)
                .where(audience_removals.c.id == -o.send_id, audience_removals.c.status == "sending")
                .values(
                    status=o.status,
                    last_error=o.error,
                    next_attempt_ms=o.next_attempt_ms,
                    attempts=audience_removals.c.attempts - (1 if o.refund_attempt else 0),
                    updated_ms=now,
                )
            )

    def _requeue_stale_removals(self) -> int:
        """Queue again the removals left ``sending`` past the lease (removing twice changes nothing)."""
        now = self.clock.now_ms()
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    update(audience_removals)
                    .where(
                        audience_removals.c.status == "sending",
                        audience_removals.c.updated_ms <= now - self.lease_ms,
                    )
                    .values(
                        status="queued",
                        next_attempt_ms=None,
                        last_error="re-sent after an interrupted delivery: removing from an audience is idempotent",
                        updated_ms=now,
                    )
                ).rowcount
            )

    # -- merged customers and the rules -----------------------------------------------

    @staticmethod
    def _canonical(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
        """The rows, those of a customer since merged into another as the customer it now is.

        A merge folds the customer's profile, identities, consent and sends into the customer it
        was merged into (:mod:`cadence.engine.identity`), and migration ``merge_0001`` moved the
        sends stored before merges did; a row still under a merged-away customer is a safeguard's
        case. It is
        delivered to (and checked against the consent, traits, zone and caps of) the customer it
        now belongs to.
        """
        merged = {r["customer_id"] for r in rows if r["_merged_into"] is not None}
        if not merged:
            return rows
        parents: dict[int, int | None] = {}
        frontier = set(merged)
        while frontier:
            found = conn.execute(
                select(customers.c.id, customers.c.merged_into).where(customers.c.id.in_(sorted(frontier)))
            ).all()
            parents.update({int(cid): parent for cid, parent in found})
            frontier = {int(p) for _c, p in found if p is not None and int(p) not in parents}
        target = {cid: canonical_of(parents, cid) for cid in merged}
        first_identity = _first_identity(customers.c.id)
        has_consent = _has_consent(customers.c.id)
        now_as = {
            int(row[0]): tuple(row)
            for row in conn.execute(
                select(customers.c.id, profiles.c.traits, first_identity, has_consent, profiles.c.timezone)
                .select_from(customers.outerjoin(profiles, profiles.c.customer_id == customers.c.id))
                .where(customers.c.id.in_(sorted(set(target.values()))))
            )
        }
        out: list[Mapping[str, Any]] = []
        for row in rows:
            to = target.get(row["customer_id"])
            if to is None:
                out.append(row)
                continue
            _id, traits, identity, any_consent, zone = now_as.get(to, (to, None, None, False, None))
            out.append(
                {
                    **row,
                    "customer_id": to,
                    "_traits": traits,
                    "_identity": identity,
                    "_has_consent": bool(any_consent),
                    "_timezone": zone,
                    "_merged_into": None,
                }
            )
        return out

    def _ruleset(self) -> CompiledRuleset | None:
        if self.rules is None:
            return None
        try:
            return self.rules()
        except Exception:  # noqa: BLE001 - rules that cannot be read must not stop delivery
            log.exception("could not read the rules: sends are not checked against them this round")
            return None

    def _rules_check(
        self, conn: Connection, rows: Sequence[Mapping[str, Any]], now: int
    ) -> RulesCheck | None:
        """The rules of this round, with the customers' sends the global caps and spacing count.

        Those are the sends of each customer (and of every customer merged into them) that
        went out or are going out (``sent`` or ``sending``, other than this round's own), at
        their due time as decisions count them (a deferral moves it), within the longest cap
        window or spacing.
        """
        ruleset = self._ruleset()
        if ruleset is None:
            return None
        check = RulesCheck(ruleset, now)
        horizon = history_horizon_ms(ruleset)
        if horizon is None:
            return check
        wanted = sorted({int(r["customer_id"]) for r in rows})
        mine = {r["id"] for r in rows}
        postgres = conn.dialect.name == "postgresql"
        # The customers as one parameter (an array, a JSON list): a bound parameter per id cost
        # more to send than the query.
        sql = _HISTORY_SQL.format(
            ids="SELECT unnest(%(ids)s::bigint[])" if postgres else "SELECT value FROM json_each(:ids)"
        )
        if not postgres:
            sql = sql.replace("%(since)s", ":since").replace("%(now)s", ":now")
        ids: Any = wanted if postgres else orjson.dumps(wanted).decode()
        params = {"ids": ids, "since": now - horizon, "now": now}
        result = conn.exec_driver_sql(sql, params) if postgres else conn.execute(text(sql), params)
        for send_id, owner, channel, due, campaign in result:
            if send_id not in mine and not check.is_sync(campaign):
                check.history.setdefault(int(owner), []).append((channel, int(due)))
        return check

    # -- recording ------------------------------------------------------------------

    def _record(self, outcomes: Sequence[_Outcome], messages: Mapping[int, OutgoingMessage]) -> None:
        now = self.clock.now_ms()
        removals = [o for o in outcomes if o.send_id < 0]
        if removals:
            with self.engine.begin() as conn:
                self._record_removals(conn, removals, now)
            for o in removals:
                self._row_attempts.pop(o.send_id, None)
            outcomes = [o for o in outcomes if o.send_id >= 0]
            if not outcomes:
                return
        params = [
            {
                "sid": o.send_id,
                "st": o.status,
                "pmid": o.provider_message_id,
                "err": o.error,
                "nxt": o.next_attempt_ms,
                "refund": 1 if o.refund_attempt else 0,
            }
            for o in outcomes
            # In doubt: left as claimed, so the lease (and Twilio's lookup window) counts from the claim.
            if o.status != "sending"
        ]
        opt_outs = [messages[o.send_id] for o in outcomes if o.opted_out]
        with self.engine.begin() as conn:
            # Driver-level executemany: building thousands of parameter sets through the
            # SQL compiler costs more than the database work.
            if conn.dialect.name == "postgresql":
                # The outcomes as one JSON document: cheaper to build than typed arrays.
                marked = conn.exec_driver_sql(
                    "UPDATE sends SET status = v.st, provider_message_id = v.pmid, last_error = v.err, "
                    "next_attempt_ms = v.nxt, attempts = sends.attempts - v.refund, updated_ms = %s "
                    "FROM jsonb_to_recordset(%s::jsonb) "
                    "AS v(sid bigint, st text, pmid text, err text, nxt bigint, refund int) "
                    "WHERE sends.id = v.sid AND sends.status = 'sending' "
                    "RETURNING sends.status, sends.campaign, sends.channel",
                    (now, orjson.dumps(params).decode()),
                )
            else:
                marked = conn.exec_driver_sql(_RECORD_SQLITE, (now, orjson.dumps(params).decode()))
            sent = [(c, ch) for st, c, ch in marked if st == "sent"]
            if opt_outs:
                append_events(
                    conn, [_opt_out_event(m, now, _anonymous_id(conn, m.customer_id)) for m in opt_outs]
                )
            # The campaigns page's count of messages sent, from the rows this transaction marked;
            # last, so the counters the engine loop also adds to are held until the commit only.
            count_dispatched(conn, now, sent)
        for o in outcomes:
            self._row_attempts.pop(o.send_id, None)

    # -- one round ------------------------------------------------------------------

    async def dispatch_once(self, *, limit: int | None = None) -> DispatchReport:
        """Claim up to ``limit`` due rows, deliver them, record every outcome."""
        return await self._round(limit=limit, catch_up=False)

    async def _round(self, *, limit: int | None, catch_up: bool) -> DispatchReport:
        # One claim at a time: concurrent rounds then fall out of step, so one claims
        # while another waits on the provider and a third records.
        async with self._claim_lock:
            if catch_up and self.before_round is not None:
                await asyncio.to_thread(self.before_round)
            claimed, report, removals = await asyncio.to_thread(
                self._claim_all, limit or self.batch_limit, every_round=not catch_up
            )
        if removals:
            claimed = [*claimed, *removals]
            report.claimed += len(removals)
            report.audience_removals += len(removals)
        if not claimed:
            return report
        # One provider call carries one template: group by connector and template.
        by_connector: dict[tuple[str, str | None], list[OutgoingMessage]] = defaultdict(list)
        connectors: dict[str, Connector] = {}
        for connector, message in claimed:
            by_connector[(connector.name, message.template)].append(message)
            connectors[connector.name] = connector
        jobs = []
        for (name, _template), messages in by_connector.items():
            deliverer = self.deliverer_for(connectors[name])
            size = deliverer.batch_size
            for start in range(0, len(messages), size):
                jobs.append(self._deliver_chunk(deliverer, messages[start : start + size]))
        chunks = await asyncio.gather(*jobs)
        outcomes = [o for chunk in chunks for o in chunk]
        messages_by_id = {m.send_id: m for _, m in claimed}
        await asyncio.to_thread(self._record, outcomes, messages_by_id)
        for o in outcomes:
            if o.status == "sent":
                report.sent += 1
            elif o.status == "failed":
                report.failed += 1
            elif o.status == "sending":
                report.in_doubt += 1
            else:
                report.deferred += 1
            report.opted_out += int(o.opted_out)
        return report

    async def _deliver_chunk(self, deliverer: Deliverer, batch: list[OutgoingMessage]) -> list[_Outcome]:
        now = self.clock.now_ms()
        name = deliverer.connector.name
        try:
            results = await deliverer.deliver(batch)
        except CircuitOpen as exc:
            wait_ms = int(max(0.0, exc.until - deliverer.now()) * 1000) + 1
            return [
                _Outcome(
                    m.send_id, "queued", error=str(exc), next_attempt_ms=now + wait_ms, refund_attempt=True
                )
                for m in batch
            ]
        except RateLimited as exc:
            return [
                _Outcome(
                    m.send_id,
                    "queued",
                    error=_error_text(exc),
                    next_attempt_ms=now + int(exc.retry_after * 1000) + 1,
                    refund_attempt=True,
                )
                for m in batch
            ]
        except DeliveryInDoubt as exc:
            if deliverer.connector.capabilities.provider_deduplicates:
                return self._failed_outcomes(exc, batch, deliverer, now)
            # The provider may have accepted the batch: leave its rows ``sending``, as a crash
            # would, so that once their lease runs out ``recover_in_doubt`` applies the
            # connector's own policy (Twilio's lookup; SendGrid's dead letter for an operator).
            log.warning(
                "%s: batch of %d may have been delivered (%s): left in doubt, settled after the lease",
                name,
                len(batch),
                exc,
            )
            return [_Outcome(m.send_id, "sending", error=_error_text(exc)) for m in batch]
        except ConnectorError as exc:
            return self._failed_outcomes(exc, batch, deliverer, now)
        except ConfigError as exc:  # a setting the connector cannot send without: dead letters that say which
            log.error("%s cannot send: %s", name, exc)
            return [_Outcome(m.send_id, "failed", error=f"ConfigError: {exc}") for m in batch]
        except Exception as exc:  # noqa: BLE001 - a plugin bug must not kill the dispatcher
            log.exception("%s raised an unexpected error", name)
            return [_Outcome(m.send_id, "failed", error=f"connector bug: {exc!r}") for m in batch]
        return self._result_outcomes(batch, results, deliverer, now)

    def _failed_outcomes(
        self, exc: ConnectorError, batch: Sequence[OutgoingMessage], deliverer: Deliverer, now: int
    ) -> list[_Outcome]:
        """A batch the provider refused or could not take: retried later while attempts last."""
        outcomes = []
        for m in batch:
            if exc.retryable and self._attempts_left(m, deliverer.policy):
                delay = backoff_delay(
                    self._row_attempts.get(m.send_id, 1),
                    base=deliverer.policy.backoff_base_seconds * 5,
                    cap=300.0,
                )
                outcomes.append(
                    _Outcome(
                        m.send_id,
                        "queued",
                        error=_error_text(exc),
                        next_attempt_ms=now + int(delay * 1000),
                    )
                )
            else:
                outcomes.append(_Outcome(m.send_id, "failed", error=_error_text(exc)))
        log.warning("%s: batch of %d failed: %s", deliverer.connector.name, len(batch), exc)
        return outcomes

    def _result_outcomes(
        self,
        batch: Sequence[OutgoingMessage],
        results: Sequence[SendResult],
        deliverer: Deliverer,
        now: int,
    ) -> list[_Outcome]:
        """Each message's outcome from the results of an accepted call."""
        outcomes = []
        for message, result in zip(batch, results, strict=True):
            if result.ok:
                outcomes.append(
                    _Outcome(message.send_id, "sent", provider_message_id=result.provider_message_id)
                )
            elif result.retryable and self._attempts_left(message, deliverer.policy):
                outcomes.append(
                    _Outcome(
                        message.send_id,
                        "queued",
                        error=result.error,
                        next_attempt_ms=now + int(deliverer.policy.backoff_base_seconds * 5000),
                    )
                )
            else:
                outcomes.append(
                    _Outcome(
                        message.send_id,
                        "failed",
                        provider_message_id=result.provider_message_id,
                        error=result.error,
                        opted_out=result.opted_out,
                    )
                )
        return outcomes

    def _attempts_left(self, message: OutgoingMessage, policy: DeliveryPolicy) -> bool:
        return self._row_attempts.get(message.send_id, 1) < policy.max_row_attempts

    # -- loops and recovery ---------------------------------------------------------

    async def drain(self, *, max_rounds: int = 1_000_000) -> DispatchReport:
        """Dispatch rounds until nothing due is left (deferred rows wait for their time).

        ``parallel_rounds`` rounds are in flight at once; each worker stops when its
        claim finds nothing due. Every row a round claims leaves it settled or due later
        (a deferral the rules date at or before now waits ``_HOLD_RECHECK_MS``), so the
        rounds end.
        """
        total = DispatchReport()
        budget = [max_rounds]

        async def worker() -> None:
            while budget[0] > 0:
                budget[0] -= 1
                report = await self._round(limit=None, catch_up=False)
                total.add(report)
                if report.claimed == 0:
                    return

        await asyncio.gather(*(worker() for _ in range(self.parallel_rounds)))
        return total

    async def run(self, *, stop: asyncio.Event, poll_seconds: float = 0.5) -> DispatchReport:
        """Dispatch until ``stop`` is set. Rounds in flight when cancelled are finished first.

        ``parallel_rounds`` workers loop over rounds; a worker whose claim took less than a
        full batch (it emptied the queue of due rows) waits ``poll_seconds`` (or until ``stop``)
        before its next round, as one that found nothing does; only a full batch (a backlog)
        goes round again at once. So a send that falls due while the queue is worked down waits
        at most ``poll_seconds``, as one that falls due while it is idle always did, and a stream
        of decisions that queue sends due now (sending commits, at hundreds a second)
        is delivered a few times a second in batches, not by rounds of a handful of rows back to
        back (each round's catch-up, claim and record: the leader's threads and PostgreSQL's
        transactions, taken from the decisions being answered; docs/measurements.md, session 16).
        ``before_round`` runs before each claim.
        """
        total = DispatchReport()
        halt = asyncio.Event()
        idle: set[asyncio.Task[Any]] = set()

        async def worker() -> None:
            me = asyncio.current_task()
            assert me is not None
            while not stop.is_set() and not halt.is_set():
                report = await self._round(limit=None, catch_up=True)
                total.add(report)
                if report.claimed < self.batch_limit:
                    idle.add(me)
                    try:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), poll_seconds)
                    finally:
                        idle.discard(me)

        async def recoverer() -> None:
            # Rows a crashed dispatcher left ``sending`` are settled once their lease runs out.
            while not stop.is_set():
                try:
                    await self.recover_in_doubt()
                except Exception:  # noqa: BLE001 - recovery must not stop delivery
                    log.exception("recovering in-doubt sends failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(1.0, self.lease_ms / 2000))

        recovery = asyncio.ensure_future(recoverer())
        idle.add(recovery)
        tasks = [asyncio.ensure_future(worker()) for _ in range(self.parallel_rounds)]
        tasks.append(recovery)
        try:
            for outcome in await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True)):
                if isinstance(outcome, BaseException):
                    raise outcome
        except asyncio.CancelledError:
            # Let the provider calls already made be recorded, then stop; idle workers go at once.
            halt.set()
            for task in list(idle):
                task.cancel()
            await asyncio.wait(tasks)
            raise
        return total

    async def recover_in_doubt(self) -> InDoubtReport:
        """Settle rows left ``sending`` longer than the lease (a crashed dispatcher's batch).

        Each such row is *in doubt*: the provider may or may not have it. Its connector's
        :meth:`~cadence.connectors.base.Connector.check_in_doubt` decides: ``resend`` puts
        it back on the queue (the provider drops a repeated key, or has no record of it),
        ``sent`` records it as sent with the provider's id, ``unknown`` dead-letters it
        with ``last_error`` starting ``in_doubt:`` for an operator (``cadence sends
        in-doubt``, ``cadence sends requeue``). Rows are leased first, so two
        dispatchers never settle the same row.
        """
        report = InDoubtReport()
        report.requeued += await asyncio.to_thread(self._requeue_stale_removals)
        leased, stamp = await asyncio.to_thread(self._lease_stale)
        if not leased:
            return report
        groups: dict[str | None, list[tuple[int, OutgoingMessage]]] = defaultdict(list)
        for claimed_ms, message, connector_name in leased:
            groups[connector_name].append((claimed_ms, message))
        verdicts: list[tuple[int, InDoubt]] = []
        for connector_name, items in groups.items():
            channel = items[0][1].channel
            connector = self.route(channel, connector_name)
            if connector is None:
                reason = f"connector {connector_name!r} is not installed"
                verdicts += [(m.send_id, InDoubt("unknown", reason)) for _, m in items]
                continue
            claimed_ms = min(c for c, _ in items)
            messages = [m for _, m in items]
            try:
                found = await connector.check_in_doubt(messages, claimed_ms=claimed_ms)
                if len(found) != len(messages):
                    raise ValueError(f"{len(found)} verdicts for {len(messages)} sends")
            except Exception as exc:  # noqa: BLE001 - a failed check must leave the rows for an operator
                log.exception("%s: checking in-doubt sends failed", connector.name)
                found = [InDoubt("unknown", f"check failed: {exc!r}")] * len(messages)
            verdicts += [(m.send_id, v) for m, v in zip(messages, found, strict=True)]
        await asyncio.to_thread(self._settle_in_doubt, verdicts, stamp)
        for _, verdict in verdicts:
            if verdict.verdict == "resend":
                report.requeued += 1
            elif verdict.verdict == "sent":
                report.confirmed_sent += 1
            else:
                report.dead_lettered += 1
        if verdicts:
            log.warning(
                "in-doubt sends after an interrupted delivery: %d re-queued, %d confirmed sent, %d dead-lettered",
                report.requeued,
                report.confirmed_sent,
                report.dead_lettered,
            )
        return report

    def _lease_stale(self) -> tuple[list[tuple[int, OutgoingMessage, str | None]], int]:
        """Take the rows ``sending`` for longer than the lease: stamp them so nobody else does."""
        now = self.clock.now_ms()
        cutoff = now - self.lease_ms
        stamp = now
        with self.engine.begin() as conn:
            query = (
                select(sends, profiles.c.traits.label("_traits"))
                .select_from(sends.outerjoin(profiles, profiles.c.customer_id == sends.c.customer_id))
                .where(sends.c.status == "sending", sends.c.updated_ms <= cutoff)
                .order_by(sends.c.id)
                .limit(self.batch_limit)
            )
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True, of=sends)
            rows = conn.execute(query).mappings().all()
            leased = []
            for row in rows:
                taken = conn.execute(
                    update(sends)
                    .where(sends.c.id == row["id"], sends.c.status == "sending", sends.c.updated_ms <= cutoff)
                    .values(updated_ms=stamp)
                ).rowcount
                if not taken:
                    continue
                traits = dict(row["_traits"] or {})
                message = OutgoingMessage(
                    send_id=row["id"],
                    idempotency_key=row["idempotency_key"],
                    campaign=row["campaign"],
                    channel=row["channel"],
                    customer_id=row["customer_id"],
                    decision_id=row["decision_id"],
                    template=row["template"],
                    variables=row["variables"] or {},
                    recipient=traits,
                )
                leased.append((int(row["updated_ms"]), message, row["connector"]))
        return leased, stamp

    def _settle_in_doubt(self, verdicts: Sequence[tuple[int, InDoubt]], stamp: int) -> None:
        now = self.clock.now_ms()
        with self.engine.begin() as conn:
            for send_id, verdict in verdicts:
                values: dict[str, Any]
                if verdict.verdict == "resend":
                    values = {
                        "status": "queued",
                        "next_attempt_ms": None,
                        "last_error": f"re-sent after an interrupted delivery: {verdict.reason}",
                    }
                elif verdict.verdict == "sent":
                    values = {
                        "status": "sent",
                        "provider_message_id": verdict.provider_message_id,
                        "last_error": None,
                    }
                else:
                    values = {"status": "failed", "last_error": in_doubt_error(verdict.reason)}
                marked = conn.execute(
                    update(sends)
                    .where(sends.c.id == send_id, sends.c.status == "sending", sends.c.updated_ms == stamp)
                    .values(updated_ms=now, **values)
                    .returning(sends.c.campaign, sends.c.channel)
                ).all()
                if values["status"] == "sent":
                    count_dispatched(conn, now, [(c, ch) for c, ch in marked])


#: ``last_error`` of a send dead-lettered because it was in doubt after a crash starts with this.
IN_DOUBT_PREFIX = "in_doubt:"


def in_doubt_error(reason: str) -> str:
    """The dead-letter text of an in-doubt send.

    >>> in_doubt_error("sendgrid has no idempotency key and no lookup")[:60]
    'in_doubt: interrupted during delivery and not re-sent, to av'
    """
    return (
        f"{IN_DOUBT_PREFIX} interrupted during delivery and not re-sent, to avoid a duplicate ({reason}). "
        "Check the provider's activity log, then `cadence sends requeue ID` to send it."
    )


@dataclass
class InDoubtReport:
    """What :meth:`Dispatcher.recover_in_doubt` did."""

    requeued: int = 0
    confirmed_sent: int = 0
    dead_lettered: int = 0


def _final(send_id: int, status: str, error: str, *, due_ms: int | None = None) -> dict[str, Any]:
    return {"sid": send_id, "st": status, "err": error, "due": due_ms}


def _error_text(exc: ConnectorError) -> str:
    detail = exc.provider_error
    if detail is None:
        return f"{type(exc).__name__}: {exc}"
    try:
        rendered = orjson.dumps(detail).decode()
    except TypeError:
        rendered = str(detail)
    return f"{type(exc).__name__}: {exc} | provider: {rendered[:2000]}"


def _anonymous_id(conn: Connection, customer_id: int) -> str | None:
    """The customer's first anonymous id (for events about a customer without a user id)."""
    found: str | None = conn.scalar(
        select(identities.c.value)
        .where(identities.c.customer_id == customer_id, identities.c.kind == "anonymous")
        .order_by(identities.c.first_seen_ms, identities.c.value)
        .limit(1)
    )
    return found


def _opt_out_event(message: OutgoingMessage, now: int, anonymous_id: str | None) -> NewEvent:
    """The ``Unsubscribed`` event recorded when a provider refuses a send as opted out."""
    properties = {
        "channel": message.channel,
        "campaign": message.campaign,
        "decision_id": message.decision_id,
        "reason": "provider reported the recipient opted out",
    }
    return NewEvent(
        message_id=f"optout:{message.idempotency_key}"[:100],
        type="track",
        event="Unsubscribed",
        user_id=message.user_id,
        anonymous_id=None if message.user_id else anonymous_id,
        ts_ms=now,
        payload={"properties": properties},
        source="connector",
    )


def circuit_states(conn: Connection) -> list[dict[str, Any]]:
    """Every connector's last recorded circuit: ``closed``, ``open`` or ``half_open``.

    A connector appears once its circuit has changed state at least once; one missing
    has always been closed.
    """
    rows = conn.execute(select(connector_state).order_by(connector_state.c.connector)).mappings()
    return [dict(row) for row in rows]
