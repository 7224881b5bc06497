"""A small demo shop's event stream: sign-ups, visits from ads, campaign feedback and orders.

:func:`demo_events` returns Segment-spec calls (the JSON a ``POST /v1/batch`` carries);
once ingested, the engine loop turns them into profiles, attribution credits and
campaign counts, which is what the dashboard shows. The dashboard's tests use it.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

__all__ = ["demo_events"]

DAY_MS = 86_400_000
CAMPAIGNS = (("welcome", "email"), ("winback", "email"), ("cart_rescue", "sms"), ("newsletter", "push"))
AD_SOURCES = (
    {"source": "google", "medium": "cpc", "name": "brand"},
    {"source": "facebook", "medium": "paid_social", "name": "spring_sale"},
    {"source": "newsletter", "medium": "email", "name": "weekly"},
)
ZONES = ("Europe/Berlin", "America/New_York", "Asia/Tokyo", "UTC")


def demo_events(*, now_ms: int, customers: int = 40, days: int = 14, seed: int = 7) -> list[dict[str, Any]]:
    """Calls of ``customers`` demo customers over the ``days`` before ``now_ms``, oldest first.

    >>> calls = demo_events(now_ms=100 * DAY_MS, customers=5, days=3)
    >>> calls[0]["type"], sorted({c["userId"] for c in calls})
    ('identify', ['demo-0', 'demo-1', 'demo-2', 'demo-3', 'demo-4'])
    >>> calls[0]["timestamp"][:10]  # day 97: three days before day 100
    '1970-04-08'
    """
    rng = random.Random(seed)
    out: list[tuple[int, dict[str, Any]]] = []
    start = now_ms - days * DAY_MS
    for i in range(customers):
        user = f"demo-{i}"
        t = start + rng.randrange(0, DAY_MS)

        def add(
            kind: str, at: int, payload: dict[str, Any], name: str | None = None, user: str = user
        ) -> None:
            at = min(at, now_ms - 1)
            call = {
                "type": kind,
                "messageId": f"demo-{seed}-{len(out)}",
                "userId": user,
                "timestamp": datetime.fromtimestamp(at / 1000, tz=UTC).isoformat(timespec="milliseconds"),
                **payload,
            }
            if name is not None:
                call["event"] = name
            out.append((at, call))

        add(
            "identify",
            t,
            {
                "traits": {
                    "first_name": f"Demo {i}",
                    "email": f"{user}@example.com",
                    "timezone": ZONES[i % len(ZONES)],
                }
            },
        )
        add("track", t + 60_000, {"properties": {}}, "signed_up")
        step = max(1, (days * DAY_MS - DAY_MS) // 6)
        for k in range(rng.randint(1, 4)):
            at = t + (k + 1) * rng.randrange(step // 2, step)
            if rng.random() < 0.5:
                utm = AD_SOURCES[rng.randrange(len(AD_SOURCES))]
                add("page", at, {"properties": {"path": "/"}, "context": {"campaign": utm}})
            else:
                campaign, channel = CAMPAIGNS[rng.randrange(len(CAMPAIGNS))]
                props = {"campaign": campaign, "channel": channel}
                add("track", at, {"properties": props}, "Message Sent")
                add(
                    "track",
                    at + 60_000,
                    {"properties": props},
                    "Email Delivered" if channel == "email" else "Message Delivered",
                )
                if rng.random() < 0.6:
                    add(
                        "track",
                        at + 3_600_000,
                        {"properties": props},
                        "Email Opened" if channel == "email" else "Message Opened",
                    )
                    if rng.random() < 0.5:
                        add("track", at + 3_700_000, {"properties": props}, "Message Clicked")
                if rng.random() < 0.08:
                    add("track", at + 7_200_000, {"properties": props}, "Unsubscribed")
        if rng.random() < 0.45:
            at = t + rng.randrange(DAY_MS, days * DAY_MS - DAY_MS)
            add("track", at, {"properties": {"revenue": round(rng.uniform(20, 200), 2)}}, "Order Completed")
    out.sort(key=lambda pair: pair[0])
    return [call for _at, call in out]
