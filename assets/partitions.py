"""The partitioning every asset shares: one trading day (session) per partition, run in bounded batches.

A day is the unit of truth: every verdict, quarantine batch, quality-log row, check result and
materialisation belongs to one daily partition, whatever range a run covers. A run walks its
range in chunks of days so that its memory depends on the universe, not on the range's length.

The partitions are the sessions of the universe's calendar (``marketfs/config/universes.toml``):
weekends and holidays are no partitions, so the UI never invites anyone to materialise them. A
partition's key is its session's date; what it holds is its trading day, ``[previous session's
close, its close)`` (``marketfs/calendars.py``), not Dagster's time window of the key, which only
orders the keys.

With ``MARKETFS_SHARDS`` above 1, a partition is a day of one instrument shard (``marketfs/shards.py``):
``MultiPartitionsDefinition`` of ``day`` x ``shard``, keys like ``2024-01-02|1``. Each shard is a chain
of days of its own (its recursions continue its own state), independent of the other shards, so the
shards of a backfill run at once. With one shard (the default) the partitions are the days alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

import dagster as dg
import polars as pl

from assets.resources import DATABASE_RETRY
from marketfs.shards import Shard, shard_count
from marketfs.universe import active_sessions

START_DATE = os.environ.get("MARKETFS_START_DATE", "2023-01-01")

SESSIONS = active_sessions()


def session_partitions(start: str = START_DATE) -> dg.TimeWindowPartitionsDefinition:
    """One partition per session of the calendar from ``start``: its weekdays, less its holidays.

    ``end_offset=1`` makes today's session a partition from 00:00 UTC, so that it can be run as soon
    as it closes (Dagster's window of a Friday key ends on Monday); runs of a session that has not
    closed yet hold its bars so far.
    """
    holidays = [datetime.combine(d, datetime.min.time(), UTC) for d in SESSIONS.excluded_weekdays()]
    return dg.TimeWindowPartitionsDefinition(
        start=start,
        fmt="%Y-%m-%d",
        cron_schedule=f"0 0 * * {SESSIONS.cron_weekdays()}",
        timezone="UTC",
        exclusions=[h for h in holidays if h.date().isoformat() >= start] or None,
        end_offset=1,
    )


DAILY = session_partitions()

SHARD_COUNT = shard_count()
SHARDED = SHARD_COUNT > 1
DAY_DIMENSION, SHARD_DIMENSION = "day", "shard"
# What every asset is partitioned by: days, or days x instrument shards.
PARTITIONS: dg.PartitionsDefinition = (
    dg.MultiPartitionsDefinition(
        {DAY_DIMENSION: DAILY, SHARD_DIMENSION: dg.StaticPartitionsDefinition([str(i) for i in range(SHARD_COUNT)])}
    )
    if SHARDED
    else DAILY
)


def partition_key(day: str, shard: Shard) -> str:
    """The partition key of ``day`` in ``shard``: the day itself when there is one shard."""
    if not SHARDED:
        return day
    return dg.MultiPartitionKey({DAY_DIMENSION: day, SHARD_DIMENSION: str(shard.index)})


def split_key(key: str) -> tuple[str, Shard]:
    """The day and shard of a partition key."""
    if not SHARDED:
        return key, Shard()
    parts = PARTITIONS.get_partition_key_from_str(key).keys_by_dimension
    return parts[DAY_DIMENSION], Shard(int(parts[SHARD_DIMENSION]), SHARD_COUNT)


@dataclass(frozen=True)
class RunScope:
    """The days of one shard that an asset's run covers, in order; ``key`` names a day's partition."""

    shard: Shard
    days: list[str]

    def key(self, day: str) -> str:
        return partition_key(day, self.shard)


def run_scopes(partition_keys: Sequence[str]) -> list[RunScope]:
    """A run's partitions grouped by shard (usually one: backfills and sensors launch a run per shard)."""
    days_by_shard: dict[Shard, list[str]] = {}
    for key in partition_keys:
        day, shard = split_key(key)
        days_by_shard.setdefault(shard, []).append(day)
    return [RunScope(shard, sorted(days)) for shard, days in sorted(days_by_shard.items(), key=lambda i: i[0].index)]


def day_dependency(asset: str, start_offset: int, end_offset: int = 0, *, same_shard: bool = True) -> dg.AssetDep:
    """A dependency on ``asset``'s days ``start_offset..end_offset`` around each day, in the same shard."""
    days = dg.TimeWindowPartitionMapping(
        start_offset=start_offset, end_offset=end_offset, allow_nonexistent_upstream_partitions=True
    )
    if not SHARDED:
        return dg.AssetDep(asset, partition_mapping=days)
    return dg.AssetDep(
        asset,
        partition_mapping=dg.MultiPartitionMapping(
            {
                DAY_DIMENSION: dg.DimensionPartitionMapping(DAY_DIMENSION, days),
                SHARD_DIMENSION: dg.DimensionPartitionMapping(SHARD_DIMENSION, dg.IdentityPartitionMapping()),
            }
        ),
    )


# Days per run of the command line and the landing sensor, and of an asset backfill with one shard: a
# year runs as ~12 runs of 31 days, not 365 runs that each pay Dagster's start-up.
RUN_DAYS = 31
# With shards, an asset backfill runs each shard's range as one run (the shards side by side). Dagster
# 1.13 picks the next partitions of a self-dependent asset for a multi-run chunk from an unordered set
# when the partitions have two dimensions (asset_backfill.py, `_should_backfill_atomic_asset_subset_unit`:
# `list(get_partition_keys())[:max_partitions_per_run]`): a shard's days then ran out of order and at
# once (seen: 2024-01-03 and 2024-01-11 of one shard side by side, before its 2024-01-02). A single run
# per shard and range keeps the order; its memory stays bounded by MARKETFS_CHUNK_ROWS, its time is the
# range's (see dagster/max_runtime in docs/operations.md, "Schedules and backfills").
BACKFILL_POLICY = (
    dg.BackfillPolicy.single_run() if SHARDED else dg.BackfillPolicy.multi_run(max_partitions_per_run=RUN_DAYS)
)

# Rows a run holds in memory at once (about): bounds a run's memory by the universe, not the range.
# The feature computation of a chunk holds ~1.5 KB a vector while it runs (1.4 GB for 936,000 vectors, 200
# instruments x 12 days), so a million-row chunk made a 30-day run 2.2x a 5-day one, whose whole range is
# 390,000 rows. 400,000 keeps a run's peak near what any range of a few days costs, and still validates 20
# days of a 50-instrument universe at once (Great Expectations has a fixed cost per validation of ~0.5 s
# that per-day chunks would multiply).
ROWS_PER_CHUNK = int(os.environ.get("MARKETFS_CHUNK_ROWS", "400000"))
# What a vector costs at the chunk's peak, to count what a step holds besides its chunk (the drift reference it
# carries, 20 days of its gated columns) in the same rows: measured ~1.4 KB (benchmarks/range_memory.py).
PEAK_BYTES_PER_VECTOR = 1536

# The longest chunk of days taken before any day has shown rows (see DayChunks).
BLIND_CHUNK_DAYS = 8

DAY = "day"


def day_window(day: str) -> tuple[datetime, datetime]:
    """``[start, end)`` of a partition key: its trading day, from the previous session's close to its close."""
    return SESSIONS.trading_day_window(day)


def session_keys(start: str, end: str) -> list[str]:
    """The partition keys (sessions) from ``start`` through ``end``, either of which may be a non-session day."""
    last = DAILY.get_last_partition_key()
    keys = [d.isoformat() for d in SESSIONS.between(max(start, START_DATE), end)]
    return [k for k in keys if last is None or k <= last]


def previous_key(day: str) -> str | None:
    """The session before ``day`` (a partition key), or None before the first partition."""
    i = SESSIONS.days.search_sorted(date.fromisoformat(day), side="left") - 1
    previous = SESSIONS.days[i].isoformat() if i >= 0 else None
    return previous if previous is not None and previous >= START_DATE else None


def with_day(frame: pl.DataFrame, column: str = "ts") -> pl.DataFrame:
    """``frame`` with column ``day``: the partition key (YYYY-MM-DD) of the trading day ``column`` falls in."""
    return frame.with_columns(SESSIONS.trading_day(frame[column]).dt.strftime("%Y-%m-%d").alias(DAY))


class DayChunks:
    """The days of a run, in order, in chunks of about ``rows_per_chunk`` rows.

    The first chunk is one day; later chunks are sized from the most rows a day has had so far
    (``saw``), so a run's memory follows its universe, not its range, without counting rows first.
    While the chunks hold no rows at all (sessions of a daily-only history, for the minute assets),
    each next chunk is twice as long, up to ``BLIND_CHUNK_DAYS``: an empty day costs a computation's
    fixed cost and no memory, and the cap bounds the chunk in which rows appear again.
    """

    def __init__(self, days: Sequence[str], rows_per_chunk: int | None = None) -> None:
        self.days = list(days)
        self.rows_per_chunk = max(ROWS_PER_CHUNK if rows_per_chunk is None else rows_per_chunk, 1)
        self._rows_per_day = 0
        self._blind_size = 1  # the chunk length while no day has had rows
        self._reserved = 0

    def hold(self, nbytes: int) -> None:
        """Count ``nbytes`` the step holds across chunks (its carried drift reference) in the next chunks'
        budget, as rows at the peak's cost per vector (at most half the budget): a full reference then
        makes the chunks shorter instead of the run's peak higher than a short range's."""
        self._reserved = min(nbytes // PEAK_BYTES_PER_VECTOR, self.rows_per_chunk // 2)

    def saw(self, rows: int, days: int) -> None:
        """Report a chunk's rows and how many of its days had any."""
        if days:
            self._rows_per_day = max(self._rows_per_day, -(-rows // days))
        elif not self._rows_per_day:
            self._blind_size = min(2 * self._blind_size, BLIND_CHUNK_DAYS)

    def __iter__(self) -> Iterator[list[str]]:
        i = 0
        while i < len(self.days):
            budget = self.rows_per_chunk - self._reserved
            size = self._blind_size if not self._rows_per_day else max(1, budget // self._rows_per_day)
            yield self.days[i : i + size]
            i += size


# Said on each check's page, beside the "non-blocking" label Dagster gives it (see daily_asset).
GATE_NOTE = (
    "Severity ERROR blocks: the asset runs this check before it writes, and a breaching day (or instrument-day) "
    "fails the step and is not written. Dagster labels the check non-blocking because its own blocking flag "
    "would only stop later steps, after the write."
)


def daily_asset(
    name: str,
    *,
    group_name: str,
    code_version: str,
    description: str,
    deps: Sequence[dg.AssetDep | str] = (),
    checks: dict[str, str] | None = None,
    metadata: dict | None = None,
    owners: Sequence[str] = ("team:quant-platform",),
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
                owners=list(owners),
            )
        ],
        check_specs=[
            dg.AssetCheckSpec(check, asset=name, description=f"{text} {GATE_NOTE}", partitions_def=PARTITIONS)
            for check, text in (checks or {}).items()
        ],
        partitions_def=PARTITIONS,
        backfill_policy=BACKFILL_POLICY,
        pool="feature_store",
        retry_policy=DATABASE_RETRY,
        can_subset=True,
    )
