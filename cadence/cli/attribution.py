"""``cadence attribution``: offline attribution runs, the simulator, and scoring.

``run`` reads touchpoints and conversions CSV files, runs one or more models and
writes the credit per channel; ``simulate`` writes journeys with known truth;
``score`` compares credit files with that truth; ``refresh`` recomputes the
materialised fits (causal, Shapley, ordered Shapley, Markov) the API and dashboard serve;
``lift`` measures each holdout campaign's lift from the recorded arm assignments.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cadence.engine.attribution.journeys import AttributionError, parse_duration, parse_window

__all__ = ["register"]

attribution_app = typer.Typer(
    help="Multi-touch attribution: offline runs, simulation, scoring.", no_args_is_help=True
)
console = Console()
err_console = Console(stderr=True)


@contextmanager
def _progress(total: int) -> Iterator[Any]:
    progress = Progress(
        TextColumn("[bold]{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )
    with progress:
        task = progress.add_task("attribution", total=total)

        def step(name: str) -> None:
            progress.update(task, advance=1, description=name)

        yield step


def _parse_position(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    parts = [p for p in text.replace(",", "/").split("/") if p.strip()]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise AttributionError(f"--position {text!r}: expected FIRST/MIDDLE/LAST, e.g. 40/20/40") from None
    if len(nums) != 3 or any(n < 0 for n in nums) or sum(nums) <= 0:
        raise AttributionError(f"--position {text!r}: expected three non-negative numbers, e.g. 40/20/40")
    total = sum(nums)
    return {"first": nums[0] / total, "last": nums[2] / total}


@attribution_app.command("run")
def run(
    touchpoints: Path = typer.Option(..., "--touchpoints", "-t", help="CSV with customer_id,ts,channel."),
    conversions: Path = typer.Option(..., "--conversions", "-c", help="CSV with customer_id,ts,value."),
    model: list[str] = typer.Option(
        ["last_touch"], "--model", "-m", help="Model name; repeat or comma-separate for several."
    ),
    window: str = typer.Option("30d", "--window", "-w", help="Attribution window, 1d to 90d."),
    value: bool = typer.Option(False, "--value", help="Credit conversion value instead of conversions."),
    report: bool = typer.Option(False, "--report", help="Print a side-by-side comparison of the models."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write channel,credit CSV here."),
    holdouts: Path | None = typer.Option(
        None, "--holdouts", help="CSV customer_id,channel,group (holdout|treatment): measured lift."
    ),
    calibrate: bool = typer.Option(
        True, "--calibrate/--no-calibrate", help="Calibrate the causal model to measured holdout lift."
    ),
    half_life: str = typer.Option("7d", "--half-life", help="time_decay half-life."),
    position: str = typer.Option("40/20/40", "--position", help="position weights FIRST/MIDDLE/LAST."),
    markov_order: int = typer.Option(1, "--markov-order", min=1, max=3, help="Markov chain order, 1-3."),
    causal_min_lag: str | None = typer.Option(
        None,
        "--causal-min-lag",
        help="causal: a touch acts only this long after it (default 1h; 0 for date-only timestamps).",
    ),
    interactions: bool = typer.Option(
        True, "--interactions/--no-interactions", help="causal: model channel-pair synergies."
    ),
    customers: Path | None = typer.Option(
        None,
        "--customers",
        help="CSV customer_id,first_seen: the causal model observes each customer from then (late arrivals).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
) -> None:
    """Run attribution models over touchpoint and conversion files."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    from cadence.engine.attribution.files import load_first_seen, load_holdouts, load_touch_log
    from cadence.engine.attribution.holdout import calibration_factors, measure_lifts
    from cadence.engine.attribution.models import ModelResult, parse_models, run_model

    models = parse_models(model)
    window_ms = parse_window(window)
    half_life_ms = parse_duration(half_life)
    if half_life_ms <= 0:
        raise AttributionError(f"--half-life {half_life}: the half-life must be longer than 0")
    params: dict[str, Any] = {
        "half_life_ms": half_life_ms,
        "order": markov_order,
        "min_lag_ms": None if causal_min_lag is None else parse_duration(causal_min_lag, default_unit="s"),
        "interactions": interactions,
        **_parse_position(position),
    }
    total = 3 + len(models) + (1 if holdouts else 0) + (1 if out else 0)
    with _progress(total) if progress else _null_progress() as step, threadpool_limits(1):
        log = load_touch_log(touchpoints, conversions, on_step=lambda name: step(f"read {name}"))
        if customers is not None:
            log = load_first_seen(customers, log)
        hold_data = None
        lifts = {}
        if holdouts:
            hold_data = load_holdouts(holdouts, log)
            lifts = measure_lifts(log, hold_data)
            step("holdouts")
        journeys = log.journeys(window_ms)
        step("journeys")
        results: list[ModelResult] = []
        raw_on_treated: dict[str, float] = {}
        for name in models:
            result = run_model(name, log=log, journeys=journeys, window_ms=window_ms, params=params)
            if name == "causal" and hold_data is not None and calibrate:
                assert result.causal is not None
                fit = result.causal
                on_treated = _causal_on_treated(fit, hold_data, lifts)
                raw_on_treated = on_treated
                factors = calibration_factors(lifts, on_treated)
                result = run_model(
                    name,
                    log=log,
                    journeys=journeys,
                    window_ms=window_ms,
                    params=params,
                    causal_fit=fit,
                    calibration=factors,
                )
            results.append(result)
            step(f"model {name}")
        if out:
            _write_credits(out, results, value=value)
            step(f"wrote {out.name}")
    if report:
        _report(
            results,
            value=value,
            lifts=lifts,
            holdouts=hold_data,
            n_customers=log.n_customers,
            raw_on_treated=raw_on_treated,
        )
    elif not out:
        _report(results, value=value, lifts={}, holdouts=None, n_customers=log.n_customers)


@contextmanager
def _null_progress() -> Iterator[Any]:
    yield lambda _name: None


def _causal_on_treated(fit: Any, hold: Any, lifts: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    n = fit.customer_credit.shape[0]
    for channel in lifts:
        if channel not in fit.channels:
            continue
        customers = hold.customers[channel][~hold.held_out[channel]]
        customers = customers[customers < n]
        out[channel] = float(fit.customer_credit[customers, fit.channels.index(channel)].sum())
    return out


def _write_credits(path: Path, results: Sequence[Any], *, value: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        several = len(results) > 1
        w.writerow(["channel", "model", "credit"] if several else ["channel", "credit"])
        for result in results:
            for channel, credit in sorted(result.by_channel(value=value).items()):
                row = [channel, result.model, f"{credit:.6f}"] if several else [channel, f"{credit:.6f}"]
                w.writerow(row)


def _report(
    results: Sequence[Any],
    *,
    value: bool,
    lifts: dict[str, Any],
    holdouts: Any,
    n_customers: int,
    raw_on_treated: dict[str, float] | None = None,
) -> None:
    unit = "value" if value else "conversions"
    totals = [r.by_channel(value=value) for r in results]
    channels = sorted({c for t in totals for c in t})
    per_table = 4  # keep each table readable in an 80-column terminal
    for lo in range(0, len(results), per_table):
        group = list(zip(results[lo : lo + per_table], totals[lo : lo + per_table], strict=True))
        table = Table(title=f"Credited {unit} by channel (share of each model's total)")
        table.add_column("channel", style="bold")
        for r, _ in group:
            table.add_column(r.model, justify="right")
        for c in channels:
            cells = []
            for _, t in group:
                s = sum(t.values())
                v = t.get(c, 0.0)
                cells.append(f"{v:,.1f} [dim]{(100 * v / s if s else 0):.0f}%[/]")
            table.add_row(c, *cells)
        table.add_row("[dim]total", *[f"[dim]{sum(t.values()):,.1f}" for _, t in group])
        console.print(table)
    for r in results:
        fit = r.causal
        if fit is None:
            continue
        console.print(
            f"[bold]causal[/]: {fit.baseline_conversions:,.1f} of {fit.expected_conversions:,.1f} expected "
            f"conversions ({100 * fit.share_anyway:.0f}%) would have happened anyway"
            + (" (customers convert repeatedly)" if fit.repeat else "")
        )
        hl = Table(title="causal: learned effect and decay per channel")
        hl.add_column("channel", style="bold")
        hl.add_column("incremental conversions", justify="right")
        hl.add_column("half-life", justify="right")
        hl.add_column("calibration", justify="right")
        for c in fit.channels:
            h = fit.half_life(c)
            cal = fit.calibration.get(c)
            hl.add_row(
                c,
                f"{fit.by_channel()[c]:,.1f}",
                "-" if h is None else f"{h:.2f} d",
                "-" if cal is None else f"x{cal:.2f}",
            )
        console.print(hl)
        if fit.interactions:
            it = Table(title="causal: channel-pair interaction effects (conversions from synergy)")
            it.add_column("pair", style="bold")
            it.add_column("conversions", justify="right")
            for (a, b), v in sorted(fit.interactions.items(), key=lambda kv: -kv[1])[:10]:
                it.add_row(f"{a} x {b}", f"{v:,.1f}")
            console.print(it)
    if lifts and holdouts is not None:
        lt = Table(title="Holdout lift: measured incremental conversions among the treated")
        lt.add_column("channel", style="bold")
        lt.add_column("treated / held out", justify="right")
        lt.add_column("rates", justify="right")
        lt.add_column("incremental [95% CI]", justify="right")
        for channel, lift in sorted(lifts.items()):
            low, high = lift.incremental_interval
            lt.add_row(
                channel,
                f"{lift.treated:,} / {lift.held_out:,}",
                f"{100 * lift.treated_rate:.2f}% vs {100 * lift.held_out_rate:.2f}%",
                f"{lift.incremental:,.1f} [{low:,.1f}, {high:,.1f}]",
            )
        console.print(lt)
        ct = Table(
            title="Observational credit on the same treated customers (red: outside the measured interval)"
        )
        ct.add_column("model", style="bold")
        for channel in sorted(lifts):
            ct.add_column(channel, justify="right")
        for r in results:
            cells = []
            for channel, lift in sorted(lifts.items()):
                low, high = lift.incremental_interval
                treated = holdouts.customers[channel][~holdouts.held_out[channel]]
                v = r.on_customers(treated, n_customers=n_customers).get(channel, 0.0)
                cells.append(f"{v:,.1f}" if low <= v <= high else f"[red]{v:,.1f}[/]")
            label = f"{r.model} (calibrated)" if r.causal is not None and r.causal.calibration else r.model
            ct.add_row(label, *cells)
        if raw_on_treated:
            cells = []
            for channel, lift in sorted(lifts.items()):
                low, high = lift.incremental_interval
                v = raw_on_treated.get(channel, 0.0)
                cells.append(f"{v:,.1f}" if low <= v <= high else f"[red]{v:,.1f}[/]")
            ct.add_row("causal (observational)", *cells)
        console.print(ct)


@attribution_app.command("simulate")
def simulate_cmd(
    customers: int = typer.Option(100_000, "--customers", "-n", min=1, help="How many customers."),
    scenario: str = typer.Option("simple", "--scenario", "-s", help="Scenario name."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Directory for T.csv, C.csv, truth.csv."),
    seed: int = typer.Option(7, "--seed", help="Random seed."),
) -> None:
    """Simulate journeys with known causal truth (T.csv, C.csv, truth.csv, holdouts.csv)."""
    from cadence.sim.journeys import SCENARIOS, simulate, write_files

    if scenario not in SCENARIOS:
        raise AttributionError(f"unknown scenario {scenario!r} (choose from {', '.join(SCENARIOS)})")
    with err_console.status(f"simulating {customers:,} customers ({scenario})"):
        result = simulate(scenario, customers=customers, seed=seed)
        paths = write_files(result, out_dir)
    console.print(
        f"{result.touch_ms.shape[0]:,} touchpoints, {result.conv_ms.shape[0]:,} conversions "
        f"({result.baseline:,.0f} expected without marketing) -> {', '.join(str(p) for p in paths.values())}"
    )


def _read_truth(path: Path) -> dict[str, float]:
    truth: dict[str, float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row["channel"].startswith("("):
                truth[row["channel"]] = float(row["incremental"])
    return truth


def _read_credits(path: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            name = row.get("model") or path.stem
            out.setdefault(name, {})[row["channel"]] = float(row["credit"])
    return out


@attribution_app.command("score")
def score_cmd(
    truth: Path = typer.Option(..., "--truth", help="truth.csv from `cadence attribution simulate`."),
    credits: list[Path] = typer.Argument(..., help="credits CSV files from `cadence attribution run`."),
) -> None:
    """Score credit files against the truth: Pearson r and share of credit on wrong channels."""
    from cadence.engine.attribution.scoring import score

    true = _read_truth(truth)
    table = Table(title="Models against the truth")
    table.add_column("model", style="bold")
    table.add_column("pearson r", justify="right")
    table.add_column("credit on wrong channels", justify="right")
    for path in credits:
        for name, credit in _read_credits(path).items():
            s = score(credit, true)
            table.add_row(
                name, "nan" if math.isnan(s.pearson) else f"{s.pearson:.3f}", f"{100 * s.wrong_share:.1f}%"
            )
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``cadence attribution`` to the root app."""
    app.add_typer(attribution_app, name="attribution")


@attribution_app.command("refresh")
def refresh_cmd(
    ctx: typer.Context,
    window: list[str] = typer.Option(
        ["30d"], "--window", "-w", help="Windows to refit (repeatable), 1d to 90d."
    ),
    model: list[str] = typer.Option(
        [], "--model", "-m", help="Models (repeatable or comma-separated; default: all materialised)."
    ),
    spec: str | None = typer.Option(None, "--spec", help="Attribution block (default: every block)."),
) -> None:
    """Refit the materialised models from the stored aggregates (what the leader does in the background)."""
    from cadence.cli import runtime_for
    from cadence.engine.attribution.materialized import MATERIALIZED_MODELS, fittable, refresh_fits
    from cadence.engine.attribution.online import kept_windows, specs_of

    runtime = runtime_for(ctx)
    asked = [m.strip() for v in model for m in v.split(",") if m.strip()]
    models = asked or list(MATERIALIZED_MODELS)
    windows = []
    for w in window:
        ms = parse_window(w)
        if ms % 86_400_000:
            raise AttributionError(f"window {w}: windows are whole days (1d to 90d)")
        windows.append(ms // 86_400_000)
    specs = [s for s in specs_of(runtime) if spec is None or s.name == spec]
    if not specs:
        raise AttributionError(f"unknown attribution block {spec!r}")
    for block in specs:
        for w in windows:
            skipped = [m for m in models if m not in fittable(block, w, models)]
            if skipped and asked:
                kept = ", ".join(f"{d}d" for d in kept_windows(block))
                raise AttributionError(
                    f"window {w}d: {', '.join(skipped)} tallies are kept for {kept} only ({block.name}); "
                    "causal fits any window"
                )
            if skipped:
                err_console.print(
                    f"{block.name}: {', '.join(skipped)} not refitted at {w}d (no tallies kept)"
                )
    table = Table("block", "model", "window", "position", "seconds", "credited", "would happen anyway")
    for block in specs:
        with err_console.status(f"refitting {block.name}"):
            fits = refresh_fits(runtime.engine, spec=block, windows=windows, models=models)
        for fit in fits:
            anyway = fit.result.get("share_anyway")
            table.add_row(
                block.name,
                fit.model,
                f"{fit.window_days}d",
                f"{fit.position:,}",
                f"{fit.seconds:.2f}",
                f"{sum(r['conversions'] for r in fit.rows):,.1f}",
                "-" if anyway is None else f"{100 * anyway:.1f}%",
            )
    console.print(table)


def _utc_day(text: str | None, option: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise AttributionError(f"{option} {text!r}: not a date (YYYY-MM-DD)") from None


@attribution_app.command("lift")
def lift_cmd(
    ctx: typer.Context,
    since: str | None = typer.Option(
        None, "--from", help="First UTC day, YYYY-MM-DD (default: 29 days before --to)."
    ),
    until: str | None = typer.Option(None, "--to", help="Last UTC day, YYYY-MM-DD (default: today)."),
    spec: str | None = typer.Option(
        None, "--spec", help="Attribution block whose conversions count (default: the first)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Measured lift of each campaign with a holdout arm: the customers who entered its split in the range, by arm."""
    import orjson

    from cadence.cli import runtime_for
    from cadence.engine.assignments import block_lifts
    from cadence.engine.attribution.online import block_named
    from cadence.store.db import read_connection

    last = _utc_day(until, "--to") or datetime.now(UTC).date()
    first = _utc_day(since, "--from") or last - timedelta(days=29)
    if first > last:
        raise AttributionError(f"--from {first} is after --to {last}")
    runtime = runtime_for(ctx)
    block = block_named(runtime, spec)
    epoch = date(1970, 1, 1)
    with read_connection(runtime.engine) as conn:
        rows = block_lifts(conn, block, since_day=(first - epoch).days, until_day=(last - epoch).days)
    if as_json:
        out = {
            "spec": block.name,
            "conversion_event": block.conversion_event,
            "since": str(first),
            "until": str(last),
            "lifts": rows,
        }
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if not rows:
        console.print(
            f"no campaign with customers in both a sending and a holdout arm from {first} to {last}"
        )
        return
    table = Table(
        "campaign",
        "treated",
        "held out",
        "treated rate",
        "held-out rate",
        "difference (95% interval)",
        "incremental",
        title=f"{block.name}: {block.conversion_event} from each customer's first assignment, {first} to {last}",
    )
    for r in rows:
        table.add_row(
            r["campaign"],
            f"{r['treated']:,}",
            f"{r['held_out']:,}",
            f"{100 * r['treated_rate']:.2f}%",
            f"{100 * r['held_out_rate']:.2f}%",
            f"{100 * r['difference']:+.2f} ({100 * r['low']:+.2f} to {100 * r['high']:+.2f}) points",
            f"{r['incremental']:,.1f}",
        )
    console.print(table)
