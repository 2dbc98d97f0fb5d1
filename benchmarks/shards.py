"""One backfill as one run against the same backfill as two instrument-shard runs at once.

    .venv/bin/python benchmarks/shards.py [--instruments 500] [--days 5 10] [--write]

For each range, into a fresh database and a fresh Dagster instance each time:

- **1 run**: ``MARKETFS_SHARDS=1 python -m pipelines run --no-snapshot`` (the whole universe, the days in order);
- **2 shard runs**: ``MARKETFS_SHARDS=2``, ``python -m pipelines run --shard 0`` and ``--shard 1`` started
  together, as Dagster's queue starts two shards' chains (each its days in order, both at once).

It reports the wall time until every run has finished, 1m vectors per second over that time, and each run's
own time and peak RSS (its whole process tree, sampled every 50 ms), the share of the machine's CPU (all cores,
the database included) that was busy meanwhile and the share PostgreSQL took, then checks that the two layouts stored
the same vectors (a content hash of every served column but when and by which run a row was written).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psutil
import sqlalchemy as sa
from bench import run_tree, trading_window
from common import bench_database, machine, pipeline_env, write_doc_section

# Every column a layout could change; when and by which run a row was written differ by construction.
UNCOMPARED = ("written_at", "run_id")


def _content(dsn: str) -> tuple[int, str]:
    """Row count and an order-independent hash of the 1m vectors (a sum of per-row md5 prefixes)."""
    from psycopg import sql

    from marketfs.db import engine_for

    with engine_for(dsn).connect() as conn:
        columns = [
            c
            for c in conn.execute(
                sa.text(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'feature_vectors' ORDER BY 1"
                )
            ).scalars()
            if c not in UNCOMPARED
        ]
        row = sql.SQL("concat_ws('|', {})").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns)
        )
        query = sql.SQL(
            "SELECT count(*), sum(('x' || left(md5({}), 15))::bit(60)::bigint::numeric)::text "
            "FROM feature_vectors WHERE timeframe = '1m'"
        ).format(row)
        count, digest = conn.connection.driver_connection.execute(query).fetchone()
    return count, digest


def one_layout(instruments: int, days: int, shards: int) -> dict:
    _, _, trading = trading_window(days)
    with bench_database() as dsn, bench_database() as instance_dsn, tempfile.TemporaryDirectory() as home:
        env = pipeline_env(dsn, instance_dsn, home, instruments, MARKETFS_SHARDS=str(shards))
        command = [sys.executable, "-m", "pipelines", "run", "--start", trading[0].isoformat()]
        command += ["--end", trading[-1].isoformat(), "--no-snapshot"]
        commands = [command] if shards == 1 else [[*command, "--shard", str(k)] for k in range(shards)]
        cpu_before, database_before = psutil.cpu_times(), _database_cpu()
        started = time.perf_counter()
        with ThreadPoolExecutor(len(commands)) as pool:  # a failed run's error is raised here
            runs = list(pool.map(lambda command: run_tree(command, env), commands))
        wall = time.perf_counter() - started
        cpu_after, database_after = psutil.cpu_times(), _database_cpu()
        rows, digest = _content(dsn)
    return {
        "shards": shards,
        "days": days,
        "calendar": f"{trading[0]}..{trading[-1]}",
        "seconds": wall,
        "rows": rows,
        "digest": digest,
        "runs": runs,
        "busy": _busy(cpu_before, cpu_after),
        "database": (database_after - database_before) / (wall * (os.cpu_count() or 1)),
    }


def _database_cpu() -> float:
    """CPU seconds of every PostgreSQL process so far, backends that have exited included (the postmaster's
    reaped children)."""
    total = 0.0
    for proc in psutil.process_iter(["name", "ppid"]):
        if proc.info["name"] != "postgres":
            continue
        try:
            times = proc.cpu_times()
            total += times.user + times.system
            if psutil.Process(proc.info["ppid"]).name() != "postgres":  # the postmaster
                total += times.children_user + times.children_system
        except psutil.Error:
            pass
    return total


def _busy(before, after) -> float:
    """Share of the machine's CPU time (every core) that was not idle between two ``psutil.cpu_times()``."""
    idle = (after.idle + getattr(after, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
    total = sum(after) - sum(before)
    return 1 - idle / total if total else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--instruments", type=int, default=500)
    parser.add_argument("--days", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--write", action="store_true", help="replace this section of docs/benchmarks.md")
    args = parser.parse_args()
    pairs = [(one_layout(args.instruments, d, 1), one_layout(args.instruments, d, 2)) for d in args.days]
    lines = [
        f"Command: `.venv/bin/python benchmarks/shards.py --instruments {args.instruments} "
        f"--days {' '.join(map(str, args.days))}`",
        "",
        f"Date: {datetime.now(UTC):%Y-%m-%d}, machine: {machine()}, embedded PostgreSQL on loopback "
        "(the runs and the database share the 2 cores).",
        "",
        "| range | trading days | layout | 1m vectors | wall time | vectors/s | machine CPU busy (of it PostgreSQL) "
        "| per run: time, peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        for r in pair:
            layout = "1 run" if r["shards"] == 1 else f"{r['shards']} shard runs at once"
            per_run = "; ".join(f"{run['seconds']:.1f} s, {run['peak_mb']:.0f} MB" for run in r["runs"])
            lines.append(
                f"| {r['calendar']} | {r['days']} | {layout} | {r['rows']:,} | {r['seconds']:.1f} s | "
                f"{r['rows'] / r['seconds']:,.0f} | {r['busy']:.0%} ({r['database']:.0%}) | {per_run} |"
            )
    lines.append("")
    identical = [(one["rows"], one["digest"]) == (two["rows"], two["digest"]) for one, two in pairs]
    for (one, two), same in zip(pairs, identical, strict=True):
        lines.append(
            f"- {one['days']} days: 2 shard runs vs 1 run: **{one['seconds'] / two['seconds']:.2f}x** the speed, "
            f"peak memory per run {max(r['peak_mb'] for r in two['runs']) / one['runs'][0]['peak_mb']:.2f}x; "
            f"stored 1m vectors {'identical' if same else 'DIFFERENT'} (content hash)"
        )
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_doc_section(
            f"## Instrument shards: 1 run against 2 shard runs at once ({args.instruments} instruments)", text
        )
    return 0 if all(identical) else 1


if __name__ == "__main__":
    raise SystemExit(main())
