"""Bars and events from a landing folder of files, read as a set of facts and validated at the edge.

``<landing>/bars`` holds CSV or Parquet files of one-minute bars, ``<landing>/bars_1d`` files of
daily bars (same columns; ``ts`` a session date such as ``1999-01-04``, meaning that session's
close), ``<landing>/events`` CSV, Parquet or JSON lines files of events. Timestamps are ISO 8601;
one with an offset is converted to UTC, one without is taken as UTC.

- **Order**: neither the order of files nor the order of rows in a file means anything; bars are
  returned sorted by (instrument_id, ts).
- **Duplicates** (bars): identical rows collapse silently, within a file and across files. Rows
  with the same (instrument_id, ts) and different values in two files are a conflict between
  deliveries: the row of the file that sorts last by path prevails (a later delivery, named so that
  it sorts later, corrects an earlier one); both are returned, that one last, so that ingestion
  keeps it, flags the bar TIMESTAMP_MISMATCH and the raw suite's uniqueness warning records the
  conflict. Within one file such rows are the file's error for that day (see ``landing_file``).
- **A bad file spoils only its own days**: a landing index (``landing_index``) knows which trading days
  each file holds; a read of a range opens only the files holding its days, a bad row fails the
  day it falls on, and a file that cannot say which days it holds blocks none and is reported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from marketfs.features.events import EVENT_SCHEMA
from marketfs.sources.base import BAR_SCHEMA, Delivery, SourceFileError
from marketfs.sources.landing_file import LandingKind, read_landing_file
from marketfs.sources.landing_index import LandingIndex, landing_files
from marketfs.universe import active_sessions

BAR_SUFFIXES = (".csv", ".parquet")
EVENT_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")
BARS = LandingKind("bars", BAR_SCHEMA, "ts", BAR_SUFFIXES, conflict_key=("instrument_id", "ts"))
# Minute bars stamped at their close by the vendor (09:31 for the trades of 09:30-09:31): read one
# minute earlier, as bars stamped at their open, which is what the rest of the project assumes.
BARS_CLOSE_STAMPED = replace(BARS, ts_shift=-timedelta(minutes=1))
BAR_STAMPS = {"open": BARS, "close": BARS_CLOSE_STAMPED}
EVENTS = LandingKind("events", EVENT_SCHEMA, "published_at", EVENT_SUFFIXES)
# Daily deliveries: one bar per instrument and session, for users who have no minute bars.
BARS_1D = LandingKind(
    "bars_1d", BAR_SCHEMA, "ts", BAR_SUFFIXES, conflict_key=("instrument_id", "ts"), session_bars=True
)

__all__ = [
    "BARS",
    "BARS_1D",
    "BAR_SUFFIXES",
    "EVENTS",
    "EVENT_SUFFIXES",
    "LandingFolderBars",
    "LandingFolderDailyBars",
    "LandingFolderEvents",
    "deliver",
    "landing_files",
    "read_landing_file",
    "trading_days",
]


def trading_days(start: datetime, end: datetime) -> set[str]:
    """The trading days (partition keys, YYYY-MM-DD) that ``[start, end)`` overlaps."""
    return {d.isoformat() for d in active_sessions().trading_days_overlapping(start, end)}


def deliver(root: Path, kind: LandingKind, start: datetime, end: datetime, index_path: Path | None = None) -> Delivery:
    """Rows of ``[start, end)`` from the files of ``root`` holding those days, with each bad day's error."""
    wanted = trading_days(start, end)
    index = LandingIndex(root, kind, index_path)
    scans = index.refresh(keep_days=wanted)
    for path in index.files_holding(wanted):
        if path not in scans:
            scans[path] = index.read(path)
    index.save()
    ordered = [scans[path] for path in sorted(scans)]
    day_errors: dict[str, SourceFileError] = {}
    for scan in ordered:
        for day, error in scan.day_errors.items():
            if day in wanted:
                day_errors.setdefault(day, error)
    set_aside = [scan.closed_day for scan in ordered if scan.closed_day is not None]
    frames = [scan.rows.with_columns(pl.lit(rank).alias("_file")) for rank, scan in enumerate(ordered)]
    if not frames:
        return Delivery(pl.DataFrame(schema=kind.schema), day_errors, index.unplaced(), set_aside)
    ts = pl.col(kind.ts_column)
    rows = pl.concat(frames).filter((ts >= start) & (ts < end))
    if day_errors:
        day = active_sessions().trading_day(rows[kind.ts_column]).dt.strftime("%Y-%m-%d")
        rows = rows.filter(~day.is_in(list(day_errors)))
    if kind.conflict_key:
        rows = rows.unique(subset=list(kind.schema), keep="first", maintain_order=True).sort(
            [*kind.conflict_key, "_file"], maintain_order=True
        )
    return Delivery(rows.drop("_file"), day_errors, index.unplaced(), set_aside)


def _absent_kind(root: Path) -> bool:
    """A landing folder without this kind's subfolder delivers none of it (a daily-only vendor has no ``bars/``
    and no ``events/``); a landing folder that does not exist at all is still an error, naming it."""
    return not root.exists() and root.parent.is_dir()


def _first_error(delivery: Delivery) -> pl.DataFrame:
    """The rows, or the error of the earliest bad day; unplaced files are a warning (they block no day)."""
    if delivery.day_errors:
        raise delivery.day_errors[min(delivery.day_errors)]
    for error in delivery.unplaced:
        warnings.warn(str(error), stacklevel=3)
    return delivery.rows


@dataclass(frozen=True)
class LandingFolderBars:
    root: Path
    index_path: Path | None = None  # default: under $MARKETFS_HOME/landing_index
    stamp: str = "open"  # what the files' ts means: the minute's open (default) or its close

    def delivery(self, start: datetime, end: datetime) -> Delivery:
        """Bars in ``[start, end)`` sorted by (instrument_id, ts), with each bad day's error."""
        if self.stamp not in BAR_STAMPS:
            raise SourceFileError(
                self.root,
                f"bar stamp {self.stamp!r} is neither 'open' nor 'close'",
                "set MARKETFS_BAR_STAMP to open (a bar stamped 09:30 holds 09:30-09:31, the default) or close "
                "(the vendor stamps it 09:31)",
            )
        if _absent_kind(self.root):
            return Delivery(pl.DataFrame(schema=BAR_SCHEMA))
        return deliver(self.root, BAR_STAMPS[self.stamp], start, end, self.index_path)

    def bars(self, start: datetime, end: datetime) -> pl.DataFrame:
        """Bars in ``[start, end)`` sorted by (instrument_id, ts), or the first bad day's ``SourceFileError``."""
        return _first_error(self.delivery(start, end))


@dataclass(frozen=True)
class LandingFolderDailyBars:
    """``<landing>/bars_1d``: daily bars, stamped at their session's last minute. A missing folder delivers none."""

    root: Path
    index_path: Path | None = None

    def delivery(self, start: datetime, end: datetime) -> Delivery:
        if not self.root.is_dir():
            return Delivery(pl.DataFrame(schema=BAR_SCHEMA))
        return deliver(self.root, BARS_1D, start, end, self.index_path)

    def bars(self, start: datetime, end: datetime) -> pl.DataFrame:
        return _first_error(self.delivery(start, end))


@dataclass(frozen=True)
class LandingFolderEvents:
    root: Path
    index_path: Path | None = None

    def delivery(self, start: datetime, end: datetime) -> Delivery:
        """Events in ``[start, end)``, file by file (sorted by path), with each bad day's error."""
        if _absent_kind(self.root):
            return Delivery(pl.DataFrame(schema=EVENT_SCHEMA))
        return deliver(self.root, EVENTS, start, end, self.index_path)

    def events(self, start: datetime, end: datetime) -> pl.DataFrame:
        return _first_error(self.delivery(start, end))
