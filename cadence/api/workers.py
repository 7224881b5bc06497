"""``cadence serve --workers N``: N API processes on one socket, one of them the leader.

The parent checks the port, then starts N worker processes (forked after importing the app once), each running
the full app on its own ``SO_REUSEPORT`` socket of that port: the kernel spreads new
connections between them.
Every worker builds the engine loop, the scheduler and the dispatcher, but they share
one leader lock (:class:`~cadence.engine.leader.Leadership`, a PostgreSQL advisory
lock): exactly one worker runs them while the others serve the API, with decisions
scored from the latest learner snapshot. When the leader dies, its database session
ends, the lock comes free, and another worker takes over within a second or two; the
parent starts a replacement worker.

On SQLite (a database file, WAL mode) the workers read concurrently and take turns to
write (every write transaction begins ``IMMEDIATE``: a commit re-reads the customer's
sends under the write lock, so caps hold across workers); the leader lock is a file
lock beside the database (:func:`~cadence.engine.leader.sqlite_shared`).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from cadence.errors import ConfigError
from cadence.settings import Settings

__all__ = ["access_log_enabled", "check_workers", "prepare_serving", "run_workers", "settle_heap"]

log = logging.getLogger("cadence.workers")

#: A worker that dies sooner than this after starting is restarted only after a pause.
FAST_FAILURE_SECONDS = 5.0


def check_workers(settings: Settings, workers: int) -> None:
    """Refuse a worker count the database cannot serve (clear message naming the fix).

    >>> check_workers(Settings(database_url="sqlite:///x.db"), 2)
    >>> check_workers(Settings(database_url="sqlite:///:memory:"), 2)
    Traceback (most recent call last):
    ...
    cadence.errors.ConfigError: --workers 2 needs a database the processes share: PostgreSQL or an SQLite file, not an in-memory SQLite database (use --workers 1)
    """
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}")
    url = settings.database_url
    if workers > 1 and url.startswith("sqlite") and url.rstrip("/").endswith((":memory:", "sqlite:")):
        raise ConfigError(
            f"--workers {workers} needs a database the processes share: PostgreSQL or an SQLite file, "
            "not an in-memory SQLite database (use --workers 1)"
        )


def access_log_enabled() -> bool:
    """Whether uvicorn logs each request: ``CADENCE_ACCESS_LOG`` (default on) and its logger at INFO.

    Off when the access logger would drop the line anyway: uvicorn then skips formatting it.
    """
    wanted = os.environ.get("CADENCE_ACCESS_LOG", "1").strip().lower() not in ("0", "false", "no", "off")
    return wanted and logging.getLogger("uvicorn.access").isEnabledFor(logging.INFO)


#: Net new container objects between young collections in a served process (Python's default: 700).
YOUNG_THRESHOLD = 10_000


def settle_heap(_app: Any = None) -> None:
    """Collect once, then freeze what is alive: the cycle collector's full passes skip it from now on.

    A served process holds a few hundred thousand long-lived objects (the web stack, the
    rule language, the learners' libraries); a full (oldest-generation) collection visits
    every one of them and took 200-350 ms under decision load, on the event loop, with
    every request of that worker waiting. ``gc.freeze()`` moves them to the permanent
    generation, which no collection visits; they are still freed by reference counting.
    Run as the last start-up hook of ``cadence serve`` (not in ``create_app``: a process
    that builds many apps, like the test suite, would keep their cycles forever).

    The youngest generation is then collected every :data:`YOUNG_THRESHOLD` net new container
    objects instead of Python's 700. A decision leaves a few objects alive (entries of the
    send-time caches), so with 700 a young collection (about 0.15 ms) landed inside 1.2% of
    ``decide()`` calls, right at their p99 (goal: under 1 ms); now about 0.07% of calls take
    one, about 1.2-1.6 ms each. The collector's total work is about the same; no cycle is
    kept longer than a few seconds of traffic.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)


def prepare_serving(_app: Any = None) -> None:
    """The last start-up hook of a ``cadence serve`` process: load what serving needs, then :func:`settle_heap`.

    The learners' compiled valuation (:mod:`cadence.engine.valuation`) is loaded here, before
    the first request, rather than by a background thread after the process's 1,000th
    decision: loading it (about a second from numba's cache, which ``make`` fills when it
    installs; a first compile takes longer) holds the interpreter lock, which would stall
    the requests in flight, and its objects are then frozen with the rest.
    """
    from cadence.engine import valuation

    valuation.load_now()  # None (the numpy path serves) when numba cannot be had
    settle_heap()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How every ``cadence serve`` process runs uvicorn: address, logging, the corked protocol."""
    from cadence.api.httpproto import CorkedHttpToolsProtocol

    return {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": access_log_enabled(),
        "http": CorkedHttpToolsProtocol,
    }


def _bind(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A socket on ``host:port`` with ``SO_REUSEPORT``: each worker listens on its own, and the
    kernel spreads new connections over them (one shared socket would wake the same worker)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    return sock


def _worker(settings: Settings, index: int) -> None:
    """One worker process: open the database, build the app, serve on its own socket of the port."""
    import uvicorn

    from cadence.api.app import create_app
    from cadence.logs import configure_logging
    from cadence.runtime import open_runtime

    # Forked with the parent's handlers: until uvicorn installs its own, SIGTERM/SIGINT must stop us.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    configure_logging(settings.log_level, json_logs=settings.log_json)
    runtime = open_runtime(settings)
    try:
        app = create_app(runtime=runtime)
        app.state.on_startup.append(prepare_serving)
        config = uvicorn.Config(app, **uvicorn_options(settings))
        sock = _bind(settings.host, settings.port)
        logging.getLogger("cadence.workers").info("worker %d serving", index)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        runtime.close()


def _preload() -> None:
    """Import what every worker needs, once, in the parent."""
    import importlib

    from cadence.api.app import ROUTERS
    from cadence.engine.loop import SUBSCRIBER_FACTORIES

    for name in (*ROUTERS, *(spec.partition(":")[0] for spec in SUBSCRIBER_FACTORIES)):
        importlib.import_module(name)


def run_workers(
    settings: Settings,
    *,
    workers: int,
    on_ready: Callable[[list[int]], None] | None = None,
    target: Callable[..., Any] = _worker,
) -> None:
    """Serve with ``workers`` processes until SIGINT or SIGTERM; restart a worker that dies.

    The database must already be migrated. ``on_ready`` receives the worker pids once started.
    """
    check_workers(settings, workers)
    # Read by each worker's leader locks: on SQLite they become file locks (one leader among the workers).
    os.environ["CADENCE_WORKERS"] = str(workers)
    # Bound but not listening: holds the port (a clear error now if it is taken) and gets no connections.
    sock = _bind(settings.host, settings.port, listen=False)
    _preload()
    # fork: workers start from the parent's imports (the web stack and the learners take
    # seconds of CPU to import); the parent holds no thread and no database connection.
    ctx = multiprocessing.get_context("fork")
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[Any] = []
    started: list[float] = []

    def spawn(index: int) -> Any:
        proc = ctx.Process(target=target, args=(settings, index), name=f"cadence-worker-{index}")
        proc.start()
        return proc

    try:
        for index in range(workers):
            procs.append(spawn(index))
            started.append(time.monotonic())
        log.info("started %d workers: %s", workers, [p.pid for p in procs])
        if on_ready is not None:
            on_ready([p.pid for p in procs])
        while not stopping:
            for index, proc in enumerate(procs):
                if proc.is_alive() or stopping:
                    continue
                lived = time.monotonic() - started[index]
                log.warning(
                    "worker %d (pid %s) exited with %s; starting another", index, proc.pid, proc.exitcode
                )
                if lived < FAST_FAILURE_SECONDS:
                    time.sleep(FAST_FAILURE_SECONDS - lived)  # do not spin on a worker that cannot start
                procs[index] = spawn(index)
                started[index] = time.monotonic()
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes requests, the app releases the lock
        deadline = time.monotonic() + 30
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
