"""The partitioning every asset shares: one UTC day per partition, run in bounded batches."""

from __future__ import annotations

import os

import dagster as dg

from pipelines.resources import DATABASE_RETRY

START_DATE = os.environ.get("MARKETFS_START_DATE", "2024-01-01")

DAILY = dg.DailyPartitionsDefinition(start_date=START_DATE, timezone="UTC")

# A backfill of a year runs as ~12 runs of 31 days, not 365 runs that each pay Dagster's start-up.
BATCHED_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=31)

# What every daily asset that writes to the feature store shares: partitions, batched backfills,
# the `feature_store` concurrency pool and retries on database faults.
DAILY_WRITER = {
    "partitions_def": DAILY,
    "backfill_policy": BATCHED_BACKFILL,
    "kinds": {"postgres", "polars"},
    "pool": "feature_store",
    "retry_policy": DATABASE_RETRY,
}
