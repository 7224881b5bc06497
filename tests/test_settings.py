"""Configuration: environment over cadence.toml, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadence.cli import main
from cadence.errors import ConfigError
from cadence.settings import load_settings


def test_environment_overrides_the_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "cadence.toml"
    config.write_text(
        'port = 9000\ndefault_timezone = "Europe/Berlin"\n[connectors.sendgrid]\napi_key = "k"\n'
    )
    monkeypatch.setenv("CADENCE_CONFIG", str(config))
    monkeypatch.setenv("CADENCE_PORT", "9100")
    settings = load_settings()
    assert settings.port == 9100
    assert settings.default_timezone == "Europe/Berlin"
    assert settings.connectors["sendgrid"]["api_key"] == "k"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CADENCE_PORT", "70000", "CADENCE_PORT: Input should be less than or equal to 65535"),
        ("CADENCE_DEFAULT_TIMEZONE", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("CADENCE_DATABASE_URL", "mysql://x", "unsupported database 'mysql'"),
        # Lists and tables not written as JSON: pydantic-settings' own error named no variable.
        (
            "CADENCE_RULES_PATHS",
            "rules",
            """CADENCE_RULES_PATHS: not JSON ('rules'); a list is written ["rules"]""",
        ),
        (
            "CADENCE_CONNECTORS",
            "{bad",
            "CADENCE_CONNECTORS: not JSON ('{bad'); a table is written as a JSON object",
        ),
        (
            "CADENCE_LEARNER__ENGAGEMENT_EVENTS",
            "clicked, converted",
            """not JSON ('clicked, converted'); a list is written ["clicked", "converted"]""",
        ),
        ("CADENCE_LEARNER__IGNORE_TRAITS", "city", """not JSON ('city'); a list is written ["city"]"""),
    ],
)
def test_a_wrong_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert message in str(caught.value)
    assert variable in str(caught.value)


def test_the_cli_reports_a_wrong_setting_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CADENCE_PORT", "not-a-port")
    with pytest.raises(SystemExit) as exited:
        main(["db", "status"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "CADENCE_PORT" in err and "Traceback" not in err


def test_learner_snapshot_thresholds_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from cadence.engine.learning import LearnerSubscriber

    monkeypatch.setenv("CADENCE_LEARNER_SNAPSHOT_EVENTS", "500")
    monkeypatch.setenv("CADENCE_LEARNER_SNAPSHOT_SECONDS", "2.5")
    learners = LearnerSubscriber(SimpleNamespace(settings=load_settings()))
    assert (learners.snapshot_every, learners.snapshot_min_seconds) == (500, 2.5)
    assert LearnerSubscriber(snapshot_every=7).snapshot_every == 7
