"""``cadence simulate`` (the demo) and ``cadence models`` (learner snapshots)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cadence.errors import ConfigError

console = Console()


def simulate(
    customers: int = typer.Option(2000, "--customers", "-n", min=10, help="Customers per population."),
    days: int = typer.Option(30, "--days", "-d", min=1, help="Simulated days."),
    seeds: str = typer.Option("1", "--seeds", help="Comma-separated seeds, each a fresh population."),
    populations: str = typer.Option(
        "balanced,email_heavy,mobile_first", "--populations", "-p", help="Population shapes to run."
    ),
    policies: str = typer.Option(
        "",
        "--policies",
        help="Only these policies (the oracle always runs): cadence,email 10:00,random,heuristic.",
    ),
    chart: Path = typer.Option(Path("simulation.png"), "--chart", help="Where to write the PNG chart."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table instead of a rich one."),
    via_api: bool = typer.Option(
        False,
        "--via-api",
        help="Also run cadence through its HTTP API (identify, decisions with 'at', track feedback, "
        "the engine loop) on a fresh SQLite database per population, with examples/simulate's rules.",
    ),
    api_url: str = typer.Option(
        "", "--api-url", help="Drive this running server instead (it must serve examples/simulate's rules)."
    ),
    api_key: str = typer.Option(
        "",
        "--api-key",
        envvar="CADENCE_API_KEY",
        help="Key with ingest, decide and admin scopes for --api-url.",
    ),
) -> None:
    """Compare cadence with baselines and an oracle on synthetic customers; write a chart."""
    import tempfile
    import time
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from cadence.sim.api import ApiPolicy, in_process_api, remote_api
    from cadence.sim.population import SHAPES
    from cadence.sim.report import compare, markdown_table, rich_table, write_chart

    shapes = [s.strip() for s in populations.split(",") if s.strip()]
    for shape in shapes:
        if shape not in SHAPES:
            raise ConfigError(f"--populations: unknown population {shape!r}; choose from {', '.join(SHAPES)}")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {seeds!r}") from exc
    wanted = [p.strip() for p in policies.split(",") if p.strip()] or None
    known = {"cadence", "email 10:00", "random", "heuristic", "oracle"}
    for name in wanted or ():
        if name not in known:
            raise ConfigError(f"--policies: unknown policy {name!r}; choose from {', '.join(sorted(known))}")
    if api_url and not api_key:
        raise ConfigError("--api-key: a key with ingest, decide and admin scopes is needed with --api-url")
    api: Callable[[str, int], AbstractContextManager[ApiPolicy]] | None = None
    run_tag = f"sim{int(time.time())}"
    if api_url:
        api = lambda shape, seed: remote_api(api_url, api_key, prefix=f"{run_tag}-{shape}-{seed}")  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="cadence-sim-") as scratch:
        if via_api and not api_url:
            api = lambda shape, seed: in_process_api(f"sqlite:///{scratch}/{shape}-{seed}.db")  # noqa: E731
        with console.status("simulating...") as status:
            result = compare(
                customers=customers,
                days=days,
                seeds=seed_list,
                shapes=shapes,
                policies=wanted,
                progress=lambda msg: status.update(f"simulating: {msg}"),
                via_api=api,
            )
    if markdown:
        console.print(markdown_table(result), markup=False, highlight=False)
    else:
        console.print(rich_table(result))
    console.print(f"chart written to [bold]{write_chart(result, chart)}[/]")


def register(app: typer.Typer) -> None:
    """Add ``cadence simulate`` and ``cadence models`` to the root app."""
    app.command("simulate")(simulate)
    from cadence.cli import models

    app.add_typer(models.models_app, name="models")
