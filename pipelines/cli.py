"""``python -m pipelines``: run the sample pipeline end to end, or open the Dagster UI on it.

python -m pipelines run [--start 2024-01-02] [--end 2024-01-12] [--shard K] [--allow-gap]
python -m pipelines run --today [--shard K]
python -m pipelines recompute --from 2024-01-05 [--to 2024-01-12] [--shard K]
python -m pipelines quarantine release|discard BATCH --by NAME --note WHY
python -m pipelines ui [--port 3000]

recompute: day D's features continue day D-1's recursion state, so a changed day is recomputed
from D through the newest materialised day (or --to), in order, in runs of up to 31 days.
run --today: one intraday step over what has been delivered of today so far (pipelines/intraday.py).
quarantine release: writes a held batch, records it in Dagster as a materialisation of its day
(with the content's data version), then recomputes what was computed without it.

With MARKETFS_SHARDS above 1, each shard's days run in order, one shard after the other (--shard K:
that shard only; start one process per shard to run them at once, as Dagster's queue does).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date, timedelta

from pipelines.environment import PROJECT_ROOT, DatabaseUnreachable, prepare_environment
from pipelines.run_report import (
    Tally,
    console_log_level,
    failure_blocks,
    is_database_message,
    logged_warnings,
    quiet_storage_errors,
)

# The sample starts with six months of daily-only history (the synthetic source delivers daily bars
# before 2024-01-02), so that its 1d features are warmed up by the minute range.
DEFAULT_START = "2023-07-03"
DEFAULT_END = "2024-01-12"
# Exit codes: 1 a run failed (a gate, a file), 2 a usage error, 3 the database cannot be reached.
USAGE = 2
DATABASE_GONE = 3
UI_STOP_GRACE_SECONDS = 8


def _execute_in_order(
    keys: list[str], asset_selection=None, verbose: bool = False, only=None, tags: dict[str, str] | None = None
) -> tuple[list[str], Tally]:
    """Run the daily job over the days ``keys`` in ranged runs of up to 31 days, in order, shard by shard
    (``only``: those shards); in a shard, stop at the first failure (later days continue its state).

    Prints each run's outcome, its failures (one block each) and its warnings as it goes. Returns the
    failed run ids (at most one per shard) and the gate tally.
    """
    from assets.partitions import SHARD_COUNT
    from marketfs.shards import shards

    tally = Tally()
    failed_runs: list[str] = []
    for shard in only or shards(SHARD_COUNT):
        failed_runs += _execute_shard(keys, shard, tally, asset_selection, verbose, tags or {})
    return failed_runs, tally


def _execute_shard(
    keys: list[str],
    shard,
    tally: Tally,
    asset_selection=None,
    verbose: bool = False,
    tags: dict[str, str] | None = None,
) -> list[str]:
    from assets.partitions import RUN_DAYS, partition_key
    from assets.resources import pooled_instance
    from pipelines.definitions import daily_features_job, defs
    from pipelines.run_health import process_tags
    from pipelines.sensors import RANGE_END_TAG, RANGE_START_TAG, chain_tags

    job = defs.resolve_job_def(daily_features_job.name)
    instance = pooled_instance()
    failed_runs: list[str] = []
    label = "" if shard.is_all else f" (shard {shard.index})"
    for i in range(0, len(keys), RUN_DAYS):
        chunk = keys[i : i + RUN_DAYS]
        _wait_for_state_chain(instance, chain_tags(shard))
        with quiet_storage_errors(verbose):
            result = job.execute_in_process(
                instance=instance,
                asset_selection=asset_selection,
                tags={
                    **(tags or {}),
                    **chain_tags(shard),
                    **process_tags(),
                    RANGE_START_TAG: partition_key(chunk[0], shard),
                    RANGE_END_TAG: partition_key(chunk[-1], shard),
                },
                raise_on_error=False,
                # Dagster logs each failure twice with its stack; the CLI says it once, below.
                # The full event log stays in the instance, for the UI.
                run_config={"loggers": {"console": {"config": {"log_level": console_log_level(verbose)}}}},
            )
        print(f"run {result.run_id}: {chunk[0]} .. {chunk[-1]}{label} {'succeeded' if result.success else 'FAILED'}")
        tally.add_checks(result)
        for line in logged_warnings(instance, result.run_id):
            print(line)
        if not result.success:
            blocks = failure_blocks(result, verbose)
            tally.failures.extend(blocks)
            sys.stdout.flush()  # the run's line first, then its failures
            for block in blocks:
                print(block, file=sys.stderr, flush=True)
            failed_runs.append(result.run_id)
            # Later days continue the features' recursion state from this range: they would fail too.
            if chunk[-1] != keys[-1]:
                print(f"stopped: {keys[keys.index(chunk[-1]) + 1]} .. {keys[-1]}{label} not attempted")
            break
    return failed_runs


def _wait_for_state_chain(instance, chain: dict[str, str]) -> None:
    """Wait while another run of the same state chain (``chain``: its tag) is queued or running (runs here
    bypass the daemon's queue)."""
    import time

    import dagster as dg

    from pipelines.run_health import fail_runs_whose_process_is_gone

    timeout = float(os.environ.get("MARKETFS_STATE_CHAIN_WAIT", "3600"))
    deadline = time.monotonic() + timeout
    said: set[str] = set()
    while True:
        for run_id in fail_runs_whose_process_is_gone(instance):
            print(f"run {run_id}: its process is gone (killed, or the machine restarted); marked FAILURE")
        active = instance.get_runs(
            filters=dg.RunsFilter(
                tags=chain,
                statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
            )
        )
        if not active or timeout <= 0:
            return
        for run in active:
            if run.run_id not in said:
                print(
                    f"waiting for run {run.run_id} ({run.status.value}): one run of the state chain at a time. "
                    "Runs of this machine whose process died are failed at once; one launched elsewhere is ended "
                    "by Dagster's run monitoring (make ui), or terminate it in the UI (Runs -> the run -> "
                    "Terminate, force), or set MARKETFS_STATE_CHAIN_WAIT=0 to go ahead anyway"
                )
                said.add(run.run_id)
        if time.monotonic() > deadline:
            raise SystemExit(
                f"gave up after {timeout:.0f} s waiting for {', '.join(r.run_id for r in active)}; "
                "cancel or finish them in the UI, or raise MARKETFS_STATE_CHAIN_WAIT"
            )
        time.sleep(5)


def _migrate(dsn: str) -> None:
    """The schema and TimescaleDB jobs brought up to date before the runs (whose own migrate then finds nothing
    to do), saying what a changed setting changed: otherwise only the database would know."""
    from marketfs.store.migrations import migrate

    migrate(dsn, report=_say_configuration)


def _say_configuration(level: int, message: str) -> None:
    import logging

    if level >= logging.WARNING:
        print(f"warning: {message}", file=sys.stderr)
    else:
        print(f"configuration  {message}")


def _holes_before(first: str, end: str, allow_gap: bool, only) -> bool:
    """Before anything is written: the sessions the store holds no bar of before ``first``. Refused (False,
    after saying which and the commands), or with ``allow_gap`` declared missing for good, so the windows of
    every instrument restart after them and its vectors say GAP until warm again."""
    import getpass

    from assets.partitions import SHARD_COUNT
    from marketfs.db import engine_for
    from marketfs.features.registry import datasets
    from marketfs.shards import shards
    from marketfs.store.coverage import holes_before
    from marketfs.store.gaps import declare_gap

    _migrate(os.environ["MARKETFS_DSN"])  # a new database: its tables first (as every run's first step does)
    with engine_for(os.environ["MARKETFS_DSN"]).begin() as conn:
        holes = holes_before(conn, first, only or shards(SHARD_COUNT))
        if not holes:
            return True
        if not allow_gap:
            for hole in holes.values():
                print(f"refused, nothing written: {hole.describe(end=end)}", file=sys.stderr)
            print(
                f'or, if those sessions are missing for good: make run ARGS="--start {first} --end {end} --allow-gap" '
                "(every instrument's windows restart after them; its vectors carry GAP until warm)",
                file=sys.stderr,
            )
            return False
        by = getpass.getuser()
        minute_datasets = [name for name, (_, tf) in datasets().items() if tf != "1d"]
        # A gap of the daily bars restarts every dataset; one of the minute bars only those computed from them.
        for timeframe, hole in holes.items():
            scopes = [None] if timeframe == "1d" else minute_datasets
            for dataset in scopes:
                declare_gap(
                    conn,
                    hole.missing[0],
                    hole.missing[-1],
                    reason=f"run --start {first} --allow-gap: {hole.table} holds no bar of these sessions",
                    by=by,
                    dataset=dataset,
                )
            named = "every dataset" if scopes == [None] else ", ".join(scopes)
            print(
                f"declared a gap: {hole.table} holds no bar of {hole.missing[0]}..{hole.missing[-1]} "
                f"({len(hole.missing)} sessions); the windows of {named} restart at {first}"
            )
    return True


def _run(
    start: str,
    end: str,
    snapshot: bool = True,
    verbose: bool = False,
    shard: int | None = None,
    allow_gap: bool = False,
) -> int:
    prepare_environment(check=True)
    import dagster as dg
    import sqlalchemy as sa

    from assets.partitions import RUN_DAYS, SESSIONS, SHARD_COUNT, day_window, session_keys
    from marketfs.db import engine_for
    from pipelines.definitions import defs
    from pipelines.run_health import process_tags

    keys = session_keys(start, end)
    for given in (start, end):
        if not SESSIONS.is_session(given):
            print(f"note: {SESSIONS.not_a_session(given)}; no partition to run for it")
    if not keys:
        print(f"no {SESSIONS.name} session from {start} through {end}: nothing to run")
        return 0
    instance = dg.DagsterInstance.get()
    only = _only_shard(shard)
    if not _holes_before(keys[0], keys[-1], allow_gap, only):
        return 1
    failed_runs, tally = _execute_in_order(keys, verbose=verbose, only=only)
    if any(is_database_message(block) for block in tally.failures):
        return DATABASE_GONE  # nothing more can be read or written: the message above says what to do

    if not failed_runs and _restate(verbose, quiet=True) != 0:
        failed_runs.append("(restatement)")
    snapshot_id = None
    if snapshot and not failed_runs:
        end_day = (date.fromisoformat(keys[-1]) + timedelta(days=1)).isoformat()
        snapshot_result = defs.resolve_job_def("snapshot").execute_in_process(
            instance=instance,
            run_config={
                "ops": {"feature_snapshots": {"config": {"start": keys[0], "end": end_day, "timeframe": "1m"}}},
                "loggers": {"console": {"config": {"log_level": console_log_level(verbose)}}},
            },
            tags=process_tags(),
            raise_on_error=False,
        )
        if snapshot_result.success:
            [materialization] = snapshot_result.asset_materializations_for_node("feature_snapshots")
            snapshot_id = materialization.metadata["snapshot_id"].value
        else:
            failed_runs.append(snapshot_result.run_id)
            for block in failure_blocks(snapshot_result, verbose):
                print(block, file=sys.stderr)

    from expectations.docs import DataDocs

    try:
        docs_index = DataDocs.default().build_index()
    except Exception as exc:  # a report, not data: the run's outcome stands whatever happens to the index
        docs_index = f"not rebuilt ({exc.__class__.__name__}: {exc}); the runs and their verdicts are unaffected"
    window_start, window_end = day_window(keys[0])[0], day_window(keys[-1])[1]
    with engine_for(os.environ["MARKETFS_DSN"]).connect() as conn:
        window = {"s": window_start, "e": window_end}
        bars, events = conn.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM ohlcv_1m WHERE ts >= :s AND ts < :e), "
                "(SELECT count(*) FROM news_events WHERE published_at >= :s AND published_at < :e)"
            ),
            window,
        ).one()
        stored = conn.execute(
            sa.text(
                "SELECT feature_set_version, timeframe, count(*) FROM feature_vectors WHERE ts >= :s AND ts < :e "
                "GROUP BY 1, 2 ORDER BY 1, 2"
            ),
            window,
        ).all()
    print()
    runs = (len(keys) + RUN_DAYS - 1) // RUN_DAYS * (len(only) if only else SHARD_COUNT)
    sharding = "" if SHARD_COUNT == 1 else f" x {len(only) if only else SHARD_COUNT} of {SHARD_COUNT} shards"
    print(f"partitions     {len(keys)} ({keys[0]} .. {keys[-1]}){sharding}, {runs} run(s)")
    print(f"bars stored    {bars} in ohlcv_1m, {events} events in news_events")
    by_version: dict[str, list[str]] = {}
    for version, timeframe, count in stored:
        by_version.setdefault(version, []).append(f"{count} ({timeframe})")
    for version, counts in by_version.items():
        print(f"vectors stored {', '.join(counts)} in feature_vectors ({version})")
    print(tally.line())
    _say_held(conn_dsn=os.environ["MARKETFS_DSN"])
    if snapshot_id:
        print(f"snapshot       {snapshot_id} (1m vectors of the range; marketfs snapshot describe {snapshot_id})")
    _say_failed_runs(failed_runs, tally)
    print(f"data docs      {docs_index}")
    print('look           make ui (Dagster UI on http://127.0.0.1:3000), make dsn (psql "$(make -s dsn)")')
    return 1 if failed_runs else 0


def _only_shard(shard: int | None):
    """``--shard K`` as the one shard to run, or None for every shard."""
    if shard is None:
        return None
    from assets.partitions import SHARD_COUNT
    from marketfs.shards import Shard

    if not 0 <= shard < SHARD_COUNT:
        raise SystemExit(
            f"--shard {shard} does not exist: MARKETFS_SHARDS={SHARD_COUNT} has shards 0..{SHARD_COUNT - 1}"
        )
    return [Shard(shard, SHARD_COUNT)]


def _recompute(
    start: str,
    end: str | None,
    asset_selection=None,
    at_least: str | None = None,
    verbose: bool = False,
    shard: int | None = None,
    only=None,
    tags: dict[str, str] | None = None,
) -> int:
    """Re-materialise the daily job (or ``asset_selection`` of it) for ``start..end``, in order, per shard.

    ``end`` None: the newest materialised day of the features, or ``at_least`` when that is later.
    """
    prepare_environment(check=True)
    import dagster as dg

    from assets.partitions import DAILY, session_keys
    from pipelines.sensors import newest_materialized_day

    only = only or _only_shard(shard)
    if end is None:
        # The newest day *any* asset of the daily job has reached, in any shard: a run killed after its raw steps,
        # or raw assets materialised alone, leave days whose features are still to be computed.
        from pipelines.definitions import ALL_ASSETS

        instance = dg.DagsterInstance.get()
        newest = max(
            filter(
                None,
                (newest_materialized_day(instance, a.key, shard=s) for a in ALL_ASSETS for s in only or [None]),
            ),
            default=None,
        )
        end = max(filter(None, [newest, at_least]), default=None)
        if end is None:
            print(f"nothing materialised yet: run `python -m pipelines run --start {start}` instead")
            return 2
    last = DAILY.get_last_partition_key()
    end = min(end, last) if last else end
    if end < start:
        print(f"nothing to recompute: {start} is after the newest materialised day {end}")
        return 0
    keys = session_keys(start, end)
    if not keys:
        print(f"nothing to recompute: no session from {start} through {end}")
        return 0
    names = ", ".join(k.to_user_string() for k in asset_selection) if asset_selection else "the daily_features job"
    print(f"recomputing {names} for {keys[0]} .. {keys[-1]} ({len(keys)} days, in order)")
    _migrate(os.environ["MARKETFS_DSN"])
    failed_runs, tally = _execute_in_order(keys, asset_selection, verbose=verbose, only=only, tags=tags)
    if any(is_database_message(block) for block in tally.failures):
        return DATABASE_GONE
    print(tally.line())
    _say_held(conn_dsn=os.environ["MARKETFS_DSN"])
    _say_failed_runs(failed_runs, tally)
    if failed_runs:
        return 1
    return 0 if tags else _restate(verbose, quiet=True)


def _restate(verbose: bool = False, quiet: bool = False) -> int:
    """Recompute the instruments a late corporate action changed, from its ex-date, in the datasets that served
    them: their vectors alone (the others' are not touched), each old version kept in the history."""
    prepare_environment(check=True)
    import dagster as dg

    from assets.features import RESTATE_TAG
    from marketfs.db import engine_for
    from marketfs.store.corporate_actions import pending_restatements

    _migrate(os.environ["MARKETFS_DSN"])
    with engine_for(os.environ["MARKETFS_DSN"]).connect() as conn:
        pending = pending_restatements(conn)
    if pending.is_empty():
        if not quiet:
            print("nothing to restate: no corporate action arrived after the vectors it changes were served")
        return 0
    instruments = sorted(set(pending["instrument_id"]))
    datasets = sorted(set(pending["dataset"]))
    start = pending["from_date"].min().isoformat()
    print(f"restating      {', '.join(instruments)} from {start} in {', '.join(datasets)} (late corporate actions)")
    return _recompute(
        start,
        None,
        asset_selection=[dg.AssetKey(d) for d in datasets],
        verbose=verbose,
        tags={RESTATE_TAG: ",".join(instruments)},
    )


def _say_held(conn_dsn: str) -> None:
    """One line when instruments are held by a quarantined instrument-day: how many, since when, which."""
    from datetime import UTC, datetime

    from marketfs.db import engine_for
    from marketfs.features.registry import datasets
    from marketfs.store.holds import RAW_ASSETS, read_holds

    assets = (*RAW_ASSETS, "bars_1d", "corporate_actions", *datasets())
    with engine_for(conn_dsn).connect() as conn:
        held = read_holds(conn, assets, datetime.max.replace(tzinfo=UTC))
    if held:
        first = min(h.day for h in held.held.values())
        print(f"held           {len(held)} instrument(s) since {first}: {held.describe()} (marketfs quarantine list)")


def _say_failed_runs(failed_runs: list[str], tally: Tally) -> None:
    if not failed_runs:
        return
    where = "make ui, Runs"
    if tally.expectation_failures:
        where = "make ui; the asset's Checks tab lists each failed expectation with its rows"
    print(f"FAILED runs    {', '.join(failed_runs)} (the failure is above; the whole run log: {where})")


def _release(batch_id: int, actor: str, note: str, verbose: bool = False) -> int:
    """Release a quarantine batch, tell Dagster, and recompute what was computed without it."""
    env = prepare_environment(check=True)

    import dagster as dg

    from assets.data_versions import InputProvenance, stored_content_version
    from assets.partitions import DAILY, SESSIONS, SHARD_COUNT, day_window, partition_key, previous_key
    from assets.resources import pooled_instance
    from marketfs.db import engine_for
    from marketfs.shards import Shard
    from marketfs.store import quality
    from pipelines.definitions import defs
    from pipelines.sensors import CHAIN_END_ASSET, materialized_days

    _migrate(env["MARKETFS_DSN"])
    days: list[tuple[str, str]] = []  # (day, content version) per released day
    try:
        with engine_for(env["MARKETFS_DSN"]).begin() as conn:
            batch = quality.release(conn, batch_id, actor=actor, note=note, shard_count=SHARD_COUNT)
            shard = Shard(batch["shard_index"], batch["shard_count"])
            for session in SESSIONS.trading_days_overlapping(batch["window_start"], batch["window_end"]):
                day = session.isoformat()
                first, day_end = day_window(day)
                # Read back in the release's transaction: the version of what it wrote.
                days.append((day, stored_content_version(conn, batch["asset"], first, day_end, shard)))
    except quality.QuarantineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    asset = dg.AssetKey(batch["asset"])
    print(f"batch {batch_id} released by {actor}: {batch['rows_written']} rows written to {batch['asset']}")
    from marketfs.features.registry import datasets
    from marketfs.store.timescale import settle_write

    served = {"raw_ohlcv": "ohlcv_1m", "bars_1d": "ohlcv_1d", "raw_events": "news_events"}.get(batch["asset"])
    if served is None and batch["asset"] in datasets():
        served = "feature_vectors"
    if served is not None:
        settle_write(engine_for(env["MARKETFS_DSN"]), served, batch["window_start"], batch["window_end"])

    instance = pooled_instance()
    graph = defs.resolve_asset_graph()
    provenance = InputProvenance(instance, graph)
    for day, version in days:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=asset,
                partition=partition_key(day, shard),
                description=f"released from quarantine batch {batch_id}",
                metadata={
                    "quarantine_batch": dg.MetadataValue.int(batch_id),
                    "released_by": dg.MetadataValue.text(actor),
                    "note": dg.MetadataValue.text(note),
                    "rows": dg.MetadataValue.int(int(batch["rows_written"])),
                    "reason_held": dg.MetadataValue.text(batch["reason"]),
                },
                tags=provenance.tags(asset, partition_key(day, shard), version),
            )
        )
    print(f"recorded in Dagster: {batch['asset']} {', '.join(d for d, _ in days)} (data version {days[0][1][:12]}…)")

    # What was computed without these rows: the released asset's descendants in the daily job from the
    # released day; for a feature asset, itself from the next day (its state chain continues there).
    descendants, self_dependent = _recomputed_after(asset)
    first_day = days[0][0]
    if self_dependent:
        descendants |= {asset}
        first_day = DAILY.get_next_partition_key(days[-1][0])
        if first_day is None:
            print("nothing to recompute: the released day is the newest partition")
            return 0
    if not descendants:
        return 0
    # A breach stops its whole step: days before the released one may have raw data but no features yet.
    raw_days = materialized_days(instance, dg.AssetKey("raw_ohlcv"), shard)
    feature_days = materialized_days(instance, CHAIN_END_ASSET, shard)
    previous = previous_key(first_day)
    while previous is not None and previous in raw_days and previous not in feature_days:
        first_day, previous = previous, previous_key(previous)
    # ... and days after it that were held back behind the breach: through the newest day with raw data.
    through = max([days[-1][0], *raw_days])
    return _recompute(
        first_day, None, asset_selection=sorted(descendants), at_least=through, verbose=verbose, only=[shard]
    )


def _discard(batch_id: int, actor: str, note: str, verbose: bool = False) -> int:
    """Discard a quarantine batch (its day becomes a gap for what it held) and recompute what follows it: the
    held instruments restart after the day instead of waiting for it."""
    env = prepare_environment(check=True)

    import dagster as dg

    from assets.partitions import SHARD_COUNT, split_key
    from marketfs.db import engine_for
    from marketfs.shards import Shard
    from marketfs.store import quality

    _migrate(env["MARKETFS_DSN"])
    try:
        with engine_for(env["MARKETFS_DSN"]).begin() as conn:
            batch = quality.discard(conn, batch_id, actor=actor, note=note, shard_count=SHARD_COUNT)
    except quality.QuarantineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    day = split_key(batch["partition"])[0]
    held = ", ".join(batch.get("instruments") or []) or "every instrument"
    if batch["gaps"]:
        print(f"batch {batch_id} discarded by {actor}: {batch['asset']} {day} of {held} is missing for good (a gap)")
    else:
        print(f"batch {batch_id} discarded by {actor}: its {batch['asset']} rows are dropped; {held} computed without")
    # Nothing changed for what follows: no gap to restart after, and no instrument the batch held back.
    if not batch["gaps"] and not batch.get("instruments"):
        return 0
    # What follows the day, from the day on: never the asset's own raw day again (it would re-read the file),
    # and a feature asset itself too (its state chain restarts after the gap).
    descendants, self_dependent = _recomputed_after(dg.AssetKey(batch["asset"]))
    if self_dependent:
        descendants |= {dg.AssetKey(batch["asset"])}
    if not descendants:
        return 0
    shard = Shard(batch["shard_index"], batch["shard_count"])
    return _recompute(day, None, asset_selection=sorted(descendants), at_least=day, verbose=verbose, only=[shard])


def _recomputed_after(asset) -> tuple[set, bool]:
    """The assets of the daily job computed from ``asset`` (without it), and whether it continues its own
    state (a feature asset): what a release or a discard of one of its days recomputes."""
    import dagster as dg

    from pipelines.definitions import ALL_ASSETS, defs

    graph = defs.resolve_asset_graph()
    daily = {a.key for a in ALL_ASSETS}
    # corporate_actions runs after the day's bars only to check its instruments against them: nothing of it
    # derives from the bars, so a released or discarded day of bars does not re-read the actions.
    descendants = (
        dg.AssetSelection.assets(asset).downstream().resolve(graph) - {asset, dg.AssetKey("corporate_actions")}
    ) & daily
    return descendants, asset in graph.get(asset).parent_keys


def _ui(port: int) -> int:
    """``dagster dev`` (webserver, daemon and their code servers) in a process group of its own.

    Ctrl-C reaches every process of the terminal's group, and each stops at once; a SIGTERM (systemd,
    docker stop, kill) or SIGHUP (the terminal closed) reaches this process only, and `dagster dev`
    alone would then ask its children to stop and wait up to a minute for each. So any of the three
    is passed on as SIGINT to the whole group, as Ctrl-C would, and what outlives a grace period is killed.
    """
    import signal
    import subprocess
    import time

    prepare_environment()
    os.chdir(PROJECT_ROOT)
    command = [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT_ROOT / "workspace.yaml")]
    dev = subprocess.Popen([*command, "-h", "127.0.0.1", "-p", str(port)], start_new_session=True)

    def group_alive() -> bool:
        try:
            os.killpg(dev.pid, 0)
        except ProcessLookupError:
            return False
        return True

    stopping: list[float] = []  # when the first stop signal came

    def stop(signum: int, _frame) -> None:
        if not stopping:
            stopping.append(time.monotonic())
            if group_alive():
                os.killpg(dev.pid, signal.SIGINT)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    # Until the whole group is gone, not only `dagster dev`: a code server may outlive it.
    killed = False
    while dev.poll() is None or (stopping and group_alive()):
        if stopping and time.monotonic() - stopping[0] > UI_STOP_GRACE_SECONDS:
            os.killpg(dev.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.2)
    code = dev.wait()
    if killed:
        # Stopped as asked, by force: a loaded machine can take longer than the grace period to wind down,
        # which is no failure of the stop (runs in flight are failed by the dead_runs sensor on the next start).
        print(f"note: the UI did not stop within {UI_STOP_GRACE_SECONDS:g} s of the signal; killed", file=sys.stderr)
        return 0
    return 0 if code in (0, -signal.SIGINT, 128 + signal.SIGINT) else code


def _day(text: str) -> date:
    """An argparse type: a calendar day, or a usage error naming the value and the format."""
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day; write it as YYYY-MM-DD, e.g. 2024-01-02") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", action="store_true", help="show Dagster's log and the traceback of each failure")
    run = sub.add_parser("run", parents=[verbose], help="materialise raw bars and feature vectors for a range of days")
    run.add_argument("--start", default=DEFAULT_START, type=_day, help="first partition (YYYY-MM-DD)")
    run.add_argument("--end", default=DEFAULT_END, type=_day, help="last partition, inclusive")
    run.add_argument("--no-snapshot", action="store_true", help="skip the sample snapshot at the end")
    run.add_argument("--shard", type=int, help="only this instrument shard (0..MARKETFS_SHARDS-1)")
    run.add_argument(
        "--allow-gap",
        action="store_true",
        help="the sessions before --start that the store holds no bar of are missing for good: declare them a gap "
        "(windows restart after it, vectors say GAP until warm) instead of refusing",
    )
    run.add_argument(
        "--today",
        action="store_true",
        help="one intraday step: compute, gate and serve what has been delivered of today so far, then exit",
    )
    run.add_argument("--now", help=argparse.SUPPRESS)  # tests: the instant taken for the clock (ISO, with offset)
    recompute = sub.add_parser(
        "recompute",
        parents=[verbose],
        help="re-materialise the daily job from a changed day through the newest materialised day",
    )
    recompute.add_argument("--from", dest="start", required=True, type=_day, help="first day")
    recompute.add_argument("--to", dest="end", type=_day, help="last day (default: the newest materialised day)")
    recompute.add_argument("--shard", type=int, help="only this instrument shard (0..MARKETFS_SHARDS-1)")
    sub.add_parser(
        "restate",
        parents=[verbose],
        help="recompute the instruments late corporate actions changed, from their ex-dates (run does it itself)",
    )
    quarantine = sub.add_parser("quarantine", help="release or discard a held quarantine batch through Dagster")
    actions = quarantine.add_subparsers(dest="action", required=True)
    for action in ("release", "discard"):
        decide = actions.add_parser(action, parents=[verbose])
        decide.add_argument("batch", type=int)
        decide.add_argument("--by", required=True, help="who reviewed it")
        decide.add_argument("--note", required=True, help="why")
    ui = sub.add_parser("ui", help="Dagster webserver and daemon on the same database")
    ui.add_argument("--port", type=int, default=3000)
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot see: a range that ends before it starts, a NUL byte, a port that cannot be."""
    for name, value in vars(args).items():
        if isinstance(value, str) and "\x00" in value:
            parser.error(f"--{name} {value!r} contains a NUL byte; remove it")
    if args.command == "run" and args.end < args.start:
        parser.error(f"--end {args.end} is before --start {args.start}; swap them")
    if args.command == "recompute" and args.end is not None and args.end < args.start:
        parser.error(f"--to {args.end} is before --from {args.start}; swap them")
    if args.command == "ui" and not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not a TCP port (1-65535)")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    verbose = getattr(args, "verbose", False)
    try:
        if args.command != "ui":
            from assets.resources import bound_instance_retries

            bound_instance_retries()  # before the instance is created: its first connections are bounded too
        if args.command == "run" and args.today:
            from datetime import datetime

            from pipelines.intraday import run_today

            return run_today(datetime.fromisoformat(args.now) if args.now else None, args.shard)
        if args.command == "run":
            return _run(
                args.start.isoformat(), args.end.isoformat(), not args.no_snapshot, verbose, args.shard, args.allow_gap
            )
        if args.command == "recompute":
            end = args.end.isoformat() if args.end else None
            return _recompute(args.start.isoformat(), end, verbose=verbose, shard=args.shard)
        if args.command == "restate":
            return _restate(verbose)
        if args.command == "quarantine" and args.action == "discard":
            return _discard(args.batch, args.by, args.note, verbose)
        if args.command == "quarantine":
            return _release(args.batch, args.by, args.note, verbose)
        return _ui(args.port)
    except Exception as exc:
        from marketfs.embedded_pg import EmbeddedPostgresError
        from pipelines.run_report import database_gone

        # The embedded server's own errors (a damaged state file, a taken port, root without user
        # namespaces) already say what to do.
        message = str(exc) if isinstance(exc, EmbeddedPostgresError | DatabaseUnreachable) else database_gone(exc)
        if message is None or verbose:
            raise
        print(f"error: {message}", file=sys.stderr)
        return DATABASE_GONE


if __name__ == "__main__":
    raise SystemExit(main())
