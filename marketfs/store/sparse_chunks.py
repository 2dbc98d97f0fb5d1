"""TimescaleDB: chunks sized by the rows they hold, not only by time, where history is sparse.

A chunk's span is set before its rows arrive, from the rows a day is expected to bring at every timeframe
(``timescale.chunk_interval``); where only daily history exists (a vendor's years of daily bars before
minute bars start), an 8-day chunk of feature vectors holds about 6 rows per instrument. The columnstore
segments by instrument, so each batch held 6 rows and the chunk grew when converted (20 of 25 chunks at
0.67-0.71x, "poor compression ratio" warnings). After each write, adjacent chunks with few rows per
instrument are merged (``merge_chunks``, TimescaleDB 2.18+) into chunks of up to ``MAX_SPAN_DAYS``, as
long a span as the default interval allows at its sparsest; chunks holding minute data never are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

logger = logging.getLogger(__name__)

# Fewer rows than this per instrument: the columnstore's batches are too short to compress (a batch holds up
# to 1,000 rows of one instrument; daily vectors over 8 days are 6).
SPARSE_ROWS_PER_INSTRUMENT = 100
# The longest chunk a merge makes, the same bound as the default chunk interval's.
MAX_SPAN_DAYS = 90
# A merge locks its chunks: it gives up rather than queue behind (and hold up) a writer of them.
MERGE_LOCK_TIMEOUT = "2s"


@dataclass(frozen=True)
class Chunk:
    name: str
    start: datetime
    end: datetime
    converted: bool
    rows_per_instrument: float | None  # None: an empty chunk

    @property
    def sparse(self) -> bool:
        return self.rows_per_instrument is not None and self.rows_per_instrument < SPARSE_ROWS_PER_INSTRUMENT


def consolidate_sparse_chunks(engine: sa.Engine, table: str, start: datetime, end: datetime) -> list[str]:
    """Merge runs of adjacent sparse chunks of ``table`` around ``[start, end)`` into chunks of up to
    ``MAX_SPAN_DAYS``; return what was merged. Converted members are converted back to the rowstore first
    and the merged chunk to the columnstore after, so that its batches are whole."""
    reach = timedelta(days=MAX_SPAN_DAYS)
    with engine.connect() as conn:
        chunks = _chunks(conn, table, start - reach, end + reach)
        conn.commit()
    done = []
    for group in _runs(chunks):
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("SELECT set_config('lock_timeout', :t, false)"), {"t": MERGE_LOCK_TIMEOUT})
            try:
                done.append(_merge(conn, table, group))
            except sa.exc.OperationalError as exc:
                # A writer holds a chunk: the next write's upkeep tries again.
                logger.info("merging chunks of %s skipped (%s)", table, str(exc.orig).splitlines()[0])
            finally:
                conn.execute(sa.text("RESET lock_timeout"))
    return done


def _chunks(conn: sa.Connection, table: str, start: datetime, end: datetime) -> list[Chunk]:
    rows = conn.execute(
        sa.text(
            "SELECT format('%I.%I', c.chunk_schema, c.chunk_name), c.range_start, c.range_end, c.is_compressed, "
            "z.numrows_pre_compression, z.numrows_post_compression "
            "FROM timescaledb_information.chunks c "
            "JOIN _timescaledb_catalog.chunk k ON k.schema_name = c.chunk_schema AND k.table_name = c.chunk_name "
            "LEFT JOIN _timescaledb_catalog.compression_chunk_size z ON z.chunk_id = k.id "
            "WHERE c.hypertable_name = :t AND c.hypertable_schema = current_schema() "
            "AND c.range_end > :s AND c.range_start < :e ORDER BY c.range_start"
        ),
        {"t": table, "s": start, "e": end},
    ).all()
    chunks = []
    for name, first, last, converted, before, batches in rows:
        if converted and batches:
            # A batch holds one instrument's rows (up to 1,000): rows per batch is rows per instrument here.
            per_instrument = before / batches
        else:
            # One instrument's rows, counted up to the threshold through the key (every served table's leads
            # with instrument_id): a few index entries, however large the chunk.
            per_instrument = (
                conn.execute(
                    sa.text(
                        f"SELECT count(*) FROM (SELECT 1 FROM ONLY {name} WHERE instrument_id = "  # quoted by format()
                        f"(SELECT instrument_id FROM ONLY {name} LIMIT 1) LIMIT :cap) s"
                    ),
                    {"cap": SPARSE_ROWS_PER_INSTRUMENT},
                ).scalar()
                or None
            )
        if (
            per_instrument is not None
            and per_instrument < SPARSE_ROWS_PER_INSTRUMENT
            and _minute_bars_in(conn, first, last)
        ):
            # Sparse so far, but a span of minute data: its minute vectors are still to come (a run writes the
            # daily dataset before, or beside, the minute ones), and a merged span would hold them too.
            per_instrument = float(SPARSE_ROWS_PER_INSTRUMENT)
        chunks.append(Chunk(name, first, last, converted, per_instrument))
    return chunks


def _minute_bars_in(conn: sa.Connection, start: datetime, end: datetime) -> bool:
    return bool(
        conn.execute(
            sa.text("SELECT EXISTS (SELECT 1 FROM ohlcv_1m WHERE ts >= :s AND ts < :e)"), {"s": start, "e": end}
        ).scalar()
    )


def _runs(chunks: list[Chunk]) -> list[list[Chunk]]:
    """Runs of two or more adjacent sparse chunks, each spanning at most ``MAX_SPAN_DAYS``, oldest first."""
    runs: list[list[Chunk]] = []
    current: list[Chunk] = []
    for chunk in chunks:
        fits = (
            current
            and chunk.sparse
            and chunk.start == current[-1].end
            and chunk.end - current[0].start <= timedelta(days=MAX_SPAN_DAYS)
        )
        if fits:
            current.append(chunk)
            continue
        if len(current) > 1:
            runs.append(current)
        current = [chunk] if chunk.sparse else []
    if len(current) > 1:
        runs.append(current)
    return runs


def _merge(conn: sa.Connection, table: str, group: list[Chunk]) -> str:
    for chunk in group:
        if chunk.converted:
            conn.execute(
                sa.text("CALL convert_to_rowstore(CAST(:c AS regclass), if_columnstore => true)"), {"c": chunk.name}
            )
    conn.execute(sa.text("CALL merge_chunks(CAST(:c AS regclass[]))"), {"c": [chunk.name for chunk in group]})
    if any(chunk.converted for chunk in group):
        merged = conn.execute(
            sa.text(
                "SELECT format('%I.%I', chunk_schema, chunk_name) FROM timescaledb_information.chunks "
                "WHERE hypertable_name = :t AND hypertable_schema = current_schema() AND range_start = :s"
            ),
            {"t": table, "s": group[0].start},
        ).scalar_one()
        conn.execute(sa.text("CALL convert_to_columnstore(CAST(:c AS regclass))"), {"c": merged})
    return (
        f"{table}: {len(group)} sparse chunks of [{group[0].start:%Y-%m-%d}, {group[-1].end:%Y-%m-%d}) merged into one"
    )
