"""The simulator driving cadence through its HTTP API, on both databases.

What an outside simulator would check: every answer keeps the rules (one message a
local day, nothing in the quiet night, never a channel the customer unsubscribed from
or cannot receive), feedback posted with ``/v1/track`` reaches the decisions and the
learners through the event log, and the run can be repeated.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from cadence.channels import Feedback
from cadence.engine.campaign import DAY_MS
from cadence.engine.learners import DecisionLearner
from cadence.engine.learning import LearnerSubscriber
from cadence.sim.api import ApiPolicy, in_process_api, run_via_api
from cadence.sim.population import make_population
from cadence.sim.report import START
from cadence.sim.world import CustomerState

START_MS = int(datetime(START.year, START.month, START.day, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)


def learners_of(app: object) -> LearnerSubscriber:
    loop = app.state.engine_loop  # type: ignore[attr-defined]
    return next(s for s in loop.subscribers if isinstance(s, LearnerSubscriber))


def knowledge(learner: DecisionLearner) -> tuple[object, ...]:
    """What the learners know: the posterior, the labels, the decisions awaiting labels, each customer,
    and the preferred-hour prior they value a customer with each pending decision's traits by."""
    customers = {k: (c.clicks, list(c.sends), dict(c.channel_clicks)) for k, c in learner.customers.items()}
    buckets = sorted({tuple(p.buckets) for p in learner.pending.values()})
    priors = [learner.hours.prior_parts(b)[0].tolist() for b in buckets]
    return (learner.engagement.mean.tolist(), learner.labels, sorted(learner.pending), customers, priors)


class Recorder(ApiPolicy):
    """Keeps what the server answered and what the world reported, to check them afterwards."""

    def __init__(self, inner: ApiPolicy, *, quitter: int, clicker: int, snapshot_at_ms: int) -> None:
        super().__init__(inner.client, headers=inner.headers, sync=inner.sync)
        self.quitter = quitter
        self.clicker = clicker
        self.snapshot_at_ms: int | None = snapshot_at_ms
        self.sent: list[tuple[int, str, int, int]] = []  # customer, channel, decided at, send at
        self.unsubscribed: dict[tuple[int, str], int] = {}
        self.clicked: list[str] = []

    def decide_many(self, states: list[CustomerState], now_ms: int) -> list[tuple[str, int] | None]:
        if self.snapshot_at_ms is not None and now_ms >= self.snapshot_at_ms:
            # what the server does every 10,000 events: a learner snapshot mid-run
            self.sync()
            app = self.client.app  # type: ignore[attr-defined]
            with app.state.runtime.engine.begin() as conn:
                learners_of(app).snapshot(conn, now_ms=now_ms)
            self.snapshot_at_ms = None
        choices = super().decide_many(states, now_ms)
        for state, choice in zip(states, choices, strict=True):
            self._record(state, now_ms, choice)
        return choices

    def _record(self, state: CustomerState, now_ms: int, choice: tuple[str, int] | None) -> None:
        if choice is not None:
            self.sent.append((state.customer.id, choice[0], now_ms, choice[1]))
            if state.customer.id == self.quitter and not any(
                c == self.quitter for c, _ch in self.unsubscribed
            ):
                # this customer unsubscribes from the first channel they get (a sure case to check)
                self.feedback(state, choice[0], Feedback.UNSUBSCRIBED, choice[1], choice[1] + 60_000)
            if state.customer.id == self.clicker and not self.clicked:
                # and this one clicks its first message unless the world has clicked one already: the
                # world's clicks follow the Thompson draws (seeded by random decision ids), and about
                # one run in 16 makes 80 sends with 0-1 clicks
                self.feedback(state, choice[0], Feedback.CLICKED, choice[1], choice[1] + 60_000)

    def feedback(self, state: CustomerState, channel: str, kind: Feedback, sent_ms: int, ts_ms: int) -> None:
        if kind is Feedback.DELIVERED and state.customer.id % 3 == 0:
            return  # not every provider reports deliveries: these sends get no feedback but clicks
        super().feedback(state, channel, kind, sent_ms, ts_ms)
        if kind is Feedback.UNSUBSCRIBED:
            self.unsubscribed.setdefault((state.customer.id, channel), ts_ms)
        if kind is Feedback.CLICKED:
            self.clicked.append(self.decision_of[(state.customer.id, sent_ms)])


def test_simulated_customers_through_the_api_keep_the_rules_and_teach_the_learners_across_a_restart(
    db_engine: Engine,
) -> None:
    population = make_population("balanced", 40, 3)
    customers = {c.id: c for c in population}
    url = db_engine.url.render_as_string(hide_password=False)
    with in_process_api(url) as api:
        quitter, clicker = [c.id for c in population if len(c.available) == 3][:2]
        policy = Recorder(api, quitter=quitter, clicker=clicker, snapshot_at_ms=int(START_MS + 1.5 * DAY_MS))
        result = run_via_api(policy, population, days=5, seed=3, start=START)
        assert result.decisions == 40 * 5
        # the customers due at one instant were decided in one batch call, feedback sent in batches
        assert policy.requests < result.decisions, policy.requests
        assert result.sends > 60, (result.sends, result.clicks, result.unsubscribes)

        per_local_day = Counter()
        for cid, channel, decided_ms, send_at in policy.sent:
            c = customers[cid]
            local = datetime.fromtimestamp(send_at / 1000, tz=ZoneInfo(c.zone))
            assert 8 <= local.hour < 21, (cid, local)  # quiet 21:00..08:00 in the customer's zone
            assert channel in c.available, (cid, channel)  # consent given with identify
            gone = policy.unsubscribed.get((cid, channel))
            assert gone is None or decided_ms < gone, (cid, channel)  # Unsubscribed withdrew consent
            per_local_day[(cid, local.date())] += 1
        assert max(per_local_day.values()) == 1  # cap 1 per 1d calendar
        (first, *later) = [channel for cid, channel, _d, _s in policy.sent if cid == quitter]
        assert later and first not in later  # the quitter unsubscribed from it after the first message

        # feedback reached the decisions through the event log ...
        clicked = policy.clicked[0]
        read = api.client.get(f"/v1/decisions/{clicked}", headers=api.headers)
        assert read.status_code == 200 and "clicked" in read.json()["outcome"], read.text
        # ... and the learners, which labelled every send whose horizon has passed
        learners = learners_of(api.client.app)  # type: ignore[attr-defined]
        assert learners.learner.labels > result.sends // 3
        before = knowledge(learners.learner)
        # decisions still waiting for their labels, some without any feedback (7 to 105 over runs:
        # the decision ids, random, seed the draws)
        assert len(before[2]) >= 5

    # A restart loads the mid-run snapshot, registers the decisions committed after it again and
    # replays the log: the learners know exactly what they knew.
    with in_process_api(url) as restarted:
        restarted.sync()
        assert knowledge(learners_of(restarted.client.app).learner) == before  # type: ignore[attr-defined]
