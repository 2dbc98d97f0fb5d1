"""Bulk transfer between polars frames and PostgreSQL with COPY, over a psycopg 3 connection."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import polars as pl
import psycopg
from psycopg import sql

if TYPE_CHECKING:
    import sqlalchemy as sa

EPOCH_US = "(extract(epoch from {col}) * 1000000)::bigint"
ROWS_PER_COPY_SLICE = 100_000


def raw_connection(conn: sa.Connection | psycopg.Connection) -> psycopg.Connection:
    """The psycopg connection under a SQLAlchemy connection, sharing its transaction (or ``conn`` itself)."""
    if isinstance(conn, psycopg.Connection):
        return conn
    return conn.connection.driver_connection  # type: ignore[return-value]


def csv_ready(frame: pl.DataFrame) -> pl.DataFrame:
    out = []
    for name, dtype in frame.schema.items():
        col = pl.col(name)
        if isinstance(dtype, pl.List):
            # PostgreSQL array literal; the values are flag names (no commas, quotes or braces).
            out.append(pl.concat_str(pl.lit("{"), col.list.join(","), pl.lit("}")).alias(name))
        elif isinstance(dtype, pl.Datetime):
            out.append(col.dt.convert_time_zone("UTC").dt.strftime("%Y-%m-%d %H:%M:%S%.6f+00").alias(name))
        else:
            out.append(col)
    return frame.select(out)


class NonFiniteWriteError(ValueError):
    """A write of NaN or an infinity into a served table, refused by the database's finite checks."""


def copy_frame_in(conn: sa.Connection | psycopg.Connection, table: str, frame: pl.DataFrame) -> int:
    """COPY every row of ``frame`` into ``table`` (columns by name); returns the row count."""
    if frame.is_empty():
        return 0
    statement = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in frame.columns)
    )
    try:
        with raw_connection(conn).cursor() as cur, cur.copy(statement) as copy:
            # In slices: the text of a whole chunk (~370 bytes a vector, 344 MB for 936,000) is never held at once.
            for offset in range(0, frame.height, ROWS_PER_COPY_SLICE):
                buffer = io.BytesIO()
                csv_ready(frame.slice(offset, ROWS_PER_COPY_SLICE)).write_csv(
                    buffer, include_header=False, null_value=""
                )
                copy.write(buffer.getbuffer())
    except psycopg.errors.CheckViolation as exc:
        constraint = exc.diag.constraint_name or ""
        if not constraint.endswith("_finite"):
            raise
        column = constraint.removeprefix(f"{table}_").removesuffix("_finite")
        # A gate should have refused the value before the write: say so, with the row the server names.
        raise NonFiniteWriteError(
            f"{table}: the database refused a non-finite value (NaN or infinity) in column {column}; "
            f"{exc.diag.message_detail or 'failing row not reported'}. Nothing of this write was kept. "
            "A quality gate (or a release) should have held the row back: report this as a bug, with this message."
        ) from exc
    return frame.height


def copy_query_out(
    conn: sa.Connection | psycopg.Connection, query: sql.Composable, params: dict | None, schema: dict[str, pl.DataType]
) -> pl.DataFrame:
    """Run ``query`` (with bound ``params``) through COPY TO and read it as a frame of ``schema``.

    Timestamp columns must be selected as epoch microseconds (see ``EPOCH_US``): it is exact
    and avoids parsing the server's text format.
    """
    buffer = io.BytesIO()
    statement = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv)").format(query)
    with raw_connection(conn).cursor() as cur, cur.copy(statement, params) as copy:
        for block in copy:
            buffer.write(block)
    read_schema = {
        name: (pl.Int64 if isinstance(dtype, pl.Datetime) else pl.String if isinstance(dtype, pl.List) else dtype)
        for name, dtype in schema.items()
    }
    if buffer.tell() == 0:
        return pl.DataFrame(schema=schema)
    buffer.seek(0)
    frame = pl.read_csv(buffer, has_header=False, new_columns=list(schema), schema=read_schema)
    fixes = []
    for name, dtype in schema.items():
        if isinstance(dtype, pl.Datetime):
            fixes.append(pl.col(name).cast(pl.Datetime("us")).dt.replace_time_zone("UTC").alias(name))
        elif isinstance(dtype, pl.List):
            fixes.append(
                pl.col(name)
                .str.strip_chars("{}")
                .str.split(",")
                .list.eval(pl.element().filter(pl.element() != ""))
                .alias(name)
            )
    return frame.with_columns(fixes) if fixes else frame
