"""The partitioning every asset shares: one UTC day per partition, run in bounded batches.

A day is the unit of truth: every verdict, quarantine batch, quality-log row, check result and
materialisation belongs to one daily partition, whatever range a run covers. A run walks its
range in chunks of days so that its memory depends on the universe, not on the range's length.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime

import dagster as dg
import polars as pl

from pipelines.resources import DATABASE_RETRY

START_DATE = os.environ.get("MARKETFS_START_DATE", "2024-01-01")

DAILY = dg.DailyPartitionsDefinition(start_date=START_DATE, timezone="UTC")

# A backfill of a year runs as ~12 runs of 31 days, not 365 runs that each pay Dagster's start-up.
BATCHED_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=31)

# Days a run holds in memory at once: bounds a 31-day run's memory at a few days' worth of rows.
DAYS_PER_CHUNK = int(os.environ.get("MARKETFS_DAYS_PER_CHUNK", "5"))

DAY = "day"


def day_window(day: str) -> tuple[datetime, datetime]:
    """``[start, end)`` of a daily partition key, UTC."""
    window = DAILY.time_window_for_partition_key(day)
    return window.start, window.end


def day_of(column: str = "ts") -> pl.Expr:
    """The daily partition key (YYYY-MM-DD, UTC) of a timestamp column, as column ``day``."""
    return pl.col(column).dt.strftime("%Y-%m-%d").alias(DAY)


def chunks(days: Sequence[str], size: int = DAYS_PER_CHUNK) -> Iterator[list[str]]:
    for i in range(0, len(days), max(size, 1)):
        yield list(days[i : i + max(size, 1)])


def daily_asset(
    name: str,
    *,
    group_name: str,
    code_version: str,
    description: str,
    deps: Sequence[dg.AssetDep | dg.AssetsDefinition] = (),
    checks: dict[str, str] | None = None,
    metadata: dict | None = None,
) -> Callable:
    """A daily-partitioned asset that writes to the feature store and reports per-day results.

    A multi-asset of one, because its checks are reported per partition with
    ``AssetCheckEvaluation`` (a plain asset must also emit one range-wide ``AssetCheckResult``,
    recorded with no partition), and its materialisations per partition with
    ``AssetMaterialization`` (``can_subset`` makes both optional outputs). Shared by every writer:
    partitions, batched backfills, the ``feature_store`` pool and retries on database faults.
    The checks are not declared ``blocking``: the asset itself fails the run on a breach, before it
    writes the breaching day (a blocking check would only stop downstream steps, after the write).
    """
    return dg.multi_asset(
        name=name,
        specs=[
            dg.AssetSpec(
                name,
                deps=list(deps),
                description=description,
                group_name=group_name,
                code_version=code_version,
                kinds={"postgres", "polars"},
                metadata=metadata or {},
            )
        ],
        check_specs=[
            dg.AssetCheckSpec(check, asset=name, description=text, partitions_def=DAILY)
            for check, text in (checks or {}).items()
        ],
        partitions_def=DAILY,
        backfill_policy=BATCHED_BACKFILL,
        pool="feature_store",
        retry_policy=DATABASE_RETRY,
        can_subset=True,
    )
