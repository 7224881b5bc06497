"""Helpers for the rule-language tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cadence.channels import CHANNELS
from cadence.dsl.loader import LoadResult, load_source


@pytest.fixture
def load() -> Callable[..., LoadResult]:
    """Load rule text with every known channel installed."""

    def _load(text: str, **kwargs: object) -> LoadResult:
        kwargs.setdefault("available_channels", CHANNELS)
        return load_source(text, **kwargs)  # type: ignore[arg-type]

    return _load
