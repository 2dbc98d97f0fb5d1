"""News events (``news_events``): replace a window of publication times, read a window back."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import sqlalchemy as sa

from marketfs.features.events import EVENT_SCHEMA
from marketfs.store import tables


def replace_events(conn: sa.Connection, events: pl.DataFrame, start: datetime, end: datetime) -> int:
    """Make ``news_events`` hold exactly ``events`` for publication times in ``[start, end)``.

    An event_id already stored under another window is kept there, once: a re-delivered event
    does not appear twice.
    """
    existing = conn.execute(
        sa.text(
            "SELECT event_id FROM news_events WHERE event_id = ANY(:ids) "
            "AND NOT (published_at >= :s AND published_at < :e)"
        ),
        {"ids": events["event_id"].to_list(), "s": start, "e": end},
    ).scalars()
    fresh = events.filter(~pl.col("event_id").is_in(list(existing)))
    return tables.replace_window(conn, "news_events", fresh.select(list(EVENT_SCHEMA)), "published_at", start, end)


def read_events(conn: sa.Connection, start: datetime, end: datetime) -> pl.DataFrame:
    return tables.read_window(
        conn, "news_events", EVENT_SCHEMA, "published_at", start, end, ("instrument_id", "published_at", "event_id")
    )
