"""Feature vectors per timeframe: computed from stored bars and events, gated day by day, then written.

The gate runs inside the writing asset, before the write, because a blocking Dagster check only
stops downstream assets: the asset it checks would already have been written. Days form a chain
(RSI, MACD and ATR continue from the previous day's state), so a run writes the days before the
first breaching day, quarantines that day, and holds back the days after it.
"""

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl

from assets.data_versions import InputProvenance, content_version
from assets.gates import Judgement, judge_days, report_run
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

if TYPE_CHECKING:
    from expectations.drift import DriftProfile

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
        judgement = Judgement()
        failure = None
        plan = DayChunks(context.partition_keys)
        history = None  # the drift reference, read once and carried from chunk to chunk
        try:
            for days in plan:
                start, end = day_window(days[0])[0], day_window(days[-1])[1]
                computation = _compute(store, timeframe, start, end)
                vectors = computation.vectors.with_columns(day_of())
                by_day = {key: rows.drop(DAY) for (key,), rows in vectors.partition_by(DAY, as_dict=True).items()}
                plan.saw(vectors.height, len(by_day))
                checks_by_day = {GATE_CHECK: validate_days(vectors, suite, suite=quality_suite)}
                profile = None
                if drift_template is not None:
                    if history is None:
                        history = _drift_history(store, drift_template, timeframe, start)
                    checks_by_day[DRIFT_CHECK], profile = _drift(vectors, history, drift_template, timeframe)

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
                    check: str, day: str, gate: GateResult, by_day: dict = by_day, profile=profile
                ) -> str | None:
                    label_ = f"{name}-{day}"
                    if check == DRIFT_CHECK:
                        row = profile.frame.filter(pl.col(DAY) == day).drop(DAY)
                        return publish_day(
                            row, gate.suite, profile.suite, docs=docs, label=label_, run_name=context.run_id
                        )
                    return publish_day(
                        by_day[day], suite, quality_suite, docs=docs, label=label_, run_name=context.run_id
                    )

                chunk = judge_days(
                    context,
                    store,
                    days=days,
                    checks=checks_by_day,
                    rows_of_day=rows_of_day,
                    chained=True,
                    publish=publish,
                )
                judgement.extend(chunk)
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
                    empty = vectors.clear().drop(DAY)
                    for day in chunk.accepted:
                        rows = by_day.get(day, empty)
                        materializations.append((context.asset_key, day, _day_metadata(rows), content_version(rows)))
                    if history is not None:
                        history = _roll(history, accepted.vectors, drift_template)
                if chunk.breaches:
                    break  # later days continue the breaching day's state: they are held back
        except dg.Failure as exc:  # a bad file or missing history in a later chunk: written days are recorded
            failure = exc
        yield from report_run(context, provenance, materializations, judgement, chained=True, failure=failure)

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


def _drift_history(store: FeatureStore, template: dict, timeframe: str, start: datetime) -> pl.DataFrame:
    """The stored vectors a run's drift reference draws on: the trailing days before ``start``, or the
    pinned window or snapshot. Only the columns drift compares (the reference spans weeks)."""
    from expectations.drift import ReferenceSpec, drift_columns

    spec = ReferenceSpec.from_suite(template)
    columns = drift_columns(template)
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
    return history.select("ts", *columns)


def _roll(history: pl.DataFrame, written: pl.DataFrame, template: dict) -> pl.DataFrame:
    """The reference for the next chunk: a trailing one takes in the days just written and keeps its
    last N days, as a fresh read would; a pinned one stays as it is."""
    from expectations.drift import ReferenceSpec

    spec = ReferenceSpec.from_suite(template)
    if spec.kind != "trailing":
        return history
    pool = pl.concat([history, written.select(history.columns)])
    days = pool.select(pl.col("ts").dt.date().unique().sort()).to_series()
    return pool.filter(pl.col("ts").dt.date() >= days[-spec.partitions]) if days.len() > spec.partitions else pool


def _drift(
    vectors: pl.DataFrame, history: pl.DataFrame, template: dict, timeframe: str
) -> tuple[dict[str, GateResult], "DriftProfile"]:
    """One drift verdict per day (the day profile against its reference, one GX validation), and the profile."""
    from expectations.drift import drift_profile
    from expectations.gate import validate_days

    profile = drift_profile(
        vectors.drop(DAY), history, template, source=f"feature_vectors ({FEATURE_SET.version}, {timeframe})"
    )
    name = template["name"]
    results = validate_days(profile.frame, name, suite=profile.suite, examples=()) if profile.frame.height else {}
    verdicts: dict[str, GateResult] = {}
    for day, gate in results.items():
        table = profile.references.get(day)
        verdicts[day] = dataclasses.replace(
            gate,
            reference=_describe(table),
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
    return verdicts, profile


def _describe(table: pl.DataFrame | None) -> str | None:
    """What a day was compared with, once (the table repeats it on every row)."""
    if table is None or table.is_empty() or "reference" not in table.columns:
        return None
    return str(table["reference"][0])


feature_vectors_1m = _feature_vectors_asset("1m", "raw_ohlcv")
feature_vectors_1d = _feature_vectors_asset("1d", "bars_1d")
