"""Feature vectors per timeframe: computed from stored bars and events, gated by the suite, then written.

The gate runs inside the writing asset, before the write, because a blocking Dagster check only
stops downstream assets: the asset it checks would already have been written.
"""

from collections.abc import Iterator

import dagster as dg

from assets.metadata import flag_counts, frame_summary, gate_metadata
from assets.partitions import BATCHED_BACKFILL, DAILY
from assets.raw import bars_1d, raw_events, raw_ohlcv
from marketfs.features.compute import WARMUP_BARS, HistoryError, compute_feature_vectors
from marketfs.features.registry import DEFAULT_FEATURE_SET, EVENT_WINDOWS
from marketfs.store.bars import read_bars
from marketfs.store.events import read_events
from marketfs.store.feature_vectors import read_state_before, write_features
from pipelines.resources import FeatureStore

FEATURE_SET = DEFAULT_FEATURE_SET
GATE_CHECK = "quality_gate"

# Lineage of the warm-up: how many earlier daily partitions of bars a day's vectors may read.
# Warm-up itself is read by bar count (WARMUP_BARS), so these only need to cover it: 40 minute
# bars fit in the previous trading day (4 days span a long weekend); 40 daily bars in 60 days.
BAR_LOOKBACK_DAYS = {"1m": 4, "1d": 60}


def _feature_vectors_asset(timeframe: str, bars_asset: dg.AssetsDefinition) -> dg.AssetsDefinition:
    name = f"feature_vectors_{timeframe}"
    suite = name
    event_window, label = EVENT_WINDOWS[timeframe]

    @dg.asset(
        name=name,
        partitions_def=DAILY,
        backfill_policy=BATCHED_BACKFILL,
        group_name="features",
        kinds={"postgres", "polars"},
        code_version=f"{FEATURE_SET.version}-2",
        deps=[
            dg.AssetDep(
                bars_asset,
                partition_mapping=dg.TimeWindowPartitionMapping(
                    start_offset=-BAR_LOOKBACK_DAYS[timeframe], allow_nonexistent_upstream_partitions=True
                ),
            ),
            # Events of the look-back window (t - 1h or t - 1d) reach into the previous day.
            dg.AssetDep(
                raw_events,
                partition_mapping=dg.TimeWindowPartitionMapping(
                    start_offset=-1, allow_nonexistent_upstream_partitions=True
                ),
            ),
            # RSI, MACD and ATR continue from the state stored at the previous day's last bar.
            dg.AssetDep(
                dg.AssetKey(name),
                partition_mapping=dg.TimeWindowPartitionMapping(
                    start_offset=-1, end_offset=-1, allow_nonexistent_upstream_partitions=True
                ),
            ),
        ],
        check_specs=[
            dg.AssetCheckSpec(
                GATE_CHECK,
                asset=name,
                blocking=True,
                description=f"Great Expectations suite expectations/suites/{suite}.json; a breach blocks the write.",
            )
        ],
        description=f"Feature vectors {FEATURE_SET.version}, timeframe {timeframe} (event window {label}), "
        "in table feature_vectors.",
        metadata={"features": dg.MetadataValue.json(FEATURE_SET.names(timeframe))},
    )
    def _asset(context: dg.AssetExecutionContext, store: FeatureStore) -> Iterator:
        from expectations.gate import validate_frame

        start, end = context.partition_time_window
        with store.engine().connect() as conn:
            bars = read_bars(conn, start, end, warmup_bars=WARMUP_BARS, timeframe=timeframe)
            events = read_events(conn, start - event_window, end)
            state = read_state_before(conn, feature_set=FEATURE_SET, timeframe=timeframe, start=start)
        try:
            computation = compute_feature_vectors(
                bars,
                timeframe,
                events=events,
                state=state,
                feature_set=FEATURE_SET,
                start=start,
                end=end,
                warmup_limit=WARMUP_BARS,
            )
        except HistoryError as exc:
            raise dg.Failure(description=str(exc)) from exc
        vectors = computation.vectors

        gate = validate_frame(vectors, suite)
        yield dg.AssetCheckResult(
            check_name=GATE_CHECK,
            passed=gate.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata=gate_metadata(gate),
        )
        if not gate.passed:
            failed = "; ".join(f"{o.label}: {o.describe()}" for o in gate.blocking_failures)
            raise dg.Failure(
                description=f"suite {suite} failed for [{start}, {end}); nothing was written. {failed}",
                metadata=gate_metadata(gate),
            )

        with store.engine().begin() as conn:
            stats = write_features(
                conn,
                computation,
                feature_set=FEATURE_SET,
                timeframe=timeframe,
                start=start,
                end=end,
                run_id=context.run_id,
            )
        metadata = frame_summary(vectors)
        metadata.update({f"flag_{k}": dg.MetadataValue.int(v) for k, v in flag_counts(vectors).items()})
        metadata.update({k: dg.MetadataValue.int(v) for k, v in stats.items()})
        yield dg.MaterializeResult(metadata=metadata)

    return _asset


feature_vectors_1m = _feature_vectors_asset("1m", raw_ohlcv)
feature_vectors_1d = _feature_vectors_asset("1d", bars_1d)
