"""The code location: every asset, job, schedule and resource, assembled in one place."""

from __future__ import annotations

import os
from datetime import timedelta

import dagster as dg

from assets.corporate_actions import corporate_actions
from assets.features import FEATURE_ASSETS
from assets.partitions import SESSIONS, SHARD_COUNT, START_DATE, partition_key
from assets.raw import bars_1d, raw_events, raw_ohlcv
from assets.resources import FeatureStore, market_data_from_env
from assets.snapshots import feature_snapshots
from marketfs.shards import shards
from pipelines.environment import default_environment
from pipelines.intraday import intraday_job, intraday_sensor
from pipelines.run_health import dead_runs
from pipelines.sensors import STATE_CHAIN_TAGS, build_landing_sensor, build_restatement_sensor, chain_tags

# Late prints and the vendor's end-of-session files arrive minutes after the close.
CLOSE_SETTLE = timedelta(minutes=15)

ALL_ASSETS = [raw_ohlcv, raw_events, bars_1d, corporate_actions, *FEATURE_ASSETS]

# One process per run: a daily run is five short steps, and a step subprocess costs ~2 s of imports.
# Runs still scale out, one per partition batch, through the instance's run launcher (docs/deploying.md).
daily_features_job = dg.define_asset_job(
    "daily_features",
    selection=ALL_ASSETS,
    executor_def=dg.in_process_executor,
    # Schedule, sensor and job-backfill runs queue one at a time on the features' state chain (dagster.yaml);
    # the schedule's and the sensor's runs of several shards carry their shard's chain instead.
    run_tags=STATE_CHAIN_TAGS,
    description="Raw bars and events, daily bars, and the vectors of every declared feature set and timeframe, "
    "for a range of daily partitions.",
)

snapshot_job = dg.define_asset_job(
    "snapshot",
    selection=[feature_snapshots],
    executor_def=dg.in_process_executor,
    description="Freeze feature vectors into an immutable snapshot (configure the range in the launchpad).",
)


@dg.schedule(
    job=daily_features_job,
    cron_schedule=os.environ.get("MARKETFS_DAILY_CRON", "15 * * * *"),
    execution_timezone="UTC",
    description="Every hour at :15 (MARKETFS_DAILY_CRON), the newest session of the universe's calendar that "
    "closed at least 15 minutes before the tick, once (one run per instrument shard): a session runs within about an "
    "hour of its close.",
)
def daily_features_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
    # Sessions close at different UTC times (early closes, DST, another exchange), so no cron fits every
    # close: the calendar says which session closed last, and the run key launches each one once.
    tick = context.scheduled_execution_time
    closed = SESSIONS.closes.search_sorted(tick - CLOSE_SETTLE, side="right") - 1
    if closed < 0:
        return dg.SkipReason("no session of the calendar has closed yet")
    day = SESSIONS.days[closed].isoformat()
    if day < START_DATE:
        return dg.SkipReason(f"the last closed session {day} is before MARKETFS_START_DATE {START_DATE}")
    return [
        dg.RunRequest(
            run_key=partition_key(day, shard), partition_key=partition_key(day, shard), tags=chain_tags(shard)
        )
        for shard in shards(SHARD_COUNT)
    ]


landing_files_sensor = build_landing_sensor(daily_features_job)
restatement_sensor = build_restatement_sensor(daily_features_job)

# However the code location is loaded (make ui, dagster dev, a code server in a container), a variable
# left unset takes its documented default; runs and sensors read the values through dg.EnvVar.
default_environment()

defs = dg.Definitions(
    assets=[*ALL_ASSETS, feature_snapshots],
    jobs=[daily_features_job, snapshot_job, intraday_job],
    schedules=[daily_features_schedule],
    sensors=[landing_files_sensor, restatement_sensor, dead_runs, intraday_sensor],
    resources={"store": FeatureStore(), "market_data": market_data_from_env()},
)
