"""The ``cadence`` command line. Each command group lives in its own module here.

A module in :data:`COMMAND_MODULES` exposes ``register(app)`` and adds its commands
or sub-apps to the root Typer app. Errors derived from :class:`CadenceError` become
a one-line message on stderr and exit status 2 (1 is kept for "checks failed").

Start-up is kept short: :func:`main` imports only the module of the command it runs
when :data:`COMMAND_HOMES` knows it (``cadence import`` does not load FastAPI, numpy
or the rule compiler, nor SQLAlchemy on a current database); help, and any command not
listed there, load every module.
``cadence.cli.app`` is the root app with every command, built on first use.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from cadence.errors import CadenceError
from cadence.settings import Settings, load_settings

if TYPE_CHECKING:  # imported when a command opens one: it loads SQLAlchemy
    from cadence.runtime import Runtime

__all__ = ["COMMAND_HOMES", "COMMAND_MODULES", "app", "build_app", "main", "runtime_for", "settings_from_cli"]

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
    "cadence.cli.engine",
)

#: The module that registers each top-level command; a command missing here still
#: works, it only makes start-up load every module in :data:`COMMAND_MODULES`.
COMMAND_HOMES = {
    "db": "cadence.cli.db",
    "serve": "cadence.cli.serve",
    "import": "cadence.cli.ingest",
    "customers": "cadence.cli.customers",
    "keys": "cadence.cli.keys",
    "simulate": "cadence.cli.decisions",
    "models": "cadence.cli.decisions",
    "check": "cadence.cli.rules",
    "fmt": "cadence.cli.rules",
    "lint": "cadence.cli.rules",
    "test": "cadence.cli.rules",
    "explain": "cadence.cli.rules",
    "plugins": "cadence.cli.plugins",
    "attribution": "cadence.cli.attribution",
    "jobs": "cadence.cli.jobs",
    "sends": "cadence.cli.sends",
    "engine": "cadence.cli.engine",
}

err_console = Console(stderr=True)


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
    from cadence.runtime import open_runtime

    runtime = open_runtime(settings_from_cli(ctx, **overrides), upgrade=upgrade)
    ctx.call_on_close(runtime.close)
    return runtime


def settings_from_cli(ctx: typer.Context, **overrides: Any) -> Settings:
    """Settings from the environment and ``cadence.toml``, with CLI flags on top."""
    obj = ctx.find_root().obj or {}
    if obj.get("database_url"):
        overrides.setdefault("database_url", obj["database_url"])
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


def build_app(modules: Sequence[str] = COMMAND_MODULES) -> typer.Typer:
    """A root app with the commands of ``modules`` (all of them by default)."""
    root = typer.Typer(
        name="cadence",
        help="Rules-and-ML decisions and multi-touch attribution for marketing.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    root.callback()(_root)
    for name in modules:
        importlib.import_module(name).register(root)
    return root


def _command(argv: Sequence[str]) -> str | None:
    """The top-level command named in ``argv``, or None (help, or no command).

    >>> _command(["--database-url", "sqlite://", "import", "x.ndjson"])
    'import'
    >>> _command(["--help"]) is None
    True
    """
    args = iter(argv)
    for arg in args:
        if arg == "--database-url":
            next(args, None)
        elif not arg.startswith("--database-url="):
            return None if arg.startswith("-") else arg
    return None


def __getattr__(name: str) -> Any:
    if name == "app":  # the full app, built once on first use (tests, docs)
        globals()["app"] = full = build_app()
        return full
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    args = sys.argv[1:] if argv is None else argv
    home = COMMAND_HOMES.get(_command(args) or "")
    root = build_app((home,)) if home in COMMAND_MODULES else build_app()
    try:
        root(args=args, standalone_mode=True)
    except CadenceError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
