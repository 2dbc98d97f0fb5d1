"""Market features over OHLCV bars.

Each function returns an expression evaluated on a frame sorted by (instrument_id, ts) that holds
one instrument's bars per group; ``.over("instrument_id")`` keeps instruments apart.
"""

from __future__ import annotations

import polars as pl

BY = "instrument_id"


def _ret(n: int) -> pl.Expr:
    return pl.col("close") / pl.col("close").shift(n) - 1.0


def ret_1() -> pl.Expr:
    return _ret(1).over(BY)


def ret_5() -> pl.Expr:
    return _ret(5).over(BY)


def vol_20() -> pl.Expr:
    return _ret(1).rolling_std(window_size=20, min_samples=20, ddof=1).over(BY)
