"""Helpers for scheduler tests: rules from text, seeded customers, a scheduler on a fixed clock."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from sqlalchemy import Engine, select

from cadence.channels import CHANNELS
from cadence.clock import FixedClock
from cadence.dsl.loader import load_source
from cadence.engine.campaign import CompiledRuleset
from cadence.scheduler.occurrences import ms
from cadence.scheduler.seed import SeedCustomer, seed_customers
from cadence.scheduler.service import PushScheduler, SchedulerConfig
from cadence.store.schema.scheduler import scheduled_runs
from cadence.store.schema.sends import sends

MONDAY = ms("2026-03-02T00:00")


def compile_rules(text: str) -> CompiledRuleset:
    result = load_source(text)
    return result.raise_for_errors()


class Rules:
    """A mutable ruleset slot, like the API's holder."""

    def __init__(self, text: str) -> None:
        self.current: CompiledRuleset | None = compile_rules(text)

    def set(self, text: str) -> None:
        self.current = compile_rules(text)


def make_scheduler(
    engine: Engine, rules: Rules, clock: FixedClock, *, owner: str = "a", **config: Any
) -> PushScheduler:
    return PushScheduler(
        engine=engine,
        clock=clock,
        rules=lambda: rules.current,
        available_channels=CHANNELS,
        config=SchedulerConfig(**config),
        owner=owner,
    )


def sent_keys(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(sends.c.idempotency_key).order_by(sends.c.id)))


def send_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(sends).order_by(sends.c.id)))


def runs(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(scheduled_runs).order_by(scheduled_runs.c.fire_ms, scheduled_runs.c.campaign))
        )


def customers(n: int, *, start: int = 1, **kw: Any) -> list[SeedCustomer]:
    return [SeedCustomer(id=i, **kw) for i in range(start, start + n)]


@pytest.fixture
def seed(db_engine: Engine) -> Callable[[Sequence[SeedCustomer]], None]:
    def write(rows: Sequence[SeedCustomer]) -> None:
        seed_customers(db_engine, rows, now_ms=MONDAY)

    return write
