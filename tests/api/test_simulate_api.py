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
from cadence.engine.learning import LearnerSubscriber
from cadence.sim.api import ApiPolicy, in_process_api, run_via_api
from cadence.sim.population import make_population
from cadence.sim.report import START
from cadence.sim.world import CustomerState


class Recorder(ApiPolicy):
    """Keeps what the server answered and what the world reported, to check them afterwards."""

    def __init__(self, inner: ApiPolicy, *, quitter: int) -> None:
        super().__init__(inner.client, headers=inner.headers, sync=inner.sync)
        self.quitter = quitter
        self.sent: list[tuple[int, str, int, int]] = []  # customer, channel, decided at, send at
        self.unsubscribed: dict[tuple[int, str], int] = {}
        self.clicked: list[str] = []

    def decide(self, state: CustomerState, now_ms: int) -> tuple[str, int] | None:
        choice = super().decide(state, now_ms)
        if choice is not None:
            self.sent.append((state.customer.id, choice[0], now_ms, choice[1]))
            if state.customer.id == self.quitter and not any(
                c == self.quitter for c, _ch in self.unsubscribed
            ):
                # this customer unsubscribes from the first channel they get (a sure case to check)
                self.feedback(state, choice[0], Feedback.UNSUBSCRIBED, choice[1], choice[1] + 60_000)
        return choice

    def feedback(self, state: CustomerState, channel: str, kind: Feedback, sent_ms: int, ts_ms: int) -> None:
        super().feedback(state, channel, kind, sent_ms, ts_ms)
        if kind is Feedback.UNSUBSCRIBED:
            self.unsubscribed.setdefault((state.customer.id, channel), ts_ms)
        if kind is Feedback.CLICKED:
            self.clicked.append(self.decision_of[(state.customer.id, sent_ms)])


def test_simulated_customers_through_the_api_keep_the_rules_and_teach_the_learners(db_engine: Engine) -> None:
    population = make_population("balanced", 40, 3)
    customers = {c.id: c for c in population}
    url = db_engine.url.render_as_string(hide_password=False)
    with in_process_api(url) as api:
        quitter = next(c.id for c in population if len(c.available) == 3)
        policy = Recorder(api, quitter=quitter)
        result = run_via_api(policy, population, days=5, seed=3, start=START)
        assert result.decisions == 40 * 5 and result.sends > 60 and result.clicks > 0

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
        loop = api.client.app.state.engine_loop  # type: ignore[attr-defined]
        learners = next(s for s in loop.subscribers if isinstance(s, LearnerSubscriber))
        assert learners.learner.labels > result.sends // 3
