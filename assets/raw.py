"""Raw inputs as they arrived, and what is derived from them alone: minute bars, news events, daily bars."""

from collections.abc import Callable
from datetime import datetime

import dagster as dg
import polars as pl

from assets.gates import partition_label, record_and_enforce
from assets.metadata import frame_summary
from assets.partitions import DAILY_WRITER
from marketfs.features.resample import daily_bars
from marketfs.sources import SourceFileError
from marketfs.sources.normalize import normalize_bars, normalize_events
from marketfs.store.bars import read_bars, replace_bars
from marketfs.store.events import replace_events
from pipelines.resources import FeatureStore, MarketData, translate_database_errors

GATE_CHECK = "quality_gate"


def _gate_spec(asset: str) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            GATE_CHECK,
            asset=asset,
            blocking=True,
            description=f"Great Expectations suite expectations/suites/{asset}.json on the delivered rows; "
            "a breach quarantines the delivery and blocks the write.",
        )
    ]


def _gate(context: dg.AssetExecutionContext, store: FeatureStore, delivered, table: str):
    from expectations.docs import DataDocs
    from expectations.gate import validate_frame

    asset = context.asset_key.to_user_string()
    gate = validate_frame(
        delivered,
        asset,
        docs=DataDocs.default(),
        batch_label=f"{asset}-{partition_label(context)}",
        run_name=context.run_id,
    )
    yield from record_and_enforce(context, store, checks={GATE_CHECK: [gate]}, rows={table: delivered})


def _delivered(fetch: Callable[[datetime, datetime], pl.DataFrame], start: datetime, end: datetime) -> pl.DataFrame:
    """What the source delivers for the window; a bad file fails the run before anything is written."""
    try:
        return fetch(start, end)
    except SourceFileError as exc:
        raise dg.Failure(
            description=str(exc), metadata={"file": dg.MetadataValue.path(str(exc.path))}, allow_retries=False
        ) from exc


@dg.asset(
    **DAILY_WRITER,
    group_name="raw",
    code_version="2",
    description="One-minute OHLCV bars (instrument_id, ts UTC, open, high, low, close, volume) in table ohlcv_1m.",
    check_specs=_gate_spec("raw_ohlcv"),
)
@translate_database_errors
def raw_ohlcv(context: dg.AssetExecutionContext, store: FeatureStore, market_data: MarketData):
    start, end = context.partition_time_window
    delivered = _delivered(market_data.bar_source().bars, start, end)
    yield from _gate(context, store, delivered, "ohlcv_1m")
    bars = normalize_bars(delivered)
    with store.engine().begin() as conn:
        replace_bars(conn, bars, start, end)
    metadata = frame_summary(bars.drop("source_flags"))
    metadata["delivered_rows"] = dg.MetadataValue.int(delivered.height)
    metadata["flag_TIMESTAMP_MISMATCH"] = dg.MetadataValue.int(int(bars["source_flags"].list.len().gt(0).sum()))
    yield dg.MaterializeResult(metadata=metadata)


@dg.asset(
    **DAILY_WRITER,
    group_name="raw",
    code_version="1",
    description="News events (event_id, instrument_id, published_at UTC, sentiment, confidence, source) "
    "in table news_events, partitioned by publication day; each event_id kept once.",
    check_specs=_gate_spec("raw_events"),
)
@translate_database_errors
def raw_events(context: dg.AssetExecutionContext, store: FeatureStore, market_data: MarketData):
    start, end = context.partition_time_window
    delivered = _delivered(market_data.event_source().events, start, end)
    yield from _gate(context, store, delivered, "news_events")
    events = normalize_events(delivered)
    with store.engine().begin() as conn:
        written = replace_events(conn, events, start, end)
    metadata = frame_summary(events.rename({"published_at": "ts"}))
    metadata["delivered_rows"] = dg.MetadataValue.int(delivered.height)
    metadata["duplicates_dropped"] = dg.MetadataValue.int(delivered.height - written)
    yield dg.MaterializeResult(metadata=metadata)


@dg.asset(
    **DAILY_WRITER,
    group_name="raw",
    code_version="1",
    deps=[raw_ohlcv],
    description="Daily bars resampled from ohlcv_1m (open first, high max, low min, close last, volume sum), "
    "stamped 23:59 UTC, in table ohlcv_1d.",
)
@translate_database_errors
def bars_1d(context: dg.AssetExecutionContext, store: FeatureStore) -> dg.MaterializeResult:
    start, end = context.partition_time_window
    with store.engine().begin() as conn:
        daily = daily_bars(read_bars(conn, start, end))
        replace_bars(conn, daily, start, end, timeframe="1d")
    return dg.MaterializeResult(metadata=frame_summary(daily.drop("source_flags")))
