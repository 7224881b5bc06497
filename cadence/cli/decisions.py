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
) -> None:
    """Compare cadence with baselines and an oracle on synthetic customers; write a chart."""
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
    with console.status("simulating...") as status:
        result = compare(
            customers=customers,
            days=days,
            seeds=seed_list,
            shapes=shapes,
            policies=wanted,
            progress=lambda msg: status.update(f"simulating: {msg}"),
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
