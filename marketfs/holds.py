"""Held instruments: which instruments a quarantined instrument-day keeps out of computations, and from when.

The value type only (pure: polars and a SQL condition); ``marketfs/store/holds.py`` reads and resolves the
batches behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl
from psycopg import sql


@dataclass(frozen=True)
class HeldInstrument:
    instrument_id: str
    since: datetime  # the start of the first held day's window
    day: str  # that day's partition key
    asset: str
    batch_id: int


@dataclass(frozen=True)
class Holds:
    """Instruments held from an instant on; empty holds filter nothing and add ``TRUE`` to SQL."""

    held: dict[str, HeldInstrument] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.held)

    def __len__(self) -> int:
        return len(self.held)

    def filter(self, frame: pl.DataFrame, ts_column: str = "ts") -> pl.DataFrame:
        """``frame`` without the rows of held instruments at or after the instant each is held from."""
        return drop_from(frame, {i: h.since for i, h in self.held.items()}, ts_column)

    def condition(self, instrument: str = "instrument_id", ts: str = "ts") -> sql.Composable:
        """SQL that holds for rows *not* held (parameters ``held_ids``, ``held_since``): a write's delete
        leaves the held instruments' served rows as they are."""
        if not self.held:
            return sql.SQL("TRUE")
        return sql.SQL(
            "NOT EXISTS (SELECT 1 FROM unnest(%(held_ids)s::text[], %(held_since)s::timestamptz[]) "
            "AS held(held_id, held_since) WHERE held.held_id = {inst} AND {ts} >= held.held_since)"
        ).format(inst=sql.Identifier(instrument), ts=sql.Identifier(ts))

    @property
    def params(self) -> dict[str, Any]:
        if not self.held:
            return {}
        return {"held_ids": list(self.held), "held_since": [h.since for h in self.held.values()]}

    def merged(self, other: Holds) -> Holds:
        """Both holds, each instrument from the earlier of its instants."""
        held = dict(self.held)
        for instrument, h in other.held.items():
            if instrument not in held or h.since < held[instrument].since:
                held[instrument] = h
        return Holds(held)

    def at(self, day_end: datetime) -> Holds:
        """The instruments held on a day ending at ``day_end``."""
        return Holds({i: h for i, h in self.held.items() if h.since < day_end})

    def describe(self, limit: int = 10) -> str:
        items = sorted(self.held.values(), key=lambda h: (h.since, h.instrument_id))
        text = ", ".join(f"{h.instrument_id} since {h.day} ({_why(h)})" for h in items[:limit])
        return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


NO_HOLDS = Holds()


def _why(h: HeldInstrument) -> str:
    # Batch 0: no quarantine batch, a late corporate action waiting for its restatement (store/corporate_actions.py).
    if h.batch_id == 0:
        return "a late corporate action, waiting for its restatement: python -m pipelines restate"
    return f"{h.asset} batch {h.batch_id}"


def drop_from(frame: pl.DataFrame, since: dict[str, datetime], ts_column: str = "ts") -> pl.DataFrame:
    """``frame`` without each named instrument's rows at or after its instant (held from it, delisted at it)."""
    if not since or frame.is_empty():
        return frame
    instants = pl.DataFrame(
        {"instrument_id": list(since), "_since": list(since.values())},
        schema={"instrument_id": pl.String, "_since": frame.schema[ts_column]},
    )
    return (
        frame.join(instants, on="instrument_id", how="left", maintain_order="left")
        .filter(pl.col("_since").is_null() | (pl.col(ts_column) < pl.col("_since")))
        .drop("_since")
    )
