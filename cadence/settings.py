"""Configuration: environment variables ``CADENCE_*`` over an optional ``cadence.toml``.

Nested settings use ``__`` in environment variables, e.g.
``CADENCE_CONNECTORS__SENDGRID__API_KEY``. Build settings with :func:`load_settings`
(it turns a validation failure into a :class:`~cadence.errors.ConfigError` that names
the setting); never at import time.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from cadence.errors import ConfigError

__all__ = ["ApiKeyConfig", "LearnerSettings", "Scope", "Settings", "load_settings"]

Scope = Literal["ingest", "decide", "admin"]
SCOPES: tuple[Scope, ...] = ("ingest", "decide", "admin")


class ApiKeyConfig(BaseModel):
    """An API key given in configuration: only its SHA-256 hash is ever stored."""

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    scopes: list[Scope] = Field(default_factory=lambda: ["ingest"])


EngagementKind = Literal["opened", "clicked", "converted"]


class LearnerSettings(BaseModel):
    """How the decision learners value a send and when they learn its outcome.

    Set in ``cadence.toml`` under ``[learner]`` or as ``CADENCE_LEARNER__<NAME>``. The value of
    a send is ``click_value * P(engagement) - unsubscribe_cost * P(unsubscribe)``. Values read
    only when deciding (``click_value``, ``unsubscribe_cost``, ``volume_optimism``) apply to the
    stored learner at the next start; a change to one that shapes what was learned
    (``horizon_hours``, ``label_delay_hours``, ``engagement_events``, ``hour_open_weight``,
    ``ignore_traits``) makes the learner learn again from the event log (docs/decisions.md).
    """

    model_config = {"extra": "forbid"}

    click_value: float = Field(default=1.0, gt=0, description="worth of one engagement")
    unsubscribe_cost: float = Field(default=10.0, ge=0, description="cost of one unsubscribe, in clicks")
    horizon_hours: float = Field(
        default=48.0, gt=0, le=24 * 90, description="after this long without engagement a send is a no"
    )
    label_delay_hours: float | None = Field(
        default=6.0,
        gt=0,
        description="learn a send provisionally this long after it (None: wait for the horizon)",
    )
    engagement_events: list[EngagementKind] = Field(
        default_factory=lambda: ["clicked", "converted"], min_length=1
    )
    hour_open_weight: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="weight of the customer's opens in the hour they read (0: the hour from clicks alone)",
    )
    volume_optimism: float = Field(
        default=0.25,
        ge=0,
        le=3,
        description="send when worth it with the customer's own effect this many sd up",
    )

    ignore_traits: list[str] = Field(
        default_factory=list,
        description="trait names that are not features, besides those that identify a person (email, phone, ...)",
    )

    @model_validator(mode="after")
    def _delay_inside_horizon(self) -> LearnerSettings:
        if self.label_delay_hours is not None and self.label_delay_hours >= self.horizon_hours:
            raise ValueError(
                f"label_delay_hours ({self.label_delay_hours}) must be shorter than horizon_hours "
                f"({self.horizon_hours})"
            )
        return self

    def to_config(self) -> Any:
        """The :class:`~cadence.engine.learners.LearnerConfig` these settings describe."""
        from dataclasses import replace

        from cadence.channels import Feedback
        from cadence.engine.learners import HOUR_MS, IDENTIFYING_TRAITS, LearnerConfig

        delay = self.label_delay_hours
        return replace(
            LearnerConfig(),
            click_value=self.click_value,
            unsubscribe_cost=self.unsubscribe_cost,
            horizon_ms=round(self.horizon_hours * HOUR_MS),
            label_delay_ms=None if delay is None else round(delay * HOUR_MS),
            engagement_events=frozenset(Feedback(kind) for kind in self.engagement_events),
            volume_optimism=self.volume_optimism,
            hour_open_weight=self.hour_open_weight,
            ignored_traits=IDENTIFYING_TRAITS | set(self.ignore_traits),
        )


class Settings(BaseSettings):
    """Everything cadence can be told. Field names map to ``CADENCE_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="CADENCE_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file="cadence.toml",
    )

    database_url: str = "sqlite:///./cadence.db"
    rules_paths: list[Path] = Field(default_factory=lambda: [Path("rules")])
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    default_timezone: str = "UTC"

    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    rate_limit_per_second: float = Field(default=200.0, gt=0)
    rate_limit_burst: int = Field(default=400, ge=1)

    max_call_bytes: int = Field(default=32 * 1024, ge=1024)
    max_batch_bytes: int = Field(default=500 * 1024, ge=1024)
    max_batch_events: int = Field(default=2500, ge=1)
    # Origins (``https://shop.example.com``, or ``*``) whose pages may POST to the ingestion routes.
    cors_origins: list[str] = Field(default_factory=list)
    # Signs the dashboard's session cookies; when unset one is generated and kept in the database.
    ui_secret: SecretStr | None = None

    engine_enabled: bool = True
    engine_batch_size: int = Field(default=10_000, ge=1)
    engine_poll_seconds: float = Field(default=0.5, gt=0)
    #: Failed tries of one engine-loop batch after which the loop finds the event it cannot apply and
    #: sets it aside (``engine_quarantine``) to go on; 0: never, the batch is retried until it commits.
    engine_quarantine_after: int = Field(default=3, ge=0)
    # How long a ``fresh`` decision (one with ``at``, or ``fresh: true``) waits for the engine loop
    # to apply the events accepted before it; past it the decision answers 503.
    decision_fresh_timeout_seconds: float = Field(default=10.0, gt=0)
    # How often the leader refreshes materialised attribution (causal, Shapley, Markov); 0: never.
    attribution_refresh_seconds: float = Field(default=300.0, ge=0)

    scheduler_enabled: bool = True
    # A run missed while no process was up: "run_once" runs the latest one late, "skip" records it skipped.
    scheduler_misfire: Literal["run_once", "skip"] = "run_once"
    scheduler_misfire_grace_seconds: float = Field(default=3600.0, ge=0)
    scheduler_lease_seconds: float = Field(default=120.0, gt=0)
    scheduler_chunk_size: int = Field(default=2000, ge=1)
    # Narrow a push in SQL to the customers its campaigns' audiences and channels could accept.
    scheduler_prefilter: bool = True
    scheduler_rules_poll_seconds: float = Field(default=5.0, gt=0)
    # Processes that do not lead reload the latest learner snapshot this often.
    learner_refresh_seconds: float = Field(default=10.0, gt=0)
    # The leading process snapshots its learners once they applied this many events since the
    # last snapshot and at least this many seconds passed (a snapshot pickles every customer's
    # statistics: about a second at 20,000 customers). A restart replays the log after the latest.
    learner_snapshot_events: int = Field(default=10_000, ge=1)
    learner_snapshot_seconds: float = Field(default=30.0, ge=0)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)

    # Compaction of derived state (leader only; `cadence db compact` runs it by hand).
    compaction_enabled: bool = True
    compaction_interval_seconds: float = Field(default=3600.0, gt=0)
    # Day buckets of profile aggregates are kept at least this long (and as long as the rules read).
    compaction_profile_days: int = Field(default=400, ge=1)
    # Finished sends and scheduled runs are kept at least this long (and as long as caps look back).
    compaction_sends_days: int = Field(default=90, ge=1)
    # Unpinned learner snapshots kept per learner (pinned ones are always kept).
    compaction_snapshots_kept: int = Field(default=5, ge=1)
    # Open attribution journeys with no touch for this long are dropped (None: kept; Markov counts
    # them as journeys that did not convert).
    compaction_journey_days: int | None = Field(default=None, ge=91)
    # Events older than this are deleted from the log once every part has applied them (None: never).
    event_retention_days: int | None = Field(default=None, ge=1)

    disable_plugin_autoload: bool = False
    plugins_allow: list[str] | None = None
    connectors: dict[str, dict[str, Any]] = Field(default_factory=dict)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False

    @field_validator("default_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        scheme = value.split(":", 1)[0]
        if scheme.split("+", 1)[0] not in {"sqlite", "postgresql", "postgres"}:
            raise ValueError(f"unsupported database {scheme!r}: use sqlite:///PATH or postgresql://...")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get("CADENCE_CONFIG", "cadence.toml"))
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_path),
        )


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings` from the environment, ``cadence.toml`` and ``overrides``.

    A bad value raises :class:`ConfigError` naming each wrong setting as its
    environment variable, e.g. ``CADENCE_PORT: Input should be less than or equal to 65535``.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "CADENCE_" + "__".join(str(part).upper() for part in err["loc"])
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from exc
    except SettingsError as exc:
        # a nested list that is not JSON: pydantic-settings' own error names no variable
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_not_json(exc))) from exc


def _not_json(exc: SettingsError) -> list[str]:
    """The variables of list and table settings whose value is not JSON, each with what to write.

    The setting is the one ``exc`` names (pydantic-settings names no variable): ``CADENCE_<FIELD>``
    itself, or ``CADENCE_<FIELD>__<NAME>`` for a list inside a table (``[learner]``). ``city,
    referrer`` for a list is said to be written ``["city", "referrer"]``.
    """
    found = re.search(r'field "(\w+)"', str(exc))
    field = Settings.model_fields.get(found.group(1)) if found else None
    if found is None or field is None:
        return [str(exc)]
    top = f"CADENCE_{found.group(1).upper()}"
    table = (
        field.annotation
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        else None
    )
    problems = []
    for name, value in sorted(os.environ.items()):
        upper = name.upper()
        if upper == top:
            annotation = field.annotation
        elif table is not None and upper.startswith(top + "__"):
            sub = table.model_fields.get(upper[len(top) + 2 :].lower())
            annotation = sub.annotation if sub is not None else None
        else:
            continue
        is_list = list in (get_origin(annotation), *map(get_origin, get_args(annotation)))
        if not is_list and annotation is not field.annotation:
            continue  # a scalar inside a table: never parsed as JSON
        try:
            json.loads(value)
        except ValueError:
            if is_list:
                written = "a list is written " + json.dumps([part.strip() for part in value.split(",")])
            else:
                written = 'a table is written as a JSON object, e.g. {"name": "value"}'
            problems.append(f"{name}: not JSON ({value!r}); {written}")
    return problems or [str(exc)]
