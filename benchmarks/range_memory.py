"""Peak memory of a backfill run against the length of its range, at one universe size.

    .venv/bin/python benchmarks/range_memory.py [--instruments 500] [--days 5 31] [--write]

Each range runs ``python -m pipelines run --no-snapshot`` (one Dagster run per 31 days, all five
assets and their gates) into a fresh database and a fresh Dagster instance, and reports wall time,
vectors per second and the peak RSS of the whole process tree (sampled every 50 ms). A run walks its
range in chunks of about ``MARKETFS_CHUNK_ROWS`` rows, so its peak should follow the universe, not
the range.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import UTC, datetime

import sqlalchemy as sa
from bench import run_tree, trading_window
from common import bench_database, machine, pipeline_env, write_doc_section


def one_range(instruments: int, days: int) -> dict:
    _, _, trading = trading_window(days)
    with bench_database() as dsn, bench_database() as instance_dsn, tempfile.TemporaryDirectory() as home:
        env = pipeline_env(dsn, instance_dsn, home, instruments)
        command = [sys.executable, "-m", "pipelines", "run", "--start", trading[0].isoformat()]
        result = run_tree([*command, "--end", trading[-1].isoformat(), "--no-snapshot"], env)
        from marketfs.db import engine_for

        with engine_for(dsn).connect() as conn:
            rows = conn.execute(sa.text("SELECT count(*) FROM feature_vectors WHERE timeframe = '1m'")).scalar()
        engine_for(dsn).dispose()
    return {**result, "rows": rows, "days": days, "calendar": f"{trading[0]}..{trading[-1]}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--instruments", type=int, default=500)
    parser.add_argument("--days", type=int, nargs="+", default=[5, 31])
    parser.add_argument("--write", action="store_true", help="replace this section of docs/benchmarks.md")
    args = parser.parse_args()
    results = [one_range(args.instruments, days) for days in args.days]
    lines = [
        f"Command: `.venv/bin/python benchmarks/range_memory.py --instruments {args.instruments} "
        f"--days {' '.join(map(str, args.days))}`",
        "",
        f"Date: {datetime.now(UTC):%Y-%m-%d}, machine: {machine()}, embedded PostgreSQL 16 on loopback, "
        f"MARKETFS_CHUNK_ROWS={os.environ.get('MARKETFS_CHUNK_ROWS', '400000 (default)')}.",
        "",
        "| range | trading days | 1m vectors | time | vectors/s | peak memory (process tree) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['calendar']} | {r['days']} | {r['rows']:,} | {r['seconds']:.1f} s | "
            f"{r['rows'] / r['seconds']:,.0f} | {r['peak_mb']:.0f} MB |"
            for r in results
        ],
        "",
        f"- peak memory, longest range vs shortest: **{results[-1]['peak_mb'] / results[0]['peak_mb']:.2f}x** "
        f"for {results[-1]['days'] / results[0]['days']:.1f}x the days",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_doc_section(f"## Peak memory against range length ({args.instruments} instruments)", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
