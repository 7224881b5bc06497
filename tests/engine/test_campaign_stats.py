"""The campaigns page's counts: messages sent are known from sent or delivered reports, or from the dispatcher (both databases)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from cadence.api.ui_pages import campaigns_page
from cadence.clock import FixedClock
from cadence.connectors.delivery import Dispatcher
from cadence.connectors.outbox import Outbox
from cadence.engine.campaign_stats import campaign_stats
from cadence.engine.loop import EngineLoop
from cadence.engine.sendqueue import enqueue_send
from cadence.runtime import Runtime
from tests.connectors.test_dispatcher import seed
from tests.engine.test_loop import ingest

DAY = date(2026, 10, 20)
DAY_NO = (DAY - date(1970, 1, 1)).days


def feedback(n: int, event: str, campaign: str, channel: str, hour: int = 10) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": f"u{n % 5}",
        "event": event,
        "messageId": f"m{n}",
        "timestamp": f"{DAY.isoformat()}T{hour:02d}:00:00Z",
        "properties": {"campaign": campaign, "channel": channel, "decision_id": f"d{n}"},
    }


def test_sent_is_known_from_deliveries_when_no_sent_report_came(runtime: Runtime) -> None:
    """An app that reports deliveries only (as ``simulate --via-api`` does) read "Sent 0" and no open
    or click rate beside thousands of deliveries and clicks (an outside check). A delivered message
    was sent: the larger of the two reports counts, per day, campaign and channel, never their sum."""
    calls = [feedback(n, "Message Delivered", "daily", "push") for n in range(8)]
    calls += [feedback(100 + n, "Push Notification Tapped", "daily", "push") for n in range(2)]
    calls += [feedback(200 + n, "Message Sent", "promo", "email") for n in range(5)]
    calls += [feedback(300 + n, "Email Delivered", "promo", "email") for n in range(4)]
    calls += [feedback(400 + n, "Email Opened", "promo", "email") for n in range(2)]
    # The next day, a provider that reports more sends than deliveries, and one only deliveries.
    calls += [
        {**feedback(500 + n, "Message Sent", "daily", "push"), "timestamp": "2026-10-21T09:00:00Z"}
        for n in range(3)
    ]
    calls += [
        {**feedback(600 + n, "Message Delivered", "daily", "push"), "timestamp": "2026-10-21T09:00:00Z"}
        for n in range(1)
    ]
    ingest(runtime, *calls)
    EngineLoop(runtime).catch_up()
    with runtime.engine.connect() as conn:
        stats = campaign_stats(conn, since_day=DAY_NO, until_day=DAY_NO + 1)
    assert stats.totals[("daily", "push")]["sent"] == 8 + 3  # 8 delivered on day one, 3 sent on day two
    assert stats.totals[("daily", "push")]["delivered"] == 9
    assert stats.totals[("promo", "email")]["sent"] == 5
    assert stats.daily["sent"] == {DAY_NO: 13, DAY_NO + 1: 3}
    assert stats.sent_by_campaign["daily"] == {DAY_NO: 8, DAY_NO + 1: 3}
    page = campaigns_page(runtime, since=DAY, until=date(2026, 10, 21))
    rows = {(r["campaign"], r["channel"]): r for r in page["rows"]}
    assert rows[("daily", "push")]["counts"]["sent"] == 11
    assert rows[("daily", "push")]["click_rate"] == 2 / 11
    assert rows[("promo", "email")]["open_rate"] == 2 / 5
    assert page["channel_totals"]["push"]["sent"] == 11


async def test_messages_the_dispatcher_sent_count_as_sent_with_no_report(runtime: Runtime) -> None:
    """The dry-run outbox (a fresh install's connector) reports no ``Message Sent`` and no delivery:
    its campaigns read "Sent 0" and no rates beside the queue's sent rows. Each message a connector
    took now counts as sent on the day the dispatcher recorded it; a report of the same messages
    does not add to it, a failed send does not count."""
    clock = FixedClock(int(datetime(2026, 10, 20, 9, tzinfo=UTC).timestamp() * 1000))
    ids = seed(runtime.engine, 4)
    with runtime.engine.begin() as conn:
        for c in ids:
            enqueue_send(
                conn, key=f"spring:{c}", campaign="spring", customer_id=c, channel="push", due_ms=0, now_ms=0
            )
        # One more the dispatcher cannot send: no connector offers the channel.
        enqueue_send(conn, key="x", campaign="spring", customer_id=ids[0], channel="fax", due_ms=0, now_ms=0)
    outbox = Outbox(engine=runtime.engine)
    report = await Dispatcher(
        engine=runtime.engine, route=lambda ch, _was=None: outbox if ch == "push" else None, clock=clock
    ).drain()
    assert report.sent == 4
    # The app reports two of them delivered, and a tap.
    ingest(runtime, *(feedback(n, "Message Delivered", "spring", "push") for n in range(2)))
    ingest(runtime, feedback(9, "Push Notification Tapped", "spring", "push"))
    EngineLoop(runtime).catch_up()
    with runtime.engine.connect() as conn:
        stats = campaign_stats(conn, since_day=DAY_NO, until_day=DAY_NO)
    assert stats.totals[("spring", "push")]["sent"] == 4
    assert stats.totals[("spring", "push")]["delivered"] == 2
    assert ("spring", "fax") not in stats.totals
    page = campaigns_page(runtime, since=DAY, until=DAY)
    row = {(r["campaign"], r["channel"]): r for r in page["rows"]}[("spring", "push")]
    assert row["counts"]["sent"] == 4 and row["click_rate"] == 1 / 4
