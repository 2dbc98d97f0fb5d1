"""Feature vectors per timeframe: computed from stored bars and events, gated by the suite, then written.

The gate runs inside the writing asset, before the write, because a blocking Dagster check only
stops downstream assets: the asset it checks would already have been written.
"""

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl

from assets.gates import partition_label, record_and_enforce
from assets.metadata import flag_counts, frame_summary
from assets.partitions import DAILY_WRITER
from assets.raw import bars_1d, raw_events, raw_ohlcv
from expectations.docs import DataDocs
from expectations.gate import GateResult, suite_path
from marketfs.catalog import catalog_table
from marketfs.features.compute import WARMUP_BARS, HistoryError, compute_feature_vectors
from marketfs.features.registry import DEFAULT_FEATURE_SET, EVENT_WINDOWS, definitions_hash
from marketfs.store.bars import read_bars
from marketfs.store.events import read_events
from marketfs.store.feature_vectors import (
    read_recent_partitions,
    read_state_before,
    read_vectors,
    write_features,
)
from pipelines.resources import FeatureStore, translate_database_errors

FEATURE_SET = DEFAULT_FEATURE_SET
GATE_CHECK = "quality_gate"
DRIFT_CHECK = "drift_gate"

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
        **DAILY_WRITER,
        group_name="features",
        # Derived from the definitions: editing a formula or lookback marks the asset stale in the UI.
        code_version=f"{FEATURE_SET.version}-{definitions_hash(FEATURE_SET, timeframe)}-2",
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
            ),
            *(
                [
                    dg.AssetCheckSpec(
                        DRIFT_CHECK,
                        asset=name,
                        blocking=True,
                        description=f"Drift suite expectations/suites/{suite}_drift.json against its reference; "
                        "a breach blocks the write.",
                    )
                ]
                if suite_path(f"{suite}_drift").exists()
                else []
            ),
        ],
        description=f"Feature vectors {FEATURE_SET.version}, timeframe {timeframe} (event window {label}), "
        "in table feature_vectors.",
        metadata={
            "feature_catalog": dg.MetadataValue.md(catalog_table(FEATURE_SET, timeframe)),
            "owner": dg.MetadataValue.text("quant-platform"),
        },
    )
    @translate_database_errors
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
            raise dg.Failure(description=str(exc), allow_retries=False) from exc
        vectors = computation.vectors

        docs = DataDocs.default()
        checks = {
            GATE_CHECK: [
                validate_frame(
                    vectors, suite, docs=docs, batch_label=f"{name}-{partition_label(context)}", run_name=context.run_id
                )
            ]
        }
        drift_file = suite_path(f"{suite}_drift")
        if drift_file.exists():
            checks[DRIFT_CHECK] = _drift(context, store, vectors, drift_file, name, timeframe, start, docs)
        state_rows = computation.state.with_columns(
            pl.lit(timeframe).alias("timeframe"), pl.lit(FEATURE_SET.version).alias("feature_set_version")
        )
        yield from record_and_enforce(
            context, store, checks=checks, rows={"feature_vectors": vectors, "feature_state": state_rows}
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


def _drift(
    context: dg.AssetExecutionContext,
    store: FeatureStore,
    vectors: pl.DataFrame,
    drift_file: Path,
    asset: str,
    timeframe: str,
    start: datetime,
    docs: DataDocs,
) -> list[GateResult]:
    from expectations.drift import ReferenceSpec, drift_columns, evaluate_drift
    from expectations.gate import load_suite_json

    template = load_suite_json(drift_file)
    spec = ReferenceSpec.from_suite(template)
    columns = drift_columns(template)  # the reference spans weeks of vectors: read only what drift compares
    with store.engine().connect() as conn:
        if spec.kind == "trailing":
            history = read_recent_partitions(
                conn,
                feature_set=FEATURE_SET,
                timeframe=timeframe,
                before=start,
                partitions=spec.partitions,
                columns=columns,
            )
        elif spec.kind == "snapshot":
            from marketfs.snapshots import read_snapshot

            history = read_snapshot(conn, spec.snapshot)
        else:
            history = read_vectors(
                conn,
                feature_set=FEATURE_SET,
                timeframe=timeframe,
                start=datetime.fromisoformat(spec.start).replace(tzinfo=UTC),
                end=datetime.fromisoformat(spec.end).replace(tzinfo=UTC),
                columns=columns,
            )
    history = history.select("ts", *columns)
    return evaluate_drift(
        vectors,
        history,
        template,
        source=f"feature_vectors ({FEATURE_SET.version}, {timeframe})",
        asset=asset,
        docs=docs,
        run_name=context.run_id,
    )


feature_vectors_1m = _feature_vectors_asset("1m", raw_ohlcv)
feature_vectors_1d = _feature_vectors_asset("1d", bars_1d)
