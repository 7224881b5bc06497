"""Run the benchmarks and write docs/benchmarks.md with the machine and the date."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ALL = ("ingest", "dsl", "connectors", "decisions", "decisions_quality", "attribution", "push", "dashboard")
OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    system = f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    return f"{os.cpu_count()} cores ({cpu}){mem}, {system}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(ALL)})")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the benchmark runs")
    parser.add_argument("--no-write", action="store_true", help="print instead of writing docs/benchmarks.md")
    args = parser.parse_args()
    names = args.names or [n for n in ALL if (Path(__file__).parent / f"{n}.py").exists()]
    postgres_url = os.environ.get("CADENCE_TEST_POSTGRES_URL")
    sections: dict[str, str] = {}
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"running benchmarks.{name} ...", file=sys.stderr, flush=True)
        sections[name] = module.run(quick=args.quick, postgres_url=postgres_url).strip()
        print(sections[name], flush=True)
    if args.no_write or args.quick:
        return
    existing: dict[str, str] = {}
    if OUT.exists():
        # Keep sections of benchmarks not run this time; each starts with a marker.
        for chunk in OUT.read_text().split("<!-- bench:")[1:]:
            key, _, body = chunk.partition(" -->")
            existing[key.strip()] = body.strip()
    existing.update(
        {
            n: f"_Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}, "
            f"load average {os.getloadavg()[0]:.1f} when written, commit {commit()}._\n\n{body}"
            for n, body in sections.items()
        }
    )
    parts = [
        "# Benchmarks\n",
        "Measured by `make bench` (`python -m benchmarks`), never copied or estimated. "
        "Each section says when and on what it was measured.\n",
    ]
    for n in ALL:
        if n in existing:
            parts.append(f"<!-- bench:{n} -->\n{existing[n]}\n")
    OUT.write_text("\n".join(parts))
    print(f"wrote {OUT}", file=sys.stderr)


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
