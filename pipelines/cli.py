"""``python -m pipelines``: run the sample pipeline end to end, or open the Dagster UI on it.

python -m pipelines run [--start 2024-01-02] [--end 2024-01-12]
python -m pipelines recompute --from 2024-01-05 [--to 2024-01-12]
python -m pipelines quarantine release BATCH --by NAME --note WHY
python -m pipelines ui [--port 3000]

recompute: day D's features continue day D-1's recursion state, so a changed day is recomputed
from D through the newest materialised day (or --to), in order, in runs of up to 31 days.
quarantine release: writes a held batch, records it in Dagster as a materialisation of its day
(with the content's data version), then recomputes what was computed without it.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date

from pipelines.environment import PROJECT_ROOT, prepare_environment

DEFAULT_START = "2024-01-02"
DEFAULT_END = "2024-01-12"


def _execute_in_order(keys: list[str], asset_selection=None) -> tuple[list[str], int, int]:
    """Run the daily job over ``keys`` in ranged runs of up to 31 days, in order; stop at the first failure.

    Returns the failed run ids (at most one) and the gate checks passed and failed.
    """
    import dagster as dg

    from assets.partitions import BATCHED_BACKFILL
    from pipelines.definitions import daily_features_job, defs
    from pipelines.sensors import RANGE_END_TAG, RANGE_START_TAG, STATE_CHAIN_TAGS

    batch = BATCHED_BACKFILL.max_partitions_per_run or len(keys)
    job = defs.resolve_job_def(daily_features_job.name)
    instance = dg.DagsterInstance.get()
    checks_passed = checks_failed = 0
    failed_runs: list[str] = []
    for i in range(0, len(keys), batch):
        chunk = keys[i : i + batch]
        _wait_for_state_chain(instance)
        result = job.execute_in_process(
            instance=instance,
            asset_selection=asset_selection,
            tags={**STATE_CHAIN_TAGS, RANGE_START_TAG: chunk[0], RANGE_END_TAG: chunk[-1]},
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
    return failed_runs, checks_passed, checks_failed


def _wait_for_state_chain(instance) -> None:
    """Wait while another run of the state chain is queued or running (runs here bypass the daemon's queue)."""
    import time

    import dagster as dg

    from pipelines.sensors import STATE_CHAIN_TAG

    timeout = float(os.environ.get("MARKETFS_STATE_CHAIN_WAIT", "3600"))
    deadline = time.monotonic() + timeout
    said: set[str] = set()
    while True:
        active = instance.get_runs(
            filters=dg.RunsFilter(
                tags={STATE_CHAIN_TAG: "daily"},
                statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
            )
        )
        if not active or timeout <= 0:
            return
        for run in active:
            if run.run_id not in said:
                print(
                    f"waiting for run {run.run_id} ({run.status.value}): one run of the state chain at a time. "
                    "A run whose process was killed never ends by itself: terminate it in the UI (Runs -> the "
                    "run -> Terminate, force), or set MARKETFS_STATE_CHAIN_WAIT=0 to go ahead anyway"
                )
                said.add(run.run_id)
        if time.monotonic() > deadline:
            raise SystemExit(
                f"gave up after {timeout:.0f} s waiting for {', '.join(r.run_id for r in active)}; "
                "cancel or finish them in the UI, or raise MARKETFS_STATE_CHAIN_WAIT"
            )
        time.sleep(5)


def _run(start: str, end: str, snapshot: bool = True) -> int:
    prepare_environment()
    import dagster as dg
    import sqlalchemy as sa

    from assets.features import FEATURE_SET
    from assets.partitions import BATCHED_BACKFILL, DAILY
    from marketfs.db import engine_for
    from pipelines.definitions import defs

    keys = DAILY.get_partition_keys_in_range(dg.PartitionKeyRange(start, end))
    batch = BATCHED_BACKFILL.max_partitions_per_run or len(keys)
    instance = dg.DagsterInstance.get()
    failed_runs, checks_passed, checks_failed = _execute_in_order(keys)

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


def _recompute(start: str, end: str | None, asset_selection=None, at_least: str | None = None) -> int:
    """Re-materialise the daily job (or ``asset_selection`` of it) for ``start..end``, in order.

    ``end`` None: the newest materialised day of the features, or ``at_least`` when that is later.
    """
    prepare_environment()
    import dagster as dg

    from assets.partitions import DAILY
    from pipelines.sensors import newest_materialized_day

    if end is None:
        end = max(filter(None, [newest_materialized_day(dg.DagsterInstance.get()), at_least]), default=None)
        if end is None:
            print(f"nothing materialised yet: run `python -m pipelines run --start {start}` instead")
            return 2
    last = DAILY.get_last_partition_key()
    end = min(end, last) if last else end
    if end < start:
        print(f"nothing to recompute: {start} is after the newest materialised day {end}")
        return 0
    keys = DAILY.get_partition_keys_in_range(dg.PartitionKeyRange(start, end))
    names = ", ".join(k.to_user_string() for k in asset_selection) if asset_selection else "the daily_features job"
    print(f"recomputing {names} for {keys[0]} .. {keys[-1]} ({len(keys)} days, in order)")
    failed_runs, checks_passed, checks_failed = _execute_in_order(keys, asset_selection)
    print(f"gate checks    {checks_passed} passed, {checks_failed} failed")
    if failed_runs:
        print(f"FAILED runs    {', '.join(failed_runs)}: open them in the UI (make ui) for the failed expectations")
    return 1 if failed_runs else 0


def _release(batch_id: int, actor: str, note: str) -> int:
    """Release a quarantine batch, tell Dagster, and recompute what was computed without it."""
    env = prepare_environment()
    from datetime import timedelta

    import dagster as dg

    from assets.data_versions import InputProvenance, stored_content_version
    from assets.partitions import DAILY
    from marketfs.db import engine_for
    from marketfs.store import quality
    from marketfs.store.migrations import migrate
    from pipelines.definitions import ALL_ASSETS, defs
    from pipelines.sensors import CHAIN_END_ASSET

    migrate(env["MARKETFS_DSN"])
    days: list[tuple[str, str]] = []  # (day, content version) per released day
    try:
        with engine_for(env["MARKETFS_DSN"]).begin() as conn:
            batch = quality.release(conn, batch_id, actor=actor, note=note)
            first = batch["window_start"]
            while first < batch["window_end"]:
                day_end = min(first + timedelta(days=1), batch["window_end"])
                # Read back in the release's transaction: the version of what it wrote.
                days.append((first.date().isoformat(), stored_content_version(conn, batch["asset"], first, day_end)))
                first = day_end
    except quality.QuarantineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    asset = dg.AssetKey(batch["asset"])
    print(f"batch {batch_id} released by {actor}: {batch['rows_written']} rows written to {batch['asset']}")

    instance = dg.DagsterInstance.get()
    graph = defs.resolve_asset_graph()
    provenance = InputProvenance(instance, graph)
    for day, version in days:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=asset,
                partition=day,
                description=f"released from quarantine batch {batch_id}",
                metadata={
                    "quarantine_batch": dg.MetadataValue.int(batch_id),
                    "released_by": dg.MetadataValue.text(actor),
                    "note": dg.MetadataValue.text(note),
                    "rows": dg.MetadataValue.int(int(batch["rows_written"])),
                    "reason_held": dg.MetadataValue.text(batch["reason"]),
                },
                tags=provenance.tags(asset, day, version),
            )
        )
    print(f"recorded in Dagster: {batch['asset']} {', '.join(d for d, _ in days)} (data version {days[0][1][:12]}…)")

    # What was computed without these rows: the released asset's descendants in the daily job from the
    # released day; for a feature asset, itself from the next day (its state chain continues there).
    daily = {a.key for a in ALL_ASSETS}
    descendants = (dg.AssetSelection.assets(asset).downstream().resolve(graph) - {asset}) & daily
    first_day = days[0][0]
    if asset in graph.get(asset).parent_keys:  # self-dependent: the state chain
        descendants |= {asset}
        first_day = DAILY.get_next_partition_key(days[-1][0])
        if first_day is None:
            print("nothing to recompute: the released day is the newest partition")
            return 0
    if not descendants:
        return 0
    # A breach stops its whole step: days before the released one may have raw data but no features yet.
    raw_days = instance.get_materialized_partitions(dg.AssetKey("raw_ohlcv"))
    feature_days = instance.get_materialized_partitions(CHAIN_END_ASSET)
    previous = (date.fromisoformat(first_day) - timedelta(days=1)).isoformat()
    while previous in raw_days and previous not in feature_days:
        first_day, previous = previous, (date.fromisoformat(previous) - timedelta(days=1)).isoformat()
    # ... and days after it that were held back behind the breach: through the newest day with raw data.
    through = max([days[-1][0], *raw_days])
    return _recompute(first_day, None, asset_selection=sorted(descendants), at_least=through)


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
    recompute = sub.add_parser(
        "recompute", help="re-materialise the daily job from a changed day through the newest materialised day"
    )
    recompute.add_argument("--from", dest="start", required=True, type=date.fromisoformat, help="first day")
    recompute.add_argument(
        "--to", dest="end", type=date.fromisoformat, help="last day (default: the newest materialised day)"
    )
    quarantine = sub.add_parser("quarantine", help="release a held quarantine batch through Dagster")
    release = quarantine.add_subparsers(dest="action", required=True).add_parser("release")
    release.add_argument("batch", type=int)
    release.add_argument("--by", required=True, help="who reviewed it")
    release.add_argument("--note", required=True, help="why")
    ui = sub.add_parser("ui", help="Dagster webserver and daemon on the same database")
    ui.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args.start.isoformat(), args.end.isoformat(), snapshot=not args.no_snapshot)
    if args.command == "recompute":
        return _recompute(args.start.isoformat(), args.end.isoformat() if args.end else None)
    if args.command == "quarantine":
        return _release(args.batch, args.by, args.note)
    return _ui(args.port)


if __name__ == "__main__":
    raise SystemExit(main())
