"""TimescaleDB policies: compression and retention, applied on every migrate when the extension is present.

Settings come from the environment, so one deployment can keep a year of minute bars and another
a month without a code change:

    MARKETFS_COMPRESS_AFTER=30 days         compress chunks older than this (default 30 days; "off" to skip)
    MARKETFS_RETENTION_OHLCV_1M=2 years     drop minute bars older than this (default: keep everything)
    MARKETFS_RETENTION_NEWS_EVENTS=...      likewise for news_events
    MARKETFS_RETENTION_FEATURE_VECTORS=...  likewise for feature_vectors

Retention counts from now(): sample data older than ``drop_after`` disappears at the next job run,
which is why it is off unless asked for.
"""

from __future__ import annotations

import os

import sqlalchemy as sa

# (table, segment by, order by): segmenting by instrument keeps one instrument's rows together,
# which is how every read of these tables filters.
COMPRESSED = {
    "ohlcv_1m": ("instrument_id", "ts DESC"),
    "news_events": ("instrument_id", "published_at DESC"),
    "feature_vectors": ("instrument_id, timeframe, feature_set_version", "ts DESC"),
}

# An upsert touching compressed chunks decompresses rows and stops at this many per transaction
# (100,000 by default); a re-run of an old partition is bounded by its window, so lift it there.
DECOMPRESSION_LIMIT_GUC = "timescaledb.max_tuples_decompressed_per_dml_transaction"


def lift_decompression_limit(conn: sa.Connection) -> None:
    """For the current transaction only; on plain PostgreSQL this sets a harmless placeholder."""
    conn.execute(sa.text("SELECT set_config(:guc, '0', true)"), {"guc": DECOMPRESSION_LIMIT_GUC})


def enable_compression(conn: sa.Connection) -> None:
    for table, (segment_by, order_by) in COMPRESSED.items():
        conn.execute(
            sa.text(
                f"ALTER TABLE {table} SET (timescaledb.compress, timescaledb.compress_segmentby = '{segment_by}', "
                f"timescaledb.compress_orderby = '{order_by}')"
            )
        )


def create_daily_quality_rollup(conn: sa.Connection) -> None:
    # A continuous aggregate, created WITH NO DATA: creating it WITH DATA (or refreshing it) cannot
    # happen inside the migration's transaction; the policy below fills it in the background.
    conn.execute(
        sa.text(
            """
            CREATE MATERIALIZED VIEW feature_quality_daily WITH (timescaledb.continuous) AS
            SELECT time_bucket(INTERVAL '1 day', ts) AS day, feature_set_version, timeframe, instrument_id,
                   count(*) AS vectors,
                   count(*) FILTER (WHERE cardinality(quality_flags) > 0) AS flagged,
                   count(*) FILTER (WHERE 'MISSING_OHLCV' = ANY(quality_flags)) AS missing_ohlcv,
                   count(*) FILTER (WHERE 'NO_EVENTS' = ANY(quality_flags)) AS no_events
            FROM feature_vectors
            GROUP BY 1, 2, 3, 4
            WITH NO DATA
            """
        )
    )
    conn.execute(
        sa.text(
            "SELECT add_continuous_aggregate_policy('feature_quality_daily', start_offset => NULL, "
            "end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '1 hour')"
        )
    )


def apply_policies(conn: sa.Connection) -> dict[str, str]:
    """Compression and retention policies as the environment asks (idempotent)."""
    applied = {}
    compress_after = os.environ.get("MARKETFS_COMPRESS_AFTER", "30 days")
    for table in COMPRESSED:
        if compress_after.lower() != "off":
            conn.execute(
                sa.text(
                    "SELECT add_compression_policy(CAST(:t AS regclass), CAST(:i AS interval), if_not_exists => true)"
                ),
                {"t": table, "i": compress_after},
            )
            applied[f"{table} compression"] = compress_after
        retention = os.environ.get(f"MARKETFS_RETENTION_{table.upper()}")
        if retention:
            conn.execute(
                sa.text(
                    "SELECT add_retention_policy(CAST(:t AS regclass), CAST(:i AS interval), if_not_exists => true)"
                ),
                {"t": table, "i": retention},
            )
            applied[f"{table} retention"] = retention
    return applied
