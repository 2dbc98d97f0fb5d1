"""The code location: every asset, job, schedule and resource, assembled in one place."""

from __future__ import annotations

import dagster as dg

from assets.features import feature_vectors_1d, feature_vectors_1m
from assets.raw import bars_1d, raw_events, raw_ohlcv
from assets.snapshots import feature_snapshots
from pipelines.resources import FeatureStore, market_data_from_env

ALL_ASSETS = [raw_ohlcv, raw_events, bars_1d, feature_vectors_1m, feature_vectors_1d]

# One process per run: a daily run is five short steps, and a step subprocess costs ~2 s of imports.
# Runs still scale out, one per partition batch, through the instance's run launcher (see README).
daily_features_job = dg.define_asset_job(
    "daily_features",
    selection=ALL_ASSETS,
    executor_def=dg.in_process_executor,
    description="Raw bars and events, daily bars, and 1m and 1d feature vectors for a range of daily partitions.",
)

snapshot_job = dg.define_asset_job(
    "snapshot",
    selection=[feature_snapshots],
    executor_def=dg.in_process_executor,
    description="Freeze feature vectors into an immutable snapshot (configure the range in the launchpad).",
)

daily_features_schedule = dg.build_schedule_from_partitioned_job(daily_features_job, hour_of_day=0, minute_of_hour=30)

defs = dg.Definitions(
    assets=[*ALL_ASSETS, feature_snapshots],
    jobs=[daily_features_job, snapshot_job],
    schedules=[daily_features_schedule],
    resources={"store": FeatureStore(), "market_data": market_data_from_env()},
)
