"""The TimescaleDB path: hypertables, compression, policies, the daily rollup, upserts into compressed chunks.

These need a server with the extension: set MARKETFS_TEST_DSN to it (any database; each test makes
its own). Without it they skip, saying so.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from dagster_helpers import materialize_range

from marketfs.db import timescaledb_installed
from marketfs.store.migrations import migrate


@pytest.fixture
def ts_engine(engine: sa.Engine) -> sa.Engine:
    with engine.connect() as conn:
        if not timescaledb_installed(conn):
            pytest.skip("no TimescaleDB on the test server: set MARKETFS_TEST_DSN to a server with the extension")
    return engine


def scalar(engine: sa.Engine, query: str, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(query), params).scalar()


def test_hypertables_compression_and_rollup_exist(ts_engine: sa.Engine) -> None:
    hypertables = scalar(
        ts_engine, "SELECT array_agg(hypertable_name ORDER BY 1) FROM timescaledb_information.hypertables"
    )
    assert {"ohlcv_1m", "ohlcv_1d", "news_events", "feature_vectors"} <= set(hypertables)
    segment_by = scalar(
        ts_engine,
        "SELECT array_agg(attname ORDER BY segmentby_column_index) FROM timescaledb_information.compression_settings "
        "WHERE hypertable_name = 'feature_vectors' AND segmentby_column_index IS NOT NULL",
    )
    assert segment_by == ["instrument_id", "timeframe", "feature_set_version"]
    jobs = scalar(ts_engine, "SELECT array_agg(proc_name ORDER BY 1) FROM timescaledb_information.jobs")
    assert "policy_compression" in jobs and "policy_refresh_continuous_aggregate" in jobs
    assert (
        scalar(
            ts_engine,
            "SELECT count(*) FROM timescaledb_information.continuous_aggregates "
            "WHERE view_name = 'feature_quality_daily'",
        )
        == 1
    )


def test_rerun_of_a_compressed_partition_upserts_past_the_decompression_limit(dsn: str, ts_engine: sa.Engine) -> None:
    assert materialize_range(dsn, "2024-01-02", "2024-01-03").success
    before = scalar(
        ts_engine,
        "SELECT md5(string_agg(f::text, '' ORDER BY f::text)) FROM "
        "(SELECT instrument_id, ts, ret_1, rsi_14, macd FROM feature_vectors) f",
    )
    with ts_engine.begin() as conn:
        conn.execute(
            sa.text("SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks('feature_vectors') c")
        )
        conn.execute(sa.text("SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks('ohlcv_1m') c"))
        # A deliberately tiny limit: without lifting it for the write, the re-run would stop with an error.
        database = conn.execute(sa.text("SELECT current_database()")).scalar()
        conn.execute(
            sa.text(f'ALTER DATABASE "{database}" SET timescaledb.max_tuples_decompressed_per_dml_transaction = 10')
        )
    from marketfs.db import engine_for

    engine_for(dsn).dispose()  # new sessions pick up the database setting
    assert scalar(ts_engine, "SELECT count(*) FROM timescaledb_information.chunks WHERE is_compressed") > 0
    assert materialize_range(dsn, "2024-01-03").success
    after = scalar(
        ts_engine,
        "SELECT md5(string_agg(f::text, '' ORDER BY f::text)) FROM "
        "(SELECT instrument_id, ts, ret_1, rsi_14, macd FROM feature_vectors) f",
    )
    assert after == before
    assert (
        scalar(
            ts_engine,
            "SELECT count(*) FROM (SELECT instrument_id, timeframe, ts, feature_set_version "
            "FROM feature_vectors GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d",
        )
        == 0
    )


def test_retention_policy_only_when_configured(
    empty_dsn: str, ts_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def retention_jobs(engine: sa.Engine) -> int:
        return scalar(engine, "SELECT count(*) FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'")

    assert retention_jobs(ts_engine) == 0
    monkeypatch.setenv("MARKETFS_RETENTION_OHLCV_1M", "400 days")
    migrate(empty_dsn)
    from marketfs.db import engine_for

    assert retention_jobs(engine_for(empty_dsn)) == 1
