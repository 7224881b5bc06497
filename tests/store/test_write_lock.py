"""The SQLite write lock: writers across threads and processes take turns and are woken when it frees."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

from cadence.store.db import SQLiteWriteLock, create_db_engine

HOLD = 0.3


def _table(url: str) -> None:
    engine = create_db_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (v INTEGER)")
    engine.dispose()


def _hold_in_child(url: str, started: multiprocessing.synchronize.Event) -> None:
    engine = create_db_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t (v) VALUES (1)")
        started.set()
        time.sleep(HOLD)
    engine.dispose()


def test_a_writer_in_another_process_waits_and_gets_in_when_the_holder_commits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    _table(url)
    engine = create_db_engine(url)  # opened before the fork: the child must still get a lock of its own
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM t").scalar() == 0
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    child = ctx.Process(target=_hold_in_child, args=(url, started))
    child.start()
    try:
        assert started.wait(30)
        t0 = time.perf_counter()
        with engine.begin() as conn:
            waited = time.perf_counter() - t0
            seen = conn.exec_driver_sql("SELECT COUNT(*) FROM t").scalar()
            conn.exec_driver_sql("INSERT INTO t (v) VALUES (2)")
    finally:
        child.join(30)
    assert child.exitcode == 0
    # It waited for the child's transaction, and got in as it committed (SQLite's busy handler alone
    # sleeps in steps of up to 100 ms, on a busy machine for longer).
    assert HOLD * 0.5 < waited < HOLD + 5
    assert seen == 1
    assert (tmp_path / "w.db.write-lock").exists()
    engine.dispose()


def test_threads_take_turns_and_every_write_lands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    _table(url)
    engines = [create_db_engine(url), create_db_engine(url)]  # two engines on one file share the lock
    lock = SQLiteWriteLock.for_path(str(tmp_path / "w.db"))
    waits_before = lock.waits
    inside = []
    overlap = []

    def write(engine_index: int) -> None:
        for i in range(20):
            with engines[engine_index].begin() as conn:
                inside.append(1)
                if len(inside) > 1:
                    overlap.append(i)
                conn.exec_driver_sql("INSERT INTO t (v) VALUES (?)", (i,))
                time.sleep(0.002)
                inside.pop()

    threads = [threading.Thread(target=write, args=(k % 2,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with engines[0].connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM t").scalar() == 80
    assert overlap == []
    assert lock.waits > waits_before  # they did wait for each other, on this lock
    # A rolled-back transaction lets the next writer in too.
    try:
        with engines[1].begin() as conn:
            conn.exec_driver_sql("INSERT INTO t (v) VALUES (99)")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert lock.acquire()
    lock.release()
    for engine in engines:
        engine.dispose()


def test_checkpoints_run_in_the_background_once_the_wal_is_large(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    _table(url)
    engine = create_db_engine(url)
    lock = SQLiteWriteLock.for_path(str(tmp_path / "w.db"))
    lock.checkpoint_bytes = 1024 * 1024
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0  # not inside COMMIT
    wal = tmp_path / "w.db-wal"
    for i in range(10):
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t (v) VALUES (?)", (i,))
    assert wal.stat().st_size < lock.checkpoint_bytes  # no checkpoint without a large WAL
    assert lock.checkpoints == 0
    blob = "x" * 40_000
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE b (v TEXT)")
        for _ in range(40):
            conn.exec_driver_sql("INSERT INTO b (v) VALUES (?)", (blob,))
    deadline = time.monotonic() + 30
    while lock.checkpoints == 0 and time.monotonic() < deadline:  # the size is looked at every 50 ms
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t (v) VALUES (-1)")
        time.sleep(0.01)
    assert lock.checkpoints == 1
    # Checkpointed: the blobs' pages were copied from the WAL into the database file.
    assert (tmp_path / "w.db").stat().st_size > 40 * 40_000
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM b").scalar() == 40
    engine.dispose()
