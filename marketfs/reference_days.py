"""A drift reference as days: per trading day, the drift columns of its vectors as float64 arrays.

What the drift profile reads of a day is, per gated feature, the distribution of its values: held
as that column's values sorted ascending (NaN last; no timestamps, no instrument ids). Sorted once,
when the day is made (from its vectors) or stored, rather than by every profile that reads it: a
trailing reference of 20 days was sorted again by each chunk of a run and each scheduled partition
(``expectations/drift.py``). A reference is about a third of the frame it came from, a day at a time
can be dropped when a trailing reference moves on, and it can be stored per day
(``marketfs/store/reference_days.py``) and read back as 20 rows instead of 400,000 vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import polars as pl

EPOCH = date(1970, 1, 1)

DayOf = Callable[[pl.Series], pl.Series]


def day_number(day: date | str) -> int:
    """Days since 1970-01-01 (what ``pl.Date`` holds)."""
    return ((date.fromisoformat(day) if isinstance(day, str) else day) - EPOCH).days


def day_label(number: int) -> str:
    return (EPOCH + timedelta(days=int(number))).isoformat()


@dataclass(frozen=True)
class ReferenceDays:
    """``values[i]`` holds day ``days[i]``'s vectors: shape ``(len(columns), rows)``, float64, NaN for null,
    each column's values sorted ascending (``np.sort``: -inf first, NaN last).

    ``days`` are day numbers (since 1970-01-01), ascending and distinct.
    """

    columns: tuple[str, ...]
    days: tuple[int, ...] = ()
    values: tuple[np.ndarray, ...] = ()

    @classmethod
    def empty(cls, columns: Iterable[str]) -> ReferenceDays:
        return cls(tuple(columns))

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, columns: Iterable[str], day_of: DayOf) -> ReferenceDays:
        """Each day's values of ``columns`` in ``frame`` (its day: ``day_of`` of ``ts``), sorted per column."""
        columns = tuple(columns)
        if not frame.height:
            return cls(columns)
        numbers = day_of(frame["ts"]).cast(pl.Int32).to_numpy().astype(np.int64)
        order = np.argsort(numbers, kind="stable")
        days, starts = np.unique(numbers[order], return_index=True)
        bounds = [*starts.tolist(), frame.height]
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))
        # Filled a column at a time: no second copy of the frame's drift columns is ever held whole.
        values = tuple(np.empty((len(columns), b - a)) for a, b in spans)
        for i, column in enumerate(columns):
            ordered = frame[column].cast(pl.Float64).to_numpy()[order]
            for day, (a, b) in zip(values, spans, strict=True):
                day[i] = np.sort(ordered[a:b])
        return cls(columns, tuple(int(d) for d in days), values)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.values)

    @property
    def labels(self) -> list[str]:
        return [day_label(d) for d in self.days]

    def day(self, number: int) -> np.ndarray:
        return self.values[self.days.index(number)]

    def merged(self, newer: ReferenceDays) -> ReferenceDays:
        """These days and ``newer``'s; a day both hold is ``newer``'s."""
        if newer.columns != self.columns:
            newer = newer.select(self.columns)
        by_day = dict(zip(self.days, self.values, strict=True))
        by_day.update(zip(newer.days, newer.values, strict=True))
        days = sorted(by_day)
        return ReferenceDays(self.columns, tuple(days), tuple(by_day[d] for d in days))

    def last(self, count: int) -> ReferenceDays:
        """The ``count`` latest days (a trailing reference moving on)."""
        if len(self.days) <= count:
            return self
        return ReferenceDays(self.columns, self.days[-count:], self.values[-count:])

    def without(self, numbers: Iterable[int]) -> ReferenceDays:
        drop = set(numbers)
        kept = [(d, v) for d, v in zip(self.days, self.values, strict=True) if d not in drop]
        return ReferenceDays(self.columns, tuple(d for d, _ in kept), tuple(v for _, v in kept))

    def select(self, columns: Iterable[str]) -> ReferenceDays:
        """The same days with ``columns`` alone (each must be held)."""
        columns = tuple(columns)
        index = [self.columns.index(c) for c in columns]
        return ReferenceDays(columns, self.days, tuple(np.ascontiguousarray(v[index]) for v in self.values))
