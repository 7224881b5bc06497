"""A scheduled push counts the sends of customers merged into the one it decides for.

Every test runs on SQLite and PostgreSQL. Ada (a user) and a visitor (an anonymous id) are two
customers until an alias stitches the visitor into Ada; one of them got the capped campaign's
send that morning through the API. The push at 09:00 must count it for the customer Ada is
now, whether the merge came before the push or while it was deciding its chunk.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, select

from cadence.channels import CHANNELS
from cadence.clock import FixedClock
from cadence.engine.decisions_service import make_decision
from cadence.engine.events import parse_call
from cadence.engine.identity import resolve_customer
from cadence.engine.ingest import record_events
from cadence.engine.loop import EngineLoop
from cadence.runtime import Runtime
from cadence.store.schema.core import customers
from tests.scheduler.conftest import MONDAY, Rules, make_scheduler, runs, send_rows
from tests.scheduler.test_push_commits import decide_calls

HOUR = 3_600_000
AT_7 = MONDAY + 6 * HOUR  # 07:00 Berlin
AT_9 = MONDAY + 8 * HOUR

CAPPED = """
campaign daily "Daily digest" {
    audience true
    send template "digest"
    channel email
    cap 1 per 7d
    schedule every day at 09:00 in "Europe/Berlin"
}
"""


def ingest(runtime: Runtime, *calls: dict[str, Any]) -> None:
    record_events(engine=runtime.engine, batch=[parse_call(c, received_ms=MONDAY - HOUR) for c in calls])
    EngineLoop(runtime).catch_up()


def two_customers(runtime: Runtime) -> tuple[int, int]:
    """Ada (a user, the older customer) and a visitor (an anonymous id), not yet linked."""
    ingest(
        runtime,
        {"type": "identify", "userId": "ada", "traits": {"email": "ada@example.com"}, "messageId": "i1"},
    )
    ingest(
        runtime,
        {
            "type": "identify",
            "anonymousId": "visitor",
            "traits": {"email": "v@example.com"},
            "messageId": "i2",
        },
    )
    with runtime.engine.connect() as conn:
        ada, visitor = resolve_customer(conn, "ada"), resolve_customer(conn, "visitor")
    assert ada is not None and visitor is not None and ada < visitor
    return ada, visitor


def commit(runtime: Runtime, rules: Rules, ref: str) -> dict[str, Any]:
    """An API commit for ``ref`` at 07:00 (the cap allows one send a week)."""
    with runtime.engine.begin() as conn:
        return make_decision(
            conn=conn,
            ruleset=rules.current,  # type: ignore[arg-type]
            customer_ref=ref,
            now_ms=AT_7,
            available_channels=CHANNELS,
            learners=None,
            mode="commit",
        )


def alias(runtime: Runtime) -> None:
    ingest(runtime, {"type": "alias", "previousId": "visitor", "userId": "ada", "messageId": "a1"})


def push_at_9(engine: Engine, rules: Rules) -> Any:
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(engine, rules, clock)
    scheduler.tick()  # registers the job
    clock.set(AT_9)
    [report] = scheduler.tick()
    return report


def test_the_visitors_morning_send_caps_the_push_after_they_logged_in(runtime: Runtime) -> None:
    rules = Rules(CAPPED)
    ada, _visitor = two_customers(runtime)
    assert commit(runtime, rules, "visitor")["queued"] is True
    alias(runtime)
    report = push_at_9(runtime.engine, rules)
    assert report.total_enqueued == 0 and report.evaluated == 1
    [only] = send_rows(runtime.engine)
    assert only.customer_id == ada and only.due_ms == AT_7  # the visitor's send, now Ada's
    [run] = runs(runtime.engine)
    assert (run.status, run.evaluated, run.enqueued) == ("done", 1, 0)


def test_a_merge_while_the_push_decides_drops_the_merged_away_customers_send(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The push read the visitor as a customer of their own (no send yet: it decides to send);
    before it writes, the alias merges the visitor into Ada, who got the morning's send. The
    visitor is no customer of their own any more: the push queues nothing for them."""
    rules = Rules(CAPPED)
    ada, visitor = two_customers(runtime)
    assert commit(runtime, rules, "ada")["queued"] is True
    made = decide_calls(monkeypatch, visitor, lambda: alias(runtime))
    report = push_at_9(runtime.engine, rules)
    assert [d.action for d in made] == ["send"]
    with runtime.engine.connect() as conn:
        assert conn.scalar(select(customers.c.merged_into).where(customers.c.id == visitor)) == ada
    [only] = send_rows(runtime.engine)
    assert only.customer_id == ada and only.due_ms == AT_7
    assert report.total_enqueued == 0
