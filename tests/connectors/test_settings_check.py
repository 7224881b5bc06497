"""Each built-in connector names the settings it cannot send without, as environment variables."""

from __future__ import annotations

import pytest

from cadence.connectors.testing import connector_config, google_oauth_config
from cadence.plugins.manager import build_connectors, make_plugin_manager
from cadence.settings import Settings


def missing(name: str, config: dict[str, object]) -> list[str]:
    settings = Settings(disable_plugin_autoload=True, connectors={name: config}, _env_file=None)  # type: ignore[call-arg]
    connector = build_connectors(settings, pm=make_plugin_manager(settings)).get(name)
    assert connector is not None
    return connector.missing_settings()


@pytest.mark.parametrize("name", ["sendgrid", "sms", "facebook", "google_ads"])
def test_a_complete_configuration_misses_nothing(name: str) -> None:
    assert missing(name, connector_config(name, "http://127.0.0.1:9")) == []


def test_google_ads_with_a_refresh_token_needs_no_access_token() -> None:
    assert missing("google_ads", google_oauth_config("http://127.0.0.1:9")) == []
    config = {k: v for k, v in google_oauth_config("http://127.0.0.1:9").items() if k != "client_secret"}
    assert missing("google_ads", config) == ["CADENCE_CONNECTORS__GOOGLE_ADS__CLIENT_SECRET"]


@pytest.mark.parametrize(
    ("name", "drop", "expected"),
    [
        ("sendgrid", ("api_key", "from_email"), ["API_KEY", "FROM_EMAIL"]),
        ("sms", ("auth_token",), ["AUTH_TOKEN"]),
        ("sms", ("from_number",), ["FROM_NUMBER"]),
        ("facebook", ("access_token",), ["ACCESS_TOKEN"]),
        ("google_ads", ("developer_token", "access_token"), ["DEVELOPER_TOKEN", "ACCESS_TOKEN"]),
    ],
)
def test_a_missing_setting_is_named(name: str, drop: tuple[str, ...], expected: list[str]) -> None:
    config = {k: v for k, v in connector_config(name, "http://127.0.0.1:9").items() if k not in drop}
    assert missing(name, config) == [f"CADENCE_CONNECTORS__{name.upper()}__{key}" for key in expected]


def test_alternatives_count() -> None:
    sms = {k: v for k, v in connector_config("sms", "http://127.0.0.1:9").items() if k != "from_number"}
    assert missing("sms", sms | {"messaging_service_sid": "MG1"}) == []
    sms = {k: v for k, v in connector_config("sms", "http://127.0.0.1:9").items() if k != "auth_token"}
    assert missing("sms", sms | {"api_key_sid": "SK1", "api_key_secret": "s"}) == []
