"""Google Ads OAuth 2: access tokens from a refresh token, over real HTTP to the fake token endpoint."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import Engine, insert, select

from cadence.connectors.base import OutgoingMessage
from cadence.connectors.delivery import Deliverer, DeliveryPolicy, Dispatcher
from cadence.connectors.google_ads import GoogleAds, OAuthRefreshRejected
from cadence.connectors.testing import FakeProviders, google_oauth_config
from cadence.engine.sendqueue import enqueue_send
from cadence.errors import AuthenticationFailure, PermanentFailure
from cadence.store.schema.core import customers
from cadence.store.schema.sends import sends


def conversion(i: int) -> OutgoingMessage:
    return OutgoingMessage(
        send_id=i,
        idempotency_key=f"conv:{i}",
        campaign="spring",
        channel="google_ads",
        customer_id=i,
        decision_id=f"d{i}",
        variables={"gclid": f"Cj0click{i}", "conversion_time_ms": 1767225600000},
    )


def oauth_connector(fake: FakeProviders, http: httpx.AsyncClient, **overrides: object) -> GoogleAds:
    return GoogleAds(config=google_oauth_config(fake.base_url) | overrides, client=http)


async def test_the_first_send_gets_a_token_with_the_refresh_grant(
    fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    connector = oauth_connector(fake, http)
    assert all(r.ok for r in await connector.send([conversion(1)]))
    assert all(r.ok for r in await connector.send([conversion(2)]))
    (token_call,) = fake.calls_to("google_oauth")
    assert token_call.headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert token_call.body["grant_type"] == "refresh_token"
    assert token_call.body["refresh_token"] == google_oauth_config(fake.base_url)["refresh_token"]
    assert token_call.body["client_id"] and token_call.body["client_secret"]
    # Both uploads carried the one token the endpoint issued: it is cached.
    issued = next(iter(fake.google_tokens))
    uploads = fake.calls_to("google_ads")
    assert [c.headers["authorization"] for c in uploads] == [f"Bearer {issued}"] * 2
    assert connector.refreshes == 1 and fake.delivered == {"conv:1": 1, "conv:2": 1}


async def test_the_token_is_refreshed_before_it_expires(fake: FakeProviders, http: httpx.AsyncClient) -> None:
    fake.google_token_lifetime = 2  # seconds; the connector refreshes at half-life at the latest
    connector = oauth_connector(fake, http)
    await connector.send([conversion(1)])
    await asyncio.sleep(1.2)
    assert all(r.ok for r in await connector.send([conversion(2)]))
    assert connector.refreshes == 2
    # No upload was ever refused: the new token came before the old one ran out.
    assert [c.status for c in fake.calls_to("google_ads")] == [200, 200]
    tokens = [c.headers["authorization"] for c in fake.calls_to("google_ads")]
    assert tokens[0] != tokens[1]


async def test_a_401_refreshes_once_and_the_send_goes_through(
    fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    connector = oauth_connector(fake, http)
    await connector.send([conversion(1)])
    fake.expire_google_tokens()  # Google revoked or expired the token early
    results = await connector.send([conversion(2)])
    assert all(r.ok for r in results)
    assert [c.status for c in fake.calls_to("google_ads")] == [200, 401, 200]
    assert connector.refreshes == 2 and fake.delivered["conv:2"] == 1


async def test_a_second_401_is_an_authentication_failure(
    fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    connector = oauth_connector(fake, http, developer_token="wrong")  # a fresh token cannot fix this
    with pytest.raises(AuthenticationFailure) as caught:
        await connector.send([conversion(1)])
    assert not isinstance(caught.value, OAuthRefreshRejected)
    assert [c.status for c in fake.calls_to("google_ads")] == [401, 401]
    assert len(fake.calls_to("google_oauth")) == 2


async def test_concurrent_sends_share_one_refresh(fake: FakeProviders, http: httpx.AsyncClient) -> None:
    connector = oauth_connector(fake, http)
    await asyncio.gather(*(connector.send([conversion(i)]) for i in range(5)))
    assert len(fake.calls_to("google_oauth")) == 1 and len(fake.delivered) == 5


async def test_a_revoked_refresh_token_is_a_permanent_named_failure(
    fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    fake.google_refresh_revoked = True
    connector = oauth_connector(fake, http)
    with pytest.raises(OAuthRefreshRejected) as caught:
        await connector.send([conversion(1)])
    assert isinstance(caught.value, PermanentFailure) and not caught.value.retryable
    assert "invalid_grant" in str(caught.value) and "REFRESH_TOKEN" in str(caught.value)
    assert caught.value.provider_error == {
        "error": "invalid_grant",
        "error_description": "Token has been expired or revoked.",
    }
    assert fake.calls_to("google_ads") == []  # nothing reached the API


async def test_a_wrong_client_secret_names_the_client_settings(
    fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    connector = oauth_connector(fake, http, client_secret="nope")
    with pytest.raises(OAuthRefreshRejected, match="invalid_client.*CLIENT_ID and CLIENT_SECRET"):
        await connector.send([conversion(1)])


async def test_a_token_endpoint_outage_is_retried(fake: FakeProviders, http: httpx.AsyncClient) -> None:
    fake.fail_next("google_oauth", 503, {"error": "temporarily_unavailable"})
    waits: list[float] = []

    async def no_sleep(seconds: float) -> None:
        waits.append(seconds)

    deliverer = Deliverer(oauth_connector(fake, http), DeliveryPolicy(), sleep=no_sleep)
    results = await deliverer.deliver([conversion(1)])
    assert results[0].ok and len(waits) == 1
    assert [c.status for c in fake.calls_to("google_oauth")] == [503, 200]


async def test_the_dispatcher_dead_letters_on_a_revoked_grant_and_pauses_the_connector(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    fake.google_refresh_revoked = True
    connector = oauth_connector(fake, http)
    with db_engine.begin() as conn:
        customer = conn.execute(insert(customers).values(created_ms=0)).inserted_primary_key[0]
        enqueue_send(
            conn,
            key="spring:1:1",
            campaign="spring",
            customer_id=customer,
            channel="google_ads",
            due_ms=0,
            now_ms=0,
            variables={"gclid": "Cj0abc"},
            connector="google_ads",
        )
    dispatcher = Dispatcher(engine=db_engine, route=lambda channel, name: connector)
    report = await dispatcher.drain()
    assert report.failed == 1 and report.sent == 0
    with db_engine.connect() as conn:
        status, error = conn.execute(select(sends.c.status, sends.c.last_error)).one()
    assert status == "failed" and error.startswith("OAuthRefreshRejected") and "invalid_grant" in error
    assert dispatcher.deliverers["google_ads"].breaker is not None
    assert dispatcher.deliverers["google_ads"].breaker.state == "open"
