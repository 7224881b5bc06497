"""``sync audience to CHANNEL``: campaigns that keep an ad platform's audience, not send messages."""

from __future__ import annotations

from collections.abc import Callable

from cadence.dsl.formatter import format_text
from cadence.dsl.loader import LoadResult
from tests.dsl.test_language import NOW, ctx

Load = Callable[..., LoadResult]

HEADER = 'event purchased = "Order Completed"\nsegment buyers = count(purchased) > 0\n'

SYNC = """campaign fb "Buyers on Facebook" {
    audience  buyers and not purchased within 7d
    sync      audience to facebook with { audience_id: "1202", tier: customer.tier ?? "none" }
    schedule  every day at 06:00
}
"""


def test_a_sync_campaign_compiles_to_an_audience_campaign(load: Load) -> None:
    result = load(HEADER + SYNC)
    assert result.ok, [str(d) for d in result.diagnostics]
    campaign = result.ruleset.campaigns["fb"]
    assert campaign.kind == "audience"
    assert campaign.channels.channels == ("facebook",)
    assert campaign.schedule is not None and campaign.schedule.cron == "0 6 * * *"
    assert campaign.template.name == ""
    buyer = ctx([("Order Completed", -30 * 86_400_000, {})], traits={"tier": "gold"})
    recent = ctx([("Order Completed", -86_400_000, {})])
    assert campaign.audience is not None
    assert campaign.audience(buyer) is True and campaign.audience(recent) is False
    assert campaign.template.variables(buyer) == {"audience_id": "1202", "tier": "gold"}
    assert campaign.template.variables(recent) == {"audience_id": "1202", "tier": "none"}
    assert buyer.now_ms == NOW


def test_message_campaigns_stay_message_campaigns(load: Load) -> None:
    result = load(HEADER + 'campaign m {\n    send template "t"\n    channel email\n}\n')
    assert result.ok
    assert result.ruleset.campaigns["m"].kind == "message"


def test_sync_is_formatted_canonically(load: Load) -> None:
    messy = SYNC.replace("sync      audience to facebook with {", "sync audience   to facebook  with{")
    canonical = format_text(HEADER + SYNC, "f.cadence")
    assert SYNC in canonical
    assert format_text(HEADER + messy, "f.cadence") == canonical
    assert load(HEADER + messy).ok


def test_channels_that_cannot_hold_an_audience_are_refused(load: Load) -> None:
    result = load(HEADER + SYNC.replace("to facebook", "to email"))
    [error] = result.errors
    assert (error.code, error.line, error.column) == ("E202", 5, 27)
    assert "cannot hold an audience" in error.message
    assert error.hint == "audiences can be synced to: facebook, google_ads"


def test_misspelt_and_uninstalled_audience_channels(load: Load) -> None:
    [error] = load(HEADER + SYNC.replace("to facebook", "to facebok")).errors
    assert (error.code, error.hint) == ("E202", "did you mean 'facebook'?")
    [error] = load(HEADER + SYNC, available_channels=("email",)).errors
    assert (error.code, error.message) == (
        "E202",
        "channel 'facebook' is not offered by any installed connector",
    )


def test_message_clauses_and_a_missing_schedule_are_reported_together(load: Load) -> None:
    text = SYNC.replace(
        "    schedule  every day at 06:00\n",
        '    send      template "t"\n    channel   email\n    trigger   on purchased\n',
    )
    result = load(HEADER + text)
    assert [(d.code, d.line, d.column) for d in result.errors] == [
        ("E404", 3, 1),
        ("E406", 6, 5),
        ("E406", 7, 5),
        ("E406", 8, 5),
    ]
    assert "has no 'schedule' clause" in result.errors[0].message
    assert "'send' is not allowed in a campaign that syncs an audience" in result.errors[1].message


def test_sync_without_to_is_a_syntax_error_with_the_expected_word(load: Load) -> None:
    [error] = load(HEADER + SYNC.replace("audience to facebook", "audience facebook")).errors
    assert (error.code, error.line, error.column) == ("E101", 5, 24)
    assert "expected 'to'" in error.message
