"""Shared by the benchmarks that drive `cadence serve` over loopback HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def process_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` (Linux), or NaN."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def cpu_ticks() -> tuple[int, int]:
    """The machine's (stolen, total) CPU ticks so far, from ``/proc/stat`` (Linux), or (0, 0).

    Steal is time the hypervisor gave this virtual machine's CPUs to someone else: on a shared
    host it stalls every process at once, and shows in wall-clock tails that no code change moves.
    """
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return fields[7], sum(fields)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the machine's CPU time stolen between two :func:`cpu_ticks` readings (NaN if unknown)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else float("nan")


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and its live children (``serve --workers N``)."""
    total = process_cpu(pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            total += process_cpu(int(entry.name))
    return total


@contextmanager
def serving(
    env: Mapping[str, str], *, ready_seconds: float = 60.0, args: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`cadence serve` on a free loopback port with ``env`` added; yields (process, port) once healthy.

    ``args`` are added to the command line (``--workers 2``).
    """
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "cadence", "serve", "--port", str(port), *args],
        env={**os.environ, "CADENCE_LOG_LEVEL": "WARNING", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + ready_seconds
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield server, port
    finally:
        server.terminate()
        server.wait(10)
