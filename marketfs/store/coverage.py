"""Which sessions the store holds bars of: a window never reads across sessions that were never delivered.

A session in which one instrument did not trade is a fact of that instrument (its features carry on, and
flag what they must); a session of which the store holds no bar at all, of any instrument (of the shard),
was never delivered or never materialised. A return, a rolling window or a recursion that reached back
across it would join two sessions as if they were adjacent, so the run refuses and names the sessions and
the command that fills them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import sqlalchemy as sa
from psycopg import sql

from marketfs.shards import ALL, Shard
from marketfs.store.bars import BAR_TABLES


@dataclass(frozen=True)
class Hole:
    """Sessions with no stored bar between the newest stored session and a day that would read across them."""

    table: str
    day: date  # the first day whose windows would span the hole
    newest: date  # the newest session before ``day`` that holds bars
    missing: list[date]

    def describe(self, end: str | None = None) -> str:
        first, last = self.missing[0], self.missing[-1]
        span = f"{first}" if first == last else f"{first}..{last}"
        fill_to = end or self.day.isoformat()
        return (
            f"{self.day}: {self.table} holds no bar of the {len(self.missing)} session(s) {span} before it (its newest "
            f"stored session is {self.newest}), so the first windows of {self.day} would read across them as if "
            f"{self.newest} were the session before. Fill them first: "
            f'make run ARGS="--start {first} --end {fill_to}"'
        )


def _holds_bars(conn: sa.Connection, table: str, start: datetime, end: datetime, shard: Shard) -> bool:
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE ts >= %(s)s AND ts < %(e)s AND {})").format(
        sql.Identifier(table), shard.condition()
    )
    with conn.connection.driver_connection.cursor() as cur:
        cur.execute(query, {"s": start, "e": end, **shard.params})
        return bool(cur.fetchone()[0])


def hole_before(conn: sa.Connection, day: date | str, timeframe: str = "1m", shard: Shard = ALL) -> Hole | None:
    """The sessions right before ``day`` of which the bar table of ``timeframe`` holds nothing, while it
    holds bars of an earlier session; None when the session before holds bars, or nothing is stored before.

    One index range read in the common case (the previous session holds bars); a ``max(ts)`` only when it
    does not.
    """
    from marketfs.universe import active_sessions

    sessions = active_sessions()
    position = sessions.position(day)
    if position == 0:
        return None
    table = BAR_TABLES[timeframe]
    previous = sessions.days[position - 1]
    if _holds_bars(conn, table, *sessions.trading_day_window(previous), shard):
        return None
    start = sessions.trading_day_window(day)[0]
    query = sql.SQL("SELECT max(ts) FROM {} WHERE ts < %(s)s AND {}").format(sql.Identifier(table), shard.condition())
    with conn.connection.driver_connection.cursor() as cur:
        cur.execute(query, {"s": start, **shard.params})
        newest = cur.fetchone()[0]
    if newest is None:
        return None  # nothing before: a first delivery, its windows start with it
    import polars as pl

    newest_day = sessions.trading_day(pl.Series([newest], dtype=pl.Datetime("us", "UTC"))).item()
    missing = [d for d in sessions.between(newest_day, day) if newest_day < d < sessions.days[position]]
    if missing:  # sessions a person declared missing for good are no hole: windows restart after them
        from marketfs.store.gaps import declared_sessions

        declared = declared_sessions(conn, missing[0], missing[-1], timeframe)
        missing = [d for d in missing if d not in declared]
    return Hole(table, sessions.days[position], newest_day, missing) if missing else None


def holes_before(
    conn: sa.Connection, day: date | str, shards: list[Shard], timeframes: tuple[str, ...] = ("1m", "1d")
) -> dict[str, Hole]:
    """``hole_before`` of every shard, per bar timeframe (the first shard with a hole names it)."""
    holes: dict[str, Hole] = {}
    for shard in shards:
        for timeframe in timeframes:
            hole = hole_before(conn, day, timeframe, shard)
            if hole is not None:
                holes.setdefault(timeframe, hole)
    return holes
