"""Data versions from content: Dagster's stale status follows a changed day (checked on Dagster 1.13.27).

A minimal copy of the pipeline's shape, in an ephemeral instance: `raw` (root) and `feat`, which
reads raw bars of the day and the `LOOKBACK` days before (the bar warm-up) and its own previous day
(the recursion state). Both yield one materialisation per day of a ranged run, tagged by
`assets.data_versions`, as the real assets do.
"""

import dagster as dg
import polars as pl
import pytest
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import (
    SKIP_PARTITION_DATA_VERSION_SELF_DEPENDENCY_THRESHOLD,
    CachingStaleStatusResolver,
    StaleStatus,
)
from dagster._time import get_current_datetime

from assets.data_versions import InputProvenance, content_version, day_materializations, materialization_tags

RAW = dg.AssetKey("raw")
FEAT = dg.AssetKey("feat")
LOOKBACK = 2
DAYS = ["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05", "2024-01-06"]


def _graph(partitions: dg.DailyPartitionsDefinition, content: dict[str, float], result_last: bool = False):
    def day_frame(day: str) -> pl.DataFrame:
        return pl.DataFrame({"instrument_id": ["A", "B"], "close": [content.get(day, 1.0), 2.0]})

    @dg.multi_asset(specs=[dg.AssetSpec(RAW, code_version="1", partitions_def=partitions)], can_subset=True)
    def raw(context: dg.AssetExecutionContext):
        provenance = InputProvenance.capture(context)
        if not result_last:
            yield dg.MaterializeResult(asset_key=RAW)
        for day in context.partition_keys:
            yield dg.AssetMaterialization(
                asset_key=RAW,
                partition=day,
                tags=materialization_tags(context, RAW, day, content_version(day_frame(day)), provenance=provenance),
            )
        if result_last:
            yield dg.MaterializeResult(asset_key=RAW)

    @dg.multi_asset(
        specs=[
            dg.AssetSpec(
                FEAT,
                code_version="1",
                partitions_def=partitions,
                deps=[
                    dg.AssetDep(RAW, partition_mapping=dg.TimeWindowPartitionMapping(start_offset=-LOOKBACK)),
                    dg.AssetDep(
                        FEAT,
                        partition_mapping=dg.TimeWindowPartitionMapping(
                            start_offset=-1, end_offset=-1, allow_nonexistent_upstream_partitions=True
                        ),
                    ),
                ],
            )
        ],
        can_subset=True,
    )
    def feat(context: dg.AssetExecutionContext):
        provenance = InputProvenance.capture(context)
        yield dg.MaterializeResult(asset_key=FEAT)
        state = 0.0  # a running sum carried from day to day, as the indicators' recursion state
        first = partitions.get_partition_keys().index(context.partition_keys[0])
        for day in partitions.get_partition_keys()[:first]:
            state += content.get(day, 1.0)
        pending = []  # built before any is yielded, as an asset that writes first and reports after
        for day in context.partition_keys:
            state += content.get(day, 1.0)
            pending.append((FEAT, day, {"state": state}, content_version(pl.DataFrame({"state": [state]}))))
        yield from day_materializations(provenance, pending)

    return [raw, feat]


def _run(instance: dg.DagsterInstance, assets: list, first: str, last: str, selection=None) -> None:
    result = dg.materialize(
        assets,
        instance=instance,
        selection=selection,
        tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
    )
    assert result.success


def _stale(instance: dg.DagsterInstance, assets: list) -> dict[str, list[str]]:
    """Stale partitions per asset, as the UI and GraphQL's staleStatus compute them."""
    graph = dg.Definitions(assets=assets).resolve_asset_graph()
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance, graph, view)
    return {
        key.to_user_string(): [d for d in DAYS if resolver.get_status(key, d) == StaleStatus.STALE]
        for key in (RAW, FEAT)
    }


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


FEW = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-31")
MANY = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-12-31")


def test_changed_raw_day_marks_features_of_its_lookback_stale_and_a_rerun_clears_them(instance) -> None:
    content: dict[str, float] = {}
    assets = _graph(MANY, content)
    _run(instance, assets, DAYS[0], DAYS[-1])
    assert _stale(instance, assets) == {"raw": [], "feat": []}

    content[DAYS[1]] = 5.0  # a re-delivered file for D
    _run(instance, assets, DAYS[1], DAYS[1], selection=[RAW])
    # D..D+LOOKBACK read D's bars: the many-to-one look-back edge marks all three, with 366 partitions.
    assert _stale(instance, assets) == {"raw": [], "feat": DAYS[1 : 2 + LOOKBACK]}

    _run(instance, assets, DAYS[1], DAYS[1 + LOOKBACK], selection=[FEAT])
    # D+3 carries D's state too, but no edge of its own says so (see the self-dependency tests).
    assert _stale(instance, assets) == {"raw": [], "feat": []}


def test_same_content_again_is_not_a_change(instance) -> None:
    assets = _graph(MANY, {})
    _run(instance, assets, DAYS[0], DAYS[-1])
    _run(instance, assets, DAYS[1], DAYS[2], selection=[RAW])
    _run(instance, assets, DAYS[1], DAYS[1])
    assert _stale(instance, assets) == {"raw": [], "feat": []}


def test_self_dependency_marks_the_next_day_only_below_one_hundred_partitions(instance) -> None:
    content: dict[str, float] = {}
    assets = _graph(FEW, content)
    assert FEW.get_num_partitions() < SKIP_PARTITION_DATA_VERSION_SELF_DEPENDENCY_THRESHOLD == 100
    _run(instance, assets, DAYS[0], DAYS[-1])
    content[DAYS[1]] = 5.0
    _run(instance, assets, DAYS[1], DAYS[1])  # raw D and feature D: D's state changed
    # The self edge marks D+1. LOOKBACK marks D+1 and D+2 through raw D; D+3 only through its own
    # previous day, which is not re-materialised yet: staleness does not pass through a stale day.
    assert _stale(instance, assets) == {"raw": [], "feat": DAYS[2 : 2 + LOOKBACK]}

    _run(instance, assets, DAYS[2], DAYS[2], selection=[FEAT])
    assert _stale(instance, assets) == {"raw": [], "feat": [DAYS[3]]}  # D+2 via raw D, D+3 via D+2's new state
    _run(instance, assets, DAYS[1], DAYS[-1], selection=[FEAT])
    assert _stale(instance, assets) == {"raw": [], "feat": []}


def test_self_dependency_is_ignored_from_one_hundred_partitions(instance) -> None:
    content: dict[str, float] = {}
    assets = _graph(MANY, content)
    assert MANY.get_num_partitions() >= SKIP_PARTITION_DATA_VERSION_SELF_DEPENDENCY_THRESHOLD
    _run(instance, assets, DAYS[0], DAYS[-1])
    _run(instance, assets, DAYS[1], DAYS[1], selection=[FEAT])  # same content
    content[DAYS[1]] = 5.0
    _run(instance, assets, DAYS[1], DAYS[1], selection=[FEAT])  # feature D changed, raw D not
    assert _stale(instance, assets) == {"raw": [], "feat": []}  # D+1 carries it, Dagster does not see it


def test_a_materialize_result_after_the_days_hides_a_change(instance) -> None:
    content: dict[str, float] = {}
    assets = _graph(MANY, content, result_last=True)
    _run(instance, assets, DAYS[0], DAYS[-1])
    content[DAYS[1]] = 5.0
    _run(instance, assets, DAYS[1], DAYS[1], selection=[RAW])
    # The result's per-partition events come last and carry Dagster's own version (for a root asset,
    # a hash of its code version alone), not the content's: the changed day goes unnoticed.
    assert _stale(instance, assets) == {"raw": [], "feat": []}
