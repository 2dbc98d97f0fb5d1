"""Indicators defined by a recursion (EMA, Wilder smoothing): RSI, MACD, ATR and EMA, as TA-Lib computes them.

TA-Lib seeds each recursion with a simple average at a fixed position of the series and then
smooths; the value at a bar therefore depends on the whole history. To get the same numbers
whether a day is computed alone or inside a backfill, the smoothed values at each day's last bar
are kept as *state* (table ``feature_state``, one column per recursion) and the next day continues
the recursion from there. Continuing from the stored value gives bit-identical results to one pass
over the whole history.

Positions (``_pos``) count valid bars from the instrument's first bar, 0-based; TA-Lib's first
outputs are at position n (RSI(n), ATR(n)), n - 1 (EMA(n)) and slow + signal - 2 (MACD).
Each recursion is named by its indicator and parameters (``rsi14_avg_gain``), so feature sets that
share an indicator share its state column, and one with other parameters gets its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from marketfs.features.windows import lag

BY = "instrument_id"
POS = pl.col("_pos")


@dataclass(frozen=True)
class Recursion:
    """y[seed_pos] = seed, y[i] = y[i-1] + alpha * (x[i] - y[i-1]); stored as state column ``key``."""

    key: str
    alpha: float
    seed_pos: int
    x: pl.Expr
    seed: pl.Expr
    after: tuple[str, ...] = ()  # recursions whose smoothed series x or seed read

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recursion) and other.key == self.key


def smoothed(key: str) -> pl.Expr:
    """The working column of a recursion's smoothed series."""
    return pl.col(f"_s_{key}")


def seeded_ewm(recursion: Recursion) -> pl.Expr:
    """The recursion started at its seed position (from scratch) or continued from the stored state.

    ``_state_pos`` is the position of the state bar for instruments continuing from state, else null.
    """
    state_pos = pl.col("_state_pos")
    start_pos = pl.coalesce(state_pos, pl.lit(recursion.seed_pos))
    start_val = pl.when(state_pos.is_not_null()).then(pl.col(f"_state_{recursion.key}")).otherwise(recursion.seed)
    series = pl.when(start_pos > POS).then(None).when(start_pos == POS).then(start_val).otherwise(recursion.x)
    return series.ewm_mean(alpha=recursion.alpha, adjust=False, ignore_nulls=True, min_samples=1).over(BY)


def _sma_at(x: pl.Expr, n: int) -> pl.Expr:
    # Only evaluated from scratch, where every series starts at position 0: identical in every run.
    return x.rolling_mean(window_size=n, min_samples=n).over(BY)


def _changes() -> tuple[pl.Expr, pl.Expr]:
    close = pl.col("close")
    change = close - lag(close, 1)
    return pl.when(change > 0).then(change).otherwise(0.0), pl.when(change < 0).then(-change).otherwise(0.0)


def seed_bars(recursions: list[Recursion]) -> int:
    """Bars of history before every recursion is seeded; with fewer there is no usable state yet."""
    return max((r.seed_pos + 1 for r in recursions), default=0)


def apply(frame: pl.DataFrame, recursions: list[Recursion]) -> pl.DataFrame:
    """``frame`` with each recursion's smoothed series attached, dependencies first."""
    done: set[str] = set()
    pending = list(dict.fromkeys(recursions))
    while pending:
        ready = [r for r in pending if set(r.after) <= done]
        if not ready:
            raise ValueError(f"recursions {[r.key for r in pending]} depend on ones not declared")
        frame = frame.with_columns(**{f"_s_{r.key}": seeded_ewm(r) for r in ready})
        done |= {r.key for r in ready}
        pending = [r for r in pending if r.key not in done]
    return frame


# --- RSI --------------------------------------------------------------------------------------


def rsi_recursions(n: int) -> list[Recursion]:
    gain, loss = _changes()
    return [
        Recursion(f"rsi{n}_avg_gain", 1 / n, n, gain, _sma_at(gain, n)),
        Recursion(f"rsi{n}_avg_loss", 1 / n, n, loss, _sma_at(loss, n)),
    ]


def rsi(n: int) -> pl.Expr:
    gain, loss = smoothed(f"rsi{n}_avg_gain"), smoothed(f"rsi{n}_avg_loss")
    total = gain + loss
    value = pl.when(total == 0).then(0.0).otherwise(100.0 * gain / total)  # TA-Lib returns 0 when flat
    return pl.when(n <= POS).then(value)


# --- MACD -------------------------------------------------------------------------------------


def macd_first(slow: int, signal: int) -> int:
    """Position of MACD's first output: the signal EMA is seeded there."""
    return slow - 1 + signal - 1


def macd_recursions(fast: int, slow: int, signal: int) -> list[Recursion]:
    close = pl.col("close")
    key = f"macd{fast}_{slow}_{signal}"
    # TA-Lib aligns both EMAs at position slow - 1: the fast one is seeded with the mean of the `fast`
    # closes ending there, not at its own position fast - 1.
    line = smoothed(f"{key}_fast") - smoothed(f"{key}_slow")
    return [
        Recursion(f"{key}_fast", 2 / (fast + 1), slow - 1, close, _sma_at(close, fast)),
        Recursion(f"{key}_slow", 2 / (slow + 1), slow - 1, close, _sma_at(close, slow)),
        Recursion(
            f"{key}_signal",
            2 / (signal + 1),
            macd_first(slow, signal),
            line,
            _sma_at(line, signal),
            after=(f"{key}_fast", f"{key}_slow"),
        ),
    ]


def macd(fast: int, slow: int, signal: int, output: str) -> pl.Expr:
    key = f"macd{fast}_{slow}_{signal}"
    line = smoothed(f"{key}_fast") - smoothed(f"{key}_slow")
    values = {"line": line, "signal": smoothed(f"{key}_signal"), "hist": line - smoothed(f"{key}_signal")}
    return pl.when(macd_first(slow, signal) <= POS).then(values[output])


# --- ATR --------------------------------------------------------------------------------------


def atr_recursions(n: int) -> list[Recursion]:
    high, low = pl.col("high"), pl.col("low")
    prev_close = lag(pl.col("close"), 1)
    true_range = pl.max_horizontal(high - low, (high - prev_close).abs(), (low - prev_close).abs())
    true_range = pl.when(prev_close.is_null()).then(None).otherwise(true_range)
    return [Recursion(f"atr{n}", 1 / n, n, true_range, _sma_at(true_range, n))]


def atr(n: int) -> pl.Expr:
    return pl.when(n <= POS).then(smoothed(f"atr{n}"))


# --- EMA crossover ----------------------------------------------------------------------------


def ema_recursions(n: int) -> list[Recursion]:
    close = pl.col("close")
    # TA-Lib EMA(n): seeded with the mean of the first n closes, at position n - 1.
    return [Recursion(f"ema{n}", 2 / (n + 1), n - 1, close, _sma_at(close, n))]


def ema_cross_recursions(fast: int, slow: int) -> list[Recursion]:
    return ema_recursions(fast) + ema_recursions(slow)


def ema_cross(fast: int, slow: int) -> pl.Expr:
    return pl.when(max(fast, slow) - 1 <= POS).then(smoothed(f"ema{fast}") / smoothed(f"ema{slow}") - 1.0)
