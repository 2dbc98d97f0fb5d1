"""Bars of a longer timeframe (5m, 1d) from one-minute bars."""

from __future__ import annotations

import polars as pl

from marketfs.features.compute import valid_bar
from marketfs.features.timeframes import timeframe as timeframe_spec
from marketfs.sources.base import BAR_SCHEMA


def resample(minute_bars: pl.DataFrame, timeframe: str) -> pl.DataFrame:
    """One bar per instrument and interval of ``timeframe``: open first, high max, low min, close last,
    volume sum, from valid minute bars only.

    Stamped with the interval's last minute (see ``timeframes.py``), so a vector at ts uses only
    minute bars with time <= ts. Source flags of the minute bars carry over.
    """
    spec = timeframe_spec(timeframe)
    if "source_flags" not in minute_bars.columns:
        minute_bars = minute_bars.with_columns(pl.lit([], pl.List(pl.String)).alias("source_flags"))
    return (
        minute_bars.filter(valid_bar())
        .sort("instrument_id", "ts")
        .group_by("instrument_id", pl.col("ts").dt.truncate(spec.step).alias("_bucket"), maintain_order=True)
        .agg(
            pl.col("open").first(),
            pl.col("high").max(),
            pl.col("low").min(),
            pl.col("close").last(),
            pl.col("volume").sum(),
            pl.col("source_flags").list.explode(keep_nulls=False, empty_as_null=False).unique().sort(),
        )
        .with_columns((pl.col("_bucket") + spec.stamp_offset).alias("ts"))
        .select(*BAR_SCHEMA, "source_flags")
        .sort("instrument_id", "ts")
    )


def daily_bars(minute_bars: pl.DataFrame) -> pl.DataFrame:
    """One bar per instrument and UTC day, stamped 23:59 UTC."""
    return resample(minute_bars, "1d")


def resampled_with_warmup(minute_bars: pl.DataFrame, timeframe: str, start, read_limit: int) -> pl.DataFrame:
    """``resample`` of a window's minute bars read with up to ``read_limit`` valid warm-up minute bars each.

    Where an instrument's warm-up read was cut at ``read_limit`` its first interval may be partial,
    so that bar is dropped: the warm-up then holds only whole intervals, as a stored bar table would.
    """
    warm = minute_bars.filter((pl.col("ts") < start) & valid_bar()).group_by("instrument_id").len()
    truncated = warm.filter(pl.col("len") >= read_limit).select("instrument_id")
    bars = resample(minute_bars, timeframe)
    first = (
        bars.filter(pl.col("ts") < start)
        .join(truncated, on="instrument_id", how="semi")
        .group_by("instrument_id")
        .agg(pl.col("ts").min())
    )
    return bars.join(first, on=["instrument_id", "ts"], how="anti").sort("instrument_id", "ts")
