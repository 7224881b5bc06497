"""``cadence check | fmt | lint | test | explain``: the rule-file tools.

Exit status: 0 when all is well, 1 when the checks found something (errors, files
to reformat, lint warnings, failed tests), 2 for a usage or configuration error.

Which channels are installed: when :mod:`cadence.plugins` offers
``available_channels(settings)`` (the plugin manager asks every connector plugin),
the tools use it; until it does, every channel in :data:`cadence.channels.CHANNELS`
counts as installed.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

import orjson
import typer
from rich.console import Console
from sqlalchemy import select

from cadence.cli import settings_from_cli
from cadence.clock import datetime_to_ms, now_ms
from cadence.dsl.diagnostics import render, render_all
from cadence.dsl.explain import explain_from_database, installed_channels, render_explain
from cadence.dsl.formatter import format_module
from cadence.dsl.lint import lint as lint_rules
from cadence.dsl.loader import LoadResult, discover, load_rules
from cadence.dsl.parser import parse_text
from cadence.dsl.testing import run_tests
from cadence.errors import ConfigError
from cadence.settings import Settings

__all__ = ["available_channels", "register"]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

PATHS = typer.Argument(None, help="Rule files or directories (default: the configured rules paths).")


def available_channels(settings: Settings | None) -> tuple[str, ...]:
    """Channels an installed connector offers (see the module docstring for the fallback)."""
    return installed_channels(settings)


def _settings(ctx: typer.Context) -> Settings | None:
    try:
        return settings_from_cli(ctx)
    except ConfigError:
        return None


def _paths(ctx: typer.Context, paths: list[Path] | None) -> list[Path]:
    if paths:
        return paths
    settings = _settings(ctx)
    return list(settings.rules_paths) if settings else [Path("rules")]


def _known_events(ctx: typer.Context, settings: Settings | None) -> Collection[str] | None:
    """Event names in the log, when a database was named (flag, environment) or exists."""
    obj = ctx.find_root().obj or {}
    if settings is None:
        return None
    explicit = bool(obj.get("database_url")) or "CADENCE_DATABASE_URL" in os.environ
    url = settings.database_url
    if not explicit and (not url.startswith("sqlite:///") or not Path(url[len("sqlite:///") :]).exists()):
        return None
    from cadence.store.db import create_db_engine, read_connection
    from cadence.store.schema.core import events

    try:
        engine = create_db_engine(url)
        with read_connection(engine) as conn:
            names = {row[0] for row in conn.execute(select(events.c.event).distinct()) if row[0]}
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any driver error: the check still runs, without the warning
        err.print(f"note: cannot read event names from the database ({exc}); skipping the unseen-event check")
        return None
    return names


def _load(ctx: typer.Context, paths: list[Path] | None, *, with_events: bool = True) -> LoadResult:
    settings = _settings(ctx)
    chosen = _paths(ctx, paths)
    missing = [p for p in chosen if not p.exists()]
    if missing:
        raise ConfigError(f"no such file or directory: {', '.join(map(str, missing))}")
    if not discover(chosen):
        raise ConfigError(f"no .cadence files in {', '.join(map(str, chosen))}")
    return load_rules(
        chosen,
        available_channels=available_channels(settings),
        known_events=_known_events(ctx, settings) if with_events else None,
        default_zone=settings.default_timezone if settings else "UTC",
    )


def check(
    ctx: typer.Context,
    paths: list[Path] | None = PATHS,
    as_json: bool = typer.Option(False, "--json", help="Print the diagnostics as JSON."),
) -> None:
    """Parse, type-check and compile rule files; exit 1 on any error."""
    result = _load(ctx, paths)
    if as_json:
        out.print(
            orjson.dumps(
                {
                    "ok": result.ok,
                    "hash": result.hash,
                    "diagnostics": [d.to_dict() for d in result.diagnostics],
                }
            ).decode()
        )
    elif result.diagnostics:
        out.print(render_all(result.diagnostics), markup=False)
    if result.ok:
        rs = result.ruleset
        assert rs is not None
        if not as_json:
            out.print(
                f"ok: {len(result.modules)} file(s), {len(rs.campaigns)} campaign(s), {len(rs.segments)} "
                f"segment(s), {len(rs.attribution)} attribution rule set(s); ruleset {rs.hash[:12]}"
            )
        return
    raise typer.Exit(1)


def fmt(
    paths: list[Path] = typer.Argument(..., help="Rule files or directories."),
    check_only: bool = typer.Option(False, "--check", help="Change nothing; exit 1 if a file would change."),
    diff: bool = typer.Option(False, "--diff", help="With --check, show what would change."),
) -> None:
    """Rewrite rule files in the canonical layout (comments are kept)."""
    files = discover(paths)
    if not files:
        raise ConfigError(f"no .cadence files in {', '.join(map(str, paths))}")
    changed, broken = 0, 0
    for file in files:
        text = file.read_text(encoding="utf-8")
        module = parse_text(text, str(file))
        if module.diagnostics:
            broken += 1
            for d in module.diagnostics:
                err.print(render(d), markup=False)
            continue
        new = format_module(module)
        if new == text:
            continue
        changed += 1
        if check_only:
            out.print(f"would reformat {file}", markup=False)
            if diff:
                out.print(
                    "".join(
                        difflib.unified_diff(
                            text.splitlines(True), new.splitlines(True), str(file), str(file) + " (formatted)"
                        )
                    ),
                    markup=False,
                )
        else:
            tmp = file.with_name(f".{file.name}.fmt-tmp")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(file)
            out.print(f"reformatted {file}", markup=False)
    if broken or (check_only and changed):
        raise typer.Exit(1)
    if not changed:
        out.print(f"{len(files)} file(s) already formatted")


def lint(ctx: typer.Context, paths: list[Path] | None = PATHS) -> None:
    """Warn about rules that are legal but probably wrong; exit 1 if there is any finding."""
    result = _load(ctx, paths)
    if not result.ok:
        out.print(render_all(result.diagnostics), markup=False)
        raise typer.Exit(1)
    findings = [d for d in result.diagnostics if d.severity == "warning"] + lint_rules(
        result, now_ms=now_ms()
    )
    if findings:
        out.print(render_all(findings), markup=False)
        raise typer.Exit(1)
    out.print("no findings")


def test(
    ctx: typer.Context,
    paths: list[Path] | None = PATHS,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every step, not only failures."),
) -> None:
    """Run the test blocks of rule files, with time travel; report per-rule coverage."""
    settings = _settings(ctx)
    result = _load(ctx, paths, with_events=False)
    if not result.ok:
        out.print(render_all(result.diagnostics), markup=False)
        raise typer.Exit(1)
    report = run_tests(result, available_channels=available_channels(settings))
    for r in report.results:
        if r.status != "passed" or verbose:
            out.print(
                f"{r.status.upper():<7} {r.file}:{r.line} [{r.test}] {r.expectation}"
                + (f"\n        {r.message}" if r.message else ""),
                markup=False,
            )
    passed = sum(1 for r in report.results if r.status == "passed")
    skipped = sum(1 for r in report.results if r.status == "skipped")
    out.print(f"{passed} passed, {len(report.failed)} failed, {skipped} skipped")
    out.print(f"coverage: {report.coverage_percent():.0f}% of rules")
    for name, cov in sorted(report.coverage.items(), key=lambda kv: (kv[1].file, kv[0])):
        mark = "covered  " if cov.covered else "UNTESTED "
        out.print(
            f"  {mark}{cov.kind:<9}{name:<28} fired {cov.fired:>3}, not fired {cov.not_fired:>3}, "
            f"expectations {cov.expected}  ({cov.file})",
            markup=False,
        )
    if skipped:
        out.print("note: send/no-send steps need cadence.engine.decide, which is not installed")
    if not report.ok:
        raise typer.Exit(1)


def _parse_at(at: str | None) -> int:
    if at is None:
        return now_ms()
    try:
        value = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--at: {at!r} is not an ISO-8601 time such as 2026-03-04T09:00:00Z") from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return datetime_to_ms(value)


def explain(
    ctx: typer.Context,
    campaign: str = typer.Argument(..., help="Campaign name."),
    customer: str = typer.Option(
        ..., "--customer", help="Customer: a user id, an anonymous id or a numeric id."
    ),
    at: str | None = typer.Option(None, "--at", help="ISO-8601 time to evaluate at (default: now)."),
    rules: list[Path] | None = typer.Option(None, "--rules", help="Rule files or directories."),
    as_json: bool = typer.Option(False, "--json", help="Print the explain record as JSON."),
) -> None:
    """Show every condition of CAMPAIGN for one customer with its actual value, and why it did not fire."""
    from cadence.cli.engine import apply_pending
    from cadence.runtime import open_runtime
    from cadence.store.db import read_connection

    settings = settings_from_cli(ctx)
    result = _load(ctx, rules, with_events=False)
    if not result.ok:
        out.print(render_all(result.diagnostics), markup=False)
        raise typer.Exit(1)
    ruleset = result.ruleset
    assert ruleset is not None
    when = _parse_at(at)
    runtime = open_runtime(settings)
    try:
        apply_pending(runtime)  # the profile as of every event logged, not as of the last server run
        with read_connection(runtime.engine) as conn:
            record = explain_from_database(
                conn,
                ruleset=ruleset,
                campaign=campaign,
                customer=customer,
                now_ms=when,
                available_channels=available_channels(settings),
            )
    except LookupError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        runtime.close()
    if as_json:
        out.print(orjson.dumps(record).decode(), markup=False)
    else:
        out.print(render_explain(record), markup=False)


def register(app: typer.Typer) -> None:
    """Add the rule commands to the root app."""
    app.command("check")(check)
    app.command("fmt")(fmt)
    app.command("lint")(lint)
    app.command("test")(test)
    app.command("explain")(explain)
