"""The landing-folder sensor: new or changed files launch one ordered run over the days they change.

Day D's features continue the recursion state of day D-1, so a changed day is recomputed from D
through the newest day already materialised, in order, never as parallel runs of single days (with
a pool of 2, day D+1 could read its state before D has written it). Every run of the state chain
carries the tag ``marketfs/state_chain`` with its shard's chain as value; ``dagster.yaml`` lets one
run per value execute at a time and queues the others (the schedule's, the sensor's, a backfill's)
in order of arrival. With several instrument shards, each shard is a chain of its own: the sensor
and the schedule launch one run per shard, and different shards' runs execute at once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg
import polars as pl

from assets.partitions import PARTITIONS, RUN_DAYS, partition_key, split_key
from assets.resources import FeatureStore, MarketData
from marketfs.features.registry import DEFAULT_FEATURE_SET, dataset_name
from marketfs.shards import ALL, Shard, shards
from marketfs.sources.landing import BAR_STAMPS, BARS, BARS_1D, EVENTS
from marketfs.sources.landing_index import LandingIndex

# One run per state chain at a time (tag_concurrency_limits in dagster.yaml, a limit per tag value).
STATE_CHAIN_TAG = "marketfs/state_chain"
STATE_CHAIN_TAGS = {STATE_CHAIN_TAG: "daily"}


def chain_tags(shard: Shard = ALL) -> dict[str, str]:
    """The state-chain tag of ``shard``'s runs: ``daily`` with one shard, ``shard-<i>`` with several."""
    return STATE_CHAIN_TAGS if shard.is_all else {STATE_CHAIN_TAG: f"shard-{shard.index}"}


# The asset whose newest materialised day ends a recomputation: the default feature set's first
# timeframe (every feature asset runs the same days in the daily job).
CHAIN_END_ASSET = dg.AssetKey(dataset_name(DEFAULT_FEATURE_SET, DEFAULT_FEATURE_SET.timeframes[0]))
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def materialized_days(instance: dg.DagsterInstance, key: dg.AssetKey, shard: Shard | None = None) -> set[str]:
    """The days of ``key`` with a materialisation in the instance (of ``shard``, or of any shard)."""
    days = set()
    for partition in instance.get_materialized_partitions(key):
        try:
            day, of = split_key(partition)
        except Exception:  # a key of another shard count (MARKETFS_SHARDS changed): not this layout's
            continue
        if shard is None or of == shard:
            days.add(day)
    return days


def newest_materialized_day(
    instance: dg.DagsterInstance, key: dg.AssetKey = CHAIN_END_ASSET, shard: Shard | None = None
) -> str | None:
    """The newest day of ``key`` with a materialisation in the instance (of ``shard``, or of any shard)."""
    days = materialized_days(instance, key, shard)
    return max(days) if days else None


def chain_range(
    partitions: dg.TimeWindowPartitionsDefinition, touched: list[str], newest_materialized: str | None
) -> list[str]:
    """The days to recompute, in order: the earliest touched day through the later of the last touched
    day and the newest materialised one; days the partitions do not have (before the start date, or
    not complete yet) are left out."""
    last = partitions.get_last_partition_key()
    first = partitions.get_first_partition_key()
    if last is None or first is None:
        return []
    days = [d for d in touched if first <= d <= last]
    if not days:
        return []
    end = max(days[-1], newest_materialized or days[-1])
    return partitions.get_partition_keys_in_range(dg.PartitionKeyRange(days[0], min(end, last)))


def chain_request(
    days: list[str],
    asset_keys: list[dg.AssetKey],
    tags: dict[str, str],
    run_key: str | None = None,
    shard: Shard = ALL,
) -> dg.RunRequest:
    """One ranged run for ``days`` of ``shard`` when they fit in RUN_DAYS days, else a backfill of them (its
    runs follow the assets' backfill policy).

    A backfill's runs carry the backfill's tags only (not the job's), so the state-chain tag is set
    here for both.
    """
    tags = {**tags, **chain_tags(shard)}
    keys = [partition_key(day, shard) for day in days]
    if len(keys) <= RUN_DAYS:
        return dg.RunRequest(run_key=run_key, tags={**tags, RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]})
    from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset

    subset = PARTITIONS.subset_with_partition_keys(keys)
    return dg.RunRequest.for_asset_graph_subset(
        AssetGraphSubset(partitions_subsets_by_asset_key=dict.fromkeys(asset_keys, subset)), tags=tags
    )


def build_landing_sensor(job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    @dg.sensor(
        name="landing_files_sensor",
        job=job,
        minimum_interval_seconds=30,
        description="Watches MARKETFS_LANDING_DIR/bars, /bars_1d and /events; new or changed files launch ONE run of "
        "the daily_features job from the earliest day they touch through the newest materialised day (a backfill "
        "when longer than 31 days), per instrument shard, tagged marketfs/state_chain so it queues behind other such "
        "runs.",
    )
    def landing_files_sensor(context: dg.SensorEvaluationContext, market_data: MarketData):
        from assets.partitions import DAILY, SHARD_COUNT

        if market_data.source != "landing":
            return dg.SkipReason("MARKETFS_SOURCE is not 'landing': nothing to watch")
        root = Path(market_data.landing_dir)
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        current: dict[str, str] = {}
        days: set[str] = set()
        files: list[str] = []
        skipped: list[str] = []
        for kind in (BAR_STAMPS.get(market_data.bar_stamp, BARS), BARS_1D, EVENTS):
            folder = root / kind.name
            if not folder.is_dir():
                continue
            # Only new or changed files are read, once, by whichever of the sensor or a run sees them first.
            index = LandingIndex(folder, kind)
            index.refresh()
            for key, entry in sorted(index.entries.items()):
                path = folder / key
                signature = current[str(path)] = f"{entry.mtime_ns}:{entry.size}"
                if seen.get(str(path)) == signature:
                    continue
                if entry.error is not None:
                    # No run for it: it cannot say which days it holds. Every run reading the folder warns too.
                    skipped.append(str(index.unplaced_error(path)))
                    context.log.warning(f"landing file skipped, no day of it can be read: {skipped[-1]}")
                    continue
                for day, error in sorted(index.day_errors(path).items()):
                    # Not launched for that day: its run would fail on the same row. Its other days are.
                    skipped.append(f"{day}: {error}")
                    context.log.warning(f"landing file skipped for {day}: {error}")
                sound = set(entry.days) - set(entry.day_errors)
                if sound:
                    days.update(sound)
                    files.append(f"{kind.name}/{path.name}@{signature}")
        context.update_cursor(json.dumps(current))
        if not days:
            return dg.SkipReason(
                "no new or changed landing files" + (f"; skipped: {'; '.join(skipped)}"[:1000] if skipped else "")
            )
        asset_keys = sorted(job.selection.resolve(context.repository_def.asset_graph)) if context.repository_def else []
        names = ",".join(sorted({f.split("@")[0].split("/", 1)[1] for f in files}))
        digest = hashlib.sha256("|".join(sorted(files)).encode()).hexdigest()[:16]
        requests = []
        # A file holds rows of every shard: each shard's chain is recomputed, as one run (or backfill) each.
        for shard in shards(SHARD_COUNT):
            newest = newest_materialized_day(context.instance, shard=shard) if _has_instance(context) else None
            keys = chain_range(DAILY, sorted(days), newest)
            if not keys:
                continue
            suffix = "" if shard.is_all else f"|{shard.index}"
            requests.append(
                chain_request(
                    keys,
                    asset_keys,
                    tags={"landing_files": names[:200]},
                    run_key=f"{keys[0]}..{keys[-1]}{suffix}:{digest}",
                    shard=shard,
                )
            )
        if not requests:
            return dg.SkipReason(f"the changed files touch no complete daily partition: {sorted(days)}")
        return requests

    return landing_files_sensor


def build_restatement_sensor(job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    """Late corporate actions restated under the daemon, as ``python -m pipelines restate`` does by hand."""

    @dg.sensor(
        name="corporate_action_restatements",
        job=job,
        minimum_interval_seconds=60,
        # On by default: it acts only when the store says an instrument waits (left out of every run until then).
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="A corporate action stored after vectors across its ex-date were served opens a restatement; "
        "this launches ONE run per shard of the feature assets concerned, from the earliest ex-date through the "
        "newest materialised day, for those instruments alone (tag marketfs/restate), queued on the state chain.",
    )
    def corporate_action_restatements(context: dg.SensorEvaluationContext, store: FeatureStore):
        from assets.features import RESTATE_TAG
        from assets.partitions import DAILY, SHARD_COUNT
        from marketfs.store.corporate_actions import pending_restatements

        with store.engine().connect() as conn:
            pending = pending_restatements(conn)
        if pending.is_empty():
            return dg.SkipReason("no corporate action waits for a restatement")
        digest = hashlib.sha256(pending.write_csv().encode()).hexdigest()[:16]
        requests = []
        for shard in shards(SHARD_COUNT):
            mine = pending.filter(pl.col("instrument_id").map_elements(shard.holds, return_dtype=pl.Boolean))
            if mine.is_empty():
                continue
            newest = newest_materialized_day(context.instance, shard=shard) if _has_instance(context) else None
            keys = chain_range(DAILY, [mine["from_date"].min().isoformat()], newest)
            if not keys:
                continue
            instruments = ",".join(sorted(set(mine["instrument_id"])))
            assets = [dg.AssetKey(d) for d in sorted(set(mine["dataset"]))]
            tags = {**chain_tags(shard), RESTATE_TAG: instruments}
            run_key = f"restate:{keys[0]}..{keys[-1]}:{shard.index}:{digest}"
            if len(keys) <= RUN_DAYS:
                ranged = {RANGE_START_TAG: partition_key(keys[0], shard), RANGE_END_TAG: partition_key(keys[-1], shard)}
                requests.append(dg.RunRequest(run_key=run_key, asset_selection=assets, tags={**tags, **ranged}))
            else:
                requests.append(chain_request(keys, assets, tags=tags, run_key=run_key, shard=shard))
        return requests or dg.SkipReason("the restatements touch no complete daily partition")

    return corporate_action_restatements


def _has_instance(context: dg.SensorEvaluationContext) -> bool:
    try:
        context.instance  # noqa: B018 - raises when the context was built without one
    except dg.DagsterInvariantViolationError:
        return False
    return True
