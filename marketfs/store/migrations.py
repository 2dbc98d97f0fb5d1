"""Versioned, forward-only schema migrations, plus columns derived from the feature registry.

``migrate()`` is safe to call from every run: an advisory lock serialises concurrent callers and
each migration runs once, in its own transaction, recorded in ``schema_migrations`` in that same
transaction (a failing migration leaves the earlier ones applied and recorded). A migration exists
only through ``@migration(version, name)``, which refuses a version out of sequence, and a test checks
that every ``_mNNN_*`` function here is registered: none can be written and forgotten.
TimescaleDB features are used when the server has the extension, and skipped when it has not or
when ``MARKETFS_TIMESCALEDB=off``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from marketfs.db import engine_for, timescaledb_installed
from marketfs.features.registry import all_feature_columns, all_state_columns

logger = logging.getLogger(__name__)
MIGRATION_LOCK_ID = 0x6D6B7466  # any constant shared by every caller


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[sa.Connection, bool], None]


# In version order; filled by @migration as the module is read.
MIGRATIONS: list[Migration] = []


def migration(version: int, name: str) -> Callable[[Callable[[sa.Connection, bool], None]], Callable]:
    """Register the decorated ``_mNNN_*`` function as migration ``version`` (the next one in sequence)."""

    def register(apply: Callable[[sa.Connection, bool], None]) -> Callable[[sa.Connection, bool], None]:
        expected = len(MIGRATIONS) + 1
        if version != expected or not apply.__name__.startswith(f"_m{version:03d}_"):
            raise RuntimeError(
                f"migration {apply.__name__} registered as version {version}: the next version is {expected}, "
                f"and its function must be named _m{expected:03d}_<what it does>"
            )
        MIGRATIONS.append(Migration(version, name, apply))
        return apply

    return register


@migration(1, "base tables: ohlcv_1m, feature_vectors")
def _m001_base_tables(conn: sa.Connection, timescale: bool) -> None:
    conn.execute(
        sa.text(
            """
            CREATE TABLE ohlcv_1m (
                instrument_id text NOT NULL,
                ts timestamptz NOT NULL,
                open double precision NOT NULL,
                high double precision NOT NULL,
                low double precision NOT NULL,
                close double precision NOT NULL,
                volume double precision NOT NULL,
                ingested_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (instrument_id, ts)
            )
            """
        )
    )
    conn.execute(
        sa.text(
            """
            CREATE TABLE feature_vectors (
                instrument_id text NOT NULL,
                timeframe text NOT NULL,
                ts timestamptz NOT NULL,
                feature_set_version text NOT NULL,
                quality_flags text[] NOT NULL DEFAULT '{}',
                run_id text,
                written_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (instrument_id, timeframe, ts, feature_set_version)
            )
            """
        )
    )
    # Serves latest-per-instrument and time-range reads of one version.
    conn.execute(
        sa.text(
            "CREATE INDEX feature_vectors_version_ts ON feature_vectors "
            "(feature_set_version, timeframe, instrument_id, ts DESC)"
        )
    )
    if timescale:
        conn.execute(
            sa.text("SELECT create_hypertable('ohlcv_1m', by_range('ts', INTERVAL '7 days'), migrate_data => true)")
        )
        conn.execute(
            sa.text(
                "SELECT create_hypertable('feature_vectors', by_range('ts', INTERVAL '7 days'), migrate_data => true)"
            )
        )


def _hypertable(conn: sa.Connection, table: str, column: str, chunk: str) -> None:
    conn.execute(
        sa.text(
            "SELECT create_hypertable(CAST(:t AS regclass), by_range(:c, CAST(:i AS interval)), migrate_data => true)"
        ),
        {"t": table, "c": column, "i": chunk},
    )


@migration(2, "news_events, ohlcv_1d, feature_state, bar source flags")
def _m002_events_daily_bars_state(conn: sa.Connection, timescale: bool) -> None:
    # What the source got wrong about a bar (e.g. TIMESTAMP_MISMATCH), carried into its vector.
    conn.execute(sa.text("ALTER TABLE ohlcv_1m ADD COLUMN source_flags text[] NOT NULL DEFAULT '{}'"))
    conn.execute(
        sa.text(
            """
            CREATE TABLE ohlcv_1d (
                instrument_id text NOT NULL,
                ts timestamptz NOT NULL,
                open double precision NOT NULL,
                high double precision NOT NULL,
                low double precision NOT NULL,
                close double precision NOT NULL,
                volume double precision NOT NULL,
                source_flags text[] NOT NULL DEFAULT '{}',
                ingested_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (instrument_id, ts)
            )
            """
        )
    )
    conn.execute(
        sa.text(
            """
            CREATE TABLE news_events (
                event_id text NOT NULL,
                instrument_id text NOT NULL,
                published_at timestamptz NOT NULL,
                sentiment double precision NOT NULL,
                confidence double precision NOT NULL,
                source text NOT NULL,
                ingested_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (instrument_id, published_at, event_id)
            )
            """
        )
    )
    conn.execute(sa.text("CREATE INDEX news_events_event_id ON news_events (event_id)"))
    conn.execute(
        sa.text(
            """
            CREATE TABLE feature_state (
                instrument_id text NOT NULL,
                timeframe text NOT NULL,
                feature_set_version text NOT NULL,
                ts timestamptz NOT NULL,
                bars_seen bigint NOT NULL,
                ema_fast double precision,
                ema_slow double precision,
                macd_signal double precision,
                rsi_avg_gain double precision,
                rsi_avg_loss double precision,
                atr double precision,
                PRIMARY KEY (instrument_id, timeframe, feature_set_version, ts)
            )
            """
        )
    )
    # Quality flags are queried as sets: WHERE quality_flags @> ARRAY['NO_EVENTS'].
    conn.execute(sa.text("CREATE INDEX feature_vectors_flags ON feature_vectors USING gin (quality_flags)"))
    if timescale:
        _hypertable(conn, "ohlcv_1d", "ts", "28 days")
        _hypertable(conn, "news_events", "published_at", "7 days")


@migration(3, "quality_log, quarantine tables")
def _m003_quality_log_and_quarantine(conn: sa.Connection, timescale: bool) -> None:
    # Every verdict of every gate, and every human decision about quarantined data.
    conn.execute(
        sa.text(
            """
            CREATE TABLE quality_log (
                id bigserial PRIMARY KEY,
                logged_at timestamptz NOT NULL DEFAULT now(),
                run_id text,
                asset text NOT NULL,
                partition text NOT NULL,
                suite text NOT NULL,
                kind text NOT NULL DEFAULT 'validation',
                expectation text NOT NULL,
                column_name text,
                severity text,
                success boolean NOT NULL,
                observed_value jsonb,
                unexpected_count bigint,
                element_count bigint,
                reference text,
                docs_url text,
                batch_id bigint,
                actor text,
                note text
            )
            """
        )
    )
    conn.execute(sa.text("CREATE INDEX quality_log_asset_partition ON quality_log (asset, partition, logged_at)"))
    conn.execute(sa.text("CREATE INDEX quality_log_run ON quality_log (run_id)"))
    conn.execute(
        sa.text(
            """
            CREATE TABLE quarantine_batches (
                batch_id bigserial PRIMARY KEY,
                created_at timestamptz NOT NULL DEFAULT now(),
                run_id text,
                asset text NOT NULL,
                partition text NOT NULL,
                window_start timestamptz NOT NULL,
                window_end timestamptz NOT NULL,
                reason text NOT NULL,
                status text NOT NULL DEFAULT 'held' CHECK (status IN ('held', 'released', 'discarded')),
                decided_at timestamptz,
                decided_by text,
                note text
            )
            """
        )
    )
    # Rejected rows keep their served table's columns, so they are inspected with the same SQL.
    for table in ("ohlcv_1m", "news_events", "feature_vectors", "feature_state"):
        conn.execute(
            sa.text(
                f"CREATE TABLE quarantine_{table} (batch_id bigint NOT NULL REFERENCES quarantine_batches "
                f"ON DELETE CASCADE, delivery_order bigint NOT NULL, LIKE {table} INCLUDING DEFAULTS)"
            )
        )
        conn.execute(sa.text(f"CREATE INDEX quarantine_{table}_batch ON quarantine_{table} (batch_id)"))


@migration(4, "feature snapshots")
def _m004_snapshots(conn: sa.Connection, timescale: bool) -> None:
    conn.execute(
        sa.text(
            """
            CREATE TABLE feature_snapshots (
                snapshot_id text PRIMARY KEY,
                created_at timestamptz NOT NULL DEFAULT now(),
                feature_set_version text NOT NULL,
                timeframe text NOT NULL,
                instruments text[] NOT NULL,
                window_start timestamptz NOT NULL,
                window_end timestamptz NOT NULL,
                row_count bigint NOT NULL,
                content_hash text NOT NULL,
                manifest jsonb NOT NULL,
                run_id text
            )
            """
        )
    )
    # Frozen copies of vectors; the trigger below makes them read-only except for an explicit delete.
    conn.execute(
        sa.text(
            "CREATE TABLE feature_snapshot_rows (snapshot_id text NOT NULL REFERENCES feature_snapshots "
            "ON DELETE CASCADE, LIKE feature_vectors INCLUDING DEFAULTS)"
        )
    )
    conn.execute(
        sa.text(
            "CREATE INDEX feature_snapshot_rows_lookup ON feature_snapshot_rows (snapshot_id, instrument_id, ts DESC)"
        )
    )
    conn.execute(
        sa.text(
            """
            CREATE FUNCTION refuse_snapshot_update() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'snapshots are immutable: % on % refused', TG_OP, TG_TABLE_NAME;
            END $$
            """
        )
    )
    for table in ("feature_snapshot_rows", "feature_snapshots"):
        conn.execute(
            sa.text(
                f"CREATE TRIGGER {table}_immutable BEFORE UPDATE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION refuse_snapshot_update()"
            )
        )
    conn.execute(
        sa.text(
            """
            CREATE TABLE snapshot_log (
                id bigserial PRIMARY KEY,
                logged_at timestamptz NOT NULL DEFAULT now(),
                snapshot_id text NOT NULL,
                action text NOT NULL,
                actor text,
                note text,
                manifest jsonb
            )
            """
        )
    )


@migration(5, "one key index on feature_vectors")
def _m005_lean_feature_indexes(conn: sa.Connection, timescale: bool) -> None:
    # One index serves the upsert key, latest() and point-in-time lookups: key columns ordered
    # (instrument, timeframe, version, ts). The separate version index and the GIN index on flags
    # cost more on every write than they saved on reads (docs/benchmarks.md).
    conn.execute(sa.text("DROP INDEX IF EXISTS feature_vectors_flags"))
    conn.execute(sa.text("DROP INDEX IF EXISTS feature_vectors_version_ts"))
    conn.execute(sa.text("ALTER TABLE feature_vectors DROP CONSTRAINT feature_vectors_pkey"))
    conn.execute(
        sa.text(
            "ALTER TABLE feature_vectors ADD CONSTRAINT feature_vectors_pkey "
            "PRIMARY KEY (instrument_id, timeframe, feature_set_version, ts)"
        )
    )


@migration(6, "TimescaleDB compression settings and the feature_quality_daily continuous aggregate")
def _m006_timescale_compression_and_rollup(conn: sa.Connection, timescale: bool) -> None:
    if not timescale:
        return
    from marketfs.store import timescale as ts

    # A fresh database gets today's settings and rollup here; migration 10 brings older ones to them.
    ts.enable_columnstore(conn)
    ts.create_daily_quality_rollup(conn)


@migration(7, "BRIN time indexes where no index leads with the time column")
def _m007_time_range_indexes(conn: sa.Connection, timescale: bool) -> None:
    # Every run reads and replaces whole time windows across instruments, which the (instrument, ts)
    # keys cannot range-scan: without this, plain PostgreSQL scans the whole table per window (a
    # 5M-vector re-run spent minutes per 31-day batch). Rows arrive in time order (each run writes its
    # window as one block), so a BRIN index is a few pages and costs next to nothing
    # on writes; autosummarize keeps the newest block ranges summarised between vacuums.
    # A hypertable already has a b-tree on its time column in every chunk and chunk exclusion, and
    # its columnstore batches carry their own min/max: a BRIN there would only cost. So each table is
    # indexed unless an index already leads with its time column, which also covers feature_state on
    # TimescaleDB (a plain table there) and hypertables of a database migrated before
    # MARKETFS_TIMESCALEDB=off.
    for table, column in TIME_COLUMNS.items():
        if not _time_column_leads_an_index(conn, table, column):
            conn.execute(
                sa.text(
                    f"CREATE INDEX {table}_{column}_brin ON {table} USING brin ({column}) WITH (autosummarize = on)"
                )
            )


@migration(8, "feature_state columns named by recursion and parameters")
def _m008_state_columns_by_recursion(conn: sa.Connection, timescale: bool) -> None:
    # Before feature sets were declarations, fs_v1's recursions had the only state columns. Named by
    # indicator and parameters, a second set with RSI(7) or another MACD gets columns of its own
    # (added from the declarations by _ensure_columns), and fs_v1's stored state carries over as is.
    renames = {
        "ema_fast": "macd12_26_9_fast",
        "ema_slow": "macd12_26_9_slow",
        "macd_signal": "macd12_26_9_signal",
        "rsi_avg_gain": "rsi14_avg_gain",
        "rsi_avg_loss": "rsi14_avg_loss",
        "atr": "atr14",
    }
    for table in ("feature_state", "quarantine_feature_state"):
        columns = set(
            conn.execute(
                sa.text("SELECT column_name FROM information_schema.columns WHERE table_name = :t"), {"t": table}
            ).scalars()
        )
        for old, new in renames.items():
            if old not in columns:
                continue
            if new in columns:  # added from the declarations by a newer release's migrate before this ran
                conn.execute(sa.text(f"UPDATE {table} SET {new} = coalesce({new}, {old})"))
                conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN {old}"))
            else:
                conn.execute(sa.text(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}"))


@migration(9, "feature_vectors_history: superseded versions of vectors, for reads as of a past instant")
def _m009_vector_history(conn: sa.Connection, timescale: bool) -> None:
    # The served table stays the hot path with one version per key; a version replaced by a re-run or
    # a correction, or deleted, moves here with the instant it stopped being served. A version was
    # served during [written_at, superseded_at).
    conn.execute(
        sa.text(
            "CREATE TABLE feature_vectors_history (LIKE feature_vectors INCLUDING DEFAULTS, "
            "superseded_at timestamptz NOT NULL)"
        )
    )
    conn.execute(
        sa.text(
            "CREATE INDEX feature_vectors_history_key ON feature_vectors_history "
            "(feature_set_version, timeframe, instrument_id, ts DESC)"
        )
    )
    conn.execute(sa.text("CREATE INDEX feature_vectors_history_superseded ON feature_vectors_history (superseded_at)"))


@migration(10, "TimescaleDB: columnstore settings for the queries that run, a real-time rollup of every flag")
def _m010_columnstore_settings_and_rollup(conn: sa.Connection, timescale: bool) -> None:
    if not timescale:
        return
    from marketfs.store import timescale as ts

    # Chunks converted with the old settings keep them until they are recompressed.
    ts.enable_columnstore(conn)
    conn.execute(sa.text(f"DROP MATERIALIZED VIEW IF EXISTS {ts.ROLLUP}"))  # drops its refresh job too
    ts.create_daily_quality_rollup(conn)


@migration(11, "news_event_ids: where each event_id is stored, for the re-delivery check")
def _m011_event_ids(conn: sa.Connection, timescale: bool) -> None:
    # A re-delivered event is kept once, in the window that has it: finding it by event_id in
    # news_events has no time filter, so on a hypertable it probed every chunk's index (67 ms over 14
    # chunks, growing with history). One small table keyed by event_id answers it with one probe.
    conn.execute(sa.text("CREATE TABLE news_event_ids (event_id text PRIMARY KEY, published_at timestamptz NOT NULL)"))
    conn.execute(sa.text("CREATE INDEX news_event_ids_published_at ON news_event_ids (published_at)"))
    conn.execute(
        sa.text(
            "INSERT INTO news_event_ids (event_id, published_at) SELECT event_id, min(published_at) "
            "FROM news_events GROUP BY event_id"
        )
    )


# The served tables' time columns: the ones window reads, replaces and retention filter on.
TIME_COLUMNS = {
    "ohlcv_1m": "ts",
    "ohlcv_1d": "ts",
    "news_events": "published_at",
    "feature_vectors": "ts",
    "feature_state": "ts",
}


@migration(12, "TimescaleDB: the flag rollup gains PARTIAL_SESSION (daily bars of partly covered sessions)")
def _m012_rollup_partial_session(conn: sa.Connection, timescale: bool) -> None:
    if timescale:
        _rollup_counts(conn, "partial_session")


def _rollup_counts(conn: sa.Connection, column: str) -> None:
    """Make the flag rollup count ``column`` (a new QualityFlag's), recreating it when it does not yet.

    A new database got the flag from migration 10, which builds the rollup from QualityFlag as it is now:
    recreating it again would only restart its jobs while the first writes arrive. A continuous aggregate's
    columns cannot be altered: it is recreated with one count per QualityFlag (its policy is reconciled after
    the migrations).
    """
    from marketfs.store import timescale as ts

    counted = conn.execute(
        sa.text("SELECT 1 FROM information_schema.columns WHERE table_name = :v AND column_name = :c"),
        {"v": ts.ROLLUP, "c": column},
    ).first()
    if not counted:
        conn.execute(sa.text(f"DROP MATERIALIZED VIEW IF EXISTS {ts.ROLLUP}"))
        ts.create_daily_quality_rollup(conn)


@migration(13, "quarantine batches record the instrument shard they hold; quarantine_ohlcv_1d")
def _m013_quarantine_shard(conn: sa.Connection, timescale: bool) -> None:
    # bars_1d quarantines its breaching sessions like raw_ohlcv does, into a table of ohlcv_1d's columns.
    conn.execute(
        sa.text(
            "CREATE TABLE IF NOT EXISTS quarantine_ohlcv_1d (batch_id bigint NOT NULL REFERENCES quarantine_batches "
            "ON DELETE CASCADE, delivery_order bigint NOT NULL, LIKE ohlcv_1d INCLUDING DEFAULTS)"
        )
    )
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS quarantine_ohlcv_1d_batch ON quarantine_ohlcv_1d (batch_id)"))
    # A batch holds one shard's rows of its window: a release must replace those instruments only, under the
    # shard count it was quarantined with (a later MARKETFS_SHARDS does not change which rows it holds).
    conn.execute(
        sa.text(
            "ALTER TABLE quarantine_batches ADD COLUMN shard_index integer NOT NULL DEFAULT 0, "
            "ADD COLUMN shard_count integer NOT NULL DEFAULT 1"
        )
    )


@migration(14, "intraday_steps: how far each feature set has filled today, step by step")
def _m014_intraday_steps(conn: sa.Connection, timescale: bool) -> None:
    # One row per intraday step of a feature set, timeframe and shard: the minutes [step_start, step_end)
    # it computed, whether they were served or quarantined, and their flag counts (the day-so-far gate
    # adds them up). A correction recomputes from the last step boundary before it, which replaces the
    # later rows.
    conn.execute(
        sa.text(
            """
            CREATE TABLE intraday_steps (
                feature_set_version text NOT NULL,
                timeframe text NOT NULL,
                shard_index integer NOT NULL,
                shard_count integer NOT NULL,
                day date NOT NULL,
                step_start timestamptz NOT NULL,
                step_end timestamptz NOT NULL,
                status text NOT NULL CHECK (status IN ('served', 'quarantined', 'reconciled')),
                vectors bigint NOT NULL,
                flag_counts jsonb NOT NULL DEFAULT '{}',
                batch_id bigint,
                run_id text,
                computed_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (feature_set_version, timeframe, shard_index, shard_count, day, step_end)
            )
            """
        )
    )


@migration(
    15, "quarantine batches of an instrument-day: the instruments they hold; 'resolved' when a later delivery is served"
)
def _m015_instrument_batches(conn: sa.Connection, timescale: bool) -> None:
    # NULL instruments: the batch holds the whole day (of its shard), as every batch did before. A list: only
    # those instruments' rows of the day are held, and those instruments' later days with them (their state
    # chain), while the other instruments of the day are served.
    conn.execute(sa.text("ALTER TABLE quarantine_batches ADD COLUMN instruments text[]"))
    conn.execute(sa.text("ALTER TABLE quarantine_batches DROP CONSTRAINT IF EXISTS quarantine_batches_status_check"))
    conn.execute(
        sa.text(
            "ALTER TABLE quarantine_batches ADD CONSTRAINT quarantine_batches_status_check "
            "CHECK (status IN ('held', 'released', 'discarded', 'resolved'))"
        )
    )
    # The open holds are what every feature computation asks for: a partial index keeps that read to them.
    conn.execute(
        sa.text(
            "CREATE INDEX quarantine_batches_held ON quarantine_batches (asset, window_start) WHERE status = 'held'"
        )
    )


@migration(16, "declared_gaps: sessions a person says are missing for good; windows restart after them (GAP)")
def _m016_declared_gaps(conn: sa.Connection, timescale: bool) -> None:
    # A hole the store must not read across (never delivered) becomes a declared gap when a person says it is
    # real (run --allow-gap, a discarded batch, a trading halt): the instrument's windows and recursions then
    # restart at restart_at, the start of the trading day after the gap, and its vectors say GAP until warm.
    conn.execute(
        sa.text(
            """
            CREATE TABLE declared_gaps (
                gap_id bigserial PRIMARY KEY,
                first_session date NOT NULL,
                last_session date NOT NULL,
                restart_at timestamptz NOT NULL,
                instrument_id text,
                dataset text,
                reason text NOT NULL,
                declared_by text NOT NULL,
                declared_at timestamptz NOT NULL DEFAULT now(),
                CHECK (first_session <= last_session)
            )
            """
        )
    )
    conn.execute(sa.text("CREATE INDEX declared_gaps_restart ON declared_gaps (restart_at)"))
    if timescale:
        _rollup_counts(conn, "gap")  # the rollup counts one column per QualityFlag, and GAP is a new one


@migration(17, "corporate_actions and their restatements: splits and dividends, known when, and what they restate")
def _m017_corporate_actions(conn: sa.Connection, timescale: bool) -> None:
    # Every version of an action is kept: a correction is a row of the same (instrument, ex-date, kind) known
    # later, so what a computation applied at any instant can be read back.
    conn.execute(
        sa.text(
            """
            CREATE TABLE corporate_actions (
                instrument_id text NOT NULL,
                ex_date date NOT NULL,
                kind text NOT NULL CHECK (kind IN ('split', 'cash_dividend')),
                ratio double precision NOT NULL CHECK (ratio > 0 AND ratio < 'Infinity'::float8),
                known_at timestamptz NOT NULL,
                source text NOT NULL,
                delivered_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                PRIMARY KEY (instrument_id, ex_date, kind, known_at)
            )
            """
        )
    )
    # An action that arrives after vectors across its ex-date were served: that instrument's vectors of each
    # dataset are recomputed from the ex-date (python -m pipelines restate); until then they are not extended.
    conn.execute(
        sa.text(
            """
            CREATE TABLE corporate_action_restatements (
                instrument_id text NOT NULL,
                dataset text NOT NULL,
                from_date date NOT NULL,
                reason text NOT NULL,
                requested_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                done_at timestamptz,
                run_id text
            )
            """
        )
    )
    conn.execute(
        sa.text(
            "CREATE INDEX corporate_action_restatements_open ON corporate_action_restatements (dataset, instrument_id) "
            "WHERE done_at IS NULL"
        )
    )
    conn.execute(
        sa.text(
            "CREATE TABLE quarantine_corporate_actions (batch_id bigint NOT NULL REFERENCES quarantine_batches "
            "(batch_id), delivery_order bigint NOT NULL, instrument_id text, ex_date text, kind text, ratio text, "
            "known_at text, source text, problem text NOT NULL)"
        )
    )


@migration(18, "drift_reference_days: each written day's drift columns, what a trailing drift reference reads")
def _m018_drift_reference_days(conn: sa.Connection, timescale: bool) -> None:
    # A scheduled partition's drift reference is the trailing 20 days of vectors: read from feature_vectors
    # that is ~400,000 rows of text per dataset (6 s of a 17 s partition); stored per day as float64 arrays
    # (marketfs/store/reference_days.py) it is 20 rows. A derived copy: any write to a day's vectors deletes
    # its rows here, and a read falls back to feature_vectors for a day without one.
    conn.execute(
        sa.text(
            """
            CREATE TABLE drift_reference_days (
                feature_set_version text NOT NULL,
                timeframe text NOT NULL,
                day date NOT NULL,
                shard_count int NOT NULL,
                shard_index int NOT NULL,
                day_start timestamptz NOT NULL,
                day_end timestamptz NOT NULL,
                columns text[] NOT NULL,
                rows int NOT NULL,
                utc_dates date[] NOT NULL,
                vector_values bytea NOT NULL,
                run_id text,
                written_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                PRIMARY KEY (feature_set_version, timeframe, day, shard_count, shard_index)
            )
            """
        )
    )


@migration(19, "drift_reference_days: each day's columns stored sorted; rows stored in vector order dropped")
def _m019_sorted_reference_days(conn: sa.Connection, timescale: bool) -> None:
    # A day's drift columns are now stored sorted (what the drift profile reads is their distribution; sorted once
    # when written, not by every run that reads them). The rows stored before hold them in vector order: dropped,
    # they are read from feature_vectors (a derived copy: a day without a row is read from its vectors).
    conn.execute(sa.text("DELETE FROM drift_reference_days"))


def _time_column_leads_an_index(conn: sa.Connection, table: str, column: str) -> bool:
    return bool(
        conn.execute(
            sa.text(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
                "WHERE i.indrelid = CAST(:t AS regclass) AND a.attname = :c)"
            ),
            {"t": table, "c": column},
        ).scalar()
    )


def timescaledb_forced_off() -> bool:
    """True when ``MARKETFS_TIMESCALEDB`` asks for plain tables whatever the server offers."""
    return os.environ.get("MARKETFS_TIMESCALEDB", "auto").strip().lower() in ("off", "0", "false", "no")


def _ensure_timescaledb(conn: sa.Connection) -> bool:
    """Whether the migrations use TimescaleDB: the extension is there (or can be created) and not forced off."""
    if timescaledb_forced_off():
        # Even with the extension installed in the database (e.g. through template1): new tables are
        # plain, no policy is touched. Tables already made hypertables stay so.
        return False
    if timescaledb_installed(conn):
        return True
    available = conn.execute(
        sa.text("SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")
    ).scalar()
    if not available:
        return False
    # The extension can be listed yet not loadable (not in shared_preload_libraries): try, and fall back.
    with conn.begin_nested() as savepoint:
        try:
            conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS timescaledb"))
        except sa.exc.DBAPIError:
            savepoint.rollback()
            return False
    return True


def _ensure_columns(conn: sa.Connection) -> None:
    """Columns derived from the feature set declarations: a feature's value, a recursion's state."""
    derived = {
        ("feature_vectors", "quarantine_feature_vectors", "feature_snapshot_rows", "feature_vectors_history"): (
            all_feature_columns()
        ),
        ("feature_state", "quarantine_feature_state"): all_state_columns(),
    }
    for tables, names in derived.items():
        for table in tables:
            _add_missing_columns(conn, table, names)


def _add_missing_columns(conn: sa.Connection, table: str, names: list[str]) -> None:
    existing = {
        row[0]
        for row in conn.execute(
            sa.text("SELECT column_name FROM information_schema.columns WHERE table_name = :t"), {"t": table}
        )
    }
    if not existing:
        return
    for name in names:
        if name not in existing:
            # Names come from the declarations, not from users; quoted as identifiers all the same.
            conn.execute(sa.text(f'ALTER TABLE {table} ADD COLUMN "{name}" double precision'))


# The served tables' float columns, which must never hold NaN or an infinity (feature_vectors'
# columns come from the registry, so a new feature gets its check with its column).
BAR_VALUE_COLUMNS = ("open", "high", "low", "close", "volume")
FINITE_TABLES = ("ohlcv_1m", "ohlcv_1d", "feature_vectors")


def finite_constraint_name(table: str, column: str) -> str:
    return f"{table}_{column}_finite"


def _finite_columns(conn: sa.Connection, table: str) -> list[str]:
    wanted = BAR_VALUE_COLUMNS if table != "feature_vectors" else tuple(all_feature_columns())
    existing = {
        row[0]
        for row in conn.execute(
            sa.text(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = :t AND data_type = 'double precision'"
            ),
            {"t": table},
        )
    }
    return [c for c in wanted if c in existing]


def _finite_check(table: str, column: str, *, not_valid: bool = False) -> str:
    # NaN sorts above 'Infinity' in PostgreSQL, so one range excludes NaN and both infinities; NULL passes
    # (a null feature is explained by its flags). Names come from the registry and this module, quoted anyway.
    return (
        f'ADD CONSTRAINT "{finite_constraint_name(table, column)}" '
        f"CHECK (\"{column}\" > '-Infinity'::float8 AND \"{column}\" < 'Infinity'::float8)"
        + (" NOT VALID" if not_valid else "")
    )


def _non_finite_days(conn: sa.Connection, table: str, columns: list[str]) -> str:
    """Which days of ``table`` hold a non-finite value in ``columns``: what an operator must recompute."""
    condition = " OR ".join(f"NOT (\"{c}\" > '-Infinity'::float8 AND \"{c}\" < 'Infinity'::float8)" for c in columns)
    days = conn.execute(
        sa.text(
            f"SELECT DISTINCT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM {table} WHERE {condition} ORDER BY 1"
        )
    ).scalars()
    return ", ".join(days) or "none found"


def _try(conn: sa.Connection, statement: str) -> str | None:
    """Run ``statement`` in a savepoint; the server's first line of refusal, or None when it succeeded."""
    with conn.begin_nested() as savepoint:
        try:
            conn.execute(sa.text(statement))
        except sa.exc.DBAPIError as exc:
            savepoint.rollback()
            return str(exc.orig).splitlines()[0]
    return None


def _ensure_finite_checks(conn: sa.Connection) -> list[str]:
    """CHECK constraints refusing NaN and infinities in the served tables; the problems met, if any.

    The raw and feature gates refuse non-finite values first; these make the database refuse them
    whatever a future bug lets through. All of a table's missing checks are added in one ALTER
    (one scan of the existing rows). A table that already serves non-finite values (written before
    the checks existed) keeps its rows and its runs: the checks are added NOT VALID where the server
    allows it (new writes are refused; TimescaleDB validates hypertables anyway and refuses), the
    days to recompute are logged, and every migrate tries again until the rows are gone.
    """
    problems = []
    for table in FINITE_TABLES:
        columns = _finite_columns(conn, table)
        present = dict(
            conn.execute(
                sa.text("SELECT conname, convalidated FROM pg_constraint WHERE conrelid = CAST(:t AS regclass)"),
                {"t": table},
            ).all()
        )
        missing = [c for c in columns if finite_constraint_name(table, c) not in present]
        unvalidated = [c for c in columns if present.get(finite_constraint_name(table, c)) is False]
        refusal = None
        if missing:
            checks = ", ".join(_finite_check(table, c) for c in missing)
            refusal = _try(conn, f"ALTER TABLE {table} {checks}")
            if refusal is not None:
                checks = ", ".join(_finite_check(table, c, not_valid=True) for c in missing)
                if _try(conn, f"ALTER TABLE {table} {checks}") is None:
                    missing, unvalidated = [], unvalidated + missing
            else:
                missing = []
        else:
            for column in list(unvalidated):
                name = finite_constraint_name(table, column)
                validated = _try(conn, f'ALTER TABLE {table} VALIDATE CONSTRAINT "{name}"') is None
                # TimescaleDB cannot VALIDATE on a hypertable with columnstore enabled, but can add the
                # check anew (which validates it): swap the NOT VALID one for it, in one savepoint.
                validated = validated or (
                    _try(conn, f'ALTER TABLE {table} DROP CONSTRAINT "{name}", {_finite_check(table, column)}') is None
                )
                if validated:
                    unvalidated.remove(column)
        if missing or unvalidated:
            problems.append(
                f"{table}: the checks refusing NaN and infinities in {', '.join(missing + unvalidated)} are "
                + ("not in place" if missing else "in place for new writes only")
                + f" ({refusal or 'old rows fail them'}); days holding such values: "
                f"{_non_finite_days(conn, table, missing + unvalidated)}. Fix: recompute those days "
                "(make recompute FROM=<first day>); the next run's migration completes the checks."
            )
    for problem in problems:
        logger.warning(problem)
    return problems


# Where migrate() says what an operator should see: (logging level, message).
Report = Callable[[int, str], None]


def migrate(dsn: str, report: Report | None = None) -> list[str]:
    """Bring the database at ``dsn`` up to date; return the names of the migrations applied now.

    A session-level advisory lock serialises migrators for the whole run; each migration commits with
    its ``schema_migrations`` row, so a failure leaves the database at the last version that succeeded.
    What changed in the TimescaleDB jobs and chunk sizes because the configuration did, and a server
    known not to work, go to ``report`` once committed (the CLI prints them, a run's resource puts them in
    Dagster's event log); without one, to this module's logger.
    """
    engine = engine_for(dsn)
    applied_now: list[str] = []
    said: list[tuple[int, str]] = []
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        conn.commit()
        try:
            with conn.begin():
                conn.execute(
                    sa.text(
                        "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                        "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                )
                timescale = _ensure_timescaledb(conn)
                done = {row[0] for row in conn.execute(sa.text("SELECT version FROM schema_migrations"))}
            for step in MIGRATIONS:
                if step.version in done:
                    continue
                with conn.begin():
                    step.apply(conn, timescale)
                    conn.execute(
                        sa.text("INSERT INTO schema_migrations (version, name) VALUES (:v, :n)"),
                        {"v": step.version, "n": step.name},
                    )
                applied_now.append(step.name)
            with conn.begin():
                from marketfs.store.feature_vectors import prune_history

                _ensure_columns(conn)
                pruned = prune_history(conn)
                if pruned:
                    said.append(
                        (logging.INFO, f"dropped {pruned} superseded vector version(s) past MARKETFS_HISTORY_RETENTION")
                    )
                _ensure_finite_checks(conn)
                if timescale:
                    from marketfs.store.timescale import prune_feature_state, reconcile_policies, version_warning

                    warning = version_warning(conn)
                    said += [(logging.WARNING, warning)] if warning else []
                    said += [(logging.INFO, f"TimescaleDB: {change}") for change in reconcile_policies(conn)]
                    prune_feature_state(conn)
        finally:
            # A session lock outlives a transaction and would travel with the pooled connection.
            if not conn.invalidated:
                conn.rollback()
                conn.execute(sa.text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
                conn.commit()
    for level, message in said:
        (report or logger.log)(level, message)
    return applied_now
