"""Raw one-minute bars: replace a time window atomically, read a window with its warm-up bars."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import sqlalchemy as sa
from psycopg import sql

from marketfs.sources.base import BAR_SCHEMA
from marketfs.store.copy import EPOCH_US, copy_frame_in, copy_query_out

BAR_COLUMNS = list(BAR_SCHEMA)


def replace_bars(conn: sa.Connection, bars: pl.DataFrame, start: datetime, end: datetime) -> int:
    """Make ``ohlcv_1m`` hold exactly ``bars`` for ``[start, end)``, inside the caller's transaction."""
    outside = bars.filter((pl.col("ts") < start) | (pl.col("ts") >= end))
    if outside.height:
        raise ValueError(f"{outside.height} bar(s) fall outside the window [{start}, {end}) being replaced")
    conn.execute(sa.text("DELETE FROM ohlcv_1m WHERE ts >= :start AND ts < :end"), {"start": start, "end": end})
    return copy_frame_in(conn, "ohlcv_1m", bars.select(BAR_COLUMNS))


def read_bars(conn: sa.Connection, start: datetime, end: datetime, warmup_bars: int = 0) -> pl.DataFrame:
    """Bars in ``[start, end)`` plus, per instrument present there, up to ``warmup_bars`` bars before ``start``.

    Warm-up is counted in bars, not days, so weekends, holidays and halts never shorten it.
    """
    cols = sql.SQL(", ").join(
        sql.SQL(EPOCH_US).format(col=sql.Identifier("ts")) if c == "ts" else sql.Identifier(c) for c in BAR_COLUMNS
    )
    query = sql.SQL(
        """
        SELECT {cols} FROM ohlcv_1m WHERE ts >= %(start)s AND ts < %(end)s
        UNION ALL
        SELECT {cols} FROM (
            SELECT w.* FROM (SELECT DISTINCT instrument_id FROM ohlcv_1m WHERE ts >= %(start)s AND ts < %(end)s) i
            CROSS JOIN LATERAL (
                SELECT * FROM ohlcv_1m b WHERE b.instrument_id = i.instrument_id AND b.ts < %(start)s
                ORDER BY b.ts DESC LIMIT %(warmup)s
            ) w
        ) warm
        """
    ).format(cols=cols)
    frame = copy_query_out(conn, query, {"start": start, "end": end, "warmup": warmup_bars}, BAR_SCHEMA)
    return frame.sort("instrument_id", "ts")
