"""TimescaleDB soak: re-runs of old ranges already in the columnstore, then sizes, chunks and jobs;
and the point-in-time join on columnstore chunks against the same chunks in the rowstore.

    MARKETFS_DSN=<a TimescaleDB server>/postgres python benchmarks/timescale_soak.py [--days 14] [--reruns 3]

Needs a server with the extension (a fresh database is made on it and dropped after). The pipeline
runs in-process, as ``make run`` does: raw bars and events, daily bars, every feature set.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import numpy as np
import polars as pl
from common import bench_database, machine  # noqa: F401  (sys.path set up there)

from assets.resources import FeatureStore, MarketData
from marketfs.db import engine_for
from pipelines.definitions import ALL_ASSETS

TABLES = ("ohlcv_1m", "news_events", "feature_vectors")


def materialize(dsn: str, first: str, last: str, instruments: int) -> float:
    t0 = time.perf_counter()
    result = dg.materialize(
        ALL_ASSETS,
        resources={
            "store": FeatureStore(dsn=dsn),
            "market_data": MarketData(source="synthetic", synthetic_instruments=instruments),
        },
        tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
        raise_on_error=False,
    )
    if not result.success:
        raise SystemExit(f"the run of {first}..{last} failed")
    return time.perf_counter() - t0


def state(dsn: str) -> dict[str, tuple[float, int, int]]:
    """Per table: total MB, chunks marked partial, rows in the chunks' rowstore."""
    out = {}
    with engine_for(dsn).connect() as conn:
        for table in TABLES:
            size = conn.exec_driver_sql(f"SELECT hypertable_size('{table}')").scalar() / 1e6
            chunks = conn.exec_driver_sql(
                "SELECT quote_ident(c.schema_name) || '.' || quote_ident(c.table_name), c.status "
                "FROM _timescaledb_catalog.chunk c "
                f"JOIN _timescaledb_catalog.hypertable h ON h.id = c.hypertable_id WHERE h.table_name = '{table}'"
            ).all()
            partial = sum(1 for _, status in chunks if status & 8)
            rowstore = sum(conn.exec_driver_sql(f"SELECT count(*) FROM ONLY {name}").scalar() for name, _ in chunks)
            out[table] = (size, partial, rowstore)
    return out


def convert_all(dsn: str, to_columnstore: bool) -> None:
    with engine_for(dsn).connect() as conn:
        for table in TABLES:
            for chunk in conn.exec_driver_sql(f"SELECT show_chunks('{table}')::text").scalars().all():
                if to_columnstore:
                    conn.exec_driver_sql(f"CALL convert_to_columnstore('{chunk}', if_not_columnstore => true)")
                else:
                    conn.exec_driver_sql(f"CALL convert_to_rowstore('{chunk}', if_columnstore => true)")
                conn.commit()


def join_seconds(dsn: str, start: datetime, end: datetime, instruments: int, rows: int) -> float:
    from marketfs.retrieval import training_frame

    rng = np.random.default_rng(4)
    span = (end - start).total_seconds()
    entities = pl.DataFrame(
        {
            "instrument_id": [f"SYN{i:03d}" for i in rng.integers(0, instruments, rows)],
            "ts": [start + timedelta(seconds=float(s)) for s in rng.uniform(0, span, rows)],
        },
        schema={"instrument_id": pl.String, "ts": pl.Datetime("us", "UTC")},
    )
    training_frame(entities.head(100), ["ret_1"], timedelta(minutes=5), dsn=dsn)  # connect, warm the catalog
    t0 = time.perf_counter()
    training_frame(entities, ["ret_1", "rsi_14", "macd", "bb_pct_b"], timedelta(minutes=5), dsn=dsn)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--instruments", type=int, default=10)
    parser.add_argument("--entities", type=int, default=20_000)
    args = parser.parse_args()
    os.environ.setdefault("MARKETFS_COMPRESS_AFTER", "30 days")
    first = datetime(2024, 1, 2, tzinfo=UTC)
    last = first + timedelta(days=args.days - 1)
    span = (first.date().isoformat(), last.date().isoformat())
    lines = []
    with bench_database() as dsn:
        with engine_for(dsn).connect() as conn:
            if not conn.exec_driver_sql("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'").scalar():
                raise SystemExit("this server has no TimescaleDB: set MARKETFS_DSN to one that has")
        seconds = materialize(dsn, *span, args.instruments)
        lines.append(("first run", seconds, state(dsn)))
        rowstore_join = join_seconds(dsn, first, last + timedelta(days=1), args.instruments, args.entities)
        convert_all(dsn, to_columnstore=True)
        lines.append(("all chunks converted to the columnstore", 0.0, state(dsn)))
        columnstore_join = join_seconds(dsn, first, last + timedelta(days=1), args.instruments, args.entities)
        for i in range(args.reruns):
            seconds = materialize(dsn, *span, args.instruments)
            lines.append((f"re-run {i + 1} of the whole range", seconds, state(dsn)))
        with engine_for(dsn).connect() as conn:
            jobs = conn.exec_driver_sql(
                "SELECT proc_name, coalesce(hypertable_name, ''), config::text FROM timescaledb_information.jobs "
                "WHERE proc_name NOT IN ('policy_telemetry', 'policy_job_stat_history_retention') ORDER BY 1, 2"
            ).all()
            rollup = conn.exec_driver_sql("SELECT count(*) FROM feature_quality_daily").scalar()
    print(f"# TimescaleDB soak — {datetime.now(UTC):%Y-%m-%d}, {machine()}")
    print(f"# {args.days} days x {args.instruments} instruments, every feature set; {args.reruns} re-runs")
    print("| step | run time | " + " | ".join(f"{t} MB / partial chunks / rowstore rows" for t in TABLES) + " |")
    print("|---|---|" + "---|" * len(TABLES))
    for label, seconds, sizes in lines:
        cells = " | ".join(f"{s:.1f} / {p} / {r:,}" for s, p, r in (sizes[t] for t in TABLES))
        print(f"| {label} | {seconds:.1f} s | {cells} |")
    print(
        f"| point-in-time join, {args.entities:,} entity rows | rowstore {rowstore_join:.2f} s | "
        f"columnstore {columnstore_join:.2f} s | ratio {columnstore_join / rowstore_join:.2f}x | |"
    )
    print(f"# feature_quality_daily rows after the re-runs: {rollup}")
    print("# jobs:")
    for proc, table, config in jobs:
        print(f"#   {proc} {table} {config}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
