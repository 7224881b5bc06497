"""Attribution: accuracy against simulated truth, and speed against ChannelAttribution.

Accuracy: each scenario of :mod:`cadence.sim.journeys` is simulated, written to CSV,
and every model runs on those files through the same code as ``cadence attribution
run``; each is scored by the Pearson r of its per-channel credit with the true
incremental conversions and by the share of its credit on channels that caused
nothing. ChannelAttribution's Markov model runs on the same files.

Speed: ``cadence attribution run`` and a ChannelAttribution script (pandas reads the
same CSV files, builds the paths, runs ``markov_model``) are each timed as a whole
process, in the same run, with the peak memory of each process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cadence.engine.attribution.files import load_holdouts, load_touch_log
from cadence.engine.attribution.holdout import calibration_factors, measure_lifts
from cadence.engine.attribution.journeys import DAY_MS
from cadence.engine.attribution.models import MODELS, run_model
from cadence.engine.attribution.scoring import score
from cadence.sim.journeys import simulate, write_files

ROOT = Path(__file__).resolve().parent.parent
WINDOW_MS = 30 * DAY_MS

CA_SCRIPT = r"""
import sys
import pandas as pd
from ChannelAttribution import markov_model

t_path, c_path, out = sys.argv[1:4]
t = pd.read_csv(t_path)
c = pd.read_csv(c_path)
t["ts"] = pd.to_datetime(t["ts"], utc=True, format="ISO8601")
c["ts"] = pd.to_datetime(c["ts"], utc=True, format="ISO8601")
first = c.groupby("customer_id")["ts"].min().rename("conv_ts")
t = t.join(first, on="customer_id")
window = pd.Timedelta(days=30)
end = t["conv_ts"].fillna(t.groupby("customer_id")["ts"].transform("max"))
keep = (t["ts"] <= end) & (t["ts"] >= end - window)
t = t[keep].sort_values(["customer_id", "ts"])
paths = t.groupby("customer_id")["channel"].agg(" > ".join).to_frame("path")
paths["conv"] = paths.index.isin(first.index).astype(int)
paths["null"] = 1 - paths["conv"]
data = paths.groupby("path", as_index=False)[["conv", "null"]].sum()
res = markov_model(data, "path", "conv", var_null="null", order=1, verbose=0, flg_pro=False)
res = res["result"] if isinstance(res, dict) else res
res = res.rename(columns={"channel_name": "channel", "total_conversions": "credit"})
res[["channel", "credit"]].to_csv(out, index=False)
"""


def _have_channelattribution() -> bool:
    try:
        import ChannelAttribution  # noqa: F401
    except ImportError:
        return False
    return True


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MiB) and exit status of a whole process.

    The peak is measured by GNU time when present: a child forked from this (large)
    process would otherwise report this process's pages as its own high-water mark.
    """
    gnu_time = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        full = [gnu_time, "-f", "%M", "-o", rss.name, *cmd] if gnu_time else cmd
        start = time.perf_counter()
        proc = subprocess.run(full, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
        text = Path(rss.name).read_text().strip().splitlines() if gnu_time else []
        peak = float(text[-1]) / 1024 if text and text[-1].isdigit() else float("nan")
    return elapsed, peak, proc.returncode


def _ca_markov(t_path: Path, c_path: Path, out: Path) -> dict[str, float]:
    env = {**os.environ}
    subprocess.run(
        [sys.executable, "-c", CA_SCRIPT, str(t_path), str(c_path), str(out)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    import csv

    with out.open() as f:
        return {row["channel"]: float(row["credit"]) for row in csv.DictReader(f)}


def accuracy(n: int, tmp: Path) -> list[str]:
    """Every model on every scenario: Pearson r and wrong-channel credit."""
    rows = []
    has_ca = _have_channelattribution()
    for scenario in ("simple", "synergy", "targeted", "intent"):
        sim = simulate(scenario, customers=n, seed=42)
        paths = write_files(sim, tmp / scenario)
        log = load_touch_log(paths["touchpoints"], paths["conversions"])
        journeys = log.journeys(WINDOW_MS)
        scores: dict[str, tuple[float, float]] = {}
        for name in MODELS:
            result = run_model(name, log=log, journeys=journeys, window_ms=WINDOW_MS)
            s = score(result.by_channel(), sim.truth)
            scores[name] = (s.pearson, s.wrong_share)
            if name == "causal":
                fit = result.causal
                assert fit is not None
                no_guard = {"min_lag_ms": 0}
                s0 = run_model(name, log=log, journeys=journeys, window_ms=WINDOW_MS, params=no_guard)
                s = score(s0.by_channel(), sim.truth)
                scores["causal (no intent guard)"] = (s.pearson, s.wrong_share)
                if "holdouts" in paths:
                    hold = load_holdouts(paths["holdouts"], log)
                    lifts = measure_lifts(log, hold)
                    on_treated = {
                        c: float(
                            fit.customer_credit[
                                hold.customers[c][~hold.held_out[c] & (hold.customers[c] < log.n_customers)],
                                fit.channels.index(c),
                            ].sum()
                        )
                        for c in lifts
                    }
                    cal = run_model(
                        name,
                        log=log,
                        journeys=journeys,
                        window_ms=WINDOW_MS,
                        causal_fit=fit,
                        calibration=calibration_factors(lifts, on_treated),
                    )
                    s = score(cal.by_channel(), sim.truth)
                    scores["causal + holdouts"] = (s.pearson, s.wrong_share)
        if has_ca:
            ca_credit = _ca_markov(paths["touchpoints"], paths["conversions"], tmp / f"{scenario}-ca.csv")
            s = score(ca_credit, sim.truth)
            scores["ChannelAttribution markov"] = (s.pearson, s.wrong_share)
        for name, (r, wrong) in scores.items():
            goal = ""
            if name == "causal" and scenario in ("simple", "synergy"):
                goal = "r >= 0.95, <= 10%"
            if name == "causal + holdouts":
                goal = "r >= 0.85"
            rows.append(f"| {scenario} | {name} | {r:.3f} | {100 * wrong:.1f}% | {goal} |")
    return rows


def speed(n: int, tmp: Path) -> list[str]:
    """Whole-process time and peak memory: cadence vs ChannelAttribution, same files."""
    sim = simulate("simple", customers=n, seed=1)
    paths = write_files(sim, tmp / "speed")
    t_path, c_path = paths["touchpoints"], paths["conversions"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sizes = f"{n:,} customers, {sim.touch_ms.shape[0]:,} touchpoints, {sim.conv_ms.shape[0]:,} conversions"
    rows = [f"_{sizes}._", ""]
    rows += ["| process | seconds | peak memory (MiB) | goal |", "|---|---:|---:|---|"]
    base = [sys.executable, "-m", "cadence", "attribution", "run", "-t", str(t_path), "-c", str(c_path)]
    results = {}
    for label, models in (("markov", "markov"), ("causal", "causal"), ("all 11 models", ",".join(MODELS))):
        cmd = [*base, "-m", models, "--out", str(tmp / "out.csv"), "--no-progress"]
        results[label] = _timed(cmd, env)
    ca = None
    if _have_channelattribution():
        ca = _timed([sys.executable, "-c", CA_SCRIPT, str(t_path), str(c_path), str(tmp / "ca.csv")], env)
    for label, (secs, mem, rc) in results.items():
        goal = ""
        if label == "markov" and ca is not None:
            goal = f"faster than ChannelAttribution ({secs / ca[0]:.2f}x its time); < 2048 MiB"
        status = "" if rc == 0 else f" (exit {rc})"
        rows.append(f"| `cadence attribution run -m {label}` | {secs:.1f}{status} | {mem:.0f} | {goal} |")
    if ca is not None:
        rows.append(f"| ChannelAttribution markov (pandas + markov_model) | {ca[0]:.1f} | {ca[1]:.0f} | |")
    else:
        rows.append("| ChannelAttribution | not installed | | |")
    return rows


def online(quick: bool, tmp: Path) -> list[str]:
    """Per-event update cost through the engine loop, and query latency on the aggregates."""
    import random
    import statistics

    from cadence.engine.attribution.online import AttributionSubscriber, query_attribution
    from cadence.engine.events import parse_call
    from cadence.engine.ingest import record_events
    from cadence.engine.loop import EngineLoop
    from cadence.runtime import open_runtime
    from cadence.settings import Settings

    settings = Settings(
        database_url=f"sqlite:///{tmp}/online.db", rules_paths=[], disable_plugin_autoload=True
    )
    runtime = open_runtime(settings, upgrade=True)
    rng = random.Random(3)
    t0 = 1_767_225_600_000
    calls = []
    n_customers = 1_000 if quick else 5_000
    channels = ["email", "sms", "push"]
    for c in range(n_customers):
        for k in range(5):
            ts = (t0 + rng.randrange(60 * 86_400_000)) / 1000
            calls.append(
                {
                    "type": "track",
                    "messageId": f"t{c}-{k}",
                    "userId": f"u{c}",
                    "timestamp": ts,
                    "event": "Message Clicked",
                    "properties": {"channel": rng.choice(channels)},
                }
            )
        if rng.random() < 0.3:
            ts = (t0 + rng.randrange(60 * 86_400_000)) / 1000
            calls.append(
                {
                    "type": "track",
                    "messageId": f"o{c}",
                    "userId": f"u{c}",
                    "timestamp": ts,
                    "event": "Order Completed",
                    "properties": {"revenue": 10},
                }
            )
    calls.sort(key=lambda x: x["timestamp"])
    record_events(engine=runtime.engine, batch=[parse_call(x, received_ms=t0) for x in calls])
    # Identity first (its cost is not attribution's), then attribution alone.
    EngineLoop(runtime, subscribers=[]).catch_up()
    loop = EngineLoop(runtime, subscribers=[AttributionSubscriber(runtime)])
    start = time.perf_counter()
    loop.catch_up()
    per_event_us = (time.perf_counter() - start) / len(calls) * 1e6

    # Aggregates the size a year of 10M touchpoints produces: one row per model,
    # window, day, channel and campaign (15 channels x 20 campaigns).
    days = 30 if quick else 365
    models = [
        "first_touch",
        "last_touch",
        "last_non_direct",
        "linear",
        "time_decay",
        "position",
        "shapley_simplified",
    ]
    windows = [1, 7, 14, 30, 60, 90]
    n_rows = 0
    with runtime.engine.begin() as conn:
        for m in models:
            for w in windows:
                # One (model, window) at a time: tuples through the driver, little memory.
                chunk = [
                    ("big", m, w, 20_454 + d, f"ch{c}", f"cp{p}", 1.0, 2.0)
                    for d in range(days)
                    for c in range(15)
                    for p in range(20)
                ]
                conn.exec_driver_sql(
                    "INSERT INTO attribution_credits (spec, model, window_days, day, channel, campaign, "
                    "conversions, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    chunk,
                )
                n_rows += len(chunk)
                conn.exec_driver_sql(
                    "INSERT INTO attribution_channel_credits (spec, model, window_days, day, channel, "
                    "conversions, value) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [("big", m, w, 20_454 + d, f"ch{c}", 20.0, 40.0) for d in range(days) for c in range(15)],
                )
                conn.exec_driver_sql(
                    "INSERT INTO attribution_campaign_credits (spec, model, window_days, day, campaign, "
                    "conversions, value) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [("big", m, w, 20_454 + d, f"cp{p}", 15.0, 30.0) for d in range(days) for p in range(20)],
                )
    timings: dict[str, list[float]] = {"channel": [], "campaign": [], "day": []}
    with runtime.engine.connect() as conn:
        for i in range(60):
            lo = 20_454 + rng.randrange(days // 2)
            group = ("channel", "campaign", "day")[i % 3]
            start = time.perf_counter()
            query_attribution(
                conn,
                spec="big",
                models=["linear", "last_touch"],
                window_days=30,
                since_day=lo,
                until_day=lo + days // 2,
                group_by=group,
            )
            timings[group].append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        query_attribution(conn, spec="default", models=["shapley", "markov"], window_days=30)
        tally_ms = (time.perf_counter() - start) * 1000
    runtime.close()
    p95 = statistics.quantiles(timings["channel"] + timings["day"], n=20)[-1]
    p95_campaign = statistics.quantiles(timings["campaign"], n=20)[-1]
    return [
        "| measure | value | goal |",
        "|---|---:|---|",
        f"| attribution subscriber, per event ({len(calls):,} events, SQLite) | {per_event_us:,.0f} us | |",
        f"| query p95 by channel or day, 2 models, half of {days} days ({n_rows:,} campaign-level rows: "
        f"{days} days x 15 channels x 20 campaigns x 7 models x 6 windows) | {p95:.1f} ms | < 50 ms |",
        f"| query p95 by campaign, same | {p95_campaign:.1f} ms | < 50 ms |",
        f"| shapley + markov from tallies ({n_customers:,} customers' open journeys) | {tally_ms:.1f} ms | |",
    ]


def run(*, quick: bool, postgres_url: str | None) -> str:
    """The attribution benchmark section (Markdown)."""
    del postgres_url
    n_acc = 20_000 if quick else 200_000
    n_speed = 50_000 if quick else 1_000_000
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        acc = accuracy(n_acc, tmp)
        spd = speed(n_speed, tmp)
        onl = online(quick, tmp)
    lines = [
        "## Attribution",
        "",
        f"Accuracy on simulated journeys with known causal truth ({n_acc:,} customers per scenario, 30-day "
        "window): Pearson r between each model's per-channel credit and the true incremental conversions "
        "(Shapley split of the counterfactual), and the share of credit on channels that caused nothing. "
        "Every model is listed, good or bad.",
        "",
        "| scenario | model | pearson r | credit on wrong channels | goal |",
        "|---|---|---:|---:|---|",
        *acc,
        "",
        "Speed: whole process (start, read both CSV files, model, write), same files for both.",
        "",
        *spd,
        "",
        "Online: the engine-loop subscriber's cost per event, and queries served from the aggregates "
        "(the aggregate tables' size depends on days x channels x campaigns, not on how many touchpoints "
        "produced them).",
        "",
        *onl,
    ]
    return "\n".join(lines)
