"""Indicators defined by a recursion (EMA, Wilder smoothing): RSI, MACD and ATR, as TA-Lib computes them.

TA-Lib seeds each recursion with a simple average at a fixed position of the series and then
smooths; the value at a bar therefore depends on the whole history. To get the same numbers
whether a day is computed alone or inside a backfill, the smoothed values at each day's last bar
are kept as *state* (table ``feature_state``) and the next day continues the recursion from there.
Continuing from the stored value gives bit-identical results to one pass over the whole history.

Positions (``_pos``) count valid bars from the instrument's first bar, 0-based; TA-Lib's first
outputs are at position 14 (RSI, ATR) and 33 (all three MACD outputs).
"""

from __future__ import annotations

import polars as pl

BY = "instrument_id"
POS = pl.col("_pos")

RSI_N, ATR_N = 14, 14
MACD_FAST, MACD_SLOW, MACD_SIGNAL = 12, 26, 9
MACD_FIRST = MACD_SLOW - 1 + MACD_SIGNAL - 1  # 33
# Positions needed before every recursion is seeded; with fewer bars of history there is no state yet.
SEED_BARS = MACD_FIRST + 1

STATE_COLUMNS: dict[str, pl.DataType] = {
    "ema_fast": pl.Float64(),
    "ema_slow": pl.Float64(),
    "macd_signal": pl.Float64(),
    "rsi_avg_gain": pl.Float64(),
    "rsi_avg_loss": pl.Float64(),
    "atr": pl.Float64(),
}


def _seeded_ewm(x: pl.Expr, alpha: float, seed_pos: int, seed: pl.Expr, state_column: str) -> pl.Expr:
    """Recursion y = ewm(x) started at ``seed_pos`` with ``seed`` (from scratch) or from the stored state.

    ``_state_pos`` is the position of the state bar for instruments continuing from state, else null.
    """
    state_pos = pl.col("_state_pos")
    start_pos = pl.coalesce(state_pos, pl.lit(seed_pos))
    start_val = pl.when(state_pos.is_not_null()).then(pl.col(f"_state_{state_column}")).otherwise(seed)
    series = pl.when(start_pos > POS).then(None).when(start_pos == POS).then(start_val).otherwise(x)
    return series.ewm_mean(alpha=alpha, adjust=False, ignore_nulls=True, min_samples=1).over(BY)


def _sma_at(x: pl.Expr, n: int) -> pl.Expr:
    # Only evaluated from scratch, where every series starts at position 0: identical in every run.
    return x.rolling_mean(window_size=n, min_samples=n).over(BY)


def state_exprs() -> dict[str, pl.Expr]:
    """The smoothed series themselves, keyed by state column (all but the MACD signal, which needs them)."""
    close = pl.col("close")
    prev_close = close.shift(1).over(BY)
    change = close - prev_close
    gain = pl.when(change > 0).then(change).otherwise(0.0)
    loss = pl.when(change < 0).then(-change).otherwise(0.0)
    high, low = pl.col("high"), pl.col("low")
    true_range = pl.max_horizontal(high - low, (high - prev_close).abs(), (low - prev_close).abs())
    true_range = pl.when(prev_close.is_null()).then(None).otherwise(true_range)

    fast_seed = _sma_at(close, MACD_FAST)  # at position 25: closes 14..25, as TA-Lib aligns the fast EMA
    slow_seed = _sma_at(close, MACD_SLOW)
    return {
        "ema_fast": _seeded_ewm(close, 2 / (MACD_FAST + 1), MACD_SLOW - 1, fast_seed, "ema_fast"),
        "ema_slow": _seeded_ewm(close, 2 / (MACD_SLOW + 1), MACD_SLOW - 1, slow_seed, "ema_slow"),
        "rsi_avg_gain": _seeded_ewm(gain, 1 / RSI_N, RSI_N, _sma_at(gain, RSI_N), "rsi_avg_gain"),
        "rsi_avg_loss": _seeded_ewm(loss, 1 / RSI_N, RSI_N, _sma_at(loss, RSI_N), "rsi_avg_loss"),
        "atr": _seeded_ewm(true_range, 1 / ATR_N, ATR_N, _sma_at(true_range, ATR_N), "atr"),
    }


def smoothed(name: str) -> pl.Expr:
    """The working column of a smoothed series (named like its state column, with a prefix)."""
    return pl.col(f"_s_{name}")


def signal_expr() -> pl.Expr:
    """EMA(9) of the MACD line, seeded with the mean of its first 9 values (positions 25..33)."""
    line = smoothed("ema_fast") - smoothed("ema_slow")
    return _seeded_ewm(line, 2 / (MACD_SIGNAL + 1), MACD_FIRST, _sma_at(line, MACD_SIGNAL), "macd_signal")


def feature_exprs() -> dict[str, pl.Expr]:
    """Features from the smoothed series, with TA-Lib's warm-up (null before its first output)."""
    gain, loss = smoothed("rsi_avg_gain"), smoothed("rsi_avg_loss")
    total = gain + loss
    rsi = pl.when(total == 0).then(0.0).otherwise(100.0 * gain / total)  # TA-Lib returns 0 when flat
    macd = smoothed("ema_fast") - smoothed("ema_slow")
    signal = smoothed("macd_signal")
    macd_ready = POS >= MACD_FIRST
    return {
        "rsi_14": pl.when(POS >= RSI_N).then(rsi),
        "macd": pl.when(macd_ready).then(macd),
        "macd_signal": pl.when(macd_ready).then(signal),
        "macd_hist": pl.when(macd_ready).then(macd - signal),
        "atr_14": pl.when(POS >= ATR_N).then(smoothed("atr")),
    }
