"""``cadence serve --workers N``: N API processes on one socket, one of them the leader.

The parent listens on the port and starts N worker processes (forked after importing the app once),
each running the full app. The parent accepts each connection and hands it to the workers in
turn (over a Unix socket pair per worker, ``SCM_RIGHTS``), as Node's ``cluster`` module does by
default: the kernel's own spreading (one ``SO_REUSEPORT`` socket per worker) hashes each
connection to a worker, which split a client's 64 keep-alive connections as unevenly as 42 to
22, and the worker with more carried two thirds of the load (session 12).
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
import select
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

    The learners' compiled valuation and score parts (:mod:`cadence.engine.valuation`) are
    loaded here, before the first request, rather than by a background thread after the
    process's 1,000th decision: loading them (about a second from numba's cache, which ``make``
    fills when it installs; a first compile takes longer) holds the interpreter lock, which
    would stall the requests in flight, and their objects are then frozen with the rest. The
    score parts are on from the first request, for the whole process (see
    :func:`cadence.engine.valuation.parts_kernel`).
    """
    from cadence.engine import valuation

    valuation.load_now(parts=True)  # None (the numpy path serves) when numba cannot be had
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


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket on ``host:port`` (non-blocking: the parent accepts what is waiting)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


#: Connections a worker takes from one read of its hand-off socket, at most.
HANDED_PER_READ = 64


def _handed_server(config: Any, handoff: socket.socket) -> Any:
    """A uvicorn server that listens on nothing and serves the connections the parent hands over ``handoff``.

    When the parent is gone (``handoff`` reads end-of-file), no connection can come any more:
    the worker finishes its requests and exits, as on SIGTERM.
    """
    import asyncio

    import uvicorn

    class HandedServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=[])  # listens on nothing
            if self.should_exit:
                return
            loop = asyncio.get_running_loop()
            state = self.lifespan.state

            def protocol() -> asyncio.Protocol:
                return config.http_protocol_class(
                    config=config, server_state=self.server_state, app_state=state, _loop=loop
                )

            def receive() -> None:
                try:
                    _, fds, _, _ = socket.recv_fds(handoff, HANDED_PER_READ, HANDED_PER_READ)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    fds = []
                if not fds:  # the parent closed its end: nothing more will come
                    loop.remove_reader(handoff.fileno())
                    self.should_exit = True
                    return
                for fd in fds:
                    conn = socket.socket(fileno=fd)
                    conn.setblocking(False)
                    task = loop.create_task(loop.connect_accepted_socket(protocol, conn))
                    connecting.add(task)  # the loop keeps only weak references to its tasks
                    task.add_done_callback(connecting.discard)

            connecting: set[asyncio.Task[Any]] = set()
            handoff.setblocking(False)
            loop.add_reader(handoff.fileno(), receive)

    return HandedServer(config)


def _child(target: Callable[..., Any], inherited: list[socket.socket], *args: Any) -> None:
    """A forked worker's start: close the parent's sockets it inherited, then run ``target(*args)``.

    The listening socket is the parent's to accept on; and a worker holding another worker's
    hand-off end would keep it open after the parent died, so that worker would never learn it.
    """
    for sock in inherited:
        sock.close()
    target(*args)


def _worker(settings: Settings, index: int, handoff: socket.socket) -> None:
    """One worker process: open the database, build the app, serve the connections the parent hands it."""
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
        logging.getLogger("cadence.workers").info("worker %d serving", index)
        _handed_server(config, handoff).run()
    finally:
        runtime.close()


class _Handoff:
    """The parent's side: each accepted connection goes to the next live worker, in turn."""

    def __init__(self) -> None:
        self.ends: dict[int, socket.socket] = {}  # worker index -> the parent's end of its pair
        self._next = 0

    def pair(self, index: int) -> socket.socket:
        """A new socket pair for worker ``index``: the parent keeps one end; returns the worker's."""
        old = self.ends.pop(index, None)
        if old is not None:
            old.close()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # A worker that does not read (still starting, or stuck) must not stop the parent.
        mine.setblocking(False)
        self.ends[index] = mine
        return theirs

    def hand(self, conn: socket.socket) -> bool:
        """Pass ``conn`` to a worker (the parent's copy is closed either way); False when none took it."""
        try:
            order = sorted(self.ends)
            for k in range(len(order)):
                index = order[(self._next + k) % len(order)]
                try:
                    socket.send_fds(self.ends[index], [b"c"], [conn.fileno()])
                except OSError:  # that worker is gone (its replacement gets a new pair), or its queue is full
                    continue
                self._next = (self._next + k + 1) % len(order)
                return True
            return False
        finally:
            conn.close()

    def accept_all(self, sock: socket.socket) -> None:
        """Hand over every connection waiting on ``sock``."""
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: try again at the next wake-up
                log.warning("accepting a connection failed: %s", exc)
                return
            if not self.hand(conn):
                log.warning("no worker could take a connection; it was closed")

    def close(self) -> None:
        for end in self.ends.values():
            end.close()
        self.ends.clear()


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
    # Listening from now on (a clear error now if the port is taken); connections wait in the backlog
    # until the workers are up.
    sock = _bind(settings.host, settings.port)
    handoff = _Handoff()
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
        theirs = handoff.pair(index)
        inherited = [sock, *handoff.ends.values()]
        proc = ctx.Process(
            target=_child, args=(target, inherited, settings, index, theirs), name=f"cadence-worker-{index}"
        )
        proc.start()
        theirs.close()  # the worker has its copy
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
            # Accept while watching the workers: wake for a connection, or every 0.2 s.
            ready, _, _ = select.select([sock], [], [], 0.2)
            if ready:
                handoff.accept_all(sock)
    finally:
        sock.close()  # no new connection; the workers finish the ones they have
        handoff.close()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes requests, the app releases the lock
        deadline = time.monotonic() + 30
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
