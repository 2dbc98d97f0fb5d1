"""Bars of a longer timeframe (5m, 1d) from one-minute bars."""

from __future__ import annotations

from datetime import timedelta

import polars as pl

from marketfs.calendars import Sessions
from marketfs.features.compute import valid_bar
from marketfs.features.flags import QualityFlag
from marketfs.features.timeframes import timeframe as timeframe_spec
from marketfs.sources.base import BAR_SCHEMA

MINUTE = timedelta(minutes=1)


def _ohlcv_of_group() -> list[pl.Expr]:
    """One bar of a time-sorted group of bars: open first, high max, low min, close last, volume sum, flags."""
    return [
        pl.col("open").first(),
        pl.col("high").max(),
        pl.col("low").min(),
        pl.col("close").last(),
        pl.col("volume").sum(),
        pl.col("source_flags").list.explode(keep_nulls=False, empty_as_null=False).unique().sort(),
    ]


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
        .agg(*_ohlcv_of_group())
        .with_columns((pl.col("_bucket") + spec.stamp_offset).alias("ts"))
        .select(*BAR_SCHEMA, "source_flags")
        .sort("instrument_id", "ts")
    )


def session_bars(minute_bars: pl.DataFrame, calendar: Sessions, partial_coverage: float = 0.9) -> pl.DataFrame:
    """One bar per instrument and session, from the valid minute bars inside the session ``[open, close)``.

    Open is the first minute's open after the session's open, close the last minute's close before its
    close: prints outside the session (pre-market, after-hours) are in no daily bar. Stamped at the
    session's last minute (close - 1 minute), so it is known at the close. A bar whose minutes span
    less than ``partial_coverage`` of the session (first minute's open to last minute's close) carries
    the source flag PARTIAL_SESSION: a feed that stopped at noon, or a single print.
    """
    if "source_flags" not in minute_bars.columns:
        minute_bars = minute_bars.with_columns(pl.lit([], pl.List(pl.String)).alias("source_flags"))
    valid = minute_bars.filter(valid_bar())
    if valid.is_empty():
        return pl.DataFrame(schema={**BAR_SCHEMA, "source_flags": pl.List(pl.String)})
    at = calendar.session_index(valid["ts"])
    inside = (
        valid.with_columns(
            calendar.days.gather(at).alias("session"),
            calendar.opens.gather(at).alias("_open"),
            calendar.closes.gather(at).alias("_close"),
        )
        .filter((pl.col("ts") >= pl.col("_open")) & (pl.col("ts") < pl.col("_close")))
        .sort("instrument_id", "ts")
    )
    length = (pl.col("_close") - pl.col("_open")).dt.total_microseconds()
    span = (pl.col("_last") + MINUTE - pl.col("_first")).dt.total_microseconds()
    partial = pl.when(span < length * partial_coverage).then(pl.lit([QualityFlag.PARTIAL_SESSION.value]))
    return (
        inside.group_by("instrument_id", "session", maintain_order=True)
        .agg(
            *_ohlcv_of_group(),
            pl.col("ts").min().alias("_first"),
            pl.col("ts").max().alias("_last"),
            pl.col("_open").first(),
            pl.col("_close").first(),
        )
        .with_columns(
            (pl.col("_close") - MINUTE).alias("ts"),
            pl.concat_list(pl.col("source_flags"), partial.otherwise(pl.lit([], pl.List(pl.String))))
            .list.unique()
            .list.sort()
            .alias("source_flags"),
        )
        .select(*BAR_SCHEMA, "source_flags")
        .sort("instrument_id", "ts")
    )


def daily_bars(minute_bars: pl.DataFrame) -> pl.DataFrame:
    """One bar per instrument and session of the active universe's calendar (see ``session_bars``)."""
    from marketfs.universe import active_universe

    universe = active_universe()
    return session_bars(minute_bars, universe.sessions, universe.partial_session_coverage)


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
