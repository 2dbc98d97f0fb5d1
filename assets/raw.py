"""Raw inputs as they arrived, and what is derived from them alone: minute bars, news events, daily bars.

Raw days are independent of each other: a delivery that breaches its gate on one day is
quarantined for that day alone, and every other day of the run is written.
"""

from collections.abc import Callable, Iterator
from datetime import datetime

import dagster as dg
import polars as pl

from assets.data_versions import InputProvenance, content_version
from assets.gates import Judgement, judge_days, report_run
from assets.metadata import frame_summary
from assets.partitions import DAY, DayChunks, daily_asset, day_of, day_window
from marketfs.features.resample import daily_bars
from marketfs.sources import SourceFileError
from marketfs.sources.normalize import normalize_bars, normalize_events
from marketfs.store.bars import read_bars, replace_bars
from marketfs.store.events import replace_events
from pipelines.resources import FeatureStore, MarketData, translate_database_errors

GATE_CHECK = "quality_gate"


def _gate_checks(asset: str) -> dict[str, str]:
    return {
        GATE_CHECK: f"Great Expectations suite expectations/suites/{asset}.json on the delivered rows, one verdict "
        "per day; a breaching day is quarantined and not written."
    }


def _delivered(fetch: Callable[[datetime, datetime], pl.DataFrame], start: datetime, end: datetime) -> pl.DataFrame:
    """What the source delivers for the window; a bad file fails the run before anything is written."""
    try:
        return fetch(start, end)
    except SourceFileError as exc:
        raise dg.Failure(
            description=str(exc), metadata={"file": dg.MetadataValue.path(str(exc.path))}, allow_retries=False
        ) from exc


def _ingest(
    context: dg.AssetExecutionContext,
    store: FeatureStore,
    *,
    fetch: Callable[[datetime, datetime], pl.DataFrame],
    ts_column: str,
    table: str,
    write: Callable,
    summarise: Callable[[pl.DataFrame, pl.DataFrame], dict[str, dg.MetadataValue]],
) -> Iterator:
    """Fetch, gate per day, write the passing days; one materialisation per written day."""
    from expectations.docs import DataDocs
    from expectations.gate import load_suite_json, publish_day, suite_path, validate_days

    asset = context.asset_key.to_user_string()
    provenance = InputProvenance.capture(context)
    suite = load_suite_json(suite_path(asset))
    docs = DataDocs.default()
    materializations = []
    judged = Judgement()
    failure = None
    plan = DayChunks(context.partition_keys)
    try:
        for days in plan:
            start, end = day_window(days[0])[0], day_window(days[-1])[1]
            # A row without a timestamp belongs to no day: it is judged (and held) with the first one.
            delivered = _delivered(fetch, start, end).with_columns(day_of(ts_column).fill_null(days[0]))
            by_day = {key: rows.drop(DAY) for (key,), rows in delivered.partition_by(DAY, as_dict=True).items()}
            plan.saw(delivered.height, len(by_day))
            empty = delivered.clear().drop(DAY)

            def publish(check: str, day: str, gate, by_day: dict = by_day) -> str | None:
                return publish_day(
                    by_day[day], asset, suite, docs=docs, label=f"{asset}-{day}", run_name=context.run_id
                )

            judgement = judge_days(
                context,
                store,
                days=days,
                checks={GATE_CHECK: validate_days(delivered, asset, suite=suite)},
                rows_of_day=lambda day, by_day=by_day: {table: by_day[day]},
                chained=False,
                publish=publish,
            )
            judged.extend(judgement)
            with store.engine().begin() as conn:
                for day in judgement.accepted:
                    rows = by_day.get(day, empty)
                    stored = write(conn, rows, *day_window(day))
                    materializations.append((context.asset_key, day, summarise(rows, stored), content_version(stored)))
    except dg.Failure as exc:  # a bad file in a later chunk: the days already written are still recorded
        failure = exc
    yield from report_run(context, provenance, materializations, judged, chained=False, failure=failure)


@daily_asset(
    "raw_ohlcv",
    group_name="raw",
    code_version="3",
    description="One-minute OHLCV bars (instrument_id, ts UTC = the bar's open, open, high, low, close, volume) "
    "in table ohlcv_1m.",
    checks=_gate_checks("raw_ohlcv"),
)
@translate_database_errors
def raw_ohlcv(context: dg.AssetExecutionContext, store: FeatureStore, market_data: MarketData):
    def write(conn, delivered: pl.DataFrame, start: datetime, end: datetime) -> pl.DataFrame:
        bars = normalize_bars(delivered)
        replace_bars(conn, bars, start, end)
        return bars

    def summarise(delivered: pl.DataFrame, bars: pl.DataFrame) -> dict[str, dg.MetadataValue]:
        metadata = frame_summary(bars.drop("source_flags"))
        metadata["delivered_rows"] = dg.MetadataValue.int(delivered.height)
        metadata["flag_TIMESTAMP_MISMATCH"] = dg.MetadataValue.int(int(bars["source_flags"].list.len().gt(0).sum()))
        return metadata

    yield from _ingest(
        context,
        store,
        fetch=market_data.bar_source().bars,
        ts_column="ts",
        table="ohlcv_1m",
        write=write,
        summarise=summarise,
    )


@daily_asset(
    "raw_events",
    group_name="raw",
    code_version="2",
    description="News events (event_id, instrument_id, published_at UTC, sentiment, confidence, source) "
    "in table news_events, partitioned by publication day; each event_id kept once.",
    checks=_gate_checks("raw_events"),
)
@translate_database_errors
def raw_events(context: dg.AssetExecutionContext, store: FeatureStore, market_data: MarketData):
    def write(conn, delivered: pl.DataFrame, start: datetime, end: datetime) -> pl.DataFrame:
        events = normalize_events(delivered)
        replace_events(conn, events, start, end)
        return events

    def summarise(delivered: pl.DataFrame, events: pl.DataFrame) -> dict[str, dg.MetadataValue]:
        metadata = frame_summary(events.rename({"published_at": "ts"}))
        metadata["delivered_rows"] = dg.MetadataValue.int(delivered.height)
        metadata["duplicates_dropped"] = dg.MetadataValue.int(delivered.height - events.height)
        return metadata

    yield from _ingest(
        context,
        store,
        fetch=market_data.event_source().events,
        ts_column="published_at",
        table="news_events",
        write=write,
        summarise=summarise,
    )


@daily_asset(
    "bars_1d",
    group_name="raw",
    code_version="2",
    deps=["raw_ohlcv"],
    description="Daily bars resampled from ohlcv_1m (open first, high max, low min, close last, volume sum), "
    "stamped 23:59 UTC, in table ohlcv_1d.",
)
@translate_database_errors
def bars_1d(context: dg.AssetExecutionContext, store: FeatureStore) -> Iterator:
    provenance = InputProvenance.capture(context)
    materializations = []
    with store.engine().begin() as conn:
        for day in context.partition_keys:
            start, end = day_window(day)
            daily = daily_bars(read_bars(conn, start, end))
            replace_bars(conn, daily, start, end, timeframe="1d")
            summary = frame_summary(daily.drop("source_flags"))
            materializations.append((context.asset_key, day, summary, content_version(daily)))
    days = Judgement(accepted=list(context.partition_keys))
    yield from report_run(context, provenance, materializations, days, chained=False)
