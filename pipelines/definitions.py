"""The code location: every asset, job, schedule and resource, assembled in one place."""

from __future__ import annotations

import dagster as dg

from assets.features import feature_vectors_1m
from assets.raw import raw_ohlcv
from pipelines.resources import FeatureStore, market_data_from_env

daily_features_job = dg.define_asset_job(
    "daily_features",
    selection=[raw_ohlcv, feature_vectors_1m],
    description="Raw bars and 1m feature vectors for a range of daily partitions.",
)

daily_features_schedule = dg.build_schedule_from_partitioned_job(daily_features_job, hour_of_day=0, minute_of_hour=30)

defs = dg.Definitions(
    assets=[raw_ohlcv, feature_vectors_1m],
    jobs=[daily_features_job],
    schedules=[daily_features_schedule],
    resources={"store": FeatureStore(), "market_data": market_data_from_env()},
)
