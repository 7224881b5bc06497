"""The attribution subscriber and GET /v1/attribution, on both databases."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.engine.attribution.online import query_attribution
from cadence.engine.events import parse_call
from cadence.engine.ingest import record_events
from cadence.engine.loop import EngineLoop
from cadence.runtime import Runtime

DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def call(n: int, user: str, day: float, **fields: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": f"m{n}",
        "userId": user,
        "timestamp": (T0 + day * DAY) / 1000,
        **fields,
    }


def click(n: int, user: str, day: float, channel: str, campaign: str = "spring") -> dict[str, Any]:
    return call(n, user, day, event="Message Clicked", properties={"channel": channel, "campaign": campaign})


def visit(n: int, user: str, day: float, source: str, medium: str) -> dict[str, Any]:
    return {
        "type": "page",
        "messageId": f"m{n}",
        "userId": user,
        "timestamp": (T0 + day * DAY) / 1000,
        "context": {"campaign": {"source": source, "medium": medium, "name": "brand"}},
    }


def order(n: int, user: str, day: float, revenue: float) -> dict[str, Any]:
    return call(n, user, day, event="Order Completed", properties={"revenue": revenue})


def ingest(runtime: Runtime, *calls: dict[str, Any]) -> None:
    record_events(engine=runtime.engine, batch=[parse_call(c, received_ms=T0) for c in calls])
    EngineLoop(runtime).catch_up()


@pytest.fixture
def journeys(runtime: Runtime) -> Runtime:
    ingest(
        runtime,
        click(1, "a", 0, "email"),
        visit(2, "a", 1, "google", "cpc"),
        order(3, "a", 2, 100.0),
        click(4, "a", 3, "sms"),  # after the conversion: not credited for it
        click(5, "b", 0, "email"),
        click(6, "c", 0, "sms"),
    )
    # A second batch: the open journeys are picked up from the table, not the log.
    ingest(runtime, order(7, "b", 10, 50.0), order(8, "d", 11, 20.0), click(9, "c", 40, "email"))
    return runtime


def test_conversions_are_credited_per_event_from_open_journeys(journeys: Runtime) -> None:
    with journeys.engine.connect() as conn:
        got = query_attribution(conn, spec="default", models=["last_touch", "linear"], window_days=30)
        assert {r["key"]: r["conversions"] for r in got["last_touch"]} == {"paid_search": 1.0, "email": 1.0}
        linear = {r["key"]: (r["conversions"], r["value"]) for r in got["linear"]}
        assert linear == {"email": (1.5, 100.0), "paid_search": (0.5, 50.0)}
        # A one-day window keeps only a's search visit (a day old); b's click is 10 days old.
        short = query_attribution(conn, spec="default", models=["linear"], window_days=1)
        assert {r["key"]: r["conversions"] for r in short["linear"]} == {"paid_search": 1.0}
        by_day = query_attribution(
            conn, spec="default", models=["first_touch"], window_days=30, group_by="day"
        )
        assert [(r["key"], r["conversions"]) for r in by_day["first_touch"]] == [
            ("2026-01-03", 1.0),
            ("2026-01-11", 1.0),
            ("2026-01-12", 1.0),
        ]
        ranged = query_attribution(
            conn, spec="default", models=["first_touch"], window_days=30, since_day=(T0 // DAY) + 5
        )
        assert [r["key"] for r in ranged["first_touch"]] == ["email"]
        by_campaign = query_attribution(
            conn, spec="default", models=["last_touch"], window_days=30, group_by="campaign"
        )
        assert {r["key"] for r in by_campaign["last_touch"]} == {"brand", "spring"}
        # the campaign rollup is the detailed credit summed over channels
        detailed = conn.exec_driver_sql(
            "SELECT model, window_days, day, campaign, SUM(conversions), SUM(value) FROM attribution_credits "
            "GROUP BY model, window_days, day, campaign ORDER BY model, window_days, day, campaign"
        ).all()
        rollup = conn.exec_driver_sql(
            "SELECT model, window_days, day, campaign, conversions, value FROM attribution_campaign_credits "
            "ORDER BY model, window_days, day, campaign"
        ).all()
        assert len(rollup) == len(detailed) > 0
        for a, b in zip(rollup, detailed, strict=True):
            assert tuple(a[:4]) == tuple(b[:4]) and a[4:] == pytest.approx(tuple(b[4:]))
        tallies = query_attribution(conn, spec="default", models=["shapley", "markov"], window_days=30)
        for model in ("shapley", "markov"):
            total = sum(r["conversions"] for r in tallies[model])
            assert total == pytest.approx(2.0)


def test_api_serves_several_models_with_scopes(journeys: Runtime) -> None:
    client = TestClient(create_app(runtime=journeys, background=False))
    key = create_key(journeys.engine, name="analyst", scopes=["admin"])
    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    assert client.get("/v1/attribution").status_code == 401
    r = client.get("/v1/attribution?model=linear&model=markov,shapley&window=30d", headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["models"]) == {"linear", "markov", "shapley"}
    assert body["notes"]
    assert set(body["fits"]) == {"markov", "shapley"}
    bad = client.get("/v1/attribution?model=causel", headers=auth)
    assert bad.status_code == 422 and "causal" in bad.json()["detail"]
    assert client.get("/v1/attribution?window=200d", headers=auth).status_code == 422
    ranged = client.get(
        "/v1/attribution?model=last_touch&from=2026-01-05&to=2026-01-31&group_by=day", headers=auth
    )
    assert [row["key"] for row in ranged.json()["models"]["last_touch"]] == ["2026-01-11", "2026-01-12"]


def test_api_names_the_parameter_it_cannot_answer_instead_of_an_empty_answer(journeys: Runtime) -> None:
    client = TestClient(create_app(runtime=journeys, background=False))
    key = create_key(journeys.engine, name="analyst", scopes=["admin"])
    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}

    def detail(query: str) -> str:
        r = client.get(f"/v1/attribution?{query}", headers=auth)
        assert r.status_code == 422, (query, r.status_code, r.text)
        return str(r.json()["detail"])

    # A range that ends before it starts is a typo, not a range without conversions.
    assert "from" in detail("model=last_touch&from=2026-01-31&to=2026-01-01")
    # No block of that name: the tally and rule models answered nothing, the fits 422.
    assert "spec" in detail("model=last_touch&spec=nope") and "default" in detail("model=linear&spec=nope")
    # Credits and tallies are kept for 1, 7, 14, 30, 60, 90 days and the block's own window:
    # another window has none, so rule models answered empty and Shapley/Markov solved
    # from the open journeys alone (every channel 0).
    for model in ("last_touch", "markov", "shapley", "shapley_ordered"):
        text = detail(f"model={model}&window=45d")
        assert "window" in text and "30d" in text, text
    # Windows are whole days: 36h was rounded to 2d without a word.
    assert "whole" in detail("model=last_touch&window=36h")
    assert client.get("/v1/attribution?model=linear&window=24h", headers=auth).status_code == 200
    ok = client.get("/v1/attribution?model=linear&from=2026-01-03&to=2026-01-03", headers=auth)
    assert ok.status_code == 200 and ok.json()["models"]["linear"]


SHOP_RULES = """event purchased = "Order Completed"

attribution shop "Orders, linear" {
    conversion  purchased value event.revenue
    window      30d
    model       linear
}
"""


@pytest.mark.parametrize("with_app", [False, True])
def test_the_rules_blocks_are_credited_before_anything_else_loads_the_rules(
    runtime: Runtime, tmp_path: Path, with_app: bool
) -> None:
    # `cadence import` then `cadence serve` (or `cadence engine catch-up`): the engine loop
    # applied the log before the scheduler or a request had loaded the rules, so every
    # conversion was credited to the block "default", which the API and dashboard do not
    # show once the rules are loaded; and the checkpoint had moved past them for good.
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "shop.cadence").write_text(SHOP_RULES)
    runtime.settings = runtime.settings.model_copy(update={"rules_paths": [rules]})
    calls = [click(1, "a", 0, "email"), order(2, "a", 1, 30.0)]
    record_events(engine=runtime.engine, batch=[parse_call(c, received_ms=T0) for c in calls])
    if with_app:
        app = create_app(runtime=runtime, background=False)
        app.state.engine_loop.catch_up()
    else:
        EngineLoop(runtime).catch_up()
    with runtime.engine.connect() as conn:
        specs = {r[0] for r in conn.exec_driver_sql("SELECT DISTINCT spec FROM attribution_channel_credits")}
        assert specs == {"shop"}
        got = query_attribution(conn, spec="shop", models=["linear"], window_days=30)
    assert [(r["key"], r["conversions"], r["value"]) for r in got["linear"]] == [("email", 1.0, 30.0)]


def test_the_blocks_credit_rules_apply_online(runtime: Runtime) -> None:
    from cadence.engine.attribution.online import AttributionSubscriber
    from cadence.engine.attribution.spec import AttributionSpec, CreditRule

    spec = AttributionSpec(
        name="ruled",
        title="ruled",
        conversion_event="Order Completed",
        value_prop="revenue",
        credit_rules=(CreditRule("sms", action="exclude"), CreditRule("email", action="weight", value=3.0)),
    )
    record_events(
        engine=runtime.engine,
        batch=[
            parse_call(c, received_ms=T0)
            for c in (
                click(1, "a", 0, "email"),
                click(2, "a", 0.5, "sms"),
                visit(3, "a", 1, "google", "cpc"),
                order(4, "a", 2, 10.0),
            )
        ],
    )
    EngineLoop(runtime, subscribers=[AttributionSubscriber(runtime, specs=[spec])]).catch_up()
    with runtime.engine.connect() as conn:
        got = query_attribution(conn, spec="ruled", models=["linear"], window_days=30)
    # sms is excluded; email's half is tripled then renormalised: 0.75 / 0.25.
    assert {r["key"]: r["conversions"] for r in got["linear"]} == {"email": 0.75, "paid_search": 0.25}


def test_a_revenue_that_is_not_a_finite_number_credits_no_value(runtime: Runtime) -> None:
    # float("NaN") and float("Infinity") parse: one such order made every later sum of its
    # day NaN (PostgreSQL) or broke the NOT NULL value column (SQLite stores NaN as NULL).
    from cadence.engine.attribution.materialized import ExposureSubscriber
    from cadence.engine.attribution.online import AttributionSubscriber

    calls = [
        click(1, "a", 0, "email"),
        order(2, "a", 1, "NaN"),  # type: ignore[arg-type]
        click(3, "b", 0, "email"),
        order(4, "b", 1, "-Infinity"),  # type: ignore[arg-type]
        click(5, "c", 0, "email"),
        order(6, "c", 1, "12.5"),  # type: ignore[arg-type]
    ]
    record_events(engine=runtime.engine, batch=[parse_call(c, received_ms=T0) for c in calls])
    subscribers = [AttributionSubscriber(runtime), ExposureSubscriber(runtime)]
    EngineLoop(runtime, subscribers=subscribers).catch_up()
    client = TestClient(create_app(runtime=runtime, background=False))
    key = create_key(runtime.engine, name="analyst", scopes=["admin"])
    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    r = client.get("/v1/attribution?model=linear,causal&refresh=true", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["models"]["linear"] == [{"key": "email", "conversions": 3.0, "value": 12.5}]


BRAND_RULES = """event purchased = "Order Completed"

attribution fair "No credit for brand-only search" {
    conversion  purchased value event.revenue
    window      30d
    model       linear
    credit      paid_search 0 when every touch.campaign matches "brand*"
}
"""


def test_credit_rule_conditions_see_each_touchs_campaign_online(runtime: Runtime, tmp_path: Path) -> None:
    # The example rules' "credit paid_search 0 when every touch.campaign matches 'brand*'"
    # never fired: the condition was evaluated on touches rebuilt without their campaign.
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "fair.cadence").write_text(BRAND_RULES)
    runtime.settings = runtime.settings.model_copy(update={"rules_paths": [rules]})

    def search(n: int, user: str, day: float, campaign: str) -> dict[str, Any]:
        v = visit(n, user, day, "google", "cpc")
        v["context"]["campaign"]["name"] = campaign
        return v

    ingest(
        runtime,
        search(1, "a", 0, "brand_de"),
        search(2, "a", 0.5, "brand_at"),
        order(3, "a", 1, 10.0),  # brand only: no credit for search
        search(4, "b", 0, "brand_de"),
        search(5, "b", 0.5, "generic"),
        order(6, "b", 1, 10.0),  # not every touch is brand: credited
    )
    with runtime.engine.connect() as conn:
        got = query_attribution(conn, spec="fair", models=["linear", "last_touch"], window_days=30)
    for model in ("linear", "last_touch"):
        assert {r["key"]: r["conversions"] for r in got[model]} == {"paid_search": 1.0}, model


def test_a_batch_is_credited_in_time_order_not_log_order(runtime: Runtime) -> None:
    # A file exported per customer (or orders before clicks) logs a conversion before the
    # touch that preceded it: the conversion was credited to no channel, and the touch
    # stayed open and was credited to the customer's next conversion.
    ingest(
        runtime,
        order(1, "a", 2, 10.0),
        click(2, "a", 1, "email"),
        order(3, "b", 2, 10.0),
        click(4, "b", 1, "sms"),
        click(5, "b", 2, "push"),  # the same millisecond as the order: counts before it
        order(6, "b", 5, 10.0),  # nothing since the first order: no channel
    )
    with runtime.engine.connect() as conn:
        got = query_attribution(conn, spec="default", models=["linear"], window_days=30, group_by="day")
        by_channel = query_attribution(conn, spec="default", models=["linear"], window_days=30)
        open_touches = conn.exec_driver_sql("SELECT COUNT(*) FROM attribution_touches").scalar()
    assert {r["key"]: r["conversions"] for r in by_channel["linear"]} == {
        "email": 1.0,
        "sms": 0.5,
        "push": 0.5,
    }
    assert [(r["key"], r["conversions"]) for r in got["linear"]] == [("2026-01-03", 2.0), ("2026-01-06", 1.0)]
    assert open_touches == 0


def test_credit_to_touches_without_a_campaign_is_not_lost_by_campaign(runtime: Runtime) -> None:
    # group_by=campaign dropped the empty campaign to hide conversions with no touch, and
    # with them the credit of every touch without a campaign (referrals, organic search,
    # sends without one): the campaign view summed to less than the channel view.
    ingest(
        runtime,
        click(1, "a", 0, "email", campaign="spring"),
        click(2, "a", 0.5, "sms", campaign=""),
        order(3, "a", 1, 10.0),
        order(4, "b", 1, 5.0),  # no touch: no channel, no campaign
    )
    with runtime.engine.connect() as conn:
        got = query_attribution(conn, spec="default", models=["linear"], window_days=30, group_by="campaign")
        channels = query_attribution(conn, spec="default", models=["linear"], window_days=30)
    rows = {r["key"]: (r["conversions"], r["value"]) for r in got["linear"]}
    assert rows == {"spring": (0.5, 5.0), "(none)": (0.5, 5.0)}
    assert sum(r["conversions"] for r in channels["linear"]) == pytest.approx(1.0)


def test_a_touch_logged_after_the_conversion_it_preceded_is_credited_for_it(runtime: Runtime) -> None:
    # A provider's click webhook that arrives after the order (or clicks imported after the
    # orders): the journey was closed, so the click went to the customer's next conversion.
    ingest(runtime, visit(1, "a", 0, "google", "cpc"), order(2, "a", 2, 100.0))
    ingest(runtime, click(3, "a", 1, "email"), order(4, "a", 9, 10.0))
    with runtime.engine.connect() as conn:
        linear = query_attribution(conn, spec="default", models=["linear", "last_touch"], window_days=30)
        by_day = query_attribution(conn, spec="default", models=["linear"], window_days=30, group_by="day")
        by_campaign = query_attribution(
            conn, spec="default", models=["linear"], window_days=30, group_by="campaign"
        )
        open_touches = conn.exec_driver_sql("SELECT COUNT(*) FROM attribution_touches").scalar()
    # The second order has nothing since the first: no channel.
    assert {r["key"]: (r["conversions"], r["value"]) for r in linear["linear"]} == {
        "paid_search": (0.5, 50.0),
        "email": (0.5, 50.0),
    }
    assert {r["key"]: r["conversions"] for r in linear["last_touch"]} == {"email": 1.0}
    assert {r["key"]: r["conversions"] for r in by_campaign["linear"] if r["key"] != "(none)"} == {
        "brand": 0.5,
        "spring": 0.5,
    }
    assert sum(r["conversions"] for r in by_day["linear"]) == pytest.approx(2.0)
    assert open_touches == 0


def test_a_conversion_logged_late_splits_the_journey_it_fell_in(runtime: Runtime) -> None:
    ingest(runtime, click(1, "a", 0, "email"), click(2, "a", 2, "sms"), order(3, "a", 3, 30.0))
    # An order at day 1 was logged later: it takes the email click, the day-3 order keeps the text.
    ingest(runtime, order(4, "a", 1, 10.0))
    with runtime.engine.connect() as conn:
        got = query_attribution(conn, spec="default", models=["linear"], window_days=30)
        tallies = query_attribution(conn, spec="default", models=["shapley"], window_days=30)
    assert {r["key"]: (r["conversions"], r["value"]) for r in got["linear"]} == {
        "email": (1.0, 10.0),
        "sms": (1.0, 30.0),
    }
    assert {r["key"]: r["conversions"] for r in tallies["shapley"]} == pytest.approx(
        {"email": 1.0, "sms": 1.0}
    )


_TABLES = {
    "attribution_credits": "model, window_days, day, channel, campaign",
    "attribution_channel_credits": "model, window_days, day, channel",
    "attribution_campaign_credits": "model, window_days, day, campaign",
    "attribution_coalitions": "window_days, channels",
    "attribution_paths": "window_days, path",
}


def _aggregates(runtime: Runtime) -> dict[str, dict[tuple[Any, ...], tuple[float, ...]]]:
    out: dict[str, dict[tuple[Any, ...], tuple[float, ...]]] = {}
    with runtime.engine.connect() as conn:
        for table, keys in _TABLES.items():
            rows = conn.exec_driver_sql(f"SELECT * FROM {table}").mappings().all()
            n = len(keys.split(", "))
            out[table] = {}
            for row in rows:
                values = list(row.values())[1:]  # without the block's name
                numbers = tuple(float(v) for v in values[n:])
                if any(abs(v) > 1e-9 for v in numbers):  # a key whose credit moved and came back
                    out[table][tuple(values[:n])] = numbers
        out["open"] = {
            tuple(r): (1.0,)
            for r in conn.exec_driver_sql(
                "SELECT ts_ms, channel, campaign FROM attribution_touches ORDER BY ts_ms, channel"
            ).all()
        }
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_credit_does_not_depend_on_how_late_the_events_were_logged(
    runtime: Runtime, tmp_path: Path, seed: int
) -> None:
    # The same events, logged in one batch in time order and in shuffled batches (each applied
    # before the next is logged), leave the same aggregates and open journeys.
    import random

    from cadence.runtime import open_runtime
    from cadence.settings import Settings
    from cadence.store.db import create_db_engine, migrate

    rng = random.Random(seed)
    calls: list[dict[str, Any]] = []
    channels = [("email", "spring"), ("sms", "spring"), ("push", "summer"), ("email", "summer")]
    for n in range(60):
        user = f"u{rng.randrange(4)}"
        day = rng.randrange(40 * 24) / 24  # hourly, so that some events share a millisecond
        kind = rng.random()
        if kind < 0.3:
            calls.append(order(n, user, day, float(rng.randrange(1, 100))))
        elif kind < 0.45:
            calls.append(
                visit(n, user, day, rng.choice(["google", "facebook"]), rng.choice(["cpc", "social"]))
            )
        else:
            ch, cp = rng.choice(channels)
            calls.append(click(n, user, day, ch, cp))
    reference_engine = create_db_engine(f"sqlite:///{tmp_path}/reference.db")
    migrate(reference_engine)
    reference = open_runtime(
        Settings(
            database_url=str(reference_engine.url),
            rules_paths=[],
            disable_plugin_autoload=True,
            _env_file=None,  # type: ignore[call-arg]
        ),
        engine=reference_engine,
    )
    ingest(reference, *sorted(calls, key=lambda c: c["timestamp"]))
    shuffled = calls[:]
    rng.shuffle(shuffled)
    cuts = sorted(rng.sample(range(1, len(shuffled)), 6))
    for lo, hi in zip([0, *cuts], [*cuts, len(shuffled)], strict=True):
        ingest(runtime, *shuffled[lo:hi])
    want, got = _aggregates(reference), _aggregates(runtime)
    reference_engine.dispose()
    for table in want:
        assert got[table].keys() == want[table].keys(), table
        for key, numbers in want[table].items():
            assert got[table][key] == pytest.approx(numbers, abs=1e-9), (table, key)


def test_a_merged_customers_credited_conversions_are_credited_again_for_a_late_touch(
    runtime: Runtime,
) -> None:
    ingest(runtime, visit(1, "a", 0, "google", "cpc"), order(2, "a", 2, 40.0), click(5, "u", 0.5, "sms"))
    ingest(  # two customers become one
        runtime,
        {
            "type": "alias",
            "messageId": "m3",
            "userId": "u",
            "previousId": "a",
            "timestamp": (T0 + 3 * DAY) / 1000,
        },
    )
    # The merged customer's click from before the order arrives late, under the user id.
    ingest(runtime, click(4, "u", 1, "email"))
    with runtime.engine.connect() as conn:
        got = query_attribution(conn, spec="default", models=["last_touch"], window_days=30)
    assert {r["key"]: r["value"] for r in got["last_touch"]} == {"email": 40.0}
    with runtime.engine.connect() as conn:
        assert (
            conn.exec_driver_sql("SELECT COUNT(DISTINCT customer_id) FROM attribution_history").scalar() == 1
        )


def test_a_conversion_older_than_90_days_before_the_newest_event_keeps_its_credit(runtime: Runtime) -> None:
    ingest(runtime, order(1, "a", 0, 10.0), click(2, "a", 95, "sms"), order(3, "a", 100, 20.0))
    # Too late for the first order (final after 90 days), and not the second order's either.
    ingest(runtime, click(4, "a", -1, "email"))
    with runtime.engine.connect() as conn:
        got = query_attribution(conn, spec="default", models=["linear"], window_days=90, group_by="day")
        by_channel = query_attribution(conn, spec="default", models=["linear"], window_days=90)
        open_touches = conn.exec_driver_sql("SELECT COUNT(*) FROM attribution_touches").scalar()
    assert {r["key"]: r["value"] for r in by_channel["linear"]} == {"sms": 20.0}
    assert [(r["key"], r["conversions"]) for r in got["linear"]] == [("2026-01-01", 1.0), ("2026-04-11", 1.0)]
    assert open_touches == 0
    # An order from before then, logged only now, still counts (with no channel).
    ingest(runtime, order(5, "a", -2, 5.0))
    with runtime.engine.connect() as conn:
        got = query_attribution(conn, spec="default", models=["linear"], window_days=90, group_by="day")
        by_channel = query_attribution(conn, spec="default", models=["linear"], window_days=90)
    assert [r["key"] for r in got["linear"]] == ["2025-12-30", "2026-01-01", "2026-04-11"]
    assert {r["key"]: r["value"] for r in by_channel["linear"]} == {"sms": 20.0}
