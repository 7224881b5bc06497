"""The simulator driving cadence through its API, as an outside client would.

:class:`ApiPolicy` is a simulator policy that knows nothing of cadence's internals:
each customer is announced with ``POST /v1/identify`` (traits, time zone, consent for
the channels they cannot receive), the daily opportunities of the customers due at one
instant are ``POST /v1/decisions/batch`` (1,000 a call) with ``at`` (the simulated time)
and ``mode: "commit"``, and the outcomes are tracked with the generic feedback names
(``Message Delivered``, ``Message Clicked``, ``Unsubscribed``) carrying ``decision_id``
and ``channel``, held back and sent in order with ``POST /v1/batch`` before the next
decisions. The
decisions come from the server's rules (``examples/simulate/daily_pick.cadence`` is
the simulator's campaign as rules) and its learners, which learn from the event log
through the engine loop.

``sync`` is called whenever simulated time has moved and feedback was posted since the
last call: it waits until the engine loop has read everything (in-process,
``engine_loop.catch_up``; against a server, :func:`wait_for_engine` polls
``GET /v1/engine``). A simulated hour is far longer than the loop's lag in production,
so this is the faithful mapping, and it makes runs repeatable.
"""

from __future__ import annotations

import time as wallclock
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx

from cadence.channels import Feedback
from cadence.errors import CadenceError
from cadence.sim.population import SIM_CHANNELS, Customer
from cadence.sim.world import CustomerState, RunResult, run_policy

__all__ = ["SIM_RULES", "ApiPolicy", "in_process_api", "remote_api", "run_via_api", "wait_for_engine"]

#: The simulator's campaign written as rules.
SIM_RULES = Path(__file__).resolve().parents[2] / "examples" / "simulate"

#: Generic feedback names (docs/decisions.md) for what the world reports.
FEEDBACK_NAMES = {
    Feedback.DELIVERED: "Message Delivered",
    Feedback.CLICKED: "Message Clicked",
    Feedback.UNSUBSCRIBED: "Unsubscribed",
}


#: Customers per ``POST /v1/decisions/batch`` (the route's limit) and feedback events per ``POST /v1/batch``.
DECISION_BATCH = 1000
FEEDBACK_BATCH = 500


class SimulationApiError(CadenceError):
    """The server answered a simulator request with an error."""


def _iso(ms: int, zone: str) -> str:
    """``ms`` as ISO-8601 with the customer's offset.

    >>> _iso(1_772_438_400_000, "America/New_York")
    '2026-03-02T03:00:00-05:00'
    """
    return datetime.fromtimestamp(ms / 1000, tz=ZoneInfo(zone)).isoformat()


class ApiPolicy:
    """cadence over HTTP: identify, decide with ``at``, and report feedback with ``/v1/track``."""

    name = "cadence (api)"

    def __init__(
        self,
        client: httpx.Client,
        *,
        headers: Mapping[str, str],
        sync: Callable[[], None],
        campaigns: list[str] | None = None,
        prefix: str = "sim",
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.headers = dict(headers)
        self._sync_server = sync
        self.campaigns = campaigns
        self._feedback: list[dict[str, object]] = []  # tracked at the next decision or sync, in one batch
        self.decision_of: dict[tuple[int, int], str] = {}
        self.requests = 0
        self._pending = False  # feedback posted since the last sync
        self._synced_ms = 0

    def sync(self) -> None:
        """Send the feedback held back, then wait until the server has read everything."""
        self._flush()
        self._sync_server()

    def _flush(self) -> None:
        """Post the feedback reported since the last flush with ``POST /v1/batch`` (in order)."""
        held, self._feedback = self._feedback, []
        for start in range(0, len(held), FEEDBACK_BATCH):
            self._post("/v1/batch", {"batch": held[start : start + FEEDBACK_BATCH]})

    def _user_id(self, customer: Customer) -> str:
        return f"{self.prefix}-{customer.id}"

    def _post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        self.requests += 1
        response = self.client.post(path, json=body, headers=self.headers)
        if response.status_code >= 300:
            raise SimulationApiError(f"POST {path} answered {response.status_code}: {response.text[:500]}")
        return response.json()  # type: ignore[no-any-return]

    def prepare(self, customers: list[Customer], *, at_ms: int) -> None:
        """Identify every customer (traits, time zone, consent) before the first decision."""
        for c in customers:
            traits: dict[str, object] = dict(c.traits)  # the time zone among them
            blocked = [ch for ch in SIM_CHANNELS if ch not in c.available]
            if blocked:
                traits["consent"] = dict.fromkeys(blocked, False)
            self._post(
                "/v1/identify",
                {
                    "userId": self._user_id(c),
                    "traits": traits,
                    "timestamp": _iso(at_ms, "UTC"),
                    "messageId": f"{self._user_id(c)}-identify",
                },
            )
        self.sync()

    def decide(self, state: CustomerState, now_ms: int) -> tuple[str, int] | None:
        """Ask the server what this customer gets now, committing the answer."""
        self._before_deciding(now_ms)
        return self._choice(state, self._post("/v1/decisions", self._request(state, now_ms)))

    def decide_many(self, states: list[CustomerState], now_ms: int) -> list[tuple[str, int] | None]:
        """:meth:`decide` for every customer due at ``now_ms``: ``POST /v1/decisions/batch``, 1,000 a call."""
        self._before_deciding(now_ms)
        out: list[tuple[str, int] | None] = []
        for start in range(0, len(states), DECISION_BATCH):
            chunk = states[start : start + DECISION_BATCH]
            answer = self._post(
                "/v1/decisions/batch", {"requests": [self._request(s, now_ms) for s in chunk]}
            )
            decisions = answer["decisions"]
            assert isinstance(decisions, list)
            out += [self._choice(s, d) for s, d in zip(chunk, decisions, strict=True)]
        return out

    def _before_deciding(self, now_ms: int) -> None:
        """Post the feedback held back; once simulated time has moved past it, wait for the server to read it."""
        self._flush()
        if self._pending and now_ms > self._synced_ms:
            self.sync()
            self._pending = False
            self._synced_ms = now_ms

    def _request(self, state: CustomerState, now_ms: int) -> dict[str, object]:
        c = state.customer
        body: dict[str, object] = {
            "customer_id": self._user_id(c),
            "at": _iso(now_ms, c.zone),
            "mode": "commit",
        }
        if self.campaigns:
            body["campaigns"] = self.campaigns
        return body

    def _choice(self, state: CustomerState, answer: dict[str, object]) -> tuple[str, int] | None:
        """The (channel, send time) of the server's answer for ``state``'s customer, or None."""
        if answer.get("action") == "error":
            raise SimulationApiError(f"deciding for {self._user_id(state.customer)}: {answer.get('error')}")
        if answer.get("action") != "send":
            return None
        channel = str(answer["channel"])
        send_at = int(datetime.fromisoformat(str(answer["send_at"])).timestamp() * 1000)
        self.decision_of[(state.customer.id, send_at)] = str(answer["decision_id"])
        return channel, send_at

    def feedback(self, state: CustomerState, channel: str, kind: Feedback, sent_ms: int, ts_ms: int) -> None:
        """Report what happened as a feedback event naming the decision."""
        name = FEEDBACK_NAMES.get(kind)
        decision_id = self.decision_of.get((state.customer.id, sent_ms))
        if name is None or decision_id is None:
            return
        self._feedback.append(
            {
                "type": "track",
                "userId": self._user_id(state.customer),
                "event": name,
                "properties": {"decision_id": decision_id, "channel": channel},
                "timestamp": _iso(ts_ms, "UTC"),
                "messageId": f"{self.prefix}-{kind}-{decision_id}",
            }
        )
        self._pending = True


def run_via_api(
    policy: ApiPolicy, customers: list[Customer], *, days: int, seed: int, start: date
) -> RunResult:
    """Identify the population, then drive ``policy`` through the simulated days."""
    first = datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp() * 1000 - 86_400_000
    policy.prepare(customers, at_ms=int(first))
    result = run_policy(policy, customers, days=days, seed=seed, start=start)
    policy.sync()  # the run ends when the server has read the last feedback
    return result


def wait_for_engine(client: httpx.Client, headers: Mapping[str, str], *, timeout_s: float = 120.0) -> None:
    """Block until every engine-loop subscriber of a running server has read the whole log."""
    deadline = wallclock.monotonic() + timeout_s
    while True:
        response = client.get("/v1/engine", headers=dict(headers))
        if response.status_code != 200:
            raise SimulationApiError(f"GET /v1/engine answered {response.status_code}: {response.text[:300]}")
        if not response.json().get("lag"):
            return
        if wallclock.monotonic() > deadline:
            raise SimulationApiError(f"the engine loop did not catch up within {timeout_s:.0f} s")
        wallclock.sleep(0.02)


@contextmanager
def remote_api(url: str, key: str, *, prefix: str) -> Iterator[ApiPolicy]:
    """A running cadence server (it must serve the simulator's rules) driven over the network.

    ``key`` needs the ingest, decide and admin scopes; ``prefix`` keeps this run's
    customers apart from earlier runs' in the same database.
    """
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=60.0) as client:
        yield ApiPolicy(client, headers=headers, sync=lambda: wait_for_engine(client, headers), prefix=prefix)


@contextmanager
def in_process_api(database_url: str, *, rules: Path = SIM_RULES) -> Iterator[ApiPolicy]:
    """A fresh cadence app on ``database_url`` with the simulator's rules, driven through HTTP in-process.

    The app runs without background threads; ``sync`` drains the engine loop, so the run
    is repeatable. The database must be empty (or hold an earlier simulation).
    """
    import warnings

    with warnings.catch_warnings():  # starlette >= 1 nudges towards httpx2; httpx is what cadence ships with
        warnings.filterwarnings("ignore", message="Using .httpx. with .starlette.testclient. is deprecated")
        from fastapi.testclient import TestClient

    from cadence.api.app import create_app
    from cadence.keys import create_key
    from cadence.runtime import open_runtime
    from cadence.settings import Settings

    settings = Settings(
        database_url=database_url,
        rules_paths=[rules],
        disable_plugin_autoload=True,
        _env_file=None,  # type: ignore[call-arg]
    )
    runtime = open_runtime(settings, upgrade=True)
    try:
        app = create_app(runtime=runtime, background=False)
        loaded = runtime.extensions["rules"].reload()
        if not loaded.ok:
            raise SimulationApiError(f"the rules in {rules} do not compile: {loaded.diagnostics[0]}")
        key = create_key(runtime.engine, name="simulator", scopes=["ingest", "decide", "admin"])
        with TestClient(app) as client:
            headers = {"Authorization": f"Bearer {key}"}
            yield ApiPolicy(client, headers=headers, sync=app.state.engine_loop.catch_up)
    finally:
        runtime.close()
