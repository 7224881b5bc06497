"""A customer's sends count after a merge: what an anonymous visitor got caps the user they turn out to be.

Every test runs on SQLite and PostgreSQL. u1 (the ``api`` fixture's customer) is the older
customer; a1, an anonymous visitor, gets the capped campaign's one send a week; then an
identify carrying both ids, or an alias, stitches a1 into u1. The next commit for u1 must be
capped, and its explanation must say so. Before the merge moved the sends, u1's decisions
read only the sends stored under u1's own id and sent again (the dispatcher then suppressed
the send, but the committed decision had broken the cap).
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from cadence.runtime import Runtime
from cadence.store.schema.sends import sends
from tests.api.test_decisions_cache import Api, reasons
from tests.api.test_decisions_notify import clean_preview, listening


def stitch(api: Api, how: str) -> None:
    """a1 becomes u1: an identify carrying both ids, or an explicit alias."""
    if how == "identify":
        api.identify(userId="u1", anonymousId="a1")
        return
    r = api.client.post("/v1/alias", json={"previousId": "a1", "userId": "u1"}, headers=api.keys["ingest"])
    assert r.status_code == 200, r.text
    api.app.state.engine_loop.catch_up()
    api.state.sync()


def cap_details(body: dict[str, Any]) -> list[str]:
    """What the explanation says of each channel the cap held (the campaign offers email and sms)."""
    return [str(s["detail"]) for s in body["explanation"]["suppressions"] if s["reason"] == "cap"]


@pytest.mark.parametrize("how", ["identify", "alias"])
def test_the_visitors_send_caps_the_user_they_log_in_as(api: Api, how: str) -> None:
    user = api.decide("u1")  # cached before the merge: the cache must not keep u1's old sends
    assert user["action"] == "send"
    api.identify(anonymousId="a1", traits={"name": "Anon"})
    sent = api.decide("a1", mode="commit")
    assert sent["queued"] is True and sent["customer_id"] != user["customer_id"]
    stitch(api, how)
    preview = api.decide("u1")
    assert preview["action"] == "none" and "cap" in reasons(preview)
    committed = api.decide("u1", mode="commit")
    assert committed["customer_id"] == user["customer_id"]
    assert committed["action"] == "none" and committed.get("queued") is not True
    details = cap_details(committed)
    assert details and all("1 per 7d" in d for d in details), committed["explanation"]
    assert (
        committed["explanation"]["summary"]
        == "Nothing to send. daily: campaign cap 1 per 7d reached (email, sms)."
    )
    # The anonymous id decides for the merged customer, with the same history.
    assert api.decide("a1", mode="commit")["action"] == "none"


def test_the_users_send_caps_the_visitor_merged_into_them(api: Api) -> None:
    """The other way round: the user got the send, the (younger) visitor's id is merged in."""
    api.identify(anonymousId="a1", traits={"name": "Anon"})
    assert api.decide("a1")["action"] == "send"
    assert api.decide("u1", mode="commit")["queued"] is True
    stitch(api, "identify")
    assert api.decide("a1", mode="commit")["action"] == "none"


def test_a_clean_preview_hears_of_the_sends_a_merge_moved(api: Api, runtime: Runtime) -> None:
    """PostgreSQL, listening: u1's preview was answered without a check; the merge that moves a1's
    send to u1 notifies u1, and the next preview reads the moved send."""
    listening(api)
    assert clean_preview(api, "u1")["action"] == "send"
    api.identify(anonymousId="a1", traits={"name": "Anon"})
    assert api.decide("a1", mode="commit")["queued"] is True
    assert clean_preview(api, "u1")["action"] == "send"  # a1's send is not u1's yet
    stitch(api, "identify")
    assert api.decide("u1")["action"] == "none"


def test_export_and_erasure_take_the_moved_sends_with_the_person(api: Api, runtime: Runtime) -> None:
    assert api.decide("u1", mode="commit")["queued"] is True
    api.identify(anonymousId="a1", traits={"name": "Anon"})
    assert api.decide("a1", mode="commit")["queued"] is True
    stitch(api, "alias")
    exported = api.client.get("/v1/customers/u1", headers=api.keys["admin"])
    assert exported.status_code == 200, exported.text
    assert len(exported.json()["sends"]) == 2
    assert api.client.delete("/v1/customers/a1", headers=api.keys["admin"]).status_code == 200
    with runtime.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(sends)) == 0


def test_the_sends_listing_takes_the_ids_decisions_take(api: Api) -> None:
    """``GET /v1/sends?customer_id=`` took only the customer number; a user or anonymous id, which
    ``POST /v1/decisions`` takes, was a 422. It resolves them alike, and follows a merge."""

    def listed(ref: str, status: int = 200) -> Any:
        r = api.client.get("/v1/sends", params={"customer_id": ref}, headers=api.keys["admin"])
        assert r.status_code == status, (ref, r.text)
        return r.json()

    api.identify(anonymousId="a1", traits={"name": "Anon"})
    sent = api.decide("a1", mode="commit")
    visitor = sent["customer_id"]
    (row,) = listed("a1")["sends"]
    assert (row["campaign"], row["customer_id"]) == (sent["campaign"], visitor)
    assert listed(str(visitor))["sends"] == [row]  # the number still works
    user = api.decide("u1")["customer_id"]
    assert listed("u1")["sends"] == []
    stitch(api, "identify")
    # The merge moved the send to u1: every id of the customer, and the visitor's old number, list it.
    for ref in ("u1", "a1", str(user), str(visitor)):
        assert [(r["id"], r["customer_id"]) for r in listed(ref)["sends"]] == [(row["id"], user)], ref
    for unknown in ("nobody", "987654"):
        assert listed(unknown, 404)["detail"] == (
            f"customer_id: no customer with user id, anonymous id or customer number {unknown!r}"
        )
