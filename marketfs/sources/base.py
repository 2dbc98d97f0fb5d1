"""The interface every bar source implements, what a delivery is, and the error a bad input file raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import polars as pl

BAR_SCHEMA: dict[str, pl.DataType] = {
    "instrument_id": pl.String(),
    "ts": pl.Datetime("us", "UTC"),
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "volume": pl.Float64(),
}


class BarSource(Protocol):
    def bars(self, start: datetime, end: datetime) -> pl.DataFrame:
        """One-minute bars with ``start <= ts < end`` in ``BAR_SCHEMA``, sorted by (instrument_id, ts).

        Row order is never read as time order. Rows with the same (instrument_id, ts) and different
        values (a conflict between deliveries) are all returned, the one that prevails last.
        """
        ...


class EventSource(Protocol):
    def events(self, start: datetime, end: datetime) -> pl.DataFrame:
        """News events with ``start <= published_at < end`` in ``EVENT_SCHEMA``, in delivery order."""
        ...


class SourceFileError(ValueError):
    """A landing file that cannot be read as the data it claims to be."""

    def __init__(self, path: Path, problem: str, fix: str, line: int | None = None) -> None:
        where = f"{path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {problem}. Fix: {fix}")
        self.path = path
        self.line = line
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class Delivery:
    """What a source delivers for a window, day by day.

    ``rows`` hold only the days that could be read; ``day_errors`` maps each other day (a UTC
    partition key) to the error of a file holding rows of it; ``unplaced`` are files that cannot
    even say which days they hold: they block no day, and every run that reads the folder reports them.
    """

    rows: pl.DataFrame
    day_errors: dict[str, SourceFileError] = field(default_factory=dict)
    unplaced: list[SourceFileError] = field(default_factory=list)
    # Rows set aside because they are stamped on a day the calendar is closed (one verdict per file).
    set_aside: list[SourceFileError] = field(default_factory=list)
