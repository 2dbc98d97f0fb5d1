"""Market features over OHLCV bars that look at a fixed window of bars.

Each function returns an expression evaluated on valid bars sorted by (instrument_id, ts); values of
earlier bars are read through ``windows.lag``, which keeps instruments apart.
"""

from __future__ import annotations

import polars as pl

from marketfs.features.windows import lag, window_mean, window_std

close = pl.col("close")


def _ret(n: int) -> pl.Expr:
    return close / lag(close, n) - 1.0


def returns(n: int) -> pl.Expr:
    return _ret(n)


def volatility(n: int) -> pl.Expr:
    """Sample standard deviation (ddof=1) of one-bar returns over the last ``n`` bars."""
    return window_std(_ret(1), n, ddof=1)


def bollinger(n: int, k: float, output: str) -> pl.Expr:
    # TA-Lib BBANDS: SMA middle band, population standard deviation (ddof=0).
    middle = window_mean(close, n)
    width = k * window_std(close, n, ddof=0)
    upper, lower = middle + width, middle - width
    values = {"upper": upper, "lower": lower, "pct_b": (close - lower) / (upper - lower)}
    return values[output]


def volume_z(n: int) -> pl.Expr:
    volume = pl.col("volume")
    return (volume - window_mean(volume, n)) / window_std(volume, n, ddof=1)
