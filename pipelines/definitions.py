"""The code location: every asset, job, schedule and resource, assembled in one place."""

from __future__ import annotations

import os
from datetime import timedelta

import dagster as dg

from assets.features import FEATURE_ASSETS
from assets.raw import bars_1d, raw_events, raw_ohlcv
from assets.resources import FeatureStore, market_data_from_env
from assets.snapshots import feature_snapshots
from pipelines.environment import default_environment
from pipelines.run_health import dead_runs
from pipelines.sensors import STATE_CHAIN_TAGS, build_landing_sensor

ALL_ASSETS = [raw_ohlcv, raw_events, bars_1d, *FEATURE_ASSETS]

# One process per run: a daily run is five short steps, and a step subprocess costs ~2 s of imports.
# Runs still scale out, one per partition batch, through the instance's run launcher (see README).
daily_features_job = dg.define_asset_job(
    "daily_features",
    selection=ALL_ASSETS,
    executor_def=dg.in_process_executor,
    # Schedule, sensor and job-backfill runs queue one at a time on the features' state chain (dagster.yaml).
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
    cron_schedule=os.environ.get("MARKETFS_DAILY_CRON", "30 0 * * *"),
    execution_timezone="UTC",
    description="The day that just ended (UTC), at 00:30; MARKETFS_DAILY_CRON changes when it ticks.",
)
def daily_features_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    # As build_schedule_from_partitioned_job does: the last complete partition before the tick. Written
    # out so the cron can be set from the environment; the run key makes each day launch once.
    day = (context.scheduled_execution_time - timedelta(days=1)).date().isoformat()
    return dg.RunRequest(run_key=day, partition_key=day)


landing_files_sensor = build_landing_sensor(daily_features_job)

# However the code location is loaded (make ui, dagster dev, a code server in a container), a variable
# left unset takes its documented default; runs and sensors read the values through dg.EnvVar.
default_environment()

defs = dg.Definitions(
    assets=[*ALL_ASSETS, feature_snapshots],
    jobs=[daily_features_job, snapshot_job],
    schedules=[daily_features_schedule],
    sensors=[landing_files_sensor, dead_runs],
    resources={"store": FeatureStore(), "market_data": market_data_from_env()},
)
