"""Deterministic synthetic one-minute bars, for the demo, tests and benchmarks.

Each (instrument, day) is generated from its own seed, so any partition comes out the same
whether it is generated alone or inside a range, and in any order. Bars follow the sessions of the
universe's calendar (``marketfs/calendars.py``): none on holidays, fewer on early closes, the open
moving with daylight saving time. Before ``minutes_from`` the source delivers daily bars only (made
from the same minutes), as a vendor's history does: the sample's 1d features get their warm-up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl

from marketfs.calendars import Sessions
from marketfs.features.events import EVENT_SCHEMA
from marketfs.sources.base import BAR_SCHEMA
from marketfs.universe import active_sessions

SESSION_OPEN_UTC = timedelta(hours=14, minutes=30)  # where events cluster: 09:30 New York in winter
BARS_PER_DAY = 390  # a regular NYSE session; generated always, cut to the session's length


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def trading_days(start: datetime, end: datetime) -> list[date]:
    """Weekdays whose session falls in ``[start, end)`` (the events' days: news does not stop on holidays)."""
    day = start.date()
    days = []
    while datetime.combine(day, datetime.min.time(), UTC) < end:
        if day.weekday() < 5:
            days.append(day)
        day += timedelta(days=1)
    return days


@dataclass(frozen=True)
class SyntheticBars:
    instruments: tuple[str, ...] = tuple(f"SYN{i:03d}" for i in range(10))
    seed: int = 7
    drop_rate: float = 0.005  # share of bars missing, as in real feeds
    minute_vol: float = 0.0008
    minutes_from: date = date.min  # sessions before it deliver daily bars only (see `daily`)
    calendar: Sessions | None = None  # default: the active universe's

    @property
    def sessions(self) -> Sessions:
        return self.calendar or active_sessions()

    def bars(self, start: datetime, end: datetime) -> pl.DataFrame:
        days = [d for d in self.sessions.trading_days_overlapping(start, end) if d >= self.minutes_from]
        frames = [self._day(instrument, day) for day in days for instrument in self.instruments]
        if not frames:
            return pl.DataFrame(schema=BAR_SCHEMA)
        out = pl.concat(frames)
        return out.filter((pl.col("ts") >= start) & (pl.col("ts") < end)).sort("instrument_id", "ts")

    def daily(self, start: datetime, end: datetime) -> pl.DataFrame:
        """Daily bars of the sessions before ``minutes_from`` in ``[start, end)``, stamped at each session's last
        minute: the minutes of the day as ``bars`` would make them, aggregated over the session."""
        from marketfs.features.resample import session_bars

        days = [d for d in self.sessions.trading_days_overlapping(start, end) if d < self.minutes_from]
        if not days:
            return pl.DataFrame(schema=BAR_SCHEMA)
        minutes = pl.concat([self._day(i, d) for d in days for i in self.instruments])
        daily = session_bars(minutes, self.sessions).select(list(BAR_SCHEMA))
        return daily.filter((pl.col("ts") >= start) & (pl.col("ts") < end)).sort("instrument_id", "ts")

    def _day(self, instrument: str, day: date) -> pl.DataFrame:
        rng = np.random.default_rng(_seed(self.seed, instrument, day.isoformat()))
        inst_rng = np.random.default_rng(_seed(self.seed, instrument))
        base = 20.0 + 180.0 * inst_rng.random()
        phase = 2 * np.pi * inst_rng.random()
        level = base * np.exp(0.15 * np.sin(2 * np.pi * day.toordinal() / 250 + phase) + 0.01 * rng.standard_normal())
        log_path = np.cumsum(rng.standard_normal(BARS_PER_DAY) * self.minute_vol)
        close = level * np.exp(log_path)
        open_ = np.concatenate([[level], close[:-1]])
        wick = np.abs(rng.standard_normal((2, BARS_PER_DAY))) * self.minute_vol * 0.5
        high = np.maximum(open_, close) * (1 + wick[0])
        low = np.minimum(open_, close) * (1 - wick[1])
        volume = np.round(rng.lognormal(mean=7.0, sigma=0.6, size=BARS_PER_DAY))
        session_start, session_close = self.sessions.bounds(day)
        keep = rng.random(BARS_PER_DAY) >= self.drop_rate
        ts = pl.datetime_range(
            session_start, session_start + timedelta(minutes=BARS_PER_DAY - 1), "1m", eager=True, time_zone="UTC"
        )
        frame = pl.DataFrame(
            {
                "instrument_id": [instrument] * BARS_PER_DAY,
                "ts": ts,
                "open": open_,
                "high": high,
                "low": low,
                "close": close,
                "volume": volume,
            },
            schema=BAR_SCHEMA,
        )
        return frame.filter(pl.Series(keep) & (pl.col("ts") < session_close))


@dataclass(frozen=True)
class SyntheticEvents:
    """About ``per_day`` news events per instrument and weekday, most of them during the session."""

    instruments: tuple[str, ...] = tuple(f"SYN{i:03d}" for i in range(10))
    seed: int = 7
    per_day: int = 20

    def events(self, start: datetime, end: datetime) -> pl.DataFrame:
        frames = [self._day(i, d) for d in trading_days(start, end) for i in self.instruments]
        if not frames:
            return pl.DataFrame(schema=EVENT_SCHEMA)
        out = pl.concat(frames)
        return out.filter((pl.col("published_at") >= start) & (pl.col("published_at") < end)).sort(
            "instrument_id", "published_at", "event_id"
        )

    def _day(self, instrument: str, day: date) -> pl.DataFrame:
        rng = np.random.default_rng(_seed(self.seed, "events", instrument, day.isoformat()))
        n = int(rng.poisson(self.per_day))
        midnight = datetime.combine(day, datetime.min.time(), UTC)
        in_session = rng.random(n) < 0.6
        session_s = SESSION_OPEN_UTC.total_seconds() + rng.random(n) * BARS_PER_DAY * 60
        offsets = np.where(in_session, session_s, rng.random(n) * 86_400)
        published = (
            pl.Series(np.datetime64(midnight.replace(tzinfo=None), "us") + (offsets * 1e6).astype("timedelta64[us]"))
            .dt.truncate("1s")
            .dt.replace_time_zone("UTC")
        )
        return pl.DataFrame(
            {
                "event_id": [f"{instrument}-{day.isoformat()}-{i:03d}" for i in range(n)],
                "instrument_id": [instrument] * n,
                "published_at": published,
                "sentiment": np.tanh(rng.normal(0.05, 0.5, n)),
                "confidence": rng.beta(4, 2, n),
                "source": rng.choice(["newswire", "blog", "filing"], n).tolist(),
            },
            schema=EVENT_SCHEMA,
        )
