"""Feature vectors: computed from stored bars, gated by the expectation suite, then written.

The gate runs inside the writing asset, before the write, because a blocking Dagster check
only stops downstream assets: the asset it checks would already have been written.
"""

from collections.abc import Iterator

import dagster as dg

from assets.metadata import flag_counts, frame_summary, gate_metadata
from assets.partitions import BATCHED_BACKFILL, DAILY
from assets.raw import raw_ohlcv
from marketfs.features.compute import compute_feature_vectors
from marketfs.features.registry import DEFAULT_FEATURE_SET
from marketfs.store.bars import read_bars
from marketfs.store.feature_vectors import upsert_window
from pipelines.resources import FeatureStore

FEATURE_SET = DEFAULT_FEATURE_SET
SUITE = "feature_vectors"
GATE_CHECK = "feature_vectors_suite"

# Lineage: a day's vectors read the warm-up bars of earlier days. Warm-up is read by bar count;
# four days cover a weekend plus a holiday for the 1m lookbacks.
WARMUP_DAYS_1M = 4


@dg.asset(
    partitions_def=DAILY,
    backfill_policy=BATCHED_BACKFILL,
    group_name="features",
    kinds={"postgres", "polars"},
    code_version=f"{FEATURE_SET.version}-1",
    deps=[
        dg.AssetDep(
            raw_ohlcv,
            partition_mapping=dg.TimeWindowPartitionMapping(
                start_offset=-WARMUP_DAYS_1M, allow_nonexistent_upstream_partitions=True
            ),
        )
    ],
    check_specs=[
        dg.AssetCheckSpec(
            GATE_CHECK,
            asset="feature_vectors_1m",
            blocking=True,
            description=f"Great Expectations suite expectations/suites/{SUITE}.json; a breach blocks the write.",
        )
    ],
    description=f"Feature vectors {FEATURE_SET.version} for timeframe 1m in table feature_vectors.",
)
def feature_vectors_1m(context: dg.AssetExecutionContext, store: FeatureStore) -> Iterator:
    from expectations.gate import validate_frame

    start, end = context.partition_time_window
    with store.engine().connect() as conn:
        bars = read_bars(conn, start, end, warmup_bars=FEATURE_SET.max_lookback - 1)
    vectors = compute_feature_vectors(bars, "1m", feature_set=FEATURE_SET, start=start, end=end)

    gate = validate_frame(vectors, SUITE)
    yield dg.AssetCheckResult(
        check_name=GATE_CHECK,
        passed=gate.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=gate_metadata(gate),
    )
    if not gate.passed:
        failed = "; ".join(f"{o.label}: {o.describe()}" for o in gate.blocking_failures)
        raise dg.Failure(
            description=f"suite {SUITE} failed for [{start}, {end}); nothing was written. {failed}",
            metadata=gate_metadata(gate),
        )

    with store.engine().begin() as conn:
        stats = upsert_window(
            conn, vectors, feature_set=FEATURE_SET, timeframe="1m", start=start, end=end, run_id=context.run_id
        )
    metadata = frame_summary(vectors)
    metadata.update({f"flag_{k}": dg.MetadataValue.int(v) for k, v in flag_counts(vectors).items()})
    metadata.update({k: dg.MetadataValue.int(v) for k, v in stats.items()})
    yield dg.MaterializeResult(metadata=metadata)
