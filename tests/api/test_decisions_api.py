"""``/v1/decisions``: preview and commit, batch, read-back with outcome, on both databases."""

from __future__ import annotations

import base64
import os
import time as clock
import uuid
from dataclasses import replace
from datetime import datetime, time

import pytest
from fastapi.testclient import TestClient

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.engine.campaign import (
    Campaign,
    ChannelPolicy,
    CompiledRuleset,
    GlobalSettings,
    QuietHours,
    SplitArm,
    TemplateSpec,
    Trigger,
)
from cadence.engine.learning import LearnerSubscriber
from cadence.runtime import Runtime


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


RULES = CompiledRuleset(
    hash="rules-v1",
    campaigns={
        "winback": Campaign(
            name="winback",
            title="Win back",
            priority=5,
            audience=None,
            template=TemplateSpec(
                "offer_x", variables=lambda ctx: {"first_name": ctx.profile.traits.get("name")}
            ),
            channels=ChannelPolicy(("sms", "email")),
            quiet=QuietHours(start=time(21), end=time(8), fallback_zone="Europe/Berlin"),
        ),
        "held": Campaign(
            name="held",
            title="Always held out",
            priority=9,
            audience=None,
            template=TemplateSpec("t"),
            channels=ChannelPolicy(("email",)),
            split=(SplitArm("holdout", 1.0, holdout=True),),
        ),
    },
    segments={},
    settings=GlobalSettings(default_zone="Europe/Berlin"),
    aggregates=frozenset(),
)


@pytest.fixture
def setup(runtime: Runtime) -> tuple[TestClient, dict[str, str], object]:
    app = create_app(runtime=runtime, background=False)
    client = TestClient(app)
    ingest = basic(create_key(runtime.engine, name="w", scopes=["ingest"]))
    decide = basic(create_key(runtime.engine, name="d", scopes=["decide"]))
    r = client.post(
        "/v1/identify",
        json={
            "userId": "u1",
            "traits": {"name": "Ada", "timezone": "Europe/Berlin", "consent": {"sms": False}},
        },
        headers=ingest,
    )
    assert r.status_code == 200, r.text
    app.state.engine_loop.catch_up()
    return client, {"ingest": ingest, "decide": decide}, app  # type: ignore[return-value]


def test_no_ruleset_is_a_503(setup: tuple[TestClient, dict[str, dict[str, str]], object]) -> None:
    client, keys, _app = setup
    r = client.post("/v1/decisions", json={"customer_id": "u1"}, headers=keys["decide"])  # type: ignore[arg-type]
    assert r.status_code == 503 and "ruleset" in r.json()["detail"]


def test_preview_commit_read_back_and_feedback(
    setup: tuple[TestClient, dict[str, dict[str, str]], object],
) -> None:
    client, keys, app = setup
    app.state.ruleset = RULES  # type: ignore[attr-defined]
    body = {"customer_id": "u1", "at": "2026-03-04T22:30:00+01:00"}
    preview = client.post("/v1/decisions", json=body, headers=keys["decide"])  # type: ignore[arg-type]
    assert preview.status_code == 200, preview.text
    got = preview.json()
    assert (got["action"], got["campaign"], got["channel"]) == ("send", "winback", "email")
    # The learners pick the hour; never inside quiet hours, and shown with the customer's offset.
    send_at = datetime.fromisoformat(got["send_at"])
    assert got["send_at"].endswith("+01:00") and 8 <= send_at.hour < 21
    assert send_at >= datetime.fromisoformat("2026-03-05T08:00:00+01:00")
    assert got["template"] == "offer_x" and got["variables"] == {"first_name": "Ada"}
    reasons = {(s["campaign"], s["reason"]) for s in got["explanation"]["suppressions"]}
    assert {("held", "holdout"), ("winback", "consent")} <= reasons
    assert all(c["send_at"] >= "2026-03-05T08:00" for c in got["explanation"]["candidates"])
    assert got["explanation"]["holdout"] == ["held"] and got["ruleset_hash"] == "rules-v1"
    summary = got["explanation"]["summary"]  # what a person reads first
    assert (
        summary.startswith("Send winback (template offer_x) by email on Thu 05 Mar ") and "+01:00" in summary
    )
    assert "sms (opted out of sms)" in summary and "held (" in summary
    assert client.get(f"/v1/decisions/{got['decision_id']}", headers=keys["decide"]).status_code == 404  # type: ignore[arg-type]

    committed = client.post("/v1/decisions", json={**body, "mode": "commit"}, headers=keys["decide"]).json()  # type: ignore[arg-type]
    did = committed["decision_id"]
    assert committed["queued"] is True
    record = client.get(f"/v1/decisions/{did}", headers=keys["decide"]).json()  # type: ignore[arg-type]
    assert record["outcome"]["send_status"] == "queued" and record["campaign"] == "winback"

    clicked = {
        "userId": "u1",
        "event": "Email Link Clicked",
        "properties": {"decision_id": did},
        "timestamp": record["send_at"],
    }
    assert client.post("/v1/track", json=clicked, headers=keys["ingest"]).status_code == 200  # type: ignore[arg-type]
    app.state.engine_loop.catch_up()  # type: ignore[attr-defined]
    record = client.get(f"/v1/decisions/{did}", headers=keys["decide"]).json()  # type: ignore[arg-type]
    assert "clicked" in record["outcome"]
    learners = next(s for s in app.state.engine_loop.subscribers if isinstance(s, LearnerSubscriber))  # type: ignore[attr-defined]
    assert learners.learner.pending[did].engaged


def test_an_immediate_send_is_never_shown_before_its_at(
    setup: tuple[TestClient, dict[str, dict[str, str]], object],
) -> None:
    """``send_at`` was cut to the second: an immediate send due at ``at`` = 10:20:00.250 read
    10:20:00, a quarter of a second before the decision (an outside check)."""
    client, keys, app = setup
    at = "2026-03-05T10:20:00.250+01:00"
    # The campaign ends within the hour: the immediate send is its one send time.
    ends = int(datetime.fromisoformat("2026-03-05T10:50:00+01:00").timestamp() * 1000)
    winback = replace(RULES.campaigns["winback"], ends_ms=ends)
    app.state.ruleset = replace(RULES, campaigns={**RULES.campaigns, "winback": winback})  # type: ignore[attr-defined]
    body = {"customer_id": "u1", "at": at, "mode": "commit"}
    got = client.post("/v1/decisions", json=body, headers=keys["decide"]).json()  # type: ignore[arg-type]
    assert got["action"] == "send" and got["send_at"] == got["decided_at"] == at
    read = client.get(f"/v1/decisions/{got['decision_id']}", headers=keys["decide"]).json()  # type: ignore[arg-type]
    assert (read["send_at"], read["decided_at"]) == (at, at)
    whole = {**body, "at": "2026-03-05T10:20:00+01:00"}
    assert client.post("/v1/decisions", json=whole, headers=keys["decide"]).json()["send_at"] == whole["at"]  # type: ignore[arg-type]


def test_batch_and_unknown_customers(setup: tuple[TestClient, dict[str, dict[str, str]], object]) -> None:
    client, keys, app = setup
    app.state.ruleset = RULES  # type: ignore[attr-defined]
    r = client.post("/v1/decisions", json={"customer_id": "nobody"}, headers=keys["decide"])  # type: ignore[arg-type]
    assert r.status_code == 404 and "nobody" in r.json()["detail"]
    r = client.post(
        "/v1/decisions/batch",
        json={
            "requests": [{"customer_id": "u1", "at": "2026-03-05T10:00:00+01:00"}, {"customer_id": "nobody"}]
        },
        headers=keys["decide"],  # type: ignore[arg-type]
    )
    assert r.status_code == 200
    first, second = r.json()["decisions"]
    assert first["action"] == "send" and first["send_at"] >= "2026-03-05T10:00:00+01:00"
    assert second["action"] == "error"
    too_many = {"requests": [{"customer_id": "u1"}] * 1001}
    assert client.post("/v1/decisions/batch", json=too_many, headers=keys["decide"]).status_code == 422  # type: ignore[arg-type]
    naive = client.post(
        "/v1/decisions", json={"customer_id": "u1", "at": "2026-03-05T10:00:00"}, headers=keys["decide"]
    )  # type: ignore[arg-type]
    assert naive.status_code == 422
    # an `at` whose send times or local days are no datetime (year 10000, before year 1) was a 500
    for at in ("9999-12-31T23:59:59+14:00", "0001-01-01T00:00:00+00:00", "9000-01-01T00:00:00Z"):
        for mode in ("preview", "commit"):
            far = client.post(
                "/v1/decisions", json={"customer_id": "u1", "at": at, "mode": mode}, headers=keys["decide"]
            )  # type: ignore[arg-type]
            assert far.status_code == 422 and far.json()["detail"].startswith("at: a time between"), far.text
        far = client.post(
            "/v1/decisions/batch",
            json={"requests": [{"customer_id": "u1", "at": at}]},
            headers=keys["decide"],
        )  # type: ignore[arg-type]
        assert far.status_code == 422 and far.json()["detail"].startswith("requests.0.at: a time between"), (
            far.text
        )
    # in a batch, the request the whole batch is refused for is named by its index
    mixed = client.post(
        "/v1/decisions/batch",
        json={"requests": [{"customer_id": "u1"}, {"customer_id": "u1", "at": "2026-03-05T10:00:00"}]},
        headers=keys["decide"],  # type: ignore[arg-type]
    )
    assert mixed.status_code == 422 and mixed.json()["detail"].startswith(
        "requests.1.at: give a time zone"
    ), mixed.text
    edge = client.post(
        "/v1/decisions", json={"customer_id": "u1", "at": "8999-12-30T00:00:00+00:00"}, headers=keys["decide"]
    )  # type: ignore[arg-type]
    assert edge.status_code == 200, edge.text
    # A campaign filter with a typo decided nothing, silently: it names the campaign (every path,
    # previews, commits, batches), and a known name still filters.
    for body in (
        {"customer_id": "u1", "campaigns": ["winbak"]},
        {"customer_id": "u1", "campaigns": ["winbak"], "mode": "commit"},
    ):
        typo = client.post("/v1/decisions", json=body, headers=keys["decide"])  # type: ignore[arg-type]
        assert typo.status_code == 422, typo.text
        assert (
            typo.json()["detail"]
            == "campaigns: no campaign 'winbak' (did you mean 'winback'?) in the loaded rules"
        )
    batch = client.post(
        "/v1/decisions/batch", json={"requests": [{"customer_id": "u1", "campaigns": ["held", "nope"]}]},
        headers=keys["decide"],  # type: ignore[arg-type]
    )  # fmt: skip
    assert batch.status_code == 422 and batch.json()["detail"].startswith(
        "requests.0.campaigns: no campaign 'nope'"
    )
    # An empty filter answered "Nothing to send." with no reason.
    empty = client.post("/v1/decisions", json={"customer_id": "u1", "campaigns": []}, headers=keys["decide"])  # type: ignore[arg-type]
    assert empty.status_code == 422 and "an empty list selects no campaign" in empty.text, empty.text
    only = client.post(
        "/v1/decisions", json={"customer_id": "u1", "campaigns": ["held"]}, headers=keys["decide"]
    )  # type: ignore[arg-type]
    assert only.status_code == 200 and only.json()["action"] == "none"
    assert client.post("/v1/decisions", json={"customer_id": "u1"}, headers=keys["ingest"]).status_code == 403  # type: ignore[arg-type]


def test_a_trigger_event_timestamp_is_checked_as_at_is_and_without_offset_is_utc(
    setup: tuple[TestClient, dict[str, dict[str, str]], object],
) -> None:
    """An outside checker (D4): a trigger ``event.timestamp`` in year 9999 was a 500 (an overflow in the
    local times), and in a batch lost every other item with no index named; one without offset was read
    in the server process's zone. Now it is range-checked as ``at`` is (422 naming the field, the batch
    item's index), and one without offset is UTC, as the ingestion API reads event times."""
    client, keys, app = setup
    rescue = Campaign(
        name="rescue",
        title="Cart rescue",
        priority=1,
        audience=None,
        template=TemplateSpec("r"),
        channels=ChannelPolicy(("email",)),
        trigger=Trigger("Cart Abandoned", delay_ms=30 * 60_000),
    )
    app.state.ruleset = replace(RULES, campaigns={**RULES.campaigns, "rescue": rescue})  # type: ignore[attr-defined]

    def item(stamp: str, **kw: object) -> dict[str, object]:
        event = {"event": "Cart Abandoned", "timestamp": stamp}
        return {"customer_id": "u1", "campaigns": ["rescue"], "event": event, **kw}

    said = "event.timestamp: a time between 1970-01-01 and 8999-12-31 (UTC)"
    for stamp in ("9999-12-31T23:00:00Z", "1969-12-31T23:00:00Z"):
        for mode in ("preview", "commit"):
            r = client.post("/v1/decisions", json=item(stamp, mode=mode), headers=keys["decide"])  # type: ignore[arg-type]
            assert r.status_code == 422 and r.json()["detail"] == said, r.text
    ok = item("2026-03-05T10:00:00Z", mode="commit")
    batch = {"requests": [ok, item("9999-12-31T23:00:00Z", mode="commit"), ok]}
    r = client.post("/v1/decisions/batch", json=batch, headers=keys["decide"])  # type: ignore[arg-type]
    assert r.status_code == 422 and r.json()["detail"] == f"requests.1.{said}", r.text

    # Without offset: UTC, whatever zone the server process runs in.
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    clock.tzset()
    try:
        at = {"at": "2027-03-10T12:00:00Z"}
        naive = client.post("/v1/decisions", json=item("2027-03-10T12:00:00", **at), headers=keys["decide"])  # type: ignore[arg-type]
        utc = client.post("/v1/decisions", json=item("2027-03-10T12:00:00Z", **at), headers=keys["decide"])  # type: ignore[arg-type]
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        clock.tzset()
    assert naive.status_code == 200 and utc.status_code == 200, (naive.text, utc.text)
    assert naive.json()["send_at"] == utc.json()["send_at"] == "2027-03-10T13:30:00+01:00"


def test_sms_through_twilio_needs_an_opt_in_before_a_decision_chooses_it(runtime: Runtime) -> None:
    twilio = {"sms": {"account_sid": "AC1", "auth_token": "secret", "from_number": "+15550100"}}
    runtime.settings = runtime.settings.model_copy(update={"connectors": twilio})
    app = create_app(runtime=runtime, background=False)
    assert app.state.opt_in_channels == frozenset({"sms"})
    client = TestClient(app)
    ingest = basic(create_key(runtime.engine, name="w", scopes=["ingest"]))
    decide = basic(create_key(runtime.engine, name="d", scopes=["decide"]))
    app.state.ruleset = CompiledRuleset(
        hash="r",
        campaigns={
            "nudge": Campaign(
                name="nudge",
                title="Nudge",
                priority=1,
                audience=None,
                template=TemplateSpec("t"),
                channels=ChannelPolicy(("sms", "email")),
            )
        },
        segments={},
        settings=GlobalSettings(),
        aggregates=frozenset(),
    )

    def channel_for(traits: dict[str, object]) -> tuple[str, list[str]]:
        r = client.post("/v1/identify", json={"userId": "u2", "traits": traits}, headers=ingest)
        assert r.status_code == 200, r.text
        app.state.engine_loop.catch_up()
        got = client.post("/v1/decisions", json={"customer_id": "u2"}, headers=decide).json()
        return got["channel"], [s["detail"] for s in got["explanation"]["suppressions"]]

    channel, details = channel_for({"phone": "+15550199"})
    assert channel == "email" and any("no opt-in for sms" in d for d in details)
    assert channel_for({"consent": {"sms": True}}) == ("sms", [])


def test_a_hard_bounce_is_said_as_a_bounced_address_not_an_opt_out(
    setup: tuple[TestClient, dict[str, dict[str, str]], object],
) -> None:
    client, keys, app = setup
    app.state.ruleset = RULES  # type: ignore[attr-defined]
    bounce = {"userId": "u1", "event": "Email Bounced", "properties": {"bounce_type": "hard"}}
    assert client.post("/v1/track", json=bounce, headers=keys["ingest"]).status_code == 200  # type: ignore[arg-type]
    for mode in ("preview", "commit"):  # the cached read (preview) and the commit's own read
        r = client.post(
            "/v1/decisions",
            json={"customer_id": "u1", "campaigns": ["winback"], "mode": mode, "fresh": True},
            headers=keys["decide"],  # type: ignore[arg-type]
        )
        assert r.status_code == 200, r.text
        held = {(s["reason"], s["channel"]) for s in r.json()["explanation"]["suppressions"]}
        assert r.json()["action"] == "none" and held == {("consent", "sms"), ("bounced", "email")}, held


def test_feedback_whose_decision_id_cannot_join_a_decision_is_accepted_with_a_warning(
    setup: tuple[TestClient, dict[str, dict[str, str]], object], caplog: pytest.LogCaptureFixture
) -> None:
    """A decision id of the wrong type or shape is named in the answer (the event is stored all the
    same); a well-shaped id no decision has is said by the engine loop, which looks it up anyway."""
    client, keys, app = setup
    app.state.ruleset = RULES  # type: ignore[attr-defined]
    body = {"customer_id": "u1", "at": "2026-03-04T22:30:00+01:00", "mode": "commit"}
    committed = client.post("/v1/decisions", json=body, headers=keys["decide"]).json()  # type: ignore[arg-type]
    did = committed["decision_id"]

    def clicked(decision_id: object, channel: object = "email", **extra: object) -> dict[str, object]:
        props = {"decision_id": decision_id, "channel": channel}
        at = committed["send_at"]
        return {"userId": "u1", "event": "Email Link Clicked", "properties": props, "timestamp": at, **extra}

    # (values of this run: the loop logs each value once per process, and both databases run here)
    number, unknown = uuid.uuid4().int % 10**9, uuid.uuid4().hex
    r = client.post("/v1/track", json=clicked(number), headers=keys["ingest"])  # type: ignore[arg-type]
    assert r.status_code == 200 and r.json()["accepted"] == 1
    [warning] = r.json()["warnings"]
    assert warning["field"] == "properties.decision_id"
    assert warning["warning"].startswith(f"a number ({number}), not a decision id: decision ids are strings")
    assert "the learners do not learn from it" in warning["warning"]
    batch = {
        "batch": [
            {"type": "track", **clicked(did)},
            {"type": "track", **clicked(did[:8])},
            {"type": "track", **clicked(did, channel=["sms"], messageId="list-channel")},
            {"type": "track", **clicked(7), "event": "Order Completed"},  # not feedback: no warning
        ]
    }
    r = client.post("/v1/batch", json=batch, headers=keys["ingest"])  # type: ignore[arg-type]
    assert r.status_code == 200 and r.json()["accepted"] == 4
    assert [(w["index"], w["field"]) for w in r.json()["warnings"]] == [
        (1, "batch.1.properties.decision_id"),
        (2, "batch.2.properties.channel"),
    ]
    assert f"{did[:8]!r} is not a decision id" in r.json()["warnings"][0]["warning"]
    # Well shaped but no decision's: no query on the ingest path, so no warning there ...
    r = client.post("/v1/track", json=clicked(unknown), headers=keys["ingest"])  # type: ignore[arg-type]
    assert r.status_code == 200 and "warnings" not in r.json()
    with caplog.at_level("WARNING", logger="cadence.learners"):
        app.state.engine_loop.catch_up()  # type: ignore[attr-defined]
    # ... the engine loop names it (and the wrong-typed one, as it would an imported event's)
    said = [m for m in caplog.messages if "joins no decision" in m]
    assert any(f"'{unknown}' joins no decision (no committed decision has this id)" in m for m in said)
    assert any(f"decision_id {number} joins no decision (a number ({number})" in m for m in said)
    learners = next(s for s in app.state.engine_loop.subscribers if isinstance(s, LearnerSubscriber))  # type: ignore[attr-defined]
    assert learners.learner.pending[did].engaged  # the well-formed one joined
    assert str(number) not in learners.learner.pending and number not in learners.learner.pending


def test_candidates_show_the_draw_and_mean_value_behind_a_score_the_learners_replaced(
    runtime: Runtime,
) -> None:
    """A draw at or below zero of an option worth sending ranks at a millionth of its value (shown
    as 0.0), and a variant the minimum exploration share held back at -inf (null): the explanation
    says what the learners drew and expected there, and compares variants by expected value."""
    app = create_app(runtime=runtime, background=False)
    app.state.ruleset = CompiledRuleset(
        hash="variants",
        campaigns={
            "v": Campaign(
                name="v",
                title="Variants",
                priority=1,
                audience=None,
                template=TemplateSpec("t"),
                channels=ChannelPolicy(("email",)),
                split=(SplitArm("x", 0.5, template="x"), SplitArm("y", 0.5, template="y")),
                learn_variants=True,
                min_explore=1.0,  # always hold one variant back
            )
        },
        segments={},
        settings=GlobalSettings(default_zone="Europe/Berlin"),
        aggregates=frozenset(),
    )
    client = TestClient(app)
    ingest = basic(create_key(runtime.engine, name="w", scopes=["ingest"]))
    decide = basic(create_key(runtime.engine, name="d", scopes=["decide"]))
    traits = {"timezone": "Europe/Berlin", "consent": {"email": True}}
    assert (
        client.post("/v1/identify", json={"userId": "u1", "traits": traits}, headers=ingest).status_code
        == 200
    )
    app.state.engine_loop.catch_up()  # type: ignore[attr-defined]
    low = None
    for day in range(1, 29):
        body = {"customer_id": "u1", "at": f"2026-03-{day:02d}T10:00:00+01:00"}
        got = client.post("/v1/decisions", json=body, headers=decide).json()
        explained = got["explanation"]
        [held] = [c for c in explained["candidates"] if c["arm"] != got["arm"]]
        assert held["score"] is None  # -inf: never chosen
        assert isinstance(held["draw"], float) and held["mean"] == pytest.approx(0.037, abs=0.01)
        note = explained["notes"][0]
        assert note.startswith(f"variant {got['arm']!r} explored (minimum exploration share)"), note
        assert "inf" not in note and ("in expected value" in note or "expected value 0.0" in note), note
        for c in explained["candidates"]:
            if c["score"] is not None and c["score"] == c["draw"]:
                continue
            if c["score"] is not None:
                low = c
        if low is not None:
            break
    assert low is not None, "no draw at or below zero in 28 decisions"
    assert low["score"] == 0.0 and low["draw"] <= 0 < low["mean"]


def test_unknown_fields_and_a_numeric_at_are_refused_by_name(
    setup: tuple[TestClient, dict[str, dict[str, str]], object],
) -> None:
    # An outside check: "modes": "commit" was answered 200 as a preview (nothing recorded), and
    # "at": 1790000000 was read as epoch seconds.
    client, keys, app = setup
    app.state.ruleset = RULES  # type: ignore[attr-defined]
    typo = client.post("/v1/decisions", json={"customer_id": "u1", "modes": "commit"}, headers=keys["decide"])  # type: ignore[arg-type]
    assert typo.status_code == 422 and "modes" in typo.text, typo.text
    number = client.post(
        "/v1/decisions", json={"customer_id": "u1", "at": 1790000000}, headers=keys["decide"]
    )  # type: ignore[arg-type]
    assert number.status_code == 422 and "at" in number.text and "offset" in number.text, number.text
    batch = client.post(
        "/v1/decisions/batch",
        json={"requests": [{"customer_id": "u1"}, {"customer_id": "u1", "campaign": ["winback"]}]},
        headers=keys["decide"],  # type: ignore[arg-type]
    )
    assert batch.status_code == 422 and "campaign" in batch.text, batch.text
    fine = client.post(
        "/v1/decisions", json={"customer_id": "u1", "at": "2026-03-04T22:30:00+01:00"}, headers=keys["decide"]
    )  # type: ignore[arg-type]
    assert fine.status_code == 200
