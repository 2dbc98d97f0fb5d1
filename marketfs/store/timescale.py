"""TimescaleDB: columnstore settings, policies that follow the configuration, the daily rollup, and
keeping what a write touched in the columnstore.

Used only when the server has the extension (and ``MARKETFS_TIMESCALEDB`` is not ``off``). Settings
come from the environment and are reconciled with the jobs on every migrate (every run), each
change returned and said by ``migrate`` (printed by the CLI, in the run's Dagster event log):

    MARKETFS_COMPRESS_AFTER=30 days          move chunks older than this to the columnstore ("off": no policy)
    MARKETFS_RETENTION_<TABLE>=2 years       drop chunks older than this (OHLCV_1M, OHLCV_1D, NEWS_EVENTS,
                                             FEATURE_VECTORS; unset: keep everything, and no job)
    MARKETFS_CHUNK_INTERVAL_<TABLE>=7 days   the time span of new chunks (default: from the expected rows
    MARKETFS_EXPECTED_INSTRUMENTS=50         per day, see chunk_interval)

Retention counts from now(): sample data older than ``drop_after`` disappears at the next job run,
which is why it is off unless asked for. The daily rollup keeps what it aggregated past the
feature vectors' retention: its refresh never reaches before the retention horizon, nor, once
retention is removed or lengthened, before the oldest vectors still held.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta

import sqlalchemy as sa

from marketfs.features.flags import QualityFlag
from marketfs.store.sparse_chunks import consolidate_sparse_chunks

logger = logging.getLogger(__name__)

# (segment by, order by) per hypertable, for the reads that run:
# - every read names one instrument (a point-in-time lookup, latest(), a window read that is then
#   split by instrument), so rows are segmented by instrument: a read decompresses only its own;
# - feature_vectors: version and timeframe lead the order, so a batch's min/max prune the other
#   versions and timeframes. Segmenting by them too split daily vectors into batches of 5 rows.
# - news_events: event_id ends the order, as the key (instrument_id, published_at, event_id) does.
# ohlcv_1d stays in the rowstore: a day is one row per instrument, too few to compress well.
COLUMNSTORE = {
    "ohlcv_1m": ("instrument_id", "ts DESC"),
    "news_events": ("instrument_id", "published_at DESC, event_id"),
    "feature_vectors": ("instrument_id", "feature_set_version, timeframe, ts DESC"),
}
HYPERTABLES = {"ohlcv_1m": "ts", "ohlcv_1d": "ts", "news_events": "published_at", "feature_vectors": "ts"}

# Rows each instrument adds to a table per day, at most: the basis of the default chunk interval.
ROWS_PER_INSTRUMENT_DAY = {"ohlcv_1m": 1440, "ohlcv_1d": 1, "news_events": 50, "feature_vectors": 3 * 1440 + 288 + 1}
# About this many rows per chunk: a recent chunk and its indexes stay in memory while it is written.
ROWS_PER_CHUNK = 2_000_000

ROLLUP = "feature_quality_daily"

# An upsert touching compressed chunks decompresses rows and stops at this many per transaction
# (100,000 by default); a re-run of an old partition is bounded by its window, so lift it there.
DECOMPRESSION_LIMIT_GUC = "timescaledb.max_tuples_decompressed_per_dml_transaction"


# Combinations known not to work: (TimescaleDB release series, PostgreSQL server_version_num from, to, what
# happens). The README's "Supported versions" names what is tested.
KNOWN_BAD_VERSIONS = (
    (
        "2.28",
        150019,
        159999,
        'every TimescaleDB background job fails (columnstore, retention, rollup refresh: "cannot drop portal '
        '"" while it is being set up"); 2.28 is tested up to PostgreSQL 15.18',
    ),
)
# The columnstore API (enable_columnstore, add_columnstore_policy, convert_to_columnstore) and merge_chunks.
OLDEST_TIMESCALEDB = (2, 18)


def known_bad_combination(timescaledb: str, server_version_num: int, server_version: str) -> str | None:
    """What goes wrong with TimescaleDB ``timescaledb`` on this PostgreSQL, and the fix; None when nothing known."""
    release = tuple(int(part) for part in timescaledb.split("-")[0].split(".")[:2])
    if release < OLDEST_TIMESCALEDB:
        return (
            f"TimescaleDB {timescaledb} is older than {'.'.join(map(str, OLDEST_TIMESCALEDB))}, whose columnstore "
            "API the migrations use. Fix: install TimescaleDB 2.18 or newer and update the extension in this database"
        )
    for series, low, high, what in KNOWN_BAD_VERSIONS:
        if ".".join(map(str, release)) == series and low <= server_version_num <= high:
            return (
                f"TimescaleDB {timescaledb} on PostgreSQL {server_version}: {what}. Fix: PostgreSQL 15.18 (hold the "
                "server package at it), or PostgreSQL 16 or newer"
            )
    return None


def version_warning(conn: sa.Connection) -> str | None:
    """``known_bad_combination`` of this server and its TimescaleDB."""
    extversion, number, version = conn.execute(
        sa.text(
            "SELECT extversion, current_setting('server_version_num')::int, current_setting('server_version') "
            "FROM pg_extension WHERE extname = 'timescaledb'"
        )
    ).one()
    return known_bad_combination(extversion, number, version.split()[0])


def lift_decompression_limit(conn: sa.Connection) -> None:
    """For the current transaction only; on plain PostgreSQL this sets a harmless placeholder."""
    conn.execute(sa.text("SELECT set_config(:guc, '0', true)"), {"guc": DECOMPRESSION_LIMIT_GUC})


def enable_columnstore(conn: sa.Connection) -> None:
    """Columnstore settings for new conversions (chunks converted earlier keep theirs until recompressed)."""
    for table, (segment_by, order_by) in COLUMNSTORE.items():
        conn.execute(
            sa.text(
                f"ALTER TABLE {table} SET (timescaledb.enable_columnstore = true, "
                f"timescaledb.segmentby = '{segment_by}', timescaledb.orderby = '{order_by}')"
            )
        )


def create_daily_quality_rollup(conn: sa.Connection) -> None:
    """Per day, version, timeframe and instrument: vectors, flagged vectors, and a count per quality flag.

    Real-time (``materialized_only = false``): rows newer than the last refresh are aggregated when
    read, so a run's day shows at once; a re-run of an older day is refreshed by ``settle_write``.
    Created WITH NO DATA: a refresh cannot run inside the migration's transaction.
    """
    flags = ",\n".join(
        f"count(*) FILTER (WHERE '{flag.value}' = ANY(quality_flags)) AS {flag.value.lower()}" for flag in QualityFlag
    )
    conn.execute(
        sa.text(
            f"""
            CREATE MATERIALIZED VIEW {ROLLUP} WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT time_bucket(INTERVAL '1 day', ts) AS day, feature_set_version, timeframe, instrument_id,
                   count(*) AS vectors,
                   count(*) FILTER (WHERE cardinality(quality_flags) > 0) AS flagged,
                   {flags}
            FROM feature_vectors
            GROUP BY 1, 2, 3, 4
            WITH NO DATA
            """
        )
    )


def _setting(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _intervals_equal(conn: sa.Connection, a: str, b: str) -> bool:
    return bool(conn.execute(sa.text("SELECT CAST(:a AS interval) = CAST(:b AS interval)"), {"a": a, "b": b}).scalar())


def _interval(conn: sa.Connection, name: str, value: str) -> str:
    """``value`` checked as an interval; a bad one is the operator's to fix, named with the variable."""
    with conn.begin_nested() as savepoint:
        try:
            conn.execute(sa.text("SELECT CAST(:v AS interval)"), {"v": value})
        except sa.exc.DataError as exc:
            savepoint.rollback()
            raise ValueError(
                f"{name}={value!r} is not an interval. Fix: a PostgreSQL interval such as '30 days' or '2 years'"
                + (", or off" if name == "MARKETFS_COMPRESS_AFTER" else ", or unset it")
            ) from exc
    return value


def _jobs(conn: sa.Connection, proc: str) -> dict[str, tuple[int, dict]]:
    """This database's jobs of one kind, by hypertable (a continuous aggregate's is its internal one)."""
    rows = conn.execute(
        sa.text("SELECT hypertable_name, job_id, config FROM timescaledb_information.jobs WHERE proc_name = :p"),
        {"p": proc},
    )
    return {name: (job_id, config or {}) for name, job_id, config in rows}


def reconcile_policies(conn: sa.Connection) -> list[str]:
    """Make the columnstore, retention and rollup jobs and the chunk intervals what the environment
    says; return what changed (``migrate`` says it). An unchanged configuration changes nothing."""
    changes: list[str] = []
    compress_after = _setting("MARKETFS_COMPRESS_AFTER") or "30 days"
    if compress_after.lower() == "off":
        compress_after = None
    else:
        _interval(conn, "MARKETFS_COMPRESS_AFTER", compress_after)
    jobs = _jobs(conn, "policy_compression")
    for table in COLUMNSTORE:
        have = jobs.get(table)
        if have and (
            compress_after is None or not _intervals_equal(conn, have[1].get("compress_after"), compress_after)
        ):
            conn.execute(
                sa.text("CALL remove_columnstore_policy(CAST(:t AS regclass), if_exists => true)"), {"t": table}
            )
            changes.append(f"{table}: columnstore policy after {have[1].get('compress_after')} removed")
            have = None
        if compress_after is not None and not have:
            conn.execute(
                sa.text("CALL add_columnstore_policy(CAST(:t AS regclass), after => CAST(:i AS interval))"),
                {"t": table, "i": compress_after},
            )
            changes.append(f"{table}: columnstore policy after {compress_after} added")

    jobs = _jobs(conn, "policy_retention")
    retention: dict[str, str | None] = {}
    for table in HYPERTABLES:
        variable = f"MARKETFS_RETENTION_{table.upper()}"
        want = _setting(variable)
        if want is not None:
            _interval(conn, variable, want)
        retention[table] = want
        have = jobs.get(table)
        if have and (want is None or not _intervals_equal(conn, have[1].get("drop_after"), want)):
            conn.execute(
                sa.text("SELECT remove_retention_policy(CAST(:t AS regclass), if_exists => true)"), {"t": table}
            )
            changes.append(f"{table}: retention after {have[1].get('drop_after')} removed")
            have = None
        if want is not None and not have:
            conn.execute(
                sa.text("SELECT add_retention_policy(CAST(:t AS regclass), CAST(:i AS interval))"),
                {"t": table, "i": want},
            )
            changes.append(f"{table}: retention after {want} added")

    changes += _reconcile_rollup_refresh(conn, retention["feature_vectors"])
    changes += _reconcile_chunk_intervals(conn)
    return changes


def _reconcile_rollup_refresh(conn: sa.Connection, retention: str | None) -> list[str]:
    # The refresh window must not start before the retention horizon: refreshing a range whose raw
    # rows were dropped would empty the rollup there (TimescaleDB, "data retention with continuous
    # aggregates"). Without retention it refreshes everything up to an hour ago, unless the rollup
    # holds days whose vectors an earlier retention dropped: then never before the oldest vectors held
    # (removing or lengthening retention emptied those days: 1,620 rows -> 0).
    held = _held_horizon(conn)
    start = retention
    if held is not None and (start is None or not _shorter_or_equal(conn, start, held)):
        start = held
    jobs = _jobs(conn, "policy_refresh_continuous_aggregate")
    have = next(iter(jobs.values()), None)  # the rollup is the only continuous aggregate here
    if have is not None:
        current = have[1].get("start_offset")
        if (current is None and start is None) or (
            current is not None and start is not None and _intervals_equal(conn, current, start)
        ):
            return []
        if current is not None and held is not None and _shorter_or_equal(conn, current, start):
            # Shorter than it could be, and safe: the horizon moves a day every day, the job stays.
            return []
        conn.execute(sa.text("SELECT remove_continuous_aggregate_policy(CAST(:v AS regclass))"), {"v": ROLLUP})
    conn.execute(
        sa.text(
            "SELECT add_continuous_aggregate_policy(CAST(:v AS regclass), start_offset => CAST(:s AS interval), "
            "end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '1 hour')"
        ),
        {"v": ROLLUP, "s": start},
    )
    reason = (
        " (not before the oldest feature vectors held: the rollup keeps the days retention dropped)"
        if held is not None and start == held
        else ""
    )
    return [f"{ROLLUP}: refresh from {start or 'the beginning'} to 1 hour ago{reason}"]


# The shortest refresh window the rollup's policy accepts: two of its 1-day buckets past the 1-hour end.
MIN_REFRESH_START = 3


def _held_horizon(conn: sa.Connection) -> str | None:
    """How far back feature vectors are still held, in whole days (at least ``MIN_REFRESH_START``), when
    the rollup holds older days (their vectors dropped by retention); None when it holds none."""
    return conn.execute(
        sa.text(
            f"""
            WITH held AS (
                SELECT coalesce(min(range_start), now()) AS since FROM timescaledb_information.chunks
                WHERE hypertable_name = 'feature_vectors' AND hypertable_schema = current_schema()
            )
            SELECT CASE WHEN EXISTS (SELECT 1 FROM {ROLLUP} WHERE day < held.since)
                   THEN greatest(floor(extract(epoch FROM now() - held.since) / 86400), :least)::int || ' days' END
            FROM held
            """
        ),
        {"least": MIN_REFRESH_START},
    ).scalar()


def _shorter_or_equal(conn: sa.Connection, a: str, b: str) -> bool:
    return bool(conn.execute(sa.text("SELECT CAST(:a AS interval) <= CAST(:b AS interval)"), {"a": a, "b": b}).scalar())


def chunk_interval(table: str) -> str:
    """``MARKETFS_CHUNK_INTERVAL_<TABLE>``, else about ``ROWS_PER_CHUNK`` rows at the expected rows per day
    (``MARKETFS_EXPECTED_INSTRUMENTS`` x the table's rows per instrument and day), 1 to 90 days."""
    explicit = _setting(f"MARKETFS_CHUNK_INTERVAL_{table.upper()}")
    if explicit:
        return explicit
    instruments = int(_setting("MARKETFS_EXPECTED_INSTRUMENTS") or "50")
    per_day = max(instruments, 1) * ROWS_PER_INSTRUMENT_DAY[table]
    return f"{min(max(ROWS_PER_CHUNK // per_day, 1), 90)} days"


def _reconcile_chunk_intervals(conn: sa.Connection) -> list[str]:
    changes = []
    current = dict(
        conn.execute(
            sa.text(
                "SELECT hypertable_name, time_interval::text FROM timescaledb_information.dimensions "
                "WHERE hypertable_schema = current_schema() AND dimension_number = 1"
            )
        ).all()
    )
    for table in HYPERTABLES:
        want = _interval(conn, f"MARKETFS_CHUNK_INTERVAL_{table.upper()}", chunk_interval(table))
        if table in current and not _intervals_equal(conn, current[table], want):
            conn.execute(
                sa.text("SELECT set_chunk_time_interval(CAST(:t AS regclass), CAST(:i AS interval))"),
                {"t": table, "i": want},
            )
            changes.append(f"{table}: new chunks span {want} (were {current[table]})")
    return changes


def prune_feature_state(conn: sa.Connection) -> int:
    """What retention left behind: the recursion state of dropped vectors (it would otherwise outlive
    them) and the event_ids of dropped events (a re-delivery of one would be refused as stored)."""
    pruned = 0
    for variable, table, column in (
        ("MARKETFS_RETENTION_FEATURE_VECTORS", "feature_state", "ts"),
        ("MARKETFS_RETENTION_NEWS_EVENTS", "news_event_ids", "published_at"),
    ):
        retention = _setting(variable)
        if retention is not None:
            pruned += conn.execute(
                sa.text(f"DELETE FROM {table} WHERE {column} < now() - CAST(:r AS interval)"), {"r": retention}
            ).rowcount
    return pruned


def settle_write(engine: sa.Engine, table: str, start: datetime, end: datetime) -> list[str]:
    """After a write to ``table``'s ``[start, end)`` committed: merge sparse chunks around it
    (``sparse_chunks``), put the columnstore chunks it touched back into the columnstore, settle their
    storage, and refresh the rollup over it. Returns what was done; a
    failure is logged, not raised (the write stands; the policy catches up).

    A write into a converted chunk leaves its rows in the rowstore beside the columnstore (the chunk
    is "partial") until the next policy run, up to 12 hours later: a re-run of 88 old days grew
    feature_vectors from 27 MB to 157 MB here. Converting right after the write keeps it compact.
    """
    done: list[str] = []
    try:
        with engine.connect() as conn:
            if not _timescale(conn, table):
                return done
            conn.commit()
            if table in COLUMNSTORE:
                done += consolidate_sparse_chunks(engine, table, start, end)
            chunks = _converted_chunks(conn, table, start, end)
            conn.commit()
            for chunk in chunks:
                # A no-op on a chunk the write did not touch; recompresses one it made partial.
                conn.execute(
                    sa.text(
                        "CALL convert_to_columnstore(CAST(:c AS regclass), if_not_columnstore => true, "
                        "recompress => true)"
                    ),
                    {"c": chunk},
                )
                conn.commit()
                done.append(f"{chunk} back in the columnstore")
            companions = _companion_chunks(conn, chunks)
            conn.commit()
        if chunks:
            done += _settle_storage(engine, chunks, companions)
        if table == "feature_vectors":
            refresh_rollup(engine, start, end + timedelta(days=1))
            done.append(f"{ROLLUP} refreshed for [{start:%Y-%m-%d}, {end:%Y-%m-%d})")
    except sa.exc.DBAPIError as exc:
        logger.warning(
            "TimescaleDB upkeep after writing %s [%s, %s) failed (%s); the write stands, the columnstore "
            "policy converts the chunks at its next run",
            table,
            start,
            end,
            str(exc.orig).splitlines()[0] if exc.orig else exc,
        )
    return done


def _converted_chunks(conn: sa.Connection, table: str, start: datetime, end: datetime) -> list[str]:
    """``table``'s columnstore chunks overlapping ``[start, end)``, quoted, oldest first."""
    return (
        conn.execute(
            sa.text(
                "SELECT format('%I.%I', chunk_schema, chunk_name) FROM timescaledb_information.chunks "
                "WHERE hypertable_name = :t AND hypertable_schema = current_schema() AND is_compressed "
                "AND range_end > :s AND range_start < :e ORDER BY range_start"
            ),
            {"t": table, "s": start, "e": end},
        )
        .scalars()
        .all()
    )


def _companion_chunks(conn: sa.Connection, chunks: list[str]) -> list[str]:
    """The internal tables holding ``chunks``' columnstore batches, quoted."""
    return (
        conn.execute(
            sa.text(
                "SELECT quote_ident(cc.schema_name) || '.' || quote_ident(cc.table_name) "
                "FROM _timescaledb_catalog.chunk c JOIN _timescaledb_catalog.chunk cc "
                "ON cc.id = c.compressed_chunk_id "
                "WHERE quote_ident(c.schema_name) || '.' || quote_ident(c.table_name) = ANY(:chunks)"
            ),
            {"chunks": list(chunks)},
        )
        .scalars()
        .all()
    )


# An empty b-tree is its metapage: a chunk whose indexes are larger while its rowstore is empty holds
# only dead entries of rows that moved to the columnstore.
EMPTY_INDEX_BYTES = 8192
# REINDEX of an empty chunk takes milliseconds, but queues behind a long read of it and would block
# the reads queued after it meanwhile: it gives up instead, and the next write's upkeep tries again.
REINDEX_LOCK_TIMEOUT = "2s"


def _settle_storage(engine: sa.Engine, chunks: list[str], companions: list[str]) -> list[str]:
    """Vacuum the chunks a write converted back, then rebuild the indexes of those whose rowstore is empty.

    The rows the write replaced, and the batches recompression rewrote, are dead tuples until a vacuum:
    without one, each re-run of a converted range added its size again (8 MB -> 103 -> 192 -> 267 MB over
    three re-runs of 14 days here). A vacuum frees heap pages but not index pages: the rowstore's indexes
    kept the size of every row that passed through them (a news_events chunk of 0 rows with a 2,280 kB
    primary key; ohlcv_1m 2.5 MB -> 5.7 MB after one re-run). Rebuilding an empty chunk's indexes is instant.
    """
    done = []
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for name in [*chunks, *companions]:
            conn.execute(sa.text(f"VACUUM {name}"))  # names from the catalog, quoted there
        done.append(f"vacuumed {len(chunks)} chunk(s)")
        conn.execute(sa.text("SELECT set_config('lock_timeout', :t, false)"), {"t": REINDEX_LOCK_TIMEOUT})
        try:
            for name in chunks:
                bloated = conn.execute(
                    sa.text(
                        f"SELECT NOT EXISTS (SELECT 1 FROM ONLY {name}) AND pg_indexes_size(CAST(:c AS regclass)) > "
                        ":empty * (SELECT count(*) FROM pg_index WHERE indrelid = CAST(:c AS regclass))"
                    ),
                    {"c": name, "empty": EMPTY_INDEX_BYTES},
                ).scalar()
                if not bloated:
                    continue
                try:
                    conn.execute(sa.text(f"REINDEX TABLE {name}"))
                    done.append(f"{name}: indexes of its empty rowstore rebuilt")
                except sa.exc.OperationalError as exc:
                    logger.info("REINDEX of %s skipped (%s); the next write's upkeep tries again", name, exc.orig)
        finally:
            conn.execute(sa.text("RESET lock_timeout"))
    return done


# A refresh the columnstore job or another run has in progress over an overlapping window makes a second
# one fail at once ("due to a concurrent refresh"): wait for it, this long at most.
REFRESH_WAIT_SECONDS = 60.0
REFRESH_LOCK_ID = 0x6D6B7472  # our refreshes take turns on this advisory lock


def refresh_rollup(engine: sa.Engine, start: datetime, end: datetime) -> None:
    """Refresh ``feature_quality_daily`` over ``[start, end)``, taking turns with other refreshes.

    Two runs' refreshes used to collide (TimescaleDB refuses a refresh overlapping one in progress), and
    the loser's days stayed stale until the hourly job: ours queue on an advisory lock, and a refresh
    refused because the policy job is refreshing is retried until it is done.
    """
    import time

    deadline = time.monotonic() + REFRESH_WAIT_SECONDS
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:id)"), {"id": REFRESH_LOCK_ID})
        try:
            pause = 0.1
            while True:
                try:
                    # Outside a transaction, as refresh_continuous_aggregate requires.
                    conn.execute(
                        sa.text("CALL refresh_continuous_aggregate(CAST(:v AS regclass), :s, :e)"),
                        {"v": ROLLUP, "s": start, "e": end},
                    )
                    return
                except sa.exc.OperationalError as exc:
                    concurrent = getattr(exc.orig, "sqlstate", None) == "55P03"  # lock_not_available
                    if not concurrent or time.monotonic() + pause > deadline:
                        raise
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:id)"), {"id": REFRESH_LOCK_ID})


def _timescale(conn: sa.Connection, table: str) -> bool:
    """Whether ``table`` is a hypertable here (the extension present, and the table made one)."""
    if not conn.execute(sa.text("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")).scalar():
        return False
    return bool(
        conn.execute(
            sa.text(
                "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = :t "
                "AND hypertable_schema = current_schema())"
            ),
            {"t": table},
        ).scalar()
    )
