"""The partitioning every asset shares: one UTC day per partition, run in bounded batches."""

from __future__ import annotations

import os

import dagster as dg

START_DATE = os.environ.get("MARKETFS_START_DATE", "2024-01-01")

DAILY = dg.DailyPartitionsDefinition(start_date=START_DATE, timezone="UTC")

# A backfill of a year runs as ~12 runs of 31 days, not 365 runs that each pay Dagster's start-up.
BATCHED_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=31)
