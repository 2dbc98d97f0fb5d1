"""Intraday: from a bar's delivery to ``latest()`` returning its vector, and the end-of-day run after it.

    .venv/bin/python benchmarks/intraday.py [--instruments 500] [--minutes 15] [--steps 6] [--write]

Synthetic data of the first two sample sessions: 2024-01-02 is yesterday (materialised by
``python -m pipelines run``), 2024-01-03 is today, and the clock is simulated (``now`` is given).

- **push_bars**: every minute, the feed pushes that minute's bars of all instruments (and the
  session's events so far every 5 minutes) right after the minute closes. The latency of a bar is
  from the call to ``push_bars`` to ``latest()`` returning the vector stamped with it: p50, p95, max.
- **run --today**: ``python -m pipelines run --today --now T`` every 30 minutes of the session (what a
  timer or the sensor's run does: start, read today's delivery so far, store what changed, step,
  record observations). Its wall time is the latency it adds to the interval between steps.
- **end of day**: ``python -m pipelines run`` of today, once on a database where today was built
  by those steps and once on one where it was not (the same yesterday): the end-of-day run of a
  day built intraday against today's run of the same day.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta

import polars as pl
from bench import run_tree
from common import bench_database, machine, pipeline_env, write_doc_section

YESTERDAY, TODAY = "2024-01-02", "2024-01-03"
OPEN = datetime(2024, 1, 3, 14, 30, tzinfo=UTC)


def _run(env: dict[str, str], *args: str) -> dict:
    return run_tree([sys.executable, "-m", "pipelines", "run", *args], env)


def push_latency(dsn: str, instruments: int, minutes: int) -> dict:
    """Push each minute's bars after it closes; time until latest() returns that minute's vector."""
    from marketfs.ingest import push_bars, push_events
    from marketfs.retrieval import OnlineReader
    from marketfs.sources import SyntheticBars
    from marketfs.sources.synthetic import SyntheticEvents

    names = tuple(f"SYN{i:03d}" for i in range(instruments))
    start, end = OPEN - timedelta(hours=18), OPEN + timedelta(minutes=minutes + 1)
    bars = SyntheticBars(instruments=names).bars(start, end)
    events = SyntheticEvents(instruments=names).events(start, end)
    reader = OnlineReader(dsn)
    latencies, steps = [], []
    for minute in range(minutes):
        t = OPEN + timedelta(minutes=minute)
        now = t + timedelta(minutes=1, seconds=2)
        if minute % 5 == 4:
            push_events(events.filter(pl.col("published_at") < now), now=now, dsn=dsn)
        minute_bars = bars.filter(pl.col("ts") == t)
        probe = minute_bars["instrument_id"][0]
        t0 = time.perf_counter()
        outcomes = push_bars(minute_bars, now=now, dsn=dsn)
        row = reader.latest([probe], ["ret_1"], output="records")[0]
        latencies.append(time.perf_counter() - t0)
        if row["ts"] != t:
            raise RuntimeError(f"latest() returned {row['ts']} for {probe} after pushing {t}")
        steps.append(sum(o.status == "served" for o in outcomes))
    warm = latencies[1:]  # the first push pays the imports and Great Expectations' start
    q = statistics.quantiles(warm, n=20, method="inclusive")
    return {
        "calls": len(warm),
        "p50": statistics.median(warm),
        "p95": q[18],
        "max": max(warm),
        "first": latencies[0],
        "steps": statistics.mean(steps),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--instruments", type=int, default=500)
    parser.add_argument("--minutes", type=int, default=15, help="minutes pushed one by one")
    parser.add_argument("--steps", type=int, default=6, help="run --today steps, 30 minutes apart from the open")
    parser.add_argument("--write", action="store_true", help="put the table in docs/benchmarks.md")
    args = parser.parse_args()
    rows = []
    with bench_database() as dsn, bench_database() as instance_dsn, tempfile.TemporaryDirectory() as home:
        env = pipeline_env(dsn, instance_dsn, home, args.instruments)
        _run(env, "--start", YESTERDAY, "--end", YESTERDAY, "--no-snapshot")
        push = push_latency(dsn, args.instruments, args.minutes)
    rows.append(
        f"| push_bars -> latest() ({push['calls']} minutes, {args.instruments} instruments, "
        f"{push['steps']:.1f} steps each) | {push['p50']:.2f} s | {push['p95']:.2f} s | {push['max']:.2f} s |"
    )
    eod = {}
    for built in (False, True):
        with bench_database() as dsn, bench_database() as instance_dsn, tempfile.TemporaryDirectory() as home:
            env = pipeline_env(dsn, instance_dsn, home, args.instruments)
            _run(env, "--start", YESTERDAY, "--end", YESTERDAY, "--no-snapshot")
            if built:
                step_times = []
                for k in range(args.steps):
                    now = OPEN + timedelta(minutes=30 * (k + 1), seconds=5)
                    step_times.append(_run(env, "--today", "--now", now.isoformat())["seconds"])
                # The rest of the session, as the last steps after the close would.
                step_times.append(
                    _run(env, "--today", "--now", (OPEN + timedelta(hours=6, minutes=30, seconds=5)).isoformat())[
                        "seconds"
                    ]
                )
            eod[built] = _run(env, "--start", TODAY, "--end", TODAY, "--no-snapshot")
    rows.append(
        f"| run --today ({len(step_times)} steps, {args.instruments} instruments) | "
        f"{statistics.median(step_times):.2f} s | {max(step_times):.2f} s | {max(step_times):.2f} s |"
    )
    table = "\n".join(
        [
            f"# intraday benchmark — {datetime.now(UTC):%Y-%m-%d}, {machine()}",
            "| path | p50 | p95 | max |",
            "|---|---|---|---|",
            *rows,
            "| run | wall | peak RSS |",
            "|---|---|---|",
            *[
                f"| end-of-day run of {TODAY}, {label} | {eod[b]['seconds']:.1f} s | {eod[b]['peak_mb']:.0f} MB |"
                for b, label in ((False, "not built intraday"), (True, "built by the steps above"))
            ],
        ]
    )
    print(table)
    if args.write:
        write_doc_section(
            "## Intraday (issue 17)", "Command: `.venv/bin/python benchmarks/intraday.py`\n\n```\n" + table + "\n```"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
