"""News events (``news_events``): replace a window of publication times, read a window back."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import sqlalchemy as sa

from marketfs.features.events import EVENT_SCHEMA
from marketfs.holds import NO_HOLDS, Holds
from marketfs.shards import ALL, Shard
from marketfs.store import tables
from marketfs.store.copy import copy_frame_in


def replace_events(
    conn: sa.Connection,
    events: pl.DataFrame,
    start: datetime,
    end: datetime,
    shard: Shard = ALL,
    protect: Holds = NO_HOLDS,
    only: list[str] | None = None,
) -> int:
    """Make ``news_events`` hold exactly ``events`` for publication times in ``[start, end)`` and the
    instruments of ``shard``.

    An event_id already stored under another window is kept there, once: a re-delivered event
    does not appear twice.
    """
    # news_event_ids says where each stored event_id is (one index probe each, whatever the history).
    existing = conn.execute(
        sa.text(
            "SELECT event_id FROM news_event_ids WHERE event_id = ANY(:ids) "
            "AND NOT (published_at >= :s AND published_at < :e)"
        ),
        {"ids": events["event_id"].to_list(), "s": start, "e": end},
    ).scalars()
    fresh = events.filter(~pl.col("event_id").is_in(list(existing)))
    written = tables.replace_window(
        conn,
        "news_events",
        fresh.select(list(EVENT_SCHEMA)),
        "published_at",
        start,
        end,
        shard=shard,
        protect=protect,
        only=only,
    )
    # news_event_ids has no instrument column: of the window's ids, those of the events just written are
    # renewed, and those whose event the window no longer holds (in any shard) go; other shards' stay.
    ids = fresh.group_by("event_id").agg(pl.col("published_at").min()).select("event_id", "published_at")
    conn.execute(
        sa.text(
            "DELETE FROM news_event_ids i WHERE i.published_at >= :s AND i.published_at < :e "
            "AND (i.event_id = ANY(:ids) OR NOT EXISTS (SELECT 1 FROM news_events n WHERE n.event_id = i.event_id "
            "AND n.published_at >= :s AND n.published_at < :e))"
        ),
        {"s": start, "e": end, "ids": ids["event_id"].to_list()},
    )
    copy_frame_in(conn, "news_event_ids", ids)
    return written


def read_events(conn: sa.Connection, start: datetime, end: datetime, shard: Shard = ALL) -> pl.DataFrame:
    order = ("instrument_id", "published_at", "event_id")
    return tables.read_window(conn, "news_events", EVENT_SCHEMA, "published_at", start, end, order, shard=shard)


def insert_new_events(conn: sa.Connection, events: pl.DataFrame) -> pl.DataFrame:
    """Store the events whose event_id is not stored yet (the first delivery wins, as ``replace_events``
    keeps it); returns them. For events delivered piece by piece: ``replace_events`` owns whole windows."""
    from marketfs.store.copy import raw_connection

    ids = events["event_id"].to_list()
    known = "SELECT event_id FROM news_event_ids WHERE event_id = ANY(%s::text[])"
    stored = {r[0] for r in raw_connection(conn).execute(known, (ids,))}
    fresh = events.filter(~pl.col("event_id").is_in(list(stored)))
    copy_frame_in(conn, "news_events", fresh.select(list(EVENT_SCHEMA)))
    copy_frame_in(
        conn,
        "news_event_ids",
        fresh.group_by("event_id").agg(pl.col("published_at").min()).select("event_id", "published_at"),
    )
    return fresh
