"""Quality flags carried by every feature vector, what each one means, and their thresholds."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path

import polars as pl

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "quality_flags.toml"


class QualityFlag(StrEnum):
    MISSING_OHLCV = "MISSING_OHLCV"
    INSUFFICIENT_OHLCV = "INSUFFICIENT_OHLCV"
    NO_EVENTS = "NO_EVENTS"
    LOW_EVENT_COUNT = "LOW_EVENT_COUNT"
    LOW_SENTIMENT_CONFIDENCE = "LOW_SENTIMENT_CONFIDENCE"
    TIMESTAMP_MISMATCH = "TIMESTAMP_MISMATCH"
    PARTIAL_SESSION = "PARTIAL_SESSION"
    GAP = "GAP"
    UNEXPLAINED_JUMP = "UNEXPLAINED_JUMP"
    COMPUTATION_ERROR = "COMPUTATION_ERROR"


FLAG_MEANINGS: dict[QualityFlag, str] = {
    QualityFlag.MISSING_OHLCV: (
        "No usable bar at ts for this instrument (absent from the source, or with a non-finite, zero or "
        "negative price, or high < low) while other instruments have one: market features are null, "
        "nothing was computed from data for them."
    ),
    QualityFlag.INSUFFICIENT_OHLCV: (
        "Fewer valid bars of history (this bar included) than at least one feature's lookback; those features are null."
    ),
    QualityFlag.NO_EVENTS: "No news event in the window; the sentiment features are null.",
    QualityFlag.LOW_EVENT_COUNT: "Fewer events in the window than `low_event_count` (but at least one).",
    QualityFlag.LOW_SENTIMENT_CONFIDENCE: "Mean confidence of the window's events below `low_sentiment_confidence`.",
    QualityFlag.TIMESTAMP_MISMATCH: (
        "The bar's ts is off the timeframe's grid, or the source delivered it more than once with other "
        "values (the last delivery is kept)."
    ),
    QualityFlag.PARTIAL_SESSION: (
        "Daily bars: the session's minute bars span less than `partial_session_coverage` of the session "
        "(marketfs/config/universes.toml), e.g. a feed that stopped early or a single print; its volume and "
        "range understate the day."
    ),
    QualityFlag.GAP: (
        "The instrument's history restarts after a declared gap (sessions missing for good: `run --allow-gap`, a "
        "discarded batch, a trading halt): its windows and recursions start again after it, and until they are "
        "warm again its vectors carry GAP beside INSUFFICIENT_OHLCV. No value spans the gap."
    ),
    QualityFlag.UNEXPLAINED_JUMP: (
        "The instrument opened its trading day beyond `unexplained_jump` of its last close (as a fraction, either "
        "way, on the scale the known corporate actions give) and no corporate action explains it: a split or "
        "dividend delivered without its action, a bad opening print, or a real move. Set on that day's vectors "
        "whose windows hold the jump; the gate holds the instrument-day until a person delivers the action "
        "(corporate_actions/) or releases the batch (docs/corporate_actions.md)."
    ),
    QualityFlag.COMPUTATION_ERROR: "A feature came out non-finite (inf or NaN); it is stored as null.",
}


@dataclass(frozen=True)
class FlagConfig:
    """The thresholds, as declared in ``marketfs/config/quality_flags.toml`` (the only place they are)."""

    low_event_count: int
    low_sentiment_confidence: float
    stale_after: dict[str, timedelta]
    unexplained_jump: float = 0.25

    def stale_after_for(self, timeframe: str) -> timedelta:
        try:
            return self.stale_after[timeframe]
        except KeyError:
            raise ValueError(
                f"no stale_after for timeframe {timeframe!r} in the quality flag configuration. "
                f'Fix: add {timeframe} = "<duration>" under [stale_after] in {DEFAULT_CONFIG}'
            ) from None


def _duration(text: str) -> timedelta:
    units = {"m": "minutes", "h": "hours", "d": "days"}
    return timedelta(**{units[text[-1]]: float(text[:-1])})


def load_flag_config(path: Path | None = None) -> FlagConfig:
    """The packaged thresholds, overridden key by key by ``path`` or ``$MARKETFS_QUALITY_CONFIG``; a bad
    file names the key."""
    path = path or Path(os.environ.get("MARKETFS_QUALITY_CONFIG", DEFAULT_CONFIG))
    try:
        data = tomllib.loads(DEFAULT_CONFIG.read_text())
        if path != DEFAULT_CONFIG:
            override = tomllib.loads(path.read_text())
            data = {**data, **override, "stale_after": {**data["stale_after"], **override.get("stale_after", {})}}
        return FlagConfig(
            low_event_count=int(data["low_event_count"]),
            low_sentiment_confidence=float(data["low_sentiment_confidence"]),
            stale_after={k: _duration(v) for k, v in data["stale_after"].items()},
            unexplained_jump=_positive(float(data["unexplained_jump"]), "unexplained_jump"),
        )
    except (OSError, tomllib.TOMLDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: quality flag configuration is invalid ({exc}). Fix: see marketfs/config/quality_flags.toml"
        ) from exc


def _positive(value: float, key: str) -> float:
    if not value > 0:
        raise ValueError(f"{key} = {value} must be above 0")
    return value


def flag_if(condition: pl.Expr, flag: QualityFlag) -> pl.Expr:
    """A one-element list holding ``flag`` where ``condition`` holds, else an empty list."""
    return pl.when(condition).then(pl.lit([flag.value])).otherwise(pl.lit([], pl.List(pl.String)))


def unexplained_nulls(features: list[tuple[str, tuple[QualityFlag, ...]]]) -> pl.Expr:
    """Per vector, how many of ``features`` ((name, flags that explain its null) pairs) are null with
    no flag that explains it."""
    flags = pl.col("quality_flags")
    terms = []
    for name, reasons in features:
        explained = pl.any_horizontal([flags.list.contains(r.value) for r in reasons]) if reasons else pl.lit(False)
        terms.append((pl.col(name).is_null() & ~explained).cast(pl.Int32))
    return pl.sum_horizontal(terms) if terms else pl.lit(0)
