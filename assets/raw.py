"""Raw inputs as they arrived: one-minute OHLCV bars per UTC day."""

import dagster as dg

from assets.metadata import frame_summary
from assets.partitions import BATCHED_BACKFILL, DAILY
from marketfs.sources import SourceFileError
from marketfs.store.bars import replace_bars
from pipelines.resources import FeatureStore, MarketData


@dg.asset(
    partitions_def=DAILY,
    backfill_policy=BATCHED_BACKFILL,
    group_name="raw",
    kinds={"postgres", "polars"},
    code_version="1",
    description="One-minute OHLCV bars (instrument_id, ts UTC, open, high, low, close, volume) in table ohlcv_1m.",
)
def raw_ohlcv(context: dg.AssetExecutionContext, store: FeatureStore, market_data: MarketData) -> dg.MaterializeResult:
    start, end = context.partition_time_window
    try:
        bars = market_data.bar_source().bars(start, end)
    except SourceFileError as exc:
        # Raised before any write: the table keeps what it had.
        raise dg.Failure(description=str(exc), metadata={"file": dg.MetadataValue.path(str(exc.path))}) from exc
    with store.engine().begin() as conn:
        written = replace_bars(conn, bars, start, end)
    context.log.info(f"wrote {written} bars for [{start}, {end})")
    return dg.MaterializeResult(metadata=frame_summary(bars))
