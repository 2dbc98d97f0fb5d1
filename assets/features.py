"""Feature vectors per timeframe: computed from stored bars and events, gated day by day, then written.

The gate runs inside the writing asset, before the write, because a blocking Dagster check only
stops downstream assets: the asset it checks would already have been written. Days form a chain
(RSI, MACD and ATR continue from the previous day's state), so a run writes the days before the
first breaching day, quarantines that day, and holds back the days after it.
"""

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg
import polars as pl

from assets.data_versions import InputProvenance, content_version, day_materializations
from assets.gates import Judgement, breach_failure, judge_days, reported
from assets.metadata import flag_counts, frame_summary, vector_preview
from assets.partitions import DAY, DayChunks, daily_asset, day_of, day_window
from expectations.gate import GateResult, suite_path
from marketfs.catalog import catalog_table
from marketfs.features.compute import WARMUP_BARS, FeatureComputation, HistoryError, compute_feature_vectors
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


def _feature_vectors_asset(timeframe: str, bars_asset: str) -> dg.AssetsDefinition:
    name = f"feature_vectors_{timeframe}"
    suite = name
    event_window, label = EVENT_WINDOWS[timeframe]
    checks = {
        GATE_CHECK: f"Great Expectations suite expectations/suites/{suite}.json, one verdict per day; "
        "a breaching day is quarantined and the days after it are held back."
    }
    if suite_path(f"{suite}_drift").exists():
        checks[DRIFT_CHECK] = (
            f"Drift suite expectations/suites/{suite}_drift.json against its reference, one verdict per day; "
            "a breach blocks the write."
        )

    @daily_asset(
        name,
        group_name="features",
        # Derived from the definitions: editing a formula or lookback marks the asset stale in the UI.
        code_version=f"{FEATURE_SET.version}-{definitions_hash(FEATURE_SET, timeframe)}-3",
        deps=[
            dg.AssetDep(
                bars_asset,
                partition_mapping=dg.TimeWindowPartitionMapping(
                    start_offset=-BAR_LOOKBACK_DAYS[timeframe], allow_nonexistent_upstream_partitions=True
                ),
            ),
            # Events of the look-back window (t - 1h or t - 1d) reach into the previous day.
            dg.AssetDep(
                "raw_events",
                partition_mapping=dg.TimeWindowPartitionMapping(
                    start_offset=-1, allow_nonexistent_upstream_partitions=True
                ),
            ),
            # RSI, MACD and ATR continue from the state stored at the previous day's last bar.
            dg.AssetDep(
                name,
                partition_mapping=dg.TimeWindowPartitionMapping(
                    start_offset=-1, end_offset=-1, allow_nonexistent_upstream_partitions=True
                ),
            ),
        ],
        checks=checks,
        description=f"Feature vectors {FEATURE_SET.version}, timeframe {timeframe} (event window {label}), "
        "in table feature_vectors.",
        metadata={
            "feature_catalog": dg.MetadataValue.md(catalog_table(FEATURE_SET, timeframe)),
            "owner": dg.MetadataValue.text("quant-platform"),
        },
    )
    @translate_database_errors
    def _asset(context: dg.AssetExecutionContext, store: FeatureStore) -> Iterator:
        from expectations.docs import DataDocs
        from expectations.gate import load_suite_json, publish_day, validate_days

        provenance = InputProvenance.capture(context)
        quality_suite = load_suite_json(suite_path(suite))
        drift_file = suite_path(f"{suite}_drift")
        drift_template = load_suite_json(drift_file) if drift_file.exists() else None
        docs = DataDocs.default()
        materializations: list[tuple] = []
        written: list[str] = []
        judgement = Judgement()
        plan = DayChunks(context.partition_keys)
        try:
            for days in plan:
                if judgement.breaches:
                    judgement.held_back.extend(days)
                    continue
                start, end = day_window(days[0])[0], day_window(days[-1])[1]
                computation = _compute(store, timeframe, start, end)
                vectors = computation.vectors.with_columns(day_of())
                plan.saw(vectors.height, vectors[DAY].n_unique())
                checks_by_day = {GATE_CHECK: validate_days(vectors, suite, suite=quality_suite)}
                drift_pages: dict[str, tuple[pl.DataFrame, dict]] = {}
                if drift_template is not None:
                    checks_by_day[DRIFT_CHECK] = _drift(store, vectors, drift_template, timeframe, start, drift_pages)

                def rows_of_day(day: str, computation: FeatureComputation = computation) -> dict[str, pl.DataFrame]:
                    day_start, day_end = day_window(day)
                    return {
                        "feature_vectors": _in_window(computation.vectors, day_start, day_end),
                        "feature_state": _in_window(computation.state, day_start, day_end).with_columns(
                            pl.lit(timeframe).alias("timeframe"),
                            pl.lit(FEATURE_SET.version).alias("feature_set_version"),
                        ),
                    }

                def publish(
                    check: str,
                    day: str,
                    gate: GateResult,
                    vectors: pl.DataFrame = vectors,
                    drift_pages: dict = drift_pages,
                ) -> str | None:
                    label_ = f"{name}-{day}"
                    if check == DRIFT_CHECK:
                        profile, drift_suite = drift_pages[day]
                        return publish_day(
                            profile, gate.suite, drift_suite, docs=docs, label=label_, run_name=context.run_id
                        )
                    rows = vectors.filter(pl.col(DAY) == day).drop(DAY)
                    return publish_day(rows, suite, quality_suite, docs=docs, label=label_, run_name=context.run_id)

                chunk = judge_days(
                    context,
                    store,
                    days=days,
                    checks=checks_by_day,
                    rows_of_day=rows_of_day,
                    chained=True,
                    publish=publish,
                )
                judgement.extend(dataclasses.replace(chunk, accepted=[]))
                if chunk.accepted:
                    # The days before the first breach, with their state, in one transaction.
                    write_start, write_end = day_window(chunk.accepted[0])[0], day_window(chunk.accepted[-1])[1]
                    accepted = FeatureComputation(
                        vectors=_in_window(computation.vectors, write_start, write_end),
                        state=_in_window(computation.state, write_start, write_end),
                    )
                    with store.engine().begin() as conn:
                        write_features(
                            conn,
                            accepted,
                            feature_set=FEATURE_SET,
                            timeframe=timeframe,
                            start=write_start,
                            end=write_end,
                            run_id=context.run_id,
                        )
                    for day in chunk.accepted:
                        day_vectors = vectors.filter(pl.col(DAY) == day).drop(DAY)
                        materializations.append(
                            (context.asset_key, day, _day_metadata(day_vectors), content_version(day_vectors))
                        )
                        written.append(day)
        except dg.Failure:
            # A later chunk failed (a bad file, missing history): the days already written are recorded.
            yield from day_materializations(provenance, materializations)
            yield from reported(context, judgement.evaluations)
            raise
        if judgement.breaches:
            yield from day_materializations(provenance, materializations)
            yield from reported(context, judgement.evaluations)
            raise breach_failure(name, judgement, written=written, first_of_chain_fix=True)
        # First the run's own record (Dagster adds one per partition), then each day's, which is the latest.
        yield dg.MaterializeResult(
            asset_key=context.asset_key, metadata={"days_written": dg.MetadataValue.int(len(written))}
        )
        yield from day_materializations(provenance, materializations)
        yield from reported(context, judgement.evaluations)

    return _asset


def _compute(store: FeatureStore, timeframe: str, start: datetime, end: datetime) -> FeatureComputation:
    event_window, _ = EVENT_WINDOWS[timeframe]
    with store.engine().connect() as conn:
        bars = read_bars(conn, start, end, warmup_bars=WARMUP_BARS, timeframe=timeframe)
        events = read_events(conn, start - event_window, end)
        state = read_state_before(conn, feature_set=FEATURE_SET, timeframe=timeframe, start=start)
    try:
        return compute_feature_vectors(
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
        raise dg.Failure(description=f"{start:%Y-%m-%d}: {exc}", allow_retries=False) from exc


def _in_window(frame: pl.DataFrame, start: datetime, end: datetime) -> pl.DataFrame:
    return frame.filter((pl.col("ts") >= start) & (pl.col("ts") < end))


def _day_metadata(vectors: pl.DataFrame) -> dict[str, dg.MetadataValue]:
    metadata = frame_summary(vectors, preview=vector_preview(vectors) if vectors.height else None)
    metadata.update({f"flag_{k}": dg.MetadataValue.int(v) for k, v in flag_counts(vectors).items()})
    return metadata


def _drift(
    store: FeatureStore,
    vectors: pl.DataFrame,
    template: dict,
    timeframe: str,
    start: datetime,
    pages: dict[str, tuple[pl.DataFrame, dict]],
) -> dict[str, GateResult]:
    """One drift verdict per day: the day profile against its reference, validated by one GX run."""
    from expectations.drift import ReferenceSpec, drift_columns, drift_profile
    from expectations.gate import validate_days

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
    profile = drift_profile(
        vectors.drop(DAY),
        history.select("ts", *columns),
        template,
        source=f"feature_vectors ({FEATURE_SET.version}, {timeframe})",
    )
    name = template["name"]
    results = validate_days(profile.frame, name, suite=profile.suite, examples=()) if profile.frame.height else {}
    for day in profile.frame[DAY].to_list() if profile.frame.height else []:
        pages[day] = (profile.frame.filter(pl.col(DAY) == day).drop(DAY), profile.suite)
    verdicts: dict[str, GateResult] = {}
    for day, gate in results.items():
        table = profile.references.get(day)
        verdicts[day] = GateResult(
            suite=gate.suite,
            suite_file=gate.suite_file,
            suite_version=gate.suite_version,
            outcomes=gate.outcomes,
            reference=_describe(table),
            label=day,
            reference_table=None if table is None else table.drop("reference", "reference_days", strict=False),
        )
    for day, reason in profile.not_evaluated.items():
        verdicts[day] = GateResult(
            suite=name,
            suite_file=suite_path(name),
            suite_version=str(template.get("meta", {}).get("suite_version", "")),
            outcomes=[],
            reference=f"not evaluated: {reason}",
            label=day,
        )
    return verdicts


def _describe(table: pl.DataFrame | None) -> str | None:
    """What a day was compared with, once (the table repeats it on every row)."""
    if table is None or table.is_empty() or "reference" not in table.columns:
        return None
    return str(table["reference"][0])


feature_vectors_1m = _feature_vectors_asset("1m", "raw_ohlcv")
feature_vectors_1d = _feature_vectors_asset("1d", "bars_1d")
