"""PostgreSQL's look-ahead: each batch stitches the next batch's identities in its own transaction,
and sends its writes in pipeline mode. A restart, a refused write or an erasure in between must
still end in the state of an uninterrupted run (on SQLite these run the plain path)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from cadence.engine.consent import ConsentSubscriber
from cadence.engine.loop import IDENTITY, EngineLoop
from cadence.engine.privacy import erase_customer
from cadence.engine.profiles import ProfilesSubscriber
from cadence.runtime import Runtime
from cadence.store.schema.core import checkpoints, identities, profiles
from tests.engine.test_loop import Crashing, RefusedWrite, ev, forget_derived_state, ingest, snapshot, stream


def _loop(runtime: Runtime, *extra: Any, look_ahead: bool = True, batch_size: int = 10) -> EngineLoop:
    loop = EngineLoop(
        runtime, [ProfilesSubscriber(runtime), ConsentSubscriber(), *extra], batch_size=batch_size
    )
    loop.look_ahead = look_ahead
    return loop


def _stored(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(select(checkpoints.c.name, checkpoints.c.position)).all())


def test_look_ahead_gives_the_state_of_batches_without_it(runtime: Runtime, db_engine: Engine) -> None:
    ingest(runtime, *stream())
    _loop(runtime, look_ahead=False, batch_size=7).catch_up()
    plain = snapshot(runtime.engine)
    forget_derived_state(db_engine)
    loop = _loop(runtime, batch_size=7)
    assert loop.catch_up() == 60
    assert snapshot(runtime.engine) == plain
    assert loop.lag() == 0


def test_a_restart_after_a_batch_that_stitched_ahead_ends_in_the_uninterrupted_state(
    runtime: Runtime, db_engine: Engine
) -> None:
    ingest(runtime, *stream())
    _loop(runtime).catch_up()
    uninterrupted = snapshot(runtime.engine)
    forget_derived_state(db_engine)
    first = _loop(runtime)
    assert first.run_once() == 10
    stored = _stored(db_engine)
    assert stored["profiles"] == stored["consent"] == 10
    if db_engine.dialect.name == "postgresql":  # identities of the next batch are committed already
        assert stored[IDENTITY] == 20
        with db_engine.connect() as conn:
            assert conn.scalar(select(func.sum(profiles.c.event_count))) == 10
    # The process dies here; a new one finds identity a batch ahead and applies the rest.
    assert _loop(runtime, batch_size=4).catch_up() == 50
    assert snapshot(runtime.engine) == uninterrupted


def test_a_refused_pipelined_write_rolls_back_the_batch_and_its_look_ahead(
    runtime: Runtime, db_engine: Engine
) -> None:
    ingest(runtime, *stream())
    _loop(runtime, RefusedWrite(fail=False)).catch_up()
    uninterrupted = snapshot(runtime.engine)
    forget_derived_state(db_engine)
    refused = RefusedWrite(fail=False)
    loop = _loop(runtime, refused)
    assert loop.run_once() == 10
    before = _stored(db_engine)
    with db_engine.connect() as conn:
        ids_before = conn.scalar(select(func.count()).select_from(identities))
    refused.fail = True
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        loop.run_once()
    # Nothing of that batch stayed: neither its profiles, nor the identities it stitched ahead.
    assert _stored(db_engine) == before
    with db_engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(identities)) == ids_before
        assert conn.scalar(select(func.sum(profiles.c.event_count))) == 10
    refused.fail = False
    assert loop.catch_up() == 50
    assert snapshot(runtime.engine) == uninterrupted


def test_an_erasure_between_batches_is_not_undone_by_the_stitched_next_batch(
    runtime: Runtime, db_engine: Engine
) -> None:
    calls = [ev(n, event="Viewed", userId="gone" if n in (3, 5, 7) else "stays") for n in range(1, 9)]
    ingest(runtime, *calls)
    loop = EngineLoop(runtime, [ProfilesSubscriber(runtime), ConsentSubscriber()], batch_size=4)
    assert loop.run_once() == 4  # on PostgreSQL "gone" was stitched ahead with the events 5-8
    # Another process erases "gone" (its loop is not this one: nothing tells this loop directly).
    erase_customer(runtime=runtime, ref="gone", requested_by="test", loop=EngineLoop(runtime))
    assert loop.catch_up() == 2  # the erased customer's events are gone from the log
    with db_engine.connect() as conn:
        counts = dict(
            conn.execute(
                select(identities.c.value, profiles.c.event_count).join(
                    profiles, profiles.c.customer_id == identities.c.customer_id
                )
            ).all()
        )
    assert counts == {"stays": 5}


def test_the_collector_runs_again_after_any_batch_but_one_of_a_drain(runtime: Runtime) -> None:
    """Between the batches of a drain it may stay paused (they carry the next batch's events); never
    after it, after a lone batch, or after a failed one."""
    import gc

    ingest(runtime, *stream())
    crashing = Crashing(fail_on=35)
    loop = _loop(runtime, crashing)
    assert gc.isenabled()
    try:
        assert loop.run_once() == 10  # a lone batch, with the next one carried on PostgreSQL
        assert gc.isenabled()
        with pytest.raises(RuntimeError, match="simulated crash"):
            loop.catch_up()
        assert gc.isenabled()
        crashing.fail_on = -1
        assert loop.catch_up() == 30  # 11-30 were applied before the crash
        assert gc.isenabled()
    finally:
        gc.enable()
