"""Daily bars from one-minute bars."""

from __future__ import annotations

from datetime import timedelta

import polars as pl

from marketfs.features.compute import DAILY_STAMP_US, valid_bar
from marketfs.sources.base import BAR_SCHEMA


def daily_bars(minute_bars: pl.DataFrame) -> pl.DataFrame:
    """One bar per instrument and UTC day: open first, high max, low min, close last, volume sum.

    Built from valid minute bars only. Stamped with the day's last minute (23:59 UTC), so a daily
    vector at ts uses only minute bars with time <= ts. Source flags of the minute bars carry over.
    """
    if "source_flags" not in minute_bars.columns:
        minute_bars = minute_bars.with_columns(pl.lit([], pl.List(pl.String)).alias("source_flags"))
    return (
        minute_bars.filter(valid_bar())
        .sort("instrument_id", "ts")
        .group_by("instrument_id", pl.col("ts").dt.truncate("1d").alias("_day"), maintain_order=True)
        .agg(
            pl.col("open").first(),
            pl.col("high").max(),
            pl.col("low").min(),
            pl.col("close").last(),
            pl.col("volume").sum(),
            pl.col("source_flags").list.explode(keep_nulls=False, empty_as_null=False).unique().sort(),
        )
        .with_columns((pl.col("_day") + timedelta(microseconds=DAILY_STAMP_US)).alias("ts"))
        .select(*BAR_SCHEMA, "source_flags")
        .sort("instrument_id", "ts")
    )
