"""The bar timeframes feature sets can be computed at: their grid, where a bar is stamped, where bars come from.

The convention, once: **a bar is stamped at the open of its (last) minute, and a vector stamped ts
became known at ts + 1 minute, when that minute closed.** A minute bar 09:30 holds the trades of
09:30:00-09:30:59.999 and is known at 09:31. A bar of a resampled timeframe holds the valid minute
bars of its interval and is stamped with its last minute (09:30-09:34 -> 09:34; a daily bar holds
its session's minutes and is stamped with the session's last minute, 20:59 UTC for a 21:00 NYSE
close), so it too is known one minute after its stamp (09:35; the session's close). Events count up to that instant, and
a point-in-time join matches a vector only from that instant on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

MINUTE = timedelta(minutes=1)


@dataclass(frozen=True)
class Timeframe:
    name: str
    step: timedelta
    # Where the bars are read from: the stored table, and whether they are resampled on read.
    bar_table: str
    resample_on_read: bool
    # How many earlier daily partitions of bars a day's warm-up may reach back into (Dagster lineage).
    lookback_days: int
    # One bar per session of the universe's calendar, stamped at the session's last minute, instead of
    # a fixed grid of ``step`` (sessions differ in length: early closes, daylight saving time).
    per_session: bool = False

    @property
    def stamp_offset(self) -> timedelta:
        """Where in its interval a bar is stamped: the interval's start for minute bars, its last minute otherwise.

        For ``per_session`` timeframes the stamp is the session's last minute (``marketfs/calendars.py``)."""
        return timedelta(0) if self.step == MINUTE else self.step - MINUTE

    @property
    def available_after(self) -> timedelta:
        """How long after its stamp a bar, and a vector computed from it, is known: its last minute's close."""
        return MINUTE

    @property
    def step_us(self) -> int:
        return self.step // timedelta(microseconds=1)

    @property
    def stamp_offset_us(self) -> int:
        return self.stamp_offset // timedelta(microseconds=1)

    @property
    def minutes(self) -> int:
        return self.step // MINUTE


TIMEFRAMES: dict[str, Timeframe] = {
    tf.name: tf
    for tf in (
        # Warm-up is read by bar count (compute.warmup_bars); lookback_days only need to cover it:
        # ~40 minute bars fit in the previous trading day (4 days span a long weekend), 40 five-minute
        # bars in two, 40 daily bars in 60 sessions.
        Timeframe("1m", MINUTE, "ohlcv_1m", False, lookback_days=4),
        Timeframe("5m", 5 * MINUTE, "ohlcv_1m", True, lookback_days=4),
        Timeframe("1d", timedelta(days=1), "ohlcv_1d", False, lookback_days=60, per_session=True),
    )
}


def timeframe(name: str) -> Timeframe:
    try:
        return TIMEFRAMES[name]
    except KeyError:
        raise KeyError(f"unknown timeframe {name!r}; known: {', '.join(TIMEFRAMES)}") from None
