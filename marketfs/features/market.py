"""Market features over OHLCV bars that look at a fixed window of bars.

Each function returns expressions evaluated on valid bars sorted by (instrument_id, ts);
``.over("instrument_id")`` keeps instruments apart.
"""

from __future__ import annotations

import polars as pl

from marketfs.features.windows import window_mean, window_std

BY = "instrument_id"
close = pl.col("close")


def _ret(n: int) -> pl.Expr:
    return close / close.shift(n) - 1.0


def returns() -> dict[str, pl.Expr]:
    return {"ret_1": _ret(1).over(BY), "ret_5": _ret(5).over(BY)}


def volatility() -> dict[str, pl.Expr]:
    return {"vol_20": window_std(_ret(1), 20, ddof=1).over(BY)}


def bollinger(n: int = 20, k: float = 2.0) -> dict[str, pl.Expr]:
    # TA-Lib BBANDS: SMA middle band, population standard deviation (ddof=0).
    middle = window_mean(close, n)
    width = k * window_std(close, n, ddof=0)
    upper, lower = middle + width, middle - width
    return {
        "bb_upper": upper.over(BY),
        "bb_lower": lower.over(BY),
        "bb_pct_b": ((close - lower) / (upper - lower)).over(BY),
    }


def volume_z(n: int = 20) -> dict[str, pl.Expr]:
    volume = pl.col("volume")
    return {"volume_z_20": ((volume - window_mean(volume, n)) / window_std(volume, n, ddof=1)).over(BY)}
