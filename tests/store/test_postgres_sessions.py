"""What every PostgreSQL session cadence opens is set to, and the trigger functions' own settings.

PostgreSQL only. JIT is off in cadence's sessions (the SQLAlchemy engine's and the fast
driver's) unless the URL sets libpq ``options`` itself: JIT compiled the scheduled push's
prefilter at every call, about 600 ms each. The two update triggers that join their
transition tables keep nested loops and JIT out of their plans (migration ``trigger_0001``):
a plan cached from small statements joined a 5,000-send dispatcher round pair by pair.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text

from cadence.store.db import create_db_engine
from cadence.store.driver import driver_target


@pytest.fixture
def pg(db_engine: Engine) -> Engine:
    if db_engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's sessions")
    return db_engine


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_cadence_sessions_run_without_jit_unless_the_url_says(pg: Engine) -> None:
    with pg.connect() as conn:
        assert conn.scalar(text("SHOW jit")) == "off"
    target = driver_target(url_of(pg))
    assert target is not None and target.postgres
    raw = target.connect()
    try:
        assert raw.execute("SHOW jit").fetchone()[0] == "off"
    finally:
        raw.close()
    mine = create_db_engine(url_of(pg) + "?options=-c%20jit%3Don%20-c%20work_mem%3D8MB")
    try:
        with mine.connect() as conn:
            assert (conn.scalar(text("SHOW jit")), conn.scalar(text("SHOW work_mem"))) == ("on", "8MB")
    finally:
        mine.dispose()


def test_the_joining_triggers_price_nested_loops_and_jit_out(pg: Engine) -> None:
    with pg.connect() as conn:
        config = dict(
            conn.execute(
                text(
                    "SELECT proname, proconfig FROM pg_proc WHERE proname IN"
                    " ('cadence_inputs_sends_upd', 'cadence_inputs_customers_upd')"
                )
            ).all()
        )
    assert config == {
        name: ["enable_nestloop=off", "jit=off"]
        for name in ("cadence_inputs_sends_upd", "cadence_inputs_customers_upd")
    }
