"""``cadence serve``: the API, the engine loop and the scheduler; ``--workers N`` for N API processes."""

from __future__ import annotations

import logging
import os

import typer
from rich.console import Console

from cadence.cli import settings_from_cli

console = Console()


def serve(
    ctx: typer.Context,
    host: str | None = typer.Option(None, help="Interface to bind (default from settings)."),
    port: int | None = typer.Option(None, help="Port to bind (default from settings)."),
    workers: int = typer.Option(
        1,
        "--workers",
        envvar="CADENCE_WORKERS",
        help="API processes (PostgreSQL, or an SQLite file in WAL mode): one leads and runs the engine "
        "loop, scheduler and dispatcher; the others serve the API and take over if it dies.",
    ),
    access_log: bool = typer.Option(
        True,
        "--access-log/--no-access-log",
        envvar="CADENCE_ACCESS_LOG",
        help="Log one line per HTTP request (at INFO). Off saves CPU at thousands of requests a second; "
        "cadence's own logs are unchanged.",
    ),
) -> None:
    """Apply migrations, then run the API with the engine loop and the scheduler."""
    # Imported here: the web stack is heavy and other commands should start fast.
    import uvicorn

    from cadence.api.app import create_app
    from cadence.api.security import KeyRing, create_key
    from cadence.api.workers import check_workers, prepare_serving, run_workers, uvicorn_options
    from cadence.logs import configure_logging
    from cadence.runtime import open_runtime

    settings = settings_from_cli(ctx, host=host, port=port)
    os.environ["CADENCE_ACCESS_LOG"] = "1" if access_log else "0"  # read by each worker too
    check_workers(settings, workers)
    configure_logging(settings.log_level, json_logs=settings.log_json)
    runtime = open_runtime(settings, upgrade=True)
    if KeyRing(settings, runtime.engine).is_empty():
        key = create_key(runtime.engine, name="bootstrap-admin", scopes=["admin"])
        console.print(
            "[bold yellow]No API key was configured; created one with the admin scope "
            "(shown once, store it):[/]\n  " + key
        )
    url = f"http://{settings.host}:{settings.port}"
    logging.getLogger("cadence").info("database %s", runtime.engine.url.render_as_string())
    if workers > 1:
        runtime.close()
        console.print(f"cadence is serving on {url} with {workers} workers - API docs at [bold]{url}/docs[/]")
        run_workers(settings, workers=workers)
        return
    app = create_app(runtime=runtime)
    app.state.on_startup.append(prepare_serving)
    console.print(f"cadence is serving on {url} - API docs at [bold]{url}/docs[/]")
    uvicorn.run(app, **uvicorn_options(settings))


def register(app: typer.Typer) -> None:
    """Add ``cadence serve`` to the root app."""
    app.command("serve")(serve)
