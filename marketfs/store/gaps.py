"""Declared gaps: sessions a person says are missing for good, after which an instrument's windows restart.

A hole (sessions the store holds no bar of) is refused by default (``coverage.py``): nothing is computed
across it. Where the hole is real, it is declared, once, in ``declared_gaps``: by ``run --allow-gap`` (every
instrument), by discarding a quarantined instrument-day (that instrument, that day), or by hand for a
trading halt. From the start of the trading day after a gap (``restart_at``) the instrument's bars before it
are not read and its recursion state is not continued: it is computed as a new listing would be, and its
vectors carry GAP until their longest window is warm again. A recomputation gives the same values, since
the declaration is data.
"""

from __future__ import annotations

from datetime import date, datetime

import polars as pl
import sqlalchemy as sa

from marketfs.shards import ALL, Shard

RESTART_SCHEMA = {"instrument_id": pl.String(), "restart_at": pl.Datetime("us", "UTC")}
WINDOW_SCHEMA = {
    "instrument_id": pl.String(),
    "gap_from": pl.Datetime("us", "UTC"),
    "restart_at": pl.Datetime("us", "UTC"),
}


def declare_gap(
    conn: sa.Connection,
    first: date | str,
    last: date | str,
    *,
    reason: str,
    by: str,
    instrument_id: str | None = None,
    dataset: str | None = None,
) -> int:
    """Record sessions ``first..last`` as missing for good (of one instrument, or of all when None; of one
    feature dataset, or of every one and the bars when None). Returns the gap's id."""
    from marketfs.universe import active_sessions

    sessions = active_sessions()
    last_day = date.fromisoformat(str(last))
    following = sessions.next_session(date.fromordinal(last_day.toordinal() + 1))
    restart_at = sessions.trading_day_window(following)[0] if following is not None else None
    if restart_at is None:
        raise ValueError(f"no session after {last} in the {sessions.name} calendar to restart from")
    return int(
        conn.execute(
            sa.text(
                "INSERT INTO declared_gaps (first_session, last_session, restart_at, instrument_id, dataset, reason, "
                "declared_by) VALUES (:f, :l, :r, :i, :d, :why, :by) RETURNING gap_id"
            ),
            {
                "f": str(first),
                "l": str(last),
                "r": restart_at,
                "i": instrument_id,
                "d": dataset,
                "why": reason,
                "by": by,
            },
        ).scalar_one()
    )


def declared_sessions(conn: sa.Connection, first: date, last: date, timeframe: str = "1d") -> set[date]:
    """The sessions of ``first..last`` declared missing for every instrument: of every dataset, or (for the
    minute bars, ``timeframe`` 1m) of the datasets computed from minute bars."""
    rows = conn.execute(
        sa.text(
            "SELECT first_session, last_session FROM declared_gaps WHERE instrument_id IS NULL "
            "AND (dataset IS NULL OR CAST(:tf AS text) = '1m') AND first_session <= :l AND last_session >= :f"
        ),
        {"f": first, "l": last, "tf": timeframe},
    ).all()
    declared: set[date] = set()
    for lo, hi in rows:
        declared.update(date.fromordinal(o) for o in range(max(lo, first).toordinal(), min(hi, last).toordinal() + 1))
    return declared


def read_gaps(conn: sa.Connection, dataset: str | None, before: datetime, shard: Shard = ALL) -> pl.DataFrame:
    """The declared gaps (``WINDOW_SCHEMA``: instrument_id null for every instrument, from the start of the
    first missing trading day to the restart) that apply to ``dataset`` (None: the bars alone) and begin
    before ``before``, of the shard's instruments: where windows restart, and where nothing is stamped."""
    from marketfs.universe import active_sessions

    sessions = active_sessions()
    rows = conn.execute(
        sa.text(
            "SELECT instrument_id, first_session, restart_at FROM declared_gaps "
            "WHERE (dataset IS NULL OR dataset = :d) ORDER BY restart_at"
        ),
        {"d": dataset},
    ).all()
    windows = [(i, sessions.trading_day_window(first)[0], restart) for i, first, restart in rows]
    frame = pl.DataFrame(windows, schema=WINDOW_SCHEMA, orient="row").filter(pl.col("gap_from") < before)
    if frame.is_empty() or shard.is_all:
        return frame
    mine = [i for i in frame["instrument_id"].drop_nulls().unique().to_list() if shard.holds(i)]
    return frame.filter(pl.col("instrument_id").is_null() | pl.col("instrument_id").is_in(mine))


def drop_inside_gaps(frame: pl.DataFrame, gaps: pl.DataFrame, ts_column: str = "ts") -> pl.DataFrame:
    """``frame`` without rows stamped inside a declared gap of their instrument (or of every instrument)."""
    if gaps.is_empty() or frame.is_empty():
        return frame
    inside = pl.lit(False)
    # One term per declared gap overlapping the frame: gaps are few (a person declares each one).
    first, last = frame[ts_column].min(), frame[ts_column].max()
    overlapping = gaps.filter((pl.col("gap_from") <= last) & (pl.col("restart_at") > first))
    for instrument, gap_from, restart_at in overlapping.iter_rows():
        mine = pl.lit(True) if instrument is None else pl.col("instrument_id") == instrument
        inside = inside | (mine & (pl.col(ts_column) >= gap_from) & (pl.col(ts_column) < restart_at))
    return frame.filter(~inside)


def declared_instrument_days(conn: sa.Connection, start: datetime, end: datetime) -> dict[str, set[str]]:
    """Per session day in ``[start, end)``, the instruments declared missing for good on it (their bars):
    what a day's completeness does not expect."""
    from marketfs.universe import active_sessions

    sessions = active_sessions()
    rows = conn.execute(
        sa.text(
            "SELECT instrument_id, first_session, last_session FROM declared_gaps WHERE instrument_id IS NOT NULL "
            "AND dataset IS NULL AND restart_at > :s"
        ),
        {"s": start},
    ).all()
    days: dict[str, set[str]] = {}
    for instrument, first, last in rows:
        for day in sessions.between(first, last):
            if start <= sessions.trading_day_window(day)[1] <= end:
                days.setdefault(day.isoformat(), set()).add(instrument)
    return days


def restarts_at(restarts: pl.DataFrame, instruments: pl.Series, at: datetime) -> pl.DataFrame:
    """Per instrument, the latest restart at or before ``at``: what its history starts from (none: whole)."""
    due = restarts.filter(pl.col("restart_at") <= at)
    if due.is_empty():
        return pl.DataFrame(schema=RESTART_SCHEMA)
    ids = instruments.unique().drop_nulls().to_frame("instrument_id")
    every = due.filter(pl.col("instrument_id").is_null()).drop("instrument_id")
    own = due.filter(pl.col("instrument_id").is_not_null())
    parts = [own.join(ids, on="instrument_id", how="semi")]
    if every.height:
        parts.append(ids.join(every, how="cross"))
    return (
        pl.concat([p.select(list(RESTART_SCHEMA)) for p in parts])
        .group_by("instrument_id")
        .agg(pl.col("restart_at").max())
        .sort("instrument_id")
    )


def drop_before_restart(frame: pl.DataFrame, restarts: pl.DataFrame, ts_column: str = "ts") -> pl.DataFrame:
    """``frame`` without the rows of each instrument from before its restart."""
    if restarts.is_empty() or frame.is_empty():
        return frame
    return (
        frame.join(restarts, on="instrument_id", how="left", maintain_order="left")
        .filter(pl.col("restart_at").is_null() | (pl.col(ts_column) >= pl.col("restart_at")))
        .drop("restart_at")
    )
