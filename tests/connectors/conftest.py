"""Fixtures for connector tests: the fake providers on loopback, an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from cadence.connectors.testing import FakeProviders, LoopbackServer


@pytest.fixture(scope="session")
def provider_server() -> Iterator[tuple[FakeProviders, LoopbackServer]]:
    fake = FakeProviders()
    server = LoopbackServer(fake.app).start()
    fake.base_url = server.url
    yield fake, server
    server.stop()


@pytest.fixture
def fake(provider_server: tuple[FakeProviders, LoopbackServer]) -> FakeProviders:
    """The fake providers, with fresh state."""
    providers, _ = provider_server
    providers.reset()
    return providers


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client
