"""Snapshots: immutable, hashed copies of feature vectors for reproducible training sets."""

from datetime import datetime, timedelta

import dagster as dg

from assets.features import FEATURE_ASSETS
from assets.resources import FeatureStore, translate_database_errors
from marketfs.snapshots import SnapshotError, create_snapshot


class SnapshotConfig(dg.Config):
    """What to freeze: one feature set version and timeframe, a UTC date range (end exclusive), instruments."""

    feature_set_version: str = "fs_v1"
    timeframe: str = "1m"
    start: str = "2024-01-02"
    end: str = "2024-01-13"
    instruments: list[str] = []


def _utc(day: str) -> datetime:
    return datetime.fromisoformat(f"{day}T00:00:00+00:00")


@dg.asset(
    deps=FEATURE_ASSETS,
    group_name="snapshots",
    kinds={"postgres"},
    pool="feature_store",
    code_version="1",
    description="An immutable snapshot of feature vectors with a manifest (content hash, schema, feature "
    "definitions, suite versions, upstream partitions); each materialisation freezes what its config selects.",
)
@translate_database_errors
def feature_snapshots(
    context: dg.AssetExecutionContext, config: SnapshotConfig, store: FeatureStore
) -> dg.MaterializeResult:
    from expectations.gate import suite_versions
    from marketfs.features.registry import dataset_name, feature_set

    start, end = _utc(config.start), _utc(config.end)
    try:
        dataset = dataset_name(feature_set(config.feature_set_version), config.timeframe)
    except KeyError as exc:
        raise dg.Failure(description=f"snapshot config: {exc.args[0]}", allow_retries=False) from exc
    upstream = _upstream_data_versions(context, dataset, config.start, config.end)
    try:
        with store.engine().begin() as conn:
            snapshot = create_snapshot(
                conn,
                feature_set_version=config.feature_set_version,
                timeframe=config.timeframe,
                start=start,
                end=end,
                instruments=config.instruments or None,
                run_id=context.run_id,
                extra_manifest={"dagster_upstream": upstream, "suite_versions": suite_versions(dataset)},
            )
    except SnapshotError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    return dg.MaterializeResult(
        metadata={
            "snapshot_id": dg.MetadataValue.text(snapshot.snapshot_id),
            "content_hash": dg.MetadataValue.text(snapshot.manifest["content_hash"]),
            "rows": dg.MetadataValue.int(snapshot.row_count),
            "instruments": dg.MetadataValue.int(len(snapshot.manifest["instruments"])),
            "window": dg.MetadataValue.text(f"{config.start} .. {config.end} (end exclusive)"),
            "manifest": dg.MetadataValue.json(snapshot.manifest),
        },
        data_version=dg.DataVersion(snapshot.manifest["content_hash"]),
    )


def _upstream_data_versions(context: dg.AssetExecutionContext, asset: str, start: str, end: str) -> dict:
    """The latest materialisation of each upstream partition in the window: run id and data version."""
    from assets.partitions import SHARD_COUNT, partition_key, session_keys
    from marketfs.shards import shards

    last = (datetime.fromisoformat(end) - timedelta(days=1)).date().isoformat()
    if last < start:
        return {}
    # The sessions of the UTC date range: their trading days hold the window's vectors (after-hours ones
    # of the range's last evening belong to the next session, outside it).
    # Every shard's partition of each day: a snapshot holds the whole universe.
    keys = [partition_key(day, shard) for day in session_keys(start, last) for shard in shards(SHARD_COUNT)]
    latest: dict[str, dict] = {}
    cursor = None
    # Newest first, page by page until every day is found: a day re-run many times has many records.
    while len(latest) < len(keys):
        page = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=keys), limit=1000, cursor=cursor
        )
        for record in page.records:
            event = record.asset_materialization
            if event is None or event.partition in latest:
                continue
            latest[event.partition] = {
                "run_id": record.run_id,
                "data_version": event.tags.get("dagster/data_version"),
            }
        if not page.has_more:
            break
        cursor = page.cursor
    return {asset: dict(sorted(latest.items()))}
