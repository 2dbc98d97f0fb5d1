"""``drift_reference_days``: each written day's drift columns, stored so a trailing reference reads 20 rows.

A derived copy of ``feature_vectors``, never the truth: a day's row holds its vectors' drift columns
(``ReferenceDays``: float64, each column sorted, NaN for null) exactly as made from a read of the day's
vectors, so a drift verdict is the same whichever the reference came from.

- Written by the daily writer, in the transaction that writes the day whole (``write_reference_days``).
- Every write to a window of ``feature_vectors`` (``upsert_window``: a re-run, an intraday step, a
  release, a restatement, a retraction) first deletes the rows of the days it touches, for every shard
  layout that overlaps its own (``forget_reference_days``); only the daily writer puts one back.
- A read (``read_trailing_reference``) takes the stored days it finds and reads the vectors of the
  others, so a day written before this table existed, or by a partial write, still counts.
- Old rows go: a day further back than any trailing reference reaches is deleted as newer days are written.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import sqlalchemy as sa

from marketfs.features.registry import FeatureSet
from marketfs.reference_days import DayOf, ReferenceDays, day_label, day_number
from marketfs.shards import Shard
from marketfs.store.copy import raw_connection

DTYPE = np.dtype("<f8")

# A row sharing a day with a write is stale when the two shard layouts can hold the same instrument: either is
# the whole universe, the counts differ (buckets re-group), or it is the same shard.
_OVERLAPS = "(shard_count = 1 OR :shard_count = 1 OR shard_count <> :shard_count OR shard_index = :shard_index)"


def forget_reference_days(
    conn: sa.Connection, *, feature_set: FeatureSet, timeframe: str, start: datetime, end: datetime, shard: Shard
) -> None:
    """Delete the stored reference of every day overlapping ``[start, end)`` that ``shard``'s write may change."""
    conn.execute(
        sa.text(
            "DELETE FROM drift_reference_days WHERE feature_set_version = :v AND timeframe = :tf "
            f"AND day_start < :end AND day_end > :start AND {_OVERLAPS}"
        ),
        {"v": feature_set.version, "tf": timeframe, "start": start, "end": end, **shard.params},
    )


def write_reference_days(
    conn: sa.Connection,
    days: ReferenceDays,
    *,
    feature_set: FeatureSet,
    timeframe: str,
    windows: dict[str, tuple[datetime, datetime]],
    utc_dates: dict[str, list[date]],
    shard: Shard,
    keep_days: int,
    run_id: str | None = None,
) -> int:
    """Store each day of ``days`` (``windows[day]``: its trading day's ``[start, end)``; ``utc_dates[day]``: the
    UTC dates its vectors' ts fall on, so a reader can count days as the vectors would), which must be exactly
    what ``feature_vectors`` now holds of those days for ``shard`` (as ``ReferenceDays.from_frame`` makes them
    from a read of the days). Days more than ``keep_days`` calendar days before the last one written are deleted.
    Returns the days stored."""
    if not days.days:
        return 0
    rows = []
    for number, values in zip(days.days, days.values, strict=True):
        label = day_label(number)
        start, end = windows[label]
        rows.append(
            {
                "v": feature_set.version,
                "tf": timeframe,
                "day": label,
                "start": start,
                "end": end,
                "columns": list(days.columns),
                "rows": int(values.shape[1]),
                "utc_dates": sorted(utc_dates[label]),
                "values": np.ascontiguousarray(values, DTYPE).tobytes(),
                "run_id": run_id,
                **shard.params,
            }
        )
    params = {"v": feature_set.version, "tf": timeframe, **shard.params}
    conn.execute(
        sa.text(
            "DELETE FROM drift_reference_days WHERE feature_set_version = :v AND timeframe = :tf "
            f"AND day = ANY(CAST(:days AS date[])) AND {_OVERLAPS}"
        ),
        {**params, "days": [r["day"] for r in rows]},
    )
    conn.execute(
        sa.text(
            "INSERT INTO drift_reference_days (feature_set_version, timeframe, day, shard_count, shard_index, "
            "day_start, day_end, columns, rows, utc_dates, vector_values, run_id) VALUES (:v, :tf, CAST(:day AS date), "
            ":shard_count, :shard_index, :start, :end, :columns, :rows, :utc_dates, :values, :run_id)"
        ),
        rows,
    )
    conn.execute(
        sa.text(
            "DELETE FROM drift_reference_days WHERE feature_set_version = :v AND timeframe = :tf "
            "AND shard_count = :shard_count AND shard_index = :shard_index AND day < CAST(:oldest AS date)"
        ),
        {**params, "oldest": (datetime.fromisoformat(rows[-1]["day"]) - timedelta(days=keep_days)).date()},
    )
    return len(rows)


def read_reference_days(
    conn: sa.Connection,
    *,
    feature_set: FeatureSet,
    timeframe: str,
    days: list[str],
    columns: list[str],
    shard: Shard,
) -> ReferenceDays:
    """The stored days among ``days`` that hold every one of ``columns`` (others are left out)."""
    # Binary results: the arrays arrive as bytes, not as hex text twice their size.
    with raw_connection(conn).cursor(binary=True) as cur:
        found = cur.execute(
            "SELECT day, columns, rows, vector_values FROM drift_reference_days WHERE feature_set_version = %(v)s "
            "AND timeframe = %(tf)s AND shard_count = %(shard_count)s AND shard_index = %(shard_index)s "
            "AND day = ANY(%(days)s::date[]) ORDER BY day",
            {"v": feature_set.version, "tf": timeframe, "days": days, **shard.params},
        ).fetchall()
    numbers, values = [], []
    for day, stored_columns, rows, payload in found:
        if not set(columns) <= set(stored_columns):
            continue
        matrix = np.frombuffer(payload, DTYPE).reshape(len(stored_columns), rows)
        numbers.append(day_number(day))
        values.append(np.ascontiguousarray(matrix[[stored_columns.index(c) for c in columns]]))
    return ReferenceDays(tuple(columns), tuple(numbers), tuple(values))


def read_trailing_reference(
    conn: sa.Connection,
    *,
    feature_set: FeatureSet,
    timeframe: str,
    before: datetime,
    partitions: int,
    columns: list[str],
    shard: Shard,
    day_of: DayOf,
) -> ReferenceDays:
    """The trailing reference before ``before``: the same days and values as a read of the vectors from
    ``recent_partitions_start`` split by ``day_of``; from the stored days where there are some, from the vectors
    for the others."""
    from marketfs.store.feature_vectors import read_vectors, recent_partitions_start
    from marketfs.universe import active_sessions

    sessions = active_sessions()
    start = _start_from_stored(conn, feature_set, timeframe, before, partitions, shard)
    if start is None:
        start = recent_partitions_start(
            conn, feature_set=feature_set, timeframe=timeframe, before=before, partitions=partitions, shard=shard
        )
    if start is None:
        return ReferenceDays.empty(columns)
    # Only a day whose whole trading day lies in the window may come from the table: the window is what a
    # read of the vectors would return.
    whole = [
        d.isoformat()
        for d in sessions.trading_days_overlapping(start, before)
        if start <= sessions.trading_day_window(d)[0] and sessions.trading_day_window(d)[1] <= before
    ]
    stored = read_reference_days(
        conn, feature_set=feature_set, timeframe=timeframe, days=whole, columns=columns, shard=shard
    )
    # The rest of the window (between the stored days' windows), read from the vectors.
    gaps: list[tuple[datetime, datetime]] = []
    cursor = start
    for day in stored.labels:
        day_start, day_end = sessions.trading_day_window(day)
        if cursor < day_start:
            gaps.append((cursor, day_start))
        cursor = day_end
    if cursor < before:
        gaps.append((cursor, before))
    fallback = ReferenceDays.empty(columns)
    for a, b in gaps:
        vectors = read_vectors(
            conn, feature_set=feature_set, timeframe=timeframe, start=a, end=b, columns=columns, shard=shard
        )
        fallback = fallback.merged(ReferenceDays.from_frame(vectors, columns, day_of))
    return stored.merged(fallback.without(stored.days))


def _start_from_stored(
    conn: sa.Connection, feature_set: FeatureSet, timeframe: str, before: datetime, partitions: int, shard: Shard
) -> datetime | None:
    """``recent_partitions_start`` from the stored rows alone, when they can say it; else None.

    They can when each of the ``partitions`` sessions that end at ``before`` has its row: those sessions' windows
    then cover ``[their first's start, before)`` without a gap, every vector there is in a row, and the rows'
    UTC dates are the dates the vectors query would count. With at least ``partitions`` of them, the earliest
    counted is the same as that query's (which reads every vector of those weeks)."""
    from marketfs.universe import active_sessions

    sessions = active_sessions()
    last = sessions.trading_day(pl.Series([before - timedelta(microseconds=1)], dtype=pl.Datetime("us", "UTC"))).item()
    if last is None or sessions.trading_day_window(last)[1] != before:
        return None
    recent = sessions.between(date.min, last)[-partitions:]
    if len(recent) < partitions:
        return None
    found = conn.execute(
        sa.text(
            "SELECT day, utc_dates FROM drift_reference_days WHERE feature_set_version = :v AND timeframe = :tf "
            "AND shard_count = :shard_count AND shard_index = :shard_index AND day = ANY(CAST(:days AS date[]))"
        ),
        {"v": feature_set.version, "tf": timeframe, "days": [d.isoformat() for d in recent], **shard.params},
    ).all()
    if len(found) < partitions:
        return None
    dates = sorted({d for _, utc_dates in found for d in utc_dates})
    if len(dates) < partitions:
        return None
    first = datetime.combine(dates[-partitions], datetime.min.time(), UTC)
    session = sessions.trading_day(pl.Series([first], dtype=pl.Datetime("us", "UTC"))).item()
    return sessions.trading_day_window(session)[0] if session is not None else first
