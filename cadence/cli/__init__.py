"""The ``cadence`` command line. Each command group lives in its own module here.

A module in :data:`COMMAND_MODULES` exposes ``register(app)`` and adds its commands
or sub-apps to the root Typer app. Errors derived from :class:`CadenceError` become
a one-line message on stderr and exit status 2 (1 is kept for "checks failed").
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
from rich.console import Console

from cadence.errors import CadenceError
from cadence.runtime import Runtime, open_runtime
from cadence.settings import Settings, load_settings

__all__ = ["app", "runtime_for", "main", "settings_from_cli"]

COMMAND_MODULES = (
    "cadence.cli.db",
    "cadence.cli.serve",
    "cadence.cli.ingest",
    "cadence.cli.customers",
    "cadence.cli.keys",
    "cadence.cli.decisions",
    "cadence.cli.rules",
    "cadence.cli.plugins",
    "cadence.cli.attribution",
    "cadence.cli.jobs",
    "cadence.cli.sends",
)

err_console = Console(stderr=True)

app = typer.Typer(
    name="cadence",
    help="Rules-and-ML decisions and multi-touch attribution for marketing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    database_url: str | None = typer.Option(
        None, "--database-url", envvar="CADENCE_DATABASE_URL", help="Database URL."
    ),
) -> None:
    """cadence: decide what each customer gets, and credit what worked."""
    ctx.obj = {"database_url": database_url}


def runtime_for(ctx: typer.Context, *, upgrade: bool = False, **overrides: Any) -> Runtime:
    """A runtime for one command; its database connections close when the command ends."""
    runtime = open_runtime(settings_from_cli(ctx, **overrides), upgrade=upgrade)
    ctx.call_on_close(runtime.close)
    return runtime


def settings_from_cli(ctx: typer.Context, **overrides: Any) -> Settings:
    """Settings from the environment and ``cadence.toml``, with CLI flags on top."""
    obj = ctx.find_root().obj or {}
    if obj.get("database_url"):
        overrides.setdefault("database_url", obj["database_url"])
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    try:
        app(args=argv, standalone_mode=True)
    except CadenceError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
