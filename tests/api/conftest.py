"""Fixtures shared by the API's decision tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cadence.runtime import Runtime
from tests.api.test_decisions_cache import Api


@pytest.fixture
def api(runtime: Runtime) -> Iterator[Api]:
    """A test client whose one customer, u1 (Ada, Europe/Berlin), is identified.

    Modules that need other customers define their own ``api``, which overrides this one.
    """
    api = Api(runtime)
    api.identify(userId="u1", traits={"name": "Ada", "timezone": "Europe/Berlin"})
    yield api
    api.state.close()
