"""Corporate actions: splits and cash dividends, and the price factors that put a history on one scale.

Raw bars stay as delivered. A window that reaches back across an ex-date sees the earlier bars scaled, as
Zipline's adjusted arrays do: prices divided by the split ratio, volumes multiplied by it. Here that is one
normalisation per instrument, independent of which window is computed: each bar's prices are multiplied by
``F``, the product of the price ratios of the instrument's actions whose ex-date is on or before the bar's
trading day (volume divided by the volume ratios' product). The series is then continuous in the units of the
instrument's earliest bar, so every scale-free feature (returns, RSI, %b, volume z) is the one of the same
series without the action, and recursion state carried from day to day is in those units too: a day computed
alone, a whole range and an intraday step continue the same numbers bit for bit. Features in price units
(MACD, ATR, Bollinger bands) are divided by the vector's own ``F`` on the way out: post-action units.

An action applies to every computation once it is stored; a correction is a row of the same (instrument, ex-date,
kind) known later (``known_at``), and replaces it.
Cash dividends adjust only feature sets declared total-return (``FeatureSet.returns``): the factor
``close / (close - amount)`` of the last close before the ex-date, applied to prices like a split.

Pure: polars in, polars out. The store (``marketfs/store/corporate_actions.py``) reads and writes them.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

SPLIT, CASH_DIVIDEND = "split", "cash_dividend"
KINDS = (SPLIT, CASH_DIVIDEND)
ACTION_SCHEMA: dict[str, pl.DataType] = {
    "instrument_id": pl.String(),
    "ex_date": pl.Date(),
    "kind": pl.String(),
    "ratio": pl.Float64(),
    "known_at": pl.Datetime("us", "UTC"),
}
ACTION_KEY = ("instrument_id", "ex_date", "kind", "known_at")
# What a computation applies: one row per action in effect, with the instant its trading day starts.
FACTOR_SCHEMA: dict[str, pl.DataType] = {
    "instrument_id": pl.String(),
    "ex_ts": pl.Datetime("us", "UTC"),
    "price_ratio": pl.Float64(),
    "volume_ratio": pl.Float64(),
}
# The last close before each dividend's ex-date: what a total-return factor is taken from.
CLOSE_SCHEMA: dict[str, pl.DataType] = {"instrument_id": pl.String(), "ex_date": pl.Date(), "close": pl.Float64()}
PRICE_COLUMNS = ("open", "high", "low", "close")
ADJ = "_adj"  # each bar's price factor F, kept on the frame so price-unit outputs can be put back


def in_effect(actions: pl.DataFrame, at: datetime | None = None) -> pl.DataFrame:
    """The actions known at ``at`` (every one when None): per (instrument, ex-date, kind), the row known last."""
    if at is not None:
        actions = actions.filter(pl.col("known_at") <= at)
    return (
        actions.sort("known_at")
        .group_by("instrument_id", "ex_date", "kind", maintain_order=True)
        .last()
        .sort("instrument_id", "ex_date", "kind")
    )


def factors(actions: pl.DataFrame, sessions, *, total_return: bool, closes: pl.DataFrame | None = None) -> pl.DataFrame:
    """``FACTOR_SCHEMA`` rows of the actions in effect (``in_effect`` applied by the caller).

    ``closes`` (instrument_id, ex_date, close): the last close before each dividend's ex-date, which a
    total-return factor needs; a dividend without one, or not below it, adjusts nothing (a gate flags the
    jump if the price moved).
    """
    if actions.is_empty():
        return pl.DataFrame(schema=FACTOR_SCHEMA)
    splits = actions.filter(pl.col("kind") == SPLIT).select(
        "instrument_id", "ex_date", pl.col("ratio").alias("price_ratio"), pl.col("ratio").alias("volume_ratio")
    )
    parts = [splits]
    if total_return:
        dividends = actions.filter(pl.col("kind") == CASH_DIVIDEND)
        if dividends.height:
            with_close = dividends.join(
                closes if closes is not None else pl.DataFrame(schema=CLOSE_SCHEMA),
                on=["instrument_id", "ex_date"],
                how="left",
            )
            parts.append(
                with_close.filter(pl.col("close").is_not_null() & (pl.col("ratio") < pl.col("close"))).select(
                    "instrument_id",
                    "ex_date",
                    (pl.col("close") / (pl.col("close") - pl.col("ratio"))).alias("price_ratio"),
                    pl.lit(1.0).alias("volume_ratio"),
                )
            )
    chosen = pl.concat(parts).filter(pl.col("price_ratio") > 0)
    if chosen.is_empty():
        return pl.DataFrame(schema=FACTOR_SCHEMA)
    days = chosen["ex_date"].unique().sort()
    starts = pl.DataFrame(
        {"ex_date": days, "ex_ts": [sessions.trading_day_window(d)[0] for d in days.to_list()]},
        schema={"ex_date": pl.Date(), "ex_ts": pl.Datetime("us", "UTC")},
    )
    return (
        chosen.join(starts, on="ex_date", how="left")
        .select(list(FACTOR_SCHEMA))
        # Two actions of one instrument on one ex-date (a split and a dividend) multiply in a fixed order.
        .sort("instrument_id", "ex_ts", "price_ratio", "volume_ratio")
    )


def adjust(bars: pl.DataFrame, factors: pl.DataFrame) -> pl.DataFrame:
    """``bars`` (sorted by instrument_id, ts) on the scale of each instrument's earliest bar, with ``_adj``.

    Without factors the bars are returned as they are, with ``_adj`` = 1, so a history with no action is
    computed from exactly the delivered values.
    """
    if factors.is_empty() or bars.is_empty():
        return bars.with_columns(pl.lit(1.0).alias(ADJ))
    cumulative = (
        factors.sort("instrument_id", "ex_ts", "price_ratio", "volume_ratio")
        .with_columns(
            pl.col("price_ratio").cum_prod().over("instrument_id").alias(ADJ),
            pl.col("volume_ratio").cum_prod().over("instrument_id").alias("_vadj"),
        )
        .group_by("instrument_id", "ex_ts", maintain_order=True)
        .last()
        .select("instrument_id", "ex_ts", ADJ, "_vadj")
    )
    joined = bars.join_asof(
        cumulative, left_on="ts", right_on="ex_ts", by="instrument_id", strategy="backward", check_sortedness=False
    ).with_columns(pl.col(ADJ).fill_null(1.0), pl.col("_vadj").fill_null(1.0))
    return joined.with_columns(
        *[(pl.col(c) * pl.col(ADJ)).alias(c) for c in PRICE_COLUMNS],
        (pl.col("volume") / pl.col("_vadj")).alias("volume"),
    ).drop("ex_ts", "_vadj")


def observed_ratio(open_price: float, previous_close: float) -> str:
    """How a person reads an overnight jump: the price move, and the split ratio that would explain it."""
    move = open_price / previous_close
    return f"x{move:.4f} overnight ({previous_close:g} -> {open_price:g}; as a split, ratio {1 / move:.4g})"
