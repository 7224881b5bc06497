"""An erased customer leaves nothing in the learners: not in memory, not in any stored snapshot.

A snapshot keeps each customer's statistics (their sends' times, clicks and click hours, their
own effects) and pending decisions. An erasure used to correct the live learners of the process
that ran it and no stored snapshot: the latest, the pinned one and the older ones kept for
rolling back all still held the customer, and a restart loaded them back. Now the erasure notes
the customer and the leader's scrub job (or ``cadence customers erase`` itself) rewrites the
snapshots. Both databases.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from cadence.cli import app as cli
from cadence.engine.learners import DecisionLearner
from cadence.engine.learning import load_snapshot, pin_snapshot, scrub_snapshots
from cadence.sim.api import ApiPolicy, in_process_api
from cadence.store.schema.decisions import learner_scrubs, learner_snapshots
from tests.api.test_learners_merges import Run, knowledge
from tests.api.test_simulate_api import learners_of

DAY0 = datetime(2026, 3, 2, 9, tzinfo=UTC)


def held(learner: DecisionLearner, customer_id: int) -> bool:
    """Whether ``learner`` keeps anything of the customer."""
    return customer_id in learner.customers or any(
        p.customer_id == customer_id for p in learner.pending.values()
    )


def stored(engine: Engine) -> list[DecisionLearner]:
    with engine.connect() as conn:
        versions = conn.execute(select(learner_snapshots.c.version)).scalars().all()
        return [s for v in versions if (s := load_snapshot(conn, name="learners", version=v)) is not None]


@pytest.fixture
def run(db_engine: Engine) -> Iterator[tuple[Engine, ApiPolicy, Run]]:
    url = db_engine.url.render_as_string(hide_password=False)
    with in_process_api(url) as api:
        yield db_engine, api, Run(api)


def learn_both(engine: Engine, api: ApiPolicy, run: Run) -> dict[str, int]:
    """Two customers with sends, clicks and pending decisions, in three stored snapshots (one pinned)."""
    ids: dict[str, int] = {}
    for who in ("erin", "other"):
        run.post(
            "/v1/identify", {"userId": who, "traits": {"timezone": "UTC"}, "timestamp": DAY0.isoformat()}
        )
    api.sync()
    app: Any = api.client.app
    for day in range(3):
        at = DAY0 + timedelta(days=day)
        for who in ("erin", "other"):
            answer = run.decide(who, at)
            run.feedback({"userId": who}, answer, "Message Delivered", timedelta(minutes=1))
            run.feedback({"userId": who}, answer, "Message Clicked", timedelta(minutes=5))
        run.flush()
        with engine.begin() as conn:
            version = learners_of(app).snapshot(conn, now_ms=int(at.timestamp() * 1000))
            if day == 0:
                pin_snapshot(conn, name="learners", version=version)
                # served from now on, as the server's follow job reloads it
                learners_of(app).pinned = load_snapshot(conn, name="learners", pinned=True)
    for who in ("erin", "other"):
        ids[who] = int(api.client.get(f"/v1/customers/{who}", headers=api.headers).json()["customer_id"])
    return ids


def clicked(run: Run, days: Iterable[int], who: Sequence[str]) -> None:
    """A decision for each of ``who`` on each of ``days`` (from DAY0), each clicked, posted day by day."""
    for day in days:
        at = DAY0 + timedelta(days=day)
        for customer in who:
            answer = run.decide(customer, at)
            run.feedback({"userId": customer}, answer, "Message Clicked", timedelta(minutes=5))
        run.flush()


def notes(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(select(learner_scrubs.c.customer_id)).scalars())


def test_an_erasure_forgets_at_once_and_the_scrub_takes_the_customer_out_of_every_stored_snapshot(
    run: tuple[Engine, ApiPolicy, Run],
) -> None:
    engine, api, driver = run
    ids = learn_both(engine, api, driver)
    learners = learners_of(api.client.app)
    snapshots = stored(engine)
    assert len(snapshots) == 3 and all(held(s, ids["erin"]) and held(s, ids["other"]) for s in snapshots)
    assert held(learners.learner, ids["erin"]) and learners.pinned is not None

    erased = api.client.delete("/v1/customers/erin", headers=api.headers)
    assert erased.status_code == 200, erased.text
    assert not held(learners.learner, ids["erin"]) and held(learners.learner, ids["other"])
    assert not held(learners.pinned, ids["erin"])
    assert notes(engine) == [ids["erin"]]
    url = engine.url.render_as_string(hide_password=False)
    with in_process_api(url) as restarted:  # before the scrub: a start forgets the noted customers
        restarted.sync()
        again = learners_of(restarted.client.app)
        assert again.pinned is not None
        assert not held(again.learner, ids["erin"]) and not held(again.pinned, ids["erin"])
        assert held(again.learner, ids["other"])

    # The leader's job, every 10 s. The erasure's own snapshot is clean: nothing was learned since
    # the newest, so it was rewritten in place rather than added (erasures one after another
    # filled the kept snapshots with copies of one state, and compaction dropped the older ones).
    assert scrub_snapshots(engine) == (1, 2)
    snapshots = stored(engine)
    assert len(snapshots) == 3
    assert not any(held(s, ids["erin"]) for s in snapshots)
    assert all(held(s, ids["other"]) for s in snapshots)  # the others' are kept as they were
    assert notes(engine) == [] and scrub_snapshots(engine) == (0, 0)


def test_erasures_with_nothing_learned_between_take_one_snapshot_not_one_each(
    run: tuple[Engine, ApiPolicy, Run],
) -> None:
    """An outside check: 25 erasures in a row left 25 snapshots at one log position, and the hourly
    compaction (it keeps the newest five unpinned) deleted every earlier one: nothing to roll back to."""
    engine, api, driver = run
    learn_both(engine, api, driver)
    for who in ("gone-1", "gone-2", "gone-3"):
        driver.post("/v1/identify", {"userId": who, "timestamp": DAY0.isoformat()})
    api.sync()
    with engine.connect() as conn:
        before = conn.execute(
            select(learner_snapshots.c.version, learner_snapshots.c.position).order_by(
                learner_snapshots.c.version
            )
        ).all()
    for who in ("gone-1", "gone-2", "gone-3", "erin"):
        assert api.client.delete(f"/v1/customers/{who}", headers=api.headers).status_code == 200
    with engine.connect() as conn:
        after = conn.execute(
            select(learner_snapshots.c.version, learner_snapshots.c.position).order_by(
                learner_snapshots.c.version
            )
        ).all()
    # One snapshot for the four, at the position the identifies moved the learners to (the older
    # ones, the rollback points, are kept as they were).
    assert after[: len(before)] == before and len(after) == len(before) + 1
    assert after[-1][1] > before[-1][1]


def test_the_cli_erasure_beside_a_running_server_leaves_the_customer_in_no_snapshot(
    run: tuple[Engine, ApiPolicy, Run],
) -> None:
    """``cadence customers erase`` scrubs the stored snapshots itself; the server's learners, not
    told, forget the customer before they write their next snapshot."""
    engine, api, driver = run
    ids = learn_both(engine, api, driver)
    learners = learners_of(api.client.app)
    url = engine.url.render_as_string(hide_password=False)
    erased = CliRunner().invoke(cli, ["--database-url", url, "customers", "erase", "erin", "--yes"])
    assert erased.exit_code == 0, erased.output
    assert "3 learner snapshots rewritten without the customer" in erased.output
    assert not any(held(s, ids["erin"]) for s in stored(engine)) and notes(engine) == []
    assert held(learners.learner, ids["erin"])  # this process was not told

    with engine.begin() as conn:
        version = learners.snapshot(conn, now_ms=int((DAY0 + timedelta(days=4)).timestamp() * 1000))
        latest = load_snapshot(conn, name="learners", version=version)
    assert latest is not None and not held(latest, ids["erin"]) and held(latest, ids["other"])
    assert not held(learners.learner, ids["erin"])


def test_a_restart_after_an_erasure_knows_what_the_live_learners_knew(
    run: tuple[Engine, ApiPolicy, Run],
) -> None:
    """The shared weights keep what the erased customer's labels taught the live learners; a restart
    from the snapshot before the erasure replayed a log without their events, and every other
    customer's values moved (an outside check: 64 of 64 options). The erasure now snapshots them."""
    engine, api, driver = run
    learn_both(engine, api, driver)
    clicked(driver, range(3, 6), ("erin", "other"))  # labels learned after the last snapshot
    learners = learners_of(api.client.app)
    assert api.client.delete("/v1/customers/erin", headers=api.headers).status_code == 200
    before = knowledge(learners.learner)
    url = engine.url.render_as_string(hide_password=False)
    with in_process_api(url) as restarted:
        restarted.sync()
        assert knowledge(learners_of(restarted.client.app).learner) == before


@pytest.mark.parametrize("then", ["a batch", "an idle poll"])
def test_a_restart_after_a_cli_erasure_beside_the_server_knows_what_the_live_learners_knew(
    run: tuple[Engine, ApiPolicy, Run], then: str
) -> None:
    """``cadence customers erase`` runs in its own process: the server's learners forget the customer
    before their next batch, or on the loop's next poll while the log is idle, and are snapshotted
    at once, so a restart knows what they knew (before, the next snapshot came 10,000 events later,
    and a restart meanwhile replayed a log without the customer's events from the snapshot before).
    (The in-process server runs no loop thread: the test polls as the thread would.)"""
    engine, api, driver = run
    ids = learn_both(engine, api, driver)
    clicked(driver, range(3, 6), ("erin", "other"))  # labels learned after the last snapshot
    learners = learners_of(api.client.app)
    url = engine.url.render_as_string(hide_password=False)
    count = len(stored(engine))
    erased = CliRunner().invoke(cli, ["--database-url", url, "customers", "erase", "erin", "--yes"])
    assert erased.exit_code == 0, erased.output
    assert held(learners.learner, ids["erin"])
    if then == "a batch":
        clicked(driver, [6], ("other",))  # another customer's feedback
    else:
        api.client.app.state.engine_loop.idle()  # a poll of the server's loop that found no event
    assert not held(learners.learner, ids["erin"]) and len(stored(engine)) == count + 1
    before = knowledge(learners.learner)
    with in_process_api(url) as restarted:
        restarted.sync()
        assert knowledge(learners_of(restarted.client.app).learner) == before


def test_a_snapshot_pickled_before_an_erasure_is_written_without_the_customer(
    run: tuple[Engine, ApiPolicy, Run],
) -> None:
    """The idle loop pickles the learners outside the write transaction (about a second at 20,000
    customers, which held SQLite's write lock and every commit); an erasure committed between the
    pickling and the write must still leave the customer out of what is written."""
    engine, api, driver = run
    ids = learn_both(engine, api, driver)
    learners = learners_of(api.client.app)
    prepared = learners.prepare_snapshot(engine)
    url = engine.url.render_as_string(hide_password=False)
    erased = CliRunner().invoke(cli, ["--database-url", url, "customers", "erase", "erin", "--yes"])
    assert erased.exit_code == 0, erased.output
    version = learners.write_snapshot(engine, prepared, now_ms=int(DAY0.timestamp() * 1000))
    with engine.connect() as conn:
        written = load_snapshot(conn, name="learners", version=version)
    assert written is not None and not held(written, ids["erin"]) and held(written, ids["other"])
    # With nothing erased meanwhile, what was pickled is what is written.
    again = learners.prepare_snapshot(engine)
    version = learners.write_snapshot(engine, again, now_ms=int(DAY0.timestamp() * 1000))
    with engine.connect() as conn:
        (state,) = conn.execute(
            select(learner_snapshots.c.state).where(learner_snapshots.c.version == version)
        ).one()
    assert state == again
