"""What keeping superseded vectors costs: rows, bytes and the write time of a re-run.

    python benchmarks/history_cost.py [--instruments 50] [--days 5]

Writes ``--days`` daily windows of fs_v1 1m vectors with ``upsert_window`` (as the feature assets do),
then re-runs every window three ways: identical values (a re-run after an unrelated fix), 5% of the
vectors changed (a vendor correction), all changed (a formula fix). Each re-run's time is compared
with the first write's; the history's rows and bytes are read from PostgreSQL after each.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
from common import bench_database, machine  # noqa: F401  (sys.path set up there)

from marketfs.db import engine_for
from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.store.feature_vectors import upsert_window, vector_schema

START = datetime(2024, 1, 2, tzinfo=UTC)


def day_vectors(instruments: int, day: datetime, seed: int) -> pl.DataFrame:
    schema = vector_schema(FS_V1, "1m")
    rng = np.random.default_rng(seed)
    ts = pl.datetime_range(day, day + timedelta(minutes=1439), "1m", eager=True, time_zone="UTC")
    n = len(ts)
    frames = [
        pl.DataFrame(
            {
                "instrument_id": f"SYN{i:03d}",
                "timeframe": "1m",
                "ts": ts,
                "feature_set_version": "fs_v1",
                **{name: rng.standard_normal(n) for name, t in schema.items() if t == pl.Float64},
                "quality_flags": [[]] * n,
            }
        )
        .select(list(schema))
        .cast(schema)
        for i in range(instruments)
    ]
    return pl.concat(frames)


def changed(frame: pl.DataFrame, share: float, seed: int) -> pl.DataFrame:
    if share == 0:
        return frame
    pick = pl.Series(np.random.default_rng(seed).random(frame.height) < share)
    return frame.with_columns(pl.when(pick).then(pl.col("ret_1") + 1).otherwise(pl.col("ret_1")).alias("ret_1"))


def history_size(dsn: str) -> tuple[int, int]:
    with engine_for(dsn).connect() as conn:
        return conn.exec_driver_sql(
            "SELECT count(*), pg_total_relation_size('feature_vectors_history') FROM feature_vectors_history"
        ).one()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--instruments", type=int, default=50)
    parser.add_argument("--days", type=int, default=5)
    args = parser.parse_args()
    days = [START + timedelta(days=i) for i in range(args.days)]
    frames = {day: day_vectors(args.instruments, day, seed=i) for i, day in enumerate(days)}
    rows: list[tuple[str, float, int, int]] = []
    with bench_database() as dsn:
        engine = engine_for(dsn)

        def write_all(label: str, share: float) -> None:
            t0 = time.perf_counter()
            for i, day in enumerate(days):
                frame = changed(frames[day], share, seed=100 + i)
                with engine.begin() as conn:
                    upsert_window(
                        conn, frame, feature_set=FS_V1, timeframe="1m", start=day, end=day + timedelta(days=1)
                    )
                frames[day] = frame
            seconds = time.perf_counter() - t0
            count, size = history_size(dsn)
            rows.append((label, seconds, count, size))

        write_all("first write", 0)
        write_all("re-run, identical values", 0)
        write_all("re-run, 5% of vectors changed", 0.05)
        write_all("re-run, all vectors changed", 1.0)
        with engine.connect() as conn:
            served = conn.exec_driver_sql("SELECT pg_total_relation_size('feature_vectors')").scalar()
    vectors = sum(f.height for f in frames.values())
    print(f"# history cost — {datetime.now(UTC):%Y-%m-%d}, {machine()}")
    print(
        f"# {vectors:,} fs_v1 1m vectors ({args.instruments} instruments x {args.days} days), written a day at a time"
    )
    print("| write | time | vectors/s | history rows | history bytes |")
    print("|---|---|---|---|---|")
    for label, seconds, count, size in rows:
        print(f"| {label} | {seconds:.2f} s | {vectors / seconds:,.0f} | {count:,} | {size / 1e6:.1f} MB |")
    print(f"| (served table, for scale) | | | {vectors:,} | {served / 1e6:.1f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
