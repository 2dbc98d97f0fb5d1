"""Feature families: what a declared feature's parameters mean.

A feature set declares each feature as a family and parameters (``rsi(n=14)``); the family turns
them into everything else: the expression that computes it, the recursions whose state it carries,
its lookback, the formula in the catalog, the bounds its values can take (the gate's default), and
which quality flags explain a null. A new family is a ``Family`` here plus its math in
``market.py``, ``recursive.py`` or ``events.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from marketfs.features import market, recursive
from marketfs.features.flags import QualityFlag
from marketfs.features.recursive import Recursion

Params = dict[str, Any]
Bounds = tuple[float | None, float | None]

MARKET_NULL_REASONS = (QualityFlag.MISSING_OHLCV, QualityFlag.INSUFFICIENT_OHLCV, QualityFlag.COMPUTATION_ERROR)
OHLC = ("open", "high", "low", "close")


@dataclass(frozen=True)
class Family:
    name: str
    inputs: tuple[str, ...]
    lookback: Callable[[Params], int]  # bars of history needed, this bar included (TA-Lib lookback + 1)
    formula: Callable[[Params], str]
    # Market families: the feature's expression over valid bars (after ``recursions`` are attached).
    expr: Callable[[Params], pl.Expr] | None = None
    recursions: Callable[[Params], list[Recursion]] = lambda p: []
    bounds: Callable[[Params], Bounds] = lambda p: (None, None)
    bounds_why: Callable[[Params], str | None] = lambda p: None
    null_reasons: Callable[[Params], tuple[QualityFlag, ...]] = lambda p: MARKET_NULL_REASONS
    # Whether the value is in price units (an EMA, a band, a range): it changes scale with a split, and is
    # served in the units of its own bar; the others (returns, ratios, oscillators, z-scores) are scale-free.
    price_units: Callable[[Params], bool] = lambda p: False

    @property
    def is_events(self) -> bool:
        return self.name == "events"


def _z_bound(n: int) -> float:
    # A z-score of n samples against their own mean and sample std is bounded by (n-1)/sqrt(n).
    return math.ceil((n - 1) / math.sqrt(n) * 10) / 10


_OUTPUT = {
    "line": "line: EMA{fast}(close) - EMA{slow}(close)",
    "signal": "signal: EMA{signal} of the MACD line, seeded with the SMA of its first {signal} values",
    "hist": "histogram: MACD line - signal",
}

_EVENT_FORMULAS = {
    "event_count": "number of events with known_at - W <= published_at < known_at (known_at: the bar's close)",
    "sentiment_mean": "mean sentiment of those events",
    "sentiment_conf_mean": "mean confidence of those events",
    "sentiment_weighted": "sum(sentiment * confidence) / sum(confidence)",
    "sentiment_std": "sample std (ddof=1) of sentiment; null below 2 events",
}
_EVENT_BOUNDS: dict[str, tuple[Bounds, str | None]] = {
    "event_count": ((0, None), None),
    "sentiment_mean": ((-1, 1), None),
    "sentiment_weighted": ((-1, 1), None),
    "sentiment_conf_mean": ((0, 1), None),
    "sentiment_std": ((0, 1.42), "sample std of values in [-1, 1] is at most sqrt(2)"),
}
# Which flags explain a null event statistic: any other null is a defect the quality gate catches.
_EVENT_NULL_REASONS: dict[str, tuple[QualityFlag, ...]] = {
    "event_count": (),
    "sentiment_mean": (QualityFlag.NO_EVENTS, QualityFlag.COMPUTATION_ERROR),
    "sentiment_conf_mean": (QualityFlag.NO_EVENTS, QualityFlag.COMPUTATION_ERROR),
    "sentiment_weighted": (QualityFlag.NO_EVENTS, QualityFlag.LOW_SENTIMENT_CONFIDENCE, QualityFlag.COMPUTATION_ERROR),
    "sentiment_std": (QualityFlag.NO_EVENTS, QualityFlag.LOW_EVENT_COUNT, QualityFlag.COMPUTATION_ERROR),
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "returns",
            ("close",),
            lookback=lambda p: p["n"] + 1,
            formula=lambda p: f"close / close[-{p['n']}] - 1",
            expr=lambda p: market.returns(p["n"]),
        ),
        Family(
            "volatility",
            ("close",),
            lookback=lambda p: p["n"] + 1,
            formula=lambda p: (
                f"sample std (ddof=1) of the one-bar return over the last {p['n']} bars, this bar included"
            ),
            expr=lambda p: market.volatility(p["n"]),
            bounds=lambda p: (0, None),
        ),
        Family(
            "bollinger",
            ("close",),
            lookback=lambda p: p["n"],
            formula=lambda p: {
                "upper": f"SMA{p['n']}(close) + {p['k']:g} * population std{p['n']}(close) (TA-Lib BBANDS)",
                "lower": f"SMA{p['n']}(close) - {p['k']:g} * population std{p['n']}(close) (TA-Lib BBANDS)",
                "pct_b": f"(close - lower) / (upper - lower), bands of BBANDS({p['n']}, {p['k']:g})",
            }[p["output"]],
            expr=lambda p: market.bollinger(p["n"], p["k"], p["output"]),
            price_units=lambda p: p["output"] in ("upper", "lower"),
        ),
        Family(
            "volume_z",
            ("volume",),
            lookback=lambda p: p["n"],
            formula=lambda p: f"(volume - mean{p['n']}(volume)) / sample std{p['n']}(volume)",
            expr=lambda p: market.volume_z(p["n"]),
            bounds=lambda p: (-_z_bound(p["n"]), _z_bound(p["n"])),
            bounds_why=lambda p: (
                f"a {p['n']}-sample z-score with sample std is bounded by {p['n'] - 1}/sqrt({p['n']}) "
                f"= {(p['n'] - 1) / math.sqrt(p['n']):.3f}"
            ),
        ),
        Family(
            "rsi",
            ("close",),
            lookback=lambda p: p["n"] + 1,
            formula=lambda p: (
                f"TA-Lib RSI({p['n']}): 100*G/(G+L), G and L Wilder averages of gains and losses, "
                f"seeded with their {p['n']}-bar mean"
            ),
            expr=lambda p: recursive.rsi(p["n"]),
            recursions=lambda p: recursive.rsi_recursions(p["n"]),
            bounds=lambda p: (0, 100),
        ),
        Family(
            "macd",
            ("close",),
            lookback=lambda p: recursive.macd_first(p["slow"], p["signal"]) + 1,
            formula=lambda p: (
                f"TA-Lib MACD({p['fast']},{p['slow']},{p['signal']}) "
                + _OUTPUT[p["output"]].format(**p)
                + f"; EMAs seeded with SMAs aligned at bar {p['slow']}"
            ),
            expr=lambda p: recursive.macd(p["fast"], p["slow"], p["signal"], p["output"]),
            recursions=lambda p: recursive.macd_recursions(p["fast"], p["slow"], p["signal"]),
            price_units=lambda p: True,
        ),
        Family(
            "atr",
            OHLC,
            lookback=lambda p: p["n"] + 1,
            formula=lambda p: (
                f"TA-Lib ATR({p['n']}): Wilder average of true range, seeded with the mean of the first {p['n']}"
            ),
            expr=lambda p: recursive.atr(p["n"]),
            recursions=lambda p: recursive.atr_recursions(p["n"]),
            price_units=lambda p: True,
            bounds=lambda p: (0, None),
        ),
        Family(
            "ema_cross",
            ("close",),
            lookback=lambda p: max(p["fast"], p["slow"]),
            formula=lambda p: (
                f"TA-Lib EMA{p['fast']}(close) / EMA{p['slow']}(close) - 1, each EMA seeded with "
                "the SMA of its first closes"
            ),
            expr=lambda p: recursive.ema_cross(p["fast"], p["slow"]),
            recursions=lambda p: recursive.ema_cross_recursions(p["fast"], p["slow"]),
            bounds=lambda p: (-1, None),
        ),
        Family(
            "events",
            ("sentiment", "confidence", "published_at"),
            lookback=lambda p: 0,
            formula=lambda p: f"{_EVENT_FORMULAS[p['stat']]}, W = {p['window']}",
            bounds=lambda p: _EVENT_BOUNDS[p["stat"]][0],
            bounds_why=lambda p: _EVENT_BOUNDS[p["stat"]][1],
            null_reasons=lambda p: _EVENT_NULL_REASONS[p["stat"]],
        ),
    )
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown feature family {name!r}; known: {', '.join(FAMILIES)}") from None
