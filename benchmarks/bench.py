"""The store on a standard workload, side by side with its baselines, in one run.

    make bench                                   # 50 instruments x 21 trading days (~400,000 vectors)
    .venv/bin/python benchmarks/bench.py --days 252 [--write]

Workload: deterministic synthetic one-minute bars (390 a day, ~0.5% dropped) and ~20 news events
per instrument-day. Each measurement runs in its own process (peak memory is its own VmHWM);
the rows are generated once, kept as Parquet, and every write measurement writes the same rows
into a fresh database.

Measured: feature computation; Great Expectations validation (one verdict per day from one
validation of the rows and one of the day profiles, quality and drift suites) and its share;
the write path against the typical approach (pandas per instrument, executemany INSERT ... ON
CONFLICT) and the physical limit proxy (COPY into an UNLOGGED table without index); a backfill
of the range through the project's CLI and one scheduled partition run through
``dagster job execute``, against an empty Dagster run launched
the same way; retrieval (``retrieval.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psutil
from common import ROOT, bench_database, machine, peak_rss_mb, pipeline_env, write_doc_section

START = datetime(2024, 1, 2, tzinfo=UTC)


def trading_window(days: int) -> tuple[datetime, datetime, list[date]]:
    """The first ``days`` sessions from START (the universe's calendar), and a UTC window holding them."""
    from marketfs.universe import active_sessions

    trading = active_sessions().between(START.date(), START.date() + timedelta(days=days * 2 + 30))[:days]
    return START, datetime.combine(trading[-1], datetime.min.time(), UTC) + timedelta(days=1), trading


# -- measurements, each run in a child process -------------------------------------------------


def m_compute(work: Path, instruments: int, days: int) -> dict:
    import polars as pl

    from marketfs.features.compute import compute_feature_vectors
    from marketfs.sources import SyntheticBars, SyntheticEvents
    from marketfs.sources.normalize import normalize_bars

    start, end, _ = trading_window(days)
    names = tuple(f"SYN{i:03d}" for i in range(instruments))
    bars = normalize_bars(SyntheticBars(instruments=names).bars(start, end))
    events = SyntheticEvents(instruments=names).events(start - timedelta(days=1), end)
    t0 = time.perf_counter()
    vectors = compute_feature_vectors(bars, "1m", events=events).vectors
    seconds = time.perf_counter() - t0
    vectors.write_parquet(work / "vectors.parquet")
    return {
        "rows": vectors.height,
        "seconds": seconds,
        "bars": bars.height,
        "events": events.height,
        "columns": len(vectors.columns),
        "peak_mb": peak_rss_mb(),
        "_": pl.__version__,
    }


def m_validate(work: Path, instruments: int, days: int) -> dict:
    import polars as pl

    from expectations.drift import drift_profile
    from expectations.gate import load_suite_json, suite_path, validate_days

    vectors = pl.read_parquet(work / "vectors.parquet")
    t0 = time.perf_counter()
    import great_expectations  # noqa: F401  (its import is part of what a run pays, once per process)

    imported = time.perf_counter() - t0
    # As the asset does: one validation of the rows and one of the day profile give every day's verdict.
    with_days = vectors.with_columns(pl.col("ts").dt.strftime("%Y-%m-%d").alias("day"))
    quality = validate_days(with_days, "feature_vectors_fs_v1_1m")
    after_quality = time.perf_counter() - t0
    template = load_suite_json(suite_path("feature_vectors_fs_v1_1m_drift"))
    profile = drift_profile(vectors, vectors.clear(), template, source="bench")
    drift = (
        validate_days(profile.frame, template["name"], suite=profile.suite, examples=()) if profile.frame.height else {}
    )
    seconds = time.perf_counter() - t0
    return {
        "rows": vectors.height,
        "seconds": seconds,
        "import_s": imported,
        "quality_s": after_quality - imported,
        "drift_s": seconds - after_quality,
        "days_judged": len(quality),
        "passed": all(q.passed for q in quality.values()) and all(d.passed for d in drift.values()),
        "peak_mb": peak_rss_mb(),
    }


def _frame(work: Path):
    import polars as pl

    return pl.read_parquet(work / "vectors.parquet")


def m_write_ours(work: Path, instruments: int, days: int) -> dict:
    from marketfs.db import engine_for
    from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
    from marketfs.store.feature_vectors import upsert_window

    vectors = _frame(work)
    start, end, _ = trading_window(days)
    with bench_database() as dsn:
        engine = engine_for(dsn)
        timings = []
        for _attempt in range(2):  # the first write, then an idempotent re-run over the same keys
            t0 = time.perf_counter()
            # As the assets do: one transaction per run of up to 31 daily partitions.
            batch_start = start
            while batch_start < end:
                batch_end = min(batch_start + timedelta(days=31), end)
                part = vectors.filter((vectors["ts"] >= batch_start) & (vectors["ts"] < batch_end))
                with engine.begin() as conn:
                    upsert_window(conn, part, feature_set=FS_V1, timeframe="1m", start=batch_start, end=batch_end)
                batch_start = batch_end
            timings.append(time.perf_counter() - t0)
    return {"rows": vectors.height, "seconds": timings[0], "rerun_s": timings[1], "peak_mb": peak_rss_mb()}


def m_write_typical(work: Path, instruments: int, days: int) -> dict:
    import psycopg

    vectors = _frame(work)
    columns = vectors.columns
    placeholders = ", ".join(["%s"] * len(columns))
    updates = ", ".join(
        f"{c} = EXCLUDED.{c}" for c in columns if c not in ("instrument_id", "timeframe", "ts", "feature_set_version")
    )
    insert = (
        f"INSERT INTO feature_vectors ({', '.join(columns)}) VALUES ({placeholders}) "
        f"ON CONFLICT (instrument_id, timeframe, ts, feature_set_version) DO UPDATE SET {updates}"
    )
    with bench_database() as dsn:
        t0 = time.perf_counter()
        with psycopg.connect(dsn) as conn:
            for instrument in vectors["instrument_id"].unique().sort():
                frame = vectors.filter(vectors["instrument_id"] == instrument).to_pandas()
                frame = frame.astype(object).where(frame.notna(), None)
                frame["quality_flags"] = frame["quality_flags"].map(list)
                rows = [tuple(r) for r in frame.itertuples(index=False)]
                with conn.cursor() as cur:
                    cur.executemany(insert, rows)
                conn.commit()
        seconds = time.perf_counter() - t0
    return {"rows": vectors.height, "seconds": seconds, "peak_mb": peak_rss_mb()}


def m_write_copy_limit(work: Path, instruments: int, days: int) -> dict:
    from marketfs.db import engine_for
    from marketfs.store.copy import copy_frame_in

    vectors = _frame(work)
    with bench_database() as dsn:
        engine = engine_for(dsn)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE UNLOGGED TABLE copy_limit (LIKE feature_vectors INCLUDING DEFAULTS)")
        t0 = time.perf_counter()
        with engine.begin() as conn:
            copy_frame_in(conn, "copy_limit", vectors)
        seconds = time.perf_counter() - t0
    return {"rows": vectors.height, "seconds": seconds, "peak_mb": peak_rss_mb()}


MEASUREMENTS = {
    "compute": m_compute,
    "validate": m_validate,
    "write_ours": m_write_ours,
    "write_typical": m_write_typical,
    "write_copy_limit": m_write_copy_limit,
}


# -- end to end through Dagster -----------------------------------------------------------------


def run_tree(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command``; wall time and the peak RSS of its whole process tree (sampled every 50 ms)."""
    t0 = time.perf_counter()
    proc = psutil.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    output = proc.stdout.read()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {"seconds": seconds, "peak_mb": peak / 2**20}


def rows_in_tables(dsn: str) -> dict[str, int]:
    """Rows of every table of the store after the backfill (all it wrote: a first backfill replaces nothing)."""
    import sqlalchemy as sa

    from marketfs.db import engine_for

    with engine_for(dsn).connect() as conn:
        tables = conn.execute(
            sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations' "
                "ORDER BY 1"
            )
        ).scalars()
        counts = {t: conn.execute(sa.text(f'SELECT count(*) FROM "{t}"')).scalar() for t in list(tables)}
    return {t: n for t, n in counts.items() if n}


def end_to_end(instruments: int, days: int, rows: int) -> dict:
    start, end, trading = trading_window(days)
    results = {}
    with bench_database() as dsn, bench_database() as instance_dsn, tempfile.TemporaryDirectory() as home:
        env = pipeline_env(dsn, instance_dsn, home, instruments)
        python = sys.executable
        backfill = run_tree(
            [
                python,
                "-m",
                "pipelines",
                "run",
                "--start",
                trading[0].isoformat(),
                "--end",
                trading[-1].isoformat(),
                "--no-snapshot",
            ],
            env,
        )
        results["backfill"] = {**backfill, "rows": rows, "written": rows_in_tables(dsn)}
        # One scheduled partition: the day after the range, so its warm-up and state come from the store.
        from marketfs.universe import active_sessions

        next_day = active_sessions().next_session(end.date()).isoformat()
        tags = json.dumps({"dagster/partition": next_day})
        results["partition"] = run_tree(
            [
                python,
                "-m",
                "dagster",
                "job",
                "execute",
                "-m",
                "pipelines.definitions",
                "-j",
                "daily_features",
                "--tags",
                tags,
            ],
            env,
        )
        results["empty"] = run_tree(
            [python, "-m", "dagster", "job", "execute", "-m", "benchmarks.floor", "-j", "empty", "--tags", tags],
            env,
        )
        results["partition"]["day"] = next_day
    return results


# -- orchestration --------------------------------------------------------------------------------


def child(name: str, work: str, instruments: int, days: int) -> dict:
    return MEASUREMENTS[name](Path(work), instruments, days)


def run_child(name: str, work: Path, instruments: int, days: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, str(work), "--instruments", str(instruments), "--days", str(days)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--instruments", type=int, default=50)
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--skip-dagster", action="store_true")
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--write", action="store_true", help="replace the pipeline section of docs/benchmarks.md")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.instruments, args.days)))
        return 0

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        r = {name: run_child(name, Path(work), args.instruments, args.days) for name in MEASUREMENTS}
    rows = r["compute"]["rows"]
    if not args.skip_dagster:
        r.update(end_to_end(args.instruments, args.days, rows))

    def rate(x: dict) -> float:
        return x.get("rows", rows) / x["seconds"]

    lines = [
        f"Command: `.venv/bin/python benchmarks/bench.py --instruments {args.instruments} --days {args.days}`",
        "",
        f"Date: {datetime.now(UTC):%Y-%m-%d}, machine: {machine()}, embedded PostgreSQL 16 on loopback. "
        f"Workload: {args.instruments} instruments x {args.days} trading days: {r['compute']['bars']:,} bars, "
        f"{r['compute']['events']:,} events, **{rows:,} vectors** of {r['compute']['columns']} columns. "
        f"Whole run: {time.perf_counter() - started:.0f} s.",
        "",
        "| measurement | time | rows/s | peak memory |",
        "|---|---|---|---|",
        f"| 1. feature computation (fs_v1, 1m) | {r['compute']['seconds']:.2f} s | {rate(r['compute']):,.0f} | "
        f"{r['compute']['peak_mb']:.0f} MB |",
        f"| 2. GX validation: quality suite + drift suite, one verdict per day "
        f"({r['validate']['days_judged']} days; import {r['validate']['import_s']:.1f} s, quality "
        f"{r['validate']['quality_s']:.1f} s, drift {r['validate']['drift_s']:.1f} s) | "
        f"{r['validate']['seconds']:.2f} s | {rate(r['validate']):,.0f} | {r['validate']['peak_mb']:.0f} MB |",
        f"| 3a. write path, first write (COPY into the table under an advisory lock), per 31-day run | "
        f"{r['write_ours']['seconds']:.2f} s | "
        f"{rate(r['write_ours']):,.0f} | {r['write_ours']['peak_mb']:.0f} MB |",
        f"| 3a'. write path, re-run over existing keys (COPY to staging, upsert, delete stale) | "
        f"{r['write_ours']['rerun_s']:.2f} s | "
        f"{rows / r['write_ours']['rerun_s']:,.0f} | |",
        f"| 3b. baseline: pandas per instrument + executemany INSERT ON CONFLICT | "
        f"{r['write_typical']['seconds']:.2f} s | {rate(r['write_typical']):,.0f} | "
        f"{r['write_typical']['peak_mb']:.0f} MB |",
        f"| 3c. limit proxy: COPY into UNLOGGED table, no index | {r['write_copy_limit']['seconds']:.2f} s | "
        f"{rate(r['write_copy_limit']):,.0f} | {r['write_copy_limit']['peak_mb']:.0f} MB |",
    ]
    if "backfill" in r:
        lines += [
            f"| 4a. backfill of the range end to end (`python -m pipelines run`, every asset, gates) | "
            f"{r['backfill']['seconds']:.1f} s | {rate(r['backfill']):,.0f} | {r['backfill']['peak_mb']:.0f} MB |",
            f"| 4b. one scheduled partition ({r['partition']['day']}, `dagster job execute`) | "
            f"{r['partition']['seconds']:.1f} s | | {r['partition']['peak_mb']:.0f} MB |",
            f"| 4c. floor: empty Dagster run launched the same way | {r['empty']['seconds']:.1f} s | | "
            f"{r['empty']['peak_mb']:.0f} MB |",
        ]
    # The import is paid once per process, whatever the range: the share is of the validation work, and
    # the line says what it is with the import counted in.
    validation = r["validate"]["seconds"] - r["validate"]["import_s"]
    share = validation / (r["compute"]["seconds"] + validation + r["write_ours"]["seconds"])
    share_with_import = r["validate"]["seconds"] / (
        r["compute"]["seconds"] + r["validate"]["seconds"] + r["write_ours"]["seconds"]
    )
    ours, typical, limit = rate(r["write_ours"]), rate(r["write_typical"]), rate(r["write_copy_limit"])
    lines += [
        "",
        "Targets:",
        f"- write path vs typical: **{ours / typical:.1f}x** (target >= 3x); vs COPY limit: **{ours / limit:.2f}** "
        "(target >= 0.5)",
        f"- GX validation's share of compute + validate + write: {100 * share:.0f}% "
        f"(with its one-time import of {r['validate']['import_s']:.1f} s counted in: {100 * share_with_import:.0f}%)",
    ]
    if "backfill" in r:
        written = sum(r["backfill"]["written"].values())
        end_to_end_rate = written / r["backfill"]["seconds"]
        tables = ", ".join(f"{t} {n:,}" for t, n in sorted(r["backfill"]["written"].items(), key=lambda i: -i[1]))
        lines += [
            f"- end to end vs COPY limit: {end_to_end_rate / limit:.2f} ({written:,} rows written by the backfill "
            f"over every table in {r['backfill']['seconds']:.1f} s = {end_to_end_rate:,.0f} rows/s, against the COPY "
            f"limit's {limit:,.0f} rows/s; target >= 0.5, bar 0.35). Rows: {tables}",
            f"- backfill end to end vs typical write alone: **{rate(r['backfill']) / typical:.1f}x** (target >= 3x), "
            f"peak memory {r['backfill']['peak_mb']:.0f} MB (target < 2048 MB)",
            f"- scheduled partition vs empty run: **{r['partition']['seconds'] / r['empty']['seconds']:.2f}x** "
            "(target <= 1.5x)",
        ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_doc_section(f"## Pipeline: compute, validate, write, end to end ({args.days} days)", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
