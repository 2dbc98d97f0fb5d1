"""Retrieval: training_frame on 100,000 entities over 1,000,000 vectors, and latest() latency.

    python benchmarks/retrieval.py [--vectors 1000000] [--entities 100000] [--calls 2000]

Vectors are written 30 s after they became known (ingestion lag), and 5% of them are restated 10
minutes later (the old version in feature_vectors_history): what ``as_of`` reads through.

Baselines in the same run: the typical point-in-time join (read the vectors of the entities'
instruments and range into pandas, then ``pandas.merge_asof``), and a latest() done the typical
way (a new connection and an unprepared query per request). Each measurement runs in a fresh
subprocess, so peak memory is that approach's own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
from common import bench_database, machine, peak_rss_mb  # noqa: F401  (sys.path set up there)

from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.store.copy import copy_frame_in
from marketfs.store.feature_vectors import vector_schema

START = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
INSTRUMENTS = 50


def load_vectors(dsn: str, n: int) -> tuple[datetime, datetime]:
    from marketfs.db import engine_for

    per_instrument = n // INSTRUMENTS
    schema = vector_schema(FS_V1, "1m")
    rng = np.random.default_rng(3)
    ts = pl.datetime_range(START, START + timedelta(minutes=per_instrument - 1), "1m", eager=True, time_zone="UTC")
    frames = []
    for i in range(INSTRUMENTS):
        data = {name: rng.standard_normal(per_instrument) for name, t in schema.items() if t == pl.Float64}
        frames.append(
            pl.DataFrame(
                {
                    "instrument_id": f"SYN{i:03d}",
                    "timeframe": "1m",
                    "ts": ts,
                    "feature_set_version": "fs_v1",
                    **data,
                    "quality_flags": [[]] * per_instrument,
                }
            )
            .select(list(schema))
            .cast(schema)
        )
    vectors = pl.concat(frames).with_columns(
        (pl.col("ts") + timedelta(minutes=1, seconds=30)).alias("written_at")  # known at ts + 1m, written 30 s later
    )
    engine = engine_for(dsn)
    with engine.begin() as conn:
        copy_frame_in(conn, "feature_vectors", vectors)
        restate(conn, FEATURES)
    # As autovacuum would after a load: otherwise whichever measurement reads first pays the hint-bit
    # writes of a million fresh rows (10,000 pages dirtied in the join's plan), and the next one does not.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE feature_vectors")
        conn.exec_driver_sql("VACUUM ANALYZE feature_vectors_history")
    return START, START + timedelta(minutes=per_instrument)


def restate(conn, features: list[str]) -> None:
    """5% of the vectors corrected 10 minutes after they were written: the old version goes to history."""
    cols = ", ".join(["instrument_id", "timeframe", "ts", "feature_set_version", "quality_flags", *features])
    chosen = "mod(abs(hashtext(instrument_id || ts::text)), 20) = 0"
    conn.exec_driver_sql(
        f"INSERT INTO feature_vectors_history ({cols}, written_at, superseded_at) "
        f"SELECT {cols}, written_at, written_at + interval '10 minutes' FROM feature_vectors WHERE {chosen}"
    )
    conn.exec_driver_sql(
        f"UPDATE feature_vectors SET ret_1 = ret_1 + 1, written_at = written_at + interval '10 minutes' WHERE {chosen}"
    )


def entities(n: int, start: datetime, end: datetime) -> pl.DataFrame:
    rng = np.random.default_rng(4)
    span = (end - start).total_seconds()
    return pl.DataFrame(
        {
            "instrument_id": [f"SYN{i:03d}" for i in rng.integers(0, INSTRUMENTS, n)],
            "ts": [start + timedelta(seconds=float(s)) for s in rng.uniform(0, span, n)],
        },
        schema={"instrument_id": pl.String, "ts": pl.Datetime("us", "UTC")},
    )


FEATURES = ["ret_1", "ret_5", "vol_20", "rsi_14", "macd", "bb_pct_b", "sentiment_mean_1h"]


def child(mode: str, dsn: str, n_entities: int, start: str, end: str, calls: int) -> dict:
    """One measurement, in its own process."""
    s, e = datetime.fromisoformat(start), datetime.fromisoformat(end)
    if mode in ("training_frame", "baseline_merge_asof", "training_frame_as_of_entity"):
        ents = entities(n_entities, s, e)
        base = peak_rss_mb()
        t0 = time.perf_counter()
        if mode.startswith("training_frame"):
            from marketfs.retrieval import training_frame

            as_of = "entity" if mode == "training_frame_as_of_entity" else None
            out = training_frame(ents, FEATURES, timedelta(minutes=5), dsn=dsn, as_of=as_of)
            matched = out["ret_1"].is_not_null().sum()
        else:
            import pandas as pd
            import sqlalchemy as sa

            from marketfs.db import engine_for

            cols = ", ".join(["instrument_id", "ts", *FEATURES])
            with engine_for(dsn).connect() as conn:
                table = pd.read_sql(
                    sa.text(
                        f"SELECT {cols} FROM feature_vectors WHERE timeframe = '1m' AND feature_set_version = "
                        "'fs_v1' AND instrument_id = ANY(:i) AND ts <= :e"
                    ),
                    conn,
                    params={"i": ents["instrument_id"].unique().to_list(), "e": e},
                )
            left = ents.to_pandas().reset_index().sort_values("ts")
            table["known_at"] = table["ts"] + pd.Timedelta(minutes=1)  # the same rule: matched once known
            out = pd.merge_asof(
                left,
                table.drop(columns="ts").sort_values("known_at"),
                left_on="ts",
                right_on="known_at",
                by="instrument_id",
                tolerance=pd.Timedelta(minutes=5),
                direction="backward",
            ).sort_values("index")
            matched = int(out["ret_1"].notna().sum())
        seconds = time.perf_counter() - t0
        return {
            "mode": mode,
            "seconds": seconds,
            "rows_per_s": n_entities / seconds,
            "matched": int(matched),
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": base,
        }
    latencies = []
    if mode in ("latest", "latest_records"):
        from marketfs.retrieval import OnlineReader

        output = "records" if mode == "latest_records" else "polars"
        reader = OnlineReader(dsn)
        reader.latest(["SYN007"], FEATURES, output=output)  # connect and prepare
        for i in range(calls):
            t0 = time.perf_counter()
            reader.latest([f"SYN{i % INSTRUMENTS:03d}"], FEATURES, output=output)
            latencies.append(time.perf_counter() - t0)
    else:
        import psycopg

        cols = ", ".join(FEATURES)
        for i in range(calls):
            t0 = time.perf_counter()
            with psycopg.connect(dsn) as conn:
                conn.execute(
                    f"SELECT ts, {cols} FROM feature_vectors WHERE instrument_id = %s AND timeframe = '1m' "
                    "AND feature_set_version = 'fs_v1' ORDER BY ts DESC LIMIT 1",
                    (f"SYN{i % INSTRUMENTS:03d}",),
                ).fetchall()
            latencies.append(time.perf_counter() - t0)
    q = statistics.quantiles(latencies, n=100)
    return {"mode": mode, "calls": calls, "p50_ms": q[49] * 1e3, "p95_ms": q[94] * 1e3, "p99_ms": q[98] * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, dsn, n, start, end, calls = args.child
        print(json.dumps(child(mode, dsn, int(n), start, end, int(calls))))
        return 0
    with bench_database() as dsn:
        t0 = time.perf_counter()
        start, end = load_vectors(dsn, args.vectors)
        load_s = time.perf_counter() - t0
        results = []
        modes = (
            "training_frame",
            "baseline_merge_asof",
            "training_frame_as_of_entity",
            "latest",
            "latest_records",
            "baseline_latest_new_connection",
        )
        for mode in modes:
            calls = args.calls if mode.startswith("latest") else max(args.calls // 10, 100)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    dsn,
                    str(args.entities),
                    start.isoformat(),
                    end.isoformat(),
                    str(calls),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"# retrieval benchmark — {datetime.now(UTC):%Y-%m-%d}, {machine()}")
    print(
        f"# {args.vectors:,} vectors ({INSTRUMENTS} instruments, 1m), loaded in {load_s:.1f} s; "
        f"{args.entities:,} entities, tolerance 5 min, {len(FEATURES)} features"
    )
    print("| measurement | time | rows/s | peak RSS |")
    print("|---|---|---|---|")
    for r in results[:3]:
        print(
            f"| {r['mode']} | {r['seconds']:.2f} s | {r['rows_per_s']:,.0f} | {r['peak_rss_mb']:.0f} MB "
            f"(matched {r['matched']:,}) |"
        )
    print("| measurement | p50 | p95 | p99 |")
    print("|---|---|---|---|")
    for r in results[3:]:
        print(
            f"| {r['mode']} ({r['calls']} calls, 1 instrument) | {r['p50_ms']:.3f} ms | {r['p95_ms']:.3f} ms | "
            f"{r['p99_ms']:.3f} ms |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
