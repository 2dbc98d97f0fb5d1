"""Bars (``ohlcv_1m``, ``ohlcv_1d``): replace a window atomically, read a window with its warm-up bars."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import sqlalchemy as sa
from psycopg import sql

from marketfs.holds import NO_HOLDS, Holds
from marketfs.shards import ALL, Shard
from marketfs.sources.base import BAR_SCHEMA
from marketfs.store.copy import copy_query_out
from marketfs.store.tables import replace_window, select_list

STORED_BAR_SCHEMA: dict[str, pl.DataType] = {**BAR_SCHEMA, "source_flags": pl.List(pl.String())}
BAR_TABLES = {"1m": "ohlcv_1m", "1d": "ohlcv_1d"}


def replace_bars(
    conn: sa.Connection,
    bars: pl.DataFrame,
    start: datetime,
    end: datetime,
    timeframe: str = "1m",
    shard: Shard = ALL,
    protect: Holds = NO_HOLDS,
    only: list[str] | None = None,
) -> int:
    """Make the bar table of ``timeframe`` hold exactly ``bars`` for ``[start, end)`` and the instruments of
    ``shard`` (``protect``, ``only``: see ``replace_window``), in the caller's transaction."""
    if "source_flags" not in bars.columns:
        bars = bars.with_columns(pl.lit([], pl.List(pl.String)).alias("source_flags"))
    table = BAR_TABLES[timeframe]
    return replace_window(
        conn, table, bars.select(list(STORED_BAR_SCHEMA)), "ts", start, end, shard=shard, protect=protect, only=only
    )


def read_bars(
    conn: sa.Connection,
    start: datetime,
    end: datetime,
    warmup_bars: int = 0,
    timeframe: str = "1m",
    shard: Shard = ALL,
    active_since: datetime | None = None,
) -> pl.DataFrame:
    """Bars in ``[start, end)`` plus, per instrument present there (or, with ``active_since``, present
    in ``[active_since, end)``), its bars before ``start`` from the ``warmup_bars``-th last *valid* one
    on (or all of them when it has fewer).

    Warm-up is counted in valid bars, as the computation counts them (``valid_bar``): invalid bars
    before a day (close 0 released from quarantine) must not shorten its history, or the day's rolling
    features would differ from a run over the whole history. It is counted in bars, not days, so
    weekends, holidays and halts never shorten it either. The invalid bars in between come along:
    they still say the instrument traded (stale_after).
    """
    from marketfs.features.compute import VALID_BAR_SQL

    table = sql.Identifier(BAR_TABLES[timeframe])
    params = {"start": start, "end": end, **shard.params}
    if warmup_bars <= 0:
        window = sql.SQL("SELECT {cols} FROM {table} b WHERE b.ts >= %(start)s AND b.ts < %(end)s AND {mine}").format(
            cols=select_list(STORED_BAR_SCHEMA, "b"),
            table=table,
            mine=shard.condition(sql.Identifier("b", "instrument_id")),
        )
        frame = copy_query_out(conn, window, params, STORED_BAR_SCHEMA)
        return frame.sort("instrument_id", "ts")
    query = sql.SQL(
        """
        SELECT {cols} FROM {table} b WHERE b.ts >= %(start)s AND b.ts < %(end)s AND {mine}
        UNION ALL
        SELECT {warm_cols} FROM (
            SELECT DISTINCT instrument_id FROM {table} WHERE ts >= %(since)s AND ts < %(end)s AND {mine_i}
        ) i
        CROSS JOIN LATERAL (
            SELECT coalesce((
                -- IS TRUE: the planner cannot multiply the eleven conditions' selectivities into "one row", which,
                -- on statistics older than the morning's bars, made it read and sort every bar of the instrument
                -- (0.15 ms each) instead of walking the index back to the warmup-th valid one (0.02 ms).
                SELECT v.ts FROM {table} v
                WHERE v.instrument_id = i.instrument_id AND v.ts < %(start)s AND ({valid}) IS TRUE
                ORDER BY v.ts DESC OFFSET %(warmup)s - 1 LIMIT 1
            ), '-infinity') AS since
            -- OFFSET 0 keeps this a subquery evaluated once per instrument: flattened, the planner ran the
            -- look-up once per stored bar (195,534 times, 2.2 s, for one minute of 500 instruments).
            OFFSET 0
        ) f
        CROSS JOIN LATERAL (
            -- OFFSET 0 again: flattened, this was a hash join of every stored bar before start (203,490 rows
            -- for 500 instruments' 40 each), filtered afterwards; fenced, one index range per instrument.
            SELECT * FROM {table} b WHERE b.instrument_id = i.instrument_id AND b.ts < %(start)s AND b.ts >= f.since
            OFFSET 0
        ) w
        """
    ).format(
        cols=select_list(STORED_BAR_SCHEMA, "b"),
        warm_cols=select_list(STORED_BAR_SCHEMA, "w"),
        table=table,
        valid=sql.SQL(VALID_BAR_SQL),
        mine=shard.condition(sql.Identifier("b", "instrument_id")),
        mine_i=shard.condition(),
    )
    since = start if active_since is None else min(start, active_since)
    frame = copy_query_out(conn, query, {**params, "warmup": warmup_bars, "since": since}, STORED_BAR_SCHEMA)
    return frame.sort("instrument_id", "ts")


def newest_bar(conn: sa.Connection, start: datetime, end: datetime, shard: Shard = ALL) -> datetime | None:
    """The newest stamp among the stored minute bars in ``[start, end)`` of ``shard``'s instruments: how
    far the feed has delivered (None: nothing of the window yet)."""
    return conn.execute(
        sa.text(f"SELECT max(ts) FROM ohlcv_1m WHERE ts >= :start AND ts < :end AND {shard.text_condition()}"),
        {"start": start, "end": end, **shard.params},
    ).scalar()


def read_bars_for(
    conn: sa.Connection,
    timeframe: str,
    start: datetime,
    end: datetime,
    warmup_bars: int,
    shard: Shard = ALL,
    active_since: datetime | None = None,
) -> pl.DataFrame:
    """Bars of ``timeframe`` in ``[start, end)`` with up to ``warmup_bars`` of them before ``start`` per
    instrument (of those with bars in the window, or since ``active_since``): read from its table, or
    resampled from the minute bars (``timeframes.py``)."""
    from marketfs.features.resample import resampled_with_warmup
    from marketfs.features.timeframes import timeframe as timeframe_spec

    spec = timeframe_spec(timeframe)
    stored = next(tf for tf, table in BAR_TABLES.items() if table == spec.bar_table)
    if not spec.resample_on_read:
        return read_bars(
            conn, start, end, warmup_bars=warmup_bars, timeframe=stored, shard=shard, active_since=active_since
        )
    # Enough minute bars for warmup_bars whole intervals after the first, possibly partial, is dropped.
    read_limit = (warmup_bars + 1) * spec.minutes
    minutes = read_bars(
        conn, start, end, warmup_bars=read_limit, timeframe=stored, shard=shard, active_since=active_since
    )
    return resampled_with_warmup(minutes, timeframe, start, read_limit)


def upsert_bars(conn: sa.Connection, bars: pl.DataFrame) -> pl.DataFrame:
    """Insert new minute bars and replace changed ones, leaving unchanged ones as they are (their
    ``ingested_at`` too); returns (instrument_id, ts) of the rows that changed. For bars delivered
    piece by piece (a push, today's delivery so far): ``replace_bars`` owns whole windows."""
    from marketfs.store.copy import copy_frame_in, raw_connection

    columns = list(STORED_BAR_SCHEMA)
    values = [c for c in columns if c not in ("instrument_id", "ts")]
    raw = raw_connection(conn)
    raw.execute("CREATE TEMP TABLE IF NOT EXISTS pushed_bars (LIKE ohlcv_1m INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
    copy_frame_in(conn, "pushed_bars", bars.select(columns))
    ident = sql.Identifier
    statement = sql.SQL(
        "INSERT INTO ohlcv_1m AS b ({cols}) SELECT {cols} FROM pushed_bars ON CONFLICT (instrument_id, ts) DO UPDATE "
        "SET {sets}, ingested_at = now() WHERE ({old}) IS DISTINCT FROM ({new}) RETURNING b.instrument_id, "
        "(extract(epoch from b.ts) * 1000000)::bigint"
    ).format(
        cols=sql.SQL(", ").join(map(ident, columns)),
        sets=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(ident(c)) for c in values),
        old=sql.SQL(", ").join(sql.Identifier("b", c) for c in values),
        new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(ident(c)) for c in values),
    )
    rows = raw.execute(statement).fetchall()
    changed = pl.DataFrame(rows, schema={"instrument_id": pl.String, "ts": pl.Int64}, orient="row")
    return changed.with_columns(pl.col("ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))
