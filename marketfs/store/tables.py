"""Window-shaped reads and writes shared by every table: replace a time window, read one back."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import sqlalchemy as sa
from psycopg import sql

from marketfs.holds import NO_HOLDS, Holds
from marketfs.shards import ALL, Shard
from marketfs.store.copy import EPOCH_US, copy_frame_in, copy_query_out
from marketfs.store.timescale import lift_decompression_limit


def select_list(schema: dict[str, pl.DataType], alias: str | None = None) -> sql.Composable:
    """Columns of ``schema`` for ``copy_query_out``: timestamps as epoch microseconds."""

    def col(name: str) -> sql.Composable:
        return sql.Identifier(alias, name) if alias else sql.Identifier(name)

    return sql.SQL(", ").join(
        sql.SQL(EPOCH_US).format(col=col(c)) if isinstance(t, pl.Datetime) else col(c) for c, t in schema.items()
    )


def writable(
    frame: pl.DataFrame,
    table: str,
    ts_column: str,
    shard: Shard,
    protect: Holds = NO_HOLDS,
    only: list[str] | None = None,
    instrument: sql.Composable | None = None,
) -> tuple[sql.Composable, dict]:
    """The SQL condition (and its parameters) for the stored rows a window write may replace: the shard's,
    less held instruments' from their hold on, or only the instruments named. Refuses a ``frame`` holding
    rows the write may not replace. ``instrument``: the column, when the statement aliases the table."""
    if shard.filter(frame).height != frame.height:
        raise ValueError(f"rows of {table} outside {shard} were given to a write of {shard}")
    if protect.filter(frame, ts_column).height != frame.height:
        raise ValueError(f"rows of held instruments were given to a write of {table}")
    if only is not None and frame.filter(~pl.col("instrument_id").is_in(only)).height:
        raise ValueError(f"rows of {table} outside the instruments {only} being replaced")
    column = instrument if instrument is not None else sql.Identifier("instrument_id")
    conditions = [shard.condition(column), protect.condition(ts=ts_column)]
    if only is not None:
        conditions.append(sql.SQL("{} = ANY(%(only)s)").format(column))
    params = {**shard.params, **protect.params, **({"only": only} if only is not None else {})}
    return sql.SQL(" AND ").join(conditions), params


def replace_window(
    conn: sa.Connection,
    table: str,
    frame: pl.DataFrame,
    ts_column: str,
    start: datetime,
    end: datetime,
    scope: dict[str, str] | None = None,
    shard: Shard = ALL,
    protect: Holds = NO_HOLDS,
    only: list[str] | None = None,
) -> int:
    """Make ``table`` hold exactly ``frame`` for ``start <= ts_column < end`` (and ``scope`` equalities),
    for the instruments of ``shard``: the other shards' rows of the window are not touched.

    ``protect``: held instruments, whose served rows from their hold on stay as they are (``frame`` must not
    hold them). ``only``: replace these instruments' rows alone (a released instrument-day batch).

    Runs in the caller's transaction: a failure before commit leaves the table as it was.
    """
    mine, mine_params = writable(frame, table, ts_column, shard, protect, only)
    outside = frame.filter((pl.col(ts_column) < start) | (pl.col(ts_column) >= end))
    if outside.height:
        raise ValueError(f"{outside.height} row(s) of {table} fall outside the window [{start}, {end}) being replaced")
    conditions = [
        sql.SQL("{} >= %(start)s AND {} < %(end)s").format(sql.Identifier(ts_column), sql.Identifier(ts_column))
    ]
    params: dict = {"start": start, "end": end, **mine_params}
    conditions.append(mine)
    for i, (column, value) in enumerate((scope or {}).items()):
        conditions.append(sql.SQL("{} = %(s{})s").format(sql.Identifier(column), sql.SQL(str(i))))
        params[f"s{i}"] = value
    lift_decompression_limit(conn)
    # Writers of one table and shard take turns, so two runs of the same partition end as one consistent
    # result; runs of different shards write disjoint rows and go on at once.
    with conn.connection.driver_connection.cursor() as cur:
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtext('replace_window'), hashtext(%s))", (f"{table}/{shard.index}",)
        )
    delete = sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier(table), sql.SQL(" AND ").join(conditions))
    with conn.connection.driver_connection.cursor() as cur:
        cur.execute(delete, params)
    return copy_frame_in(conn, table, frame)


def read_window(
    conn: sa.Connection,
    table: str,
    schema: dict[str, pl.DataType],
    ts_column: str,
    start: datetime,
    end: datetime,
    order_by: tuple[str, ...],
    shard: Shard = ALL,
) -> pl.DataFrame:
    query = sql.SQL("SELECT {} FROM {} WHERE {} >= %(start)s AND {} < %(end)s AND {} ORDER BY {}").format(
        select_list(schema),
        sql.Identifier(table),
        sql.Identifier(ts_column),
        sql.Identifier(ts_column),
        shard.condition(),
        sql.SQL(", ").join(map(sql.Identifier, order_by)),
    )
    return copy_query_out(conn, query, {"start": start, "end": end, **shard.params}, schema)
