"""The interface every bar source implements, and the error a bad input file raises."""

from __future__ import annotations

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
        """One-minute bars with ``start <= ts < end`` in ``BAR_SCHEMA``, in delivery order."""
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
