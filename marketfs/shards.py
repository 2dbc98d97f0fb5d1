"""Instrument shards: a stable split of the universe into N parts that are computed independently.

Instruments share nothing in the feature math (each one's recursions carry only its own state), so
the work of a day splits by instrument without changing any value. An instrument's shard is the
first 32 bits of the MD5 of its id, modulo the shard count: the same in Python and in PostgreSQL
(``md5()`` is built in), stable across processes, versions and machines, and independent of which
other instruments exist, so a new listing never moves an old one.

``MARKETFS_SHARDS`` (default 1) sets the count. Stored rows do not record their shard: it is a
function of the instrument, so changing the count re-groups the same rows and every read still
finds each instrument's history and state.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cache

import polars as pl
from psycopg import sql

SHARDS_ENV = "MARKETFS_SHARDS"
MAX_SHARDS = 256


class ShardConfigError(ValueError):
    pass


def shard_count() -> int:
    """The configured number of shards (``MARKETFS_SHARDS``), checked."""
    raw = os.environ.get(SHARDS_ENV, "").strip() or "1"
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_SHARDS:
        raise ShardConfigError(
            f"{SHARDS_ENV}={raw!r} is not a shard count: give a whole number from 1 to {MAX_SHARDS} "
            "(1, the default, computes every instrument in one run per day)"
        )
    return count


@cache
def _bucket(instrument_id: str) -> int:
    return int(hashlib.md5(instrument_id.encode()).hexdigest()[:8], 16)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the instruments whose bucket modulo ``count`` is ``index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ShardConfigError(f"shard {self.index} does not exist among {self.count} shard(s)")

    @property
    def is_all(self) -> bool:
        return self.count == 1

    def __str__(self) -> str:
        return "all instruments" if self.is_all else f"shard {self.index} of {self.count}"

    def holds(self, instrument_id: str) -> bool:
        return self.is_all or _bucket(instrument_id) % self.count == self.index

    def mask(self, instrument_ids: pl.Series) -> pl.Series:
        """Which of ``instrument_ids`` this shard holds (nulls are held by shard 0, so no row is lost)."""
        if self.is_all:
            return pl.Series(instrument_ids.name, [True] * instrument_ids.len(), pl.Boolean)
        unique = instrument_ids.unique().drop_nulls().to_list()
        mine = [i for i in unique if self.holds(i)]
        held = instrument_ids.is_in(mine)
        return held.fill_null(self.index == 0) if instrument_ids.null_count() else held

    def partition_key(self, day: str) -> str:
        """The partition key of ``day`` in this shard as Dagster spells it: the day, or ``day|shard``."""
        return day if self.is_all else f"{day}|{self.index}"

    def filter(self, frame: pl.DataFrame, column: str = "instrument_id") -> pl.DataFrame:
        """The rows of ``frame`` whose instrument this shard holds."""
        if self.is_all or column not in frame.columns or frame.is_empty():
            return frame
        return frame.filter(self.mask(frame[column]))

    def condition(self, column: sql.Composable | None = None) -> sql.Composable:
        """A SQL condition (psycopg composable, parameters ``shard_count`` and ``shard_index``) that holds
        for this shard's rows; ``TRUE`` when there is one shard, so an unsharded query plans as before."""
        if self.is_all:
            return sql.SQL("TRUE")
        column = column if column is not None else sql.Identifier("instrument_id")
        return sql.SQL(
            "(mod(('x' || left(md5({col}), 8))::bit(32)::bigint, %(shard_count)s) = %(shard_index)s)"
        ).format(col=column)

    def text_condition(self, column: str = "instrument_id") -> str:
        """The same condition for ``sqlalchemy.text`` (bound ``:shard_count`` and ``:shard_index``);
        ``column`` is a name written in the code, never a value."""
        if self.is_all:
            return "TRUE"
        return f"(mod(('x' || left(md5({column}), 8))::bit(32)::bigint, :shard_count) = :shard_index)"

    @property
    def params(self) -> dict[str, int]:
        return {"shard_count": self.count, "shard_index": self.index}


ALL = Shard()


def shards(count: int | None = None) -> list[Shard]:
    """Every shard of ``count`` (default: the configured count), in order."""
    n = shard_count() if count is None else count
    return [Shard(i, n) for i in range(n)]
