"""Data versions from content, so Dagster marks a day's downstream partitions stale when the day changes.

A ranged run yields one ``dg.AssetMaterialization`` per day. Dagster writes data-version provenance
only on the materialisations it derives from an output (``MaterializeResult``); for the per-day
events the asset has to write it as tags itself, or the stale status of later partitions is never
computed from versions. What Dagster 1.13.27 reads (``CachingStaleStatusResolver``,
``dagster/_core/definitions/data_version.py``), checked in ``tests/test_staleness.py``:

- ``dagster/data_version`` of the latest materialisation of a partition is its current version.
- ``dagster/code_version`` must be present, else the event has no provenance at all and staleness
  falls back to comparing timestamps; a value other than the asset's code version marks it stale.
- For each parent asset P, ``dagster/input_event_pointer/P`` is a storage id of P's event log: P's
  partition X (one that the partition mapping maps to this partition) counts as changed when a
  materialisation of X after that pointer has another data version than the last one at or before
  it. ``dagster/input_data_version/P`` must be present too (only its presence is read for a
  partitioned parent).
- One edge at a time: a partition is stale when a direct upstream partition has a new data
  version, never because an upstream partition is itself stale. A self-dependency (the features'
  recursion state, D-1 -> D) is skipped altogether once the partitions definition has 100 or more
  partitions (``SKIP_PARTITION_DATA_VERSION_SELF_DEPENDENCY_THRESHOLD``), and a mapping that gives
  100 or more upstream partitions is skipped too (``SKIP_PARTITION_DATA_VERSION_DEPENDENCY_THRESHOLD``).
  The state chain past the bar look-back is therefore recomputed by ``python -m pipelines recompute``,
  which runs from the changed day to the newest materialised day, not from Dagster's stale flags.
- The per-day events must be the last materialisations of their partitions in the run: a
  ``MaterializeResult`` yielded after them adds one materialisation per partition with Dagster's own
  (input-derived) data version and marks every next day stale at once. Yield it first, or not at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl

if TYPE_CHECKING:
    import sqlalchemy as sa
    from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"
USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"
INPUT_DATA_VERSION_PREFIX = "dagster/input_data_version/"
INPUT_EVENT_POINTER_PREFIX = "dagster/input_event_pointer/"
NULL_POINTER = "NULL"
UNKNOWN = "UNKNOWN"


def _canonical(column: pl.Series) -> pl.Series:
    """One physical form per logical value: a frame read back from PostgreSQL hashes as the one written."""
    dtype = column.dtype
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            column = column.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return column.dt.epoch("us")
    if dtype == pl.Date:
        return column.cast(pl.Int64)
    if dtype.is_float() or dtype.is_decimal():
        return column.cast(pl.Float64) + 0.0  # -0.0 + 0.0 is 0.0: one form for zero
    if dtype.is_integer():
        return column.cast(pl.Int64)
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        return column.cast(pl.String)
    if isinstance(dtype, pl.List) and dtype.inner != pl.String:
        return column.cast(pl.List(pl.String))
    return column


def content_version(frame: pl.DataFrame) -> str:
    """A data version for the rows of ``frame``: the same rows give the same version, in any order.

    The multiset of rows is hashed (``hash_rows`` with a fixed seed, sorted, then sha256 with the
    column names), so row order, chunking and column order do not matter, while a changed value, a
    row more or less, or a renamed column does. Timestamps are compared in UTC microseconds, integers
    as Int64 and floats as Float64, so a frame read back from PostgreSQL hashes as the one written.
    Stable within one polars version (``hash_rows`` promises no more); a polars upgrade can give
    every partition a new version once, which marks downstream days stale, never hides a change.
    About 0.2 s per million rows.
    """
    columns = sorted(frame.columns)
    digest = hashlib.sha256()
    digest.update("\x1f".join(columns).encode())
    digest.update(frame.height.to_bytes(8, "little"))
    if frame.height and columns:
        canonical = pl.DataFrame([_canonical(frame[name]) for name in columns])
        rows = canonical.hash_rows(seed=0).sort()
        digest.update(rows.to_numpy().tobytes())
    return digest.hexdigest()[:32]


def stored_content_version(conn: sa.Connection, asset: str, start: datetime, end: datetime, shard=None) -> str:
    """The content version of what an asset's served table holds for ``[start, end)`` (one day; of
    ``shard``'s instruments when given).

    The same frame the assets hash before they write (the served table's columns), read back: a
    release from quarantine, which writes outside a run, reports it.
    """
    from marketfs.features.registry import datasets
    from marketfs.shards import ALL
    from marketfs.store.bars import read_bars
    from marketfs.store.events import read_events
    from marketfs.store.feature_vectors import read_vectors

    shard = shard or ALL
    if asset == "raw_ohlcv":
        frame = read_bars(conn, start, end, shard=shard)
    elif asset == "bars_1d":
        frame = read_bars(conn, start, end, timeframe="1d", shard=shard)
    elif asset == "raw_events":
        frame = read_events(conn, start, end, shard=shard)
    elif asset == "corporate_actions":
        from marketfs.store.corporate_actions import read_actions

        frame = read_actions(conn)  # the asset's content: every stored version, whatever day it was run for
    elif asset in datasets():
        feature_set, timeframe = datasets()[asset]
        frame = read_vectors(conn, feature_set=feature_set, timeframe=timeframe, start=start, end=end, shard=shard)
    else:
        raise ValueError(f"no served table known for asset {asset!r}")
    return content_version(frame)


def _latest_storage_id(instance: dg.DagsterInstance, key: dg.AssetKey) -> int | None:
    """Storage id of the newest materialisation of any partition of ``key`` (what Dagster itself records)."""
    records = instance.get_asset_records([key])
    if not records or records[0].asset_entry.last_materialization_record is None:
        return None
    return records[0].asset_entry.last_materialization_record.storage_id


class InputProvenance:
    """The provenance tags of the per-day materialisations of one step.

    Create it before the step reads its upstream tables (``InputProvenance.capture(context)``): the
    event pointers of upstream assets are then taken no later than the data was read, so a change
    landing during the run is seen as a change. Parents that the step materialises itself (the
    features' own previous day) are looked up when each day's tags are built, after the previous
    day's materialisation was yielded (and stored: the executor logs an event before it resumes the
    asset's generator).
    """

    def __init__(
        self,
        instance: dg.DagsterInstance,
        asset_graph: BaseAssetGraph,
        materialized_here: Iterable[dg.AssetKey] = (),
        partition_keys: Iterable[str] = (),
    ) -> None:
        self._instance = instance
        self._graph = asset_graph
        self._here = set(materialized_here)
        self._pointers: dict[dg.AssetKey, int | None] = {}
        # The step's partitions: an upstream asset's tags are read for all of them in one query, not per day.
        self._keys = list(partition_keys)
        self._upstream_tags: dict[tuple[dg.AssetKey, dg.AssetKey], tuple[set[str], dict[str, dict]]] = {}
        self._unpartitioned: dict[dg.AssetKey, str] = {}
        self._mapped: dict[tuple[dg.AssetKey, dg.AssetKey, str], list[str]] = {}

    @classmethod
    def capture(cls, context: dg.AssetExecutionContext) -> InputProvenance:
        """Provenance of the step running in ``context``; upstream pointers are taken now."""
        keys = context.partition_keys if context.has_partition_key_range or context.has_partition_key else []
        provenance = cls(
            context.instance, context.job_def.asset_layer.asset_graph, context.selected_asset_keys, partition_keys=keys
        )
        for key in context.selected_asset_keys:
            for parent in provenance._graph.get(key).parent_keys:
                provenance._pointer(parent)
        return provenance

    def _pointer(self, parent: dg.AssetKey) -> int | None:
        if parent in self._here:
            return _latest_storage_id(self._instance, parent)
        if parent not in self._pointers:
            self._pointers[parent] = _latest_storage_id(self._instance, parent)
        return self._pointers[parent]

    def _input_data_version(self, parent: dg.AssetKey, asset_key: dg.AssetKey, partition_key: str) -> str:
        """As Dagster computes it: sha256 of the upstream partitions' data versions, in partition order."""
        node = self._graph.get(parent)
        if not node.is_partitioned:
            if parent in self._here:  # written by this step: read each time
                return self._latest_version(parent, node.is_external)
            if parent not in self._unpartitioned:
                self._unpartitioned[parent] = self._latest_version(parent, node.is_external)
            return self._unpartitioned[parent]
        upstream = self._upstream_partitions(parent, asset_key, partition_key)
        if not upstream:
            return UNKNOWN
        by_partition = self._latest_tags(parent, asset_key, upstream)
        versions = [tags[DATA_VERSION_TAG] for _, tags in sorted(by_partition.items()) if DATA_VERSION_TAG in tags]
        return hashlib.sha256("".join(versions).encode()).hexdigest() if versions else UNKNOWN

    def _latest_version(self, asset: dg.AssetKey, external: bool) -> str:
        record = self._instance.get_latest_data_version_record(asset, external)
        return (record.event_log_entry.tags or {}).get(DATA_VERSION_TAG, UNKNOWN) if record else UNKNOWN

    def _upstream_partitions(self, parent: dg.AssetKey, asset_key: dg.AssetKey, partition_key: str) -> list[str]:
        key = (parent, asset_key, partition_key)
        if key not in self._mapped:  # the mapping is a fixed function of the graph: worked out once per day
            self._mapped[key] = list(
                self._graph.get_parent_partition_keys_for_child(
                    partition_key, parent, asset_key
                ).partitions_subset.get_partition_keys()
            )
        return self._mapped[key]

    def _latest_tags(self, parent: dg.AssetKey, asset_key: dg.AssetKey, upstream: list[str]) -> dict[str, dict]:
        """The tags of the latest materialisation of each of ``upstream`` (partitions of ``parent``).

        A parent this step does not materialise does not change while it runs: its partitions for every day
        of the step are read at the first day, in one query. The step's own asset is read each time (day D's
        tags follow day D-1's materialisation, just stored)."""
        from dagster._core.events import DagsterEventType

        def read(partitions: list[str]) -> dict[str, dict]:
            return self._instance.event_log_storage.get_latest_tags_by_partition(
                parent, DagsterEventType.ASSET_MATERIALIZATION, [DATA_VERSION_TAG], asset_partitions=partitions
            )

        if parent in self._here:
            return read(upstream)
        key = (parent, asset_key)
        if key not in self._upstream_tags:
            wanted = sorted({p for day in self._keys for p in self._upstream_partitions(parent, asset_key, day)})
            self._upstream_tags[key] = (set(wanted), read(wanted) if wanted else {})
        asked, found = self._upstream_tags[key]
        if not set(upstream) <= asked:  # a day outside the step's partitions
            return read(upstream)
        return {p: found[p] for p in upstream if p in found}

    def tags(self, asset_key: dg.AssetKey, partition_key: str, content_hash: str) -> dict[str, str]:
        """Tags for the materialisation of ``asset_key`` at ``partition_key`` whose rows hash to ``content_hash``."""
        node = self._graph.get(asset_key)
        tags = {
            CODE_VERSION_TAG: node.code_version or UNKNOWN,
            DATA_VERSION_TAG: content_hash,
            USER_PROVIDED_TAG: "true",
        }
        for parent in sorted(node.parent_keys):
            name = parent.to_user_string()
            pointer = self._pointer(parent)
            tags[INPUT_EVENT_POINTER_PREFIX + name] = str(pointer) if pointer is not None else NULL_POINTER
            tags[INPUT_DATA_VERSION_PREFIX + name] = self._input_data_version(parent, asset_key, partition_key)
        return tags


def materialization_tags(
    context: dg.AssetExecutionContext,
    asset_key: dg.AssetKey,
    partition_key: str,
    content_hash: str,
    *,
    provenance: InputProvenance | None = None,
) -> dict[str, str]:
    """Tags for one day's ``dg.AssetMaterialization`` in a ranged run (see the module docstring).

    Pass the ``provenance`` captured at the top of the asset; without it the upstream pointers are
    taken now, after the step has read its inputs (a change landing meanwhile would be missed).
    """
    return (provenance or InputProvenance.capture(context)).tags(asset_key, partition_key, content_hash)


def day_materializations(
    provenance: InputProvenance,
    days: Iterable[tuple[dg.AssetKey, str, Mapping[str, object], str]],
) -> Iterator[dg.AssetMaterialization]:
    """``yield from`` this: one materialisation per (asset key, day, metadata, content hash), in order.

    Each day's tags are built only when the previous day's event has been yielded (and stored), so the
    self-dependency's pointer of day D+1 covers day D of this run. Materialisations built up front
    in a list would point before it, and D+1 would read as stale at once (below 100 partitions).
    """
    for asset_key, day, metadata, content_hash in days:
        yield dg.AssetMaterialization(
            asset_key=asset_key,
            partition=day,
            metadata=dict(metadata),
            tags=provenance.tags(asset_key, day, content_hash),
        )
