"""``python -m pipelines``: run the sample pipeline end to end, or open the Dagster UI on it.

python -m pipelines run [--start 2024-01-02] [--end 2024-01-12]
python -m pipelines ui [--port 3000]
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date

from pipelines.environment import PROJECT_ROOT, prepare_environment

DEFAULT_START = "2024-01-02"
DEFAULT_END = "2024-01-12"


def _run(start: str, end: str, snapshot: bool = True) -> int:
    prepare_environment()
    import dagster as dg
    import sqlalchemy as sa

    from assets.features import FEATURE_SET
    from assets.partitions import BATCHED_BACKFILL, DAILY
    from marketfs.db import engine_for
    from pipelines.definitions import daily_features_job, defs

    keys = DAILY.get_partition_keys_in_range(dg.PartitionKeyRange(start, end))
    batch = BATCHED_BACKFILL.max_partitions_per_run or len(keys)
    job = defs.resolve_job_def(daily_features_job.name)
    instance = dg.DagsterInstance.get()
    checks_passed = checks_failed = 0
    failed_runs = []
    for i in range(0, len(keys), batch):
        chunk = keys[i : i + batch]
        result = job.execute_in_process(
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": chunk[0],
                "dagster/asset_partition_range_end": chunk[-1],
            },
            raise_on_error=False,
            # Per-event DEBUG lines drown the summary; the full event log is in the UI.
            run_config={
                "loggers": {"console": {"config": {"log_level": os.environ.get("MARKETFS_LOG_LEVEL", "WARNING")}}}
            },
        )
        print(f"run {result.run_id}: {chunk[0]} .. {chunk[-1]} {'succeeded' if result.success else 'FAILED'}")
        for evaluation in result.get_asset_check_evaluations():
            checks_passed += evaluation.passed
            checks_failed += not evaluation.passed
        if not result.success:
            failed_runs.append(result.run_id)
            # Later days continue the features' recursion state from this range: they would fail too.
            if chunk[-1] != keys[-1]:
                print(f"stopped: {keys[keys.index(chunk[-1]) + 1]} .. {keys[-1]} not attempted")
            break

    snapshot_id = None
    if snapshot and not failed_runs:
        end_day = DAILY.time_window_for_partition_key(keys[-1]).end.date().isoformat()
        snapshot_result = defs.resolve_job_def("snapshot").execute_in_process(
            instance=instance,
            run_config={
                "ops": {"feature_snapshots": {"config": {"start": keys[0], "end": end_day, "timeframe": "1m"}}},
                "loggers": {"console": {"config": {"log_level": "WARNING"}}},
            },
            raise_on_error=False,
        )
        if snapshot_result.success:
            [materialization] = snapshot_result.asset_materializations_for_node("feature_snapshots")
            snapshot_id = materialization.metadata["snapshot_id"].value
        else:
            failed_runs.append(snapshot_result.run_id)

    from expectations.docs import DataDocs

    docs_index = DataDocs.default().build_index()
    window_start = DAILY.time_window_for_partition_key(keys[0]).start
    window_end = DAILY.time_window_for_partition_key(keys[-1]).end
    with engine_for(os.environ["MARKETFS_DSN"]).connect() as conn:
        bars, events, vectors_1m, vectors_1d = conn.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM ohlcv_1m WHERE ts >= :s AND ts < :e), "
                "(SELECT count(*) FROM news_events WHERE published_at >= :s AND published_at < :e), "
                "(SELECT count(*) FROM feature_vectors WHERE ts >= :s AND ts < :e AND feature_set_version = :v "
                "AND timeframe = '1m'), "
                "(SELECT count(*) FROM feature_vectors WHERE ts >= :s AND ts < :e AND feature_set_version = :v "
                "AND timeframe = '1d')"
            ),
            {"s": window_start, "e": window_end, "v": FEATURE_SET.version},
        ).one()
    print()
    print(f"partitions     {len(keys)} ({keys[0]} .. {keys[-1]}), {(len(keys) + batch - 1) // batch} run(s)")
    print(f"bars stored    {bars} in ohlcv_1m, {events} events in news_events")
    print(f"vectors stored {vectors_1m} (1m) and {vectors_1d} (1d) in feature_vectors ({FEATURE_SET.version})")
    print(f"gate checks    {checks_passed} passed, {checks_failed} failed")
    if snapshot_id:
        print(f"snapshot       {snapshot_id} (1m vectors of the range; marketfs snapshot describe {snapshot_id})")
    if failed_runs:
        print(f"FAILED runs    {', '.join(failed_runs)}: open them in the UI (make ui) for the failed expectations")
    print(f"data docs      {docs_index}")
    print('look           make ui (Dagster UI on http://127.0.0.1:3000), make dsn (psql "$(make -s dsn)")')
    return 1 if failed_runs else 0


def _ui(port: int) -> int:
    prepare_environment()
    os.chdir(PROJECT_ROOT)
    command = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(PROJECT_ROOT / "workspace.yaml"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    os.execv(sys.executable, command)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialise raw bars and feature vectors for a range of days")
    run.add_argument("--start", default=DEFAULT_START, type=date.fromisoformat)
    run.add_argument("--end", default=DEFAULT_END, type=date.fromisoformat, help="last partition, inclusive")
    run.add_argument("--no-snapshot", action="store_true", help="skip the sample snapshot at the end")
    ui = sub.add_parser("ui", help="Dagster webserver and daemon on the same database")
    ui.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args.start.isoformat(), args.end.isoformat(), snapshot=not args.no_snapshot)
    return _ui(args.port)


if __name__ == "__main__":
    raise SystemExit(main())
