"""Exchange sessions: which days trade, when each session opens and closes, which trading day an instant is in.

The session data come from ``exchange_calendars`` (the Quantopian/zipline lineage, maintained by
gerrymanoim; its calendar data ship inside the wheel, so nothing is fetched at run time), chosen
over ``pandas_market_calendars`` because that package wraps the same calendars and adds only a
layer of its own, and over a hand-kept holiday list because early closes, DST and ad-hoc closures
(national mourning days, storms) are what such lists get wrong.

The rule every part of the project follows, once: **a trading day is labelled by its session's date
and holds every instant from the previous session's close (inclusive) up to its own close
(exclusive)**, ``[previous close, close)``. So an after-hours print belongs to the next session, a
weekend's instants to Monday's, and a session that crosses UTC midnight (CME Globex, FX, ASX in
UTC) is one trading day, not two halves. The trading days tile time with no gap and no overlap.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl

# Far enough back for the daily histories people land (the S&P 500 from 1990), and cheap: building
# XNYS from 1990 costs 0.3 s once per process.
CALENDAR_START = "1990-01-01"

UTC_US = pl.Datetime("us", "UTC")


class CalendarError(ValueError):
    """An unknown calendar name, or a day outside the calendar's range."""


@dataclass(frozen=True)
class Sessions:
    """A calendar's sessions as arrays: ``days`` (date labels), ``opens`` and ``closes`` (UTC instants)."""

    name: str
    days: pl.Series  # pl.Date, ascending
    opens: pl.Series  # UTC_US
    closes: pl.Series  # UTC_US
    weekmask: str  # "1111100": which weekdays (Monday first) can hold a session
    tz: str = "UTC"  # the exchange's time zone: what its calendar dates are dates in

    @functools.cached_property
    def _index(self) -> dict[date, int]:
        return {d: i for i, d in enumerate(self.days.to_list())}

    @property
    def first(self) -> date:
        return self.days[0]

    @property
    def last(self) -> date:
        return self.days[-1]

    def is_session(self, day: date | str) -> bool:
        return _as_date(day) in self._index

    def position(self, day: date | str) -> int:
        """The index of session ``day``; ``CalendarError`` naming the next session when it is none."""
        d = _as_date(day)
        try:
            return self._index[d]
        except KeyError:
            raise CalendarError(self.not_a_session(d)) from None

    def closed_reason(self, day: date | str) -> str:
        """Why a day that is no session is closed, e.g. ``Friday, a holiday``."""
        d = _as_date(day)
        return f"{d:%A}, {'a weekend' if self.weekmask[d.weekday()] == '0' else 'a holiday'}"

    def not_a_session(self, day: date | str) -> str:
        d = _as_date(day)
        if not self.first <= d <= self.last:
            return f"{d} is outside the {self.name} calendar ({self.first}..{self.last})"
        following = self.next_session(d)
        return (
            f"{d} is no {self.name} session ({self.closed_reason(d)}); its instants belong to the session of "
            f"{following}"
        )

    def next_session(self, day: date | str) -> date | None:
        """The first session on or after ``day``."""
        i = self.days.search_sorted(_as_date(day), side="left")
        return self.days[i] if i < len(self.days) else None

    def bounds(self, day: date | str) -> tuple[datetime, datetime]:
        """``(open, close)`` of session ``day``, UTC."""
        i = self.position(day)
        return self.opens[i], self.closes[i]

    def trading_day_window(self, day: date | str) -> tuple[datetime, datetime]:
        """``[previous session's close, this session's close)``: every instant of trading day ``day``.

        The calendar's first session starts one day before its open (there is no previous close).
        """
        i = self.position(day)
        start = self.closes[i - 1] if i else self.opens[i] - timedelta(days=1)
        return start, self.closes[i]

    def between(self, start: date | str, end: date | str) -> list[date]:
        """The sessions ``start <= day <= end``."""
        lo = self.days.search_sorted(_as_date(start), side="left")
        hi = self.days.search_sorted(_as_date(end), side="right")
        return self.days[lo:hi].to_list()

    def trading_days_overlapping(self, start: datetime, end: datetime) -> list[date]:
        """The sessions whose trading day window overlaps ``[start, end)``."""
        lo = self.closes.search_sorted(_utc(start), side="right")
        hi = self.closes.search_sorted(_utc(end), side="left")
        return self.days[lo : min(hi + 1, len(self.days))].to_list()

    def session_index(self, ts: pl.Series) -> pl.Series:
        """The position of each instant's trading day (the first session closing after it) in ``days``,
        ``opens`` and ``closes``. Null where ``ts`` is null or past the calendar's last session."""
        ts = ts.cast(UTC_US)
        at = self.closes.search_sorted(ts.fill_null(self.closes[0]), side="right")
        return pl.select(pl.when(ts.is_null() | (at >= len(self.days))).then(None).otherwise(at)).to_series()

    def trading_day(self, ts: pl.Series) -> pl.Series:
        """The trading day (a ``pl.Date`` session label) of each instant: the first session closing after it.

        Null where ``ts`` is null or past the calendar's last session.
        """
        return self.days.gather(self.session_index(ts)).alias(ts.name or "day")

    def on_closed_day(self, ts: pl.Series) -> pl.Series:
        """Whether each instant falls on a day the exchange is closed (a weekend, a holiday), in its own time
        zone, outside every session: bars stamped there were never traded on this calendar.

        An after-hours print of a session's evening keeps the session's local date, and an instant inside a
        session that opens the evening before (CME Globex on Sunday) is inside that session: neither is closed.
        """
        ts = ts.cast(UTC_US)
        local_day = ts.dt.convert_time_zone(self.tz).dt.date()
        at = self.session_index(ts)
        opens = self.opens.gather(at.fill_null(0))
        inside = at.is_not_null() & (ts >= opens)
        return (~local_day.is_in(self.days.implode()) & ~inside & ts.is_not_null()).alias("closed_day")

    def excluded_weekdays(self) -> list[date]:
        """Days of the weekmask's weekdays that hold no session (holidays), over the calendar's range."""
        every = pl.date_range(self.first, self.last, "1d", eager=True)
        trading_weekdays = [i + 1 for i, on in enumerate(self.weekmask) if on == "1"]  # polars: Monday is 1
        return every.filter(every.dt.weekday().is_in(trading_weekdays) & ~every.is_in(self.days.implode())).to_list()

    def cron_weekdays(self) -> str:
        """The weekmask as a cron day-of-week field (``1-5`` style list: ``1,2,3,4,5``; ``*`` for every day)."""
        if self.weekmask == "1111111":
            return "*"
        # cron counts Sunday as 0, the weekmask starts on Monday.
        return ",".join(str((i + 1) % 7) for i, on in enumerate(self.weekmask) if on == "1")


def _as_date(day: date | str) -> date:
    if isinstance(day, datetime):
        return day.date()
    if isinstance(day, date):
        return day
    try:
        return date.fromisoformat(str(day))
    except ValueError:
        raise CalendarError(f"{day!r} is not a date (YYYY-MM-DD)") from None


def _utc(instant: datetime) -> datetime:
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)


@functools.cache
def sessions(name: str) -> Sessions:
    """The sessions of calendar ``name`` (an exchange_calendars name: XNYS, XLON, CMES, 24/7, ...).

    Kept under ``$MARKETFS_HOME/calendars`` once built: importing exchange_calendars (and its pandas)
    and building a calendar cost ~0.9 s, which every Dagster process would pay when it loads the
    partitions. The file is named by the package's version and today's date (the calendar's end
    follows today), so an upgrade or a new day builds it anew.
    """
    path = _cache_path(name)
    if path.exists():
        try:
            return _from_frame(name, pl.read_parquet(path))
        except (OSError, pl.exceptions.PolarsError):  # a damaged file: built again below
            pass
    built = _build(name)
    _store(path, built)
    return built


def _cache_path(name: str) -> Path:
    from importlib.metadata import version

    safe = "".join(c if c.isalnum() else "_" for c in name)
    stamp = f"{version('exchange-calendars')}-{CALENDAR_START}-{date.today().isoformat()}"
    return Path(os.environ.get("MARKETFS_HOME", ".marketfs")) / "calendars" / f"{safe}-{stamp}.parquet"


def _from_frame(name: str, frame: pl.DataFrame) -> Sessions:
    return Sessions(
        name=name,
        days=frame["session"],
        opens=frame["open"],
        closes=frame["close"],
        weekmask=frame["weekmask"][0],
        tz=frame["tz"][0],  # a file written before the column existed is built again (ColumnNotFoundError)
    )


def _store(path: Path, built: Sessions) -> None:
    """Written whole or not at all (another process may read it meanwhile); older builds removed."""
    frame = pl.DataFrame({"session": built.days, "open": built.opens, "close": built.closes}).with_columns(
        pl.lit(built.weekmask).alias("weekmask"), pl.lit(built.tz).alias("tz")
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f"{path.name.split('-')[0]}-*.parquet"):
            old.unlink(missing_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        frame.write_parquet(partial)
        partial.replace(path)
    except OSError:  # a read-only home: every process builds the calendar itself
        pass


def _build(name: str) -> Sessions:
    import exchange_calendars as xcals

    try:
        calendar = xcals.get_calendar(name, start=CALENDAR_START)
    except xcals.errors.InvalidCalendarName:
        raise CalendarError(
            f"unknown calendar {name!r}; names are those of exchange_calendars, e.g. XNYS (NYSE), XNAS, XLON, "
            "CMES (CME Globex, sessions crossing UTC midnight), 24/7 (crypto)"
        ) from None
    except ValueError:  # the calendar begins later than CALENDAR_START
        calendar = xcals.get_calendar(name)
    schedule = calendar.schedule
    return Sessions(
        name=name,
        days=pl.Series("session", schedule.index.to_numpy()).cast(pl.Date),
        opens=pl.from_pandas(schedule["open"]).cast(UTC_US).rename("open"),
        closes=pl.from_pandas(schedule["close"]).cast(UTC_US).rename("close"),
        weekmask=str(calendar.weekmask),
        tz=str(calendar.tz),
    )
