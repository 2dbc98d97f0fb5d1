"""The TimescaleDB path: hypertables, compression, policies, the daily rollup, upserts into compressed chunks.

These need a server with the extension: set MARKETFS_TEST_DSN to it (any database; each test makes
its own). Without it they skip, saying so.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from dagster_helpers import materialize_range
from timescale_helpers import convert_all, run_jobs, scalar

from marketfs.db import engine_for
from marketfs.features.flags import QualityFlag
from marketfs.store.migrations import migrate


@pytest.mark.columnstore_policy
def test_hypertables_columnstore_and_rollup_exist(ts_engine: sa.Engine) -> None:
    hypertables = scalar(
        ts_engine, "SELECT array_agg(hypertable_name ORDER BY 1) FROM timescaledb_information.hypertables"
    )
    assert {"ohlcv_1m", "ohlcv_1d", "news_events", "feature_vectors"} <= set(hypertables)
    with ts_engine.connect() as conn:
        settings = {
            row[0]: (row[1], row[2])
            for row in conn.execute(
                sa.text(
                    "SELECT hypertable::text, segmentby, orderby FROM "
                    "timescaledb_information.hypertable_columnstore_settings"
                )
            )
        }
    # Segmented by instrument only: daily vectors no longer form batches of 5 rows; the key's event_id orders.
    assert settings["feature_vectors"] == ("instrument_id", "feature_set_version,timeframe,ts DESC")
    assert settings["news_events"] == ("instrument_id", "published_at DESC,event_id")
    jobs = scalar(ts_engine, "SELECT array_agg(proc_name ORDER BY 1) FROM timescaledb_information.jobs")
    assert "policy_compression" in jobs and "policy_refresh_continuous_aggregate" in jobs
    rollup = scalar(
        ts_engine,
        "SELECT materialized_only FROM timescaledb_information.continuous_aggregates "
        "WHERE view_name = 'feature_quality_daily'",
    )
    assert rollup is False  # real-time
    columns = scalar(
        ts_engine,
        "SELECT array_agg(column_name::text) FROM information_schema.columns "
        "WHERE table_name = 'feature_quality_daily'",
    )
    assert {f.value.lower() for f in QualityFlag} <= set(columns)


def _partial_or_rowstore(engine: sa.Engine, table: str) -> tuple[int, int]:
    """Chunks of ``table`` marked partial (rows beside the columnstore), and rows in chunks' rowstore."""
    with engine.connect() as conn:
        chunks = conn.execute(
            sa.text(
                "SELECT format('%I.%I', c.schema_name, c.table_name), c.status FROM _timescaledb_catalog.chunk c "
                "JOIN _timescaledb_catalog.hypertable h ON h.id = c.hypertable_id "
                "WHERE h.table_name = :t"
            ),
            {"t": table},
        ).all()
        partial = sum(1 for _, status in chunks if status & 8)
        rows = sum(conn.execute(sa.text(f"SELECT count(*) FROM ONLY {name}")).scalar() for name, _ in chunks)
    return partial, rows


def test_a_rerun_of_a_converted_range_leaves_it_in_the_columnstore(dsn: str, ts_engine: sa.Engine) -> None:
    """Item 1: the re-run's rows are converted back after it commits, not left beside the columnstore."""
    assert materialize_range(dsn, "2024-01-02", "2024-01-03").success
    convert_all(ts_engine, "feature_vectors", "ohlcv_1m", "news_events")
    assert _partial_or_rowstore(ts_engine, "feature_vectors") == (0, 0)
    assert materialize_range(dsn, "2024-01-03").success
    for table in ("feature_vectors", "ohlcv_1m", "news_events"):
        assert _partial_or_rowstore(ts_engine, table) == (0, 0), table


def test_rerun_of_a_compressed_partition_upserts_past_the_decompression_limit(dsn: str, ts_engine: sa.Engine) -> None:
    assert materialize_range(dsn, "2024-01-02", "2024-01-03").success
    before = scalar(
        ts_engine,
        "SELECT md5(string_agg(f::text, '' ORDER BY f::text)) FROM "
        "(SELECT instrument_id, ts, ret_1, rsi_14, macd FROM feature_vectors) f",
    )
    convert_all(ts_engine, "feature_vectors", "ohlcv_1m")
    with ts_engine.begin() as conn:
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


def _policies(dsn: str) -> dict[tuple[str, str], str]:
    from marketfs.db import engine_for

    with engine_for(dsn).connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT proc_name, hypertable_name, coalesce(config->>'compress_after', config->>'drop_after') "
                "FROM timescaledb_information.jobs WHERE proc_name IN ('policy_compression', 'policy_retention')"
            )
        ).all()
    return {(proc, table): after for proc, table, after in rows}


@pytest.mark.columnstore_policy
def test_policies_follow_the_configuration_on_every_migrate(
    empty_dsn: str, ts_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 2: a changed, switched-off or unset setting changes the job, and says so."""
    migrate(empty_dsn)
    assert _policies(empty_dsn)[("policy_compression", "feature_vectors")] == "30 days"
    assert not any(proc == "policy_retention" for proc, _ in _policies(empty_dsn))
    monkeypatch.setenv("MARKETFS_COMPRESS_AFTER", "7 days")
    monkeypatch.setenv("MARKETFS_RETENTION_OHLCV_1D", "5 years")
    with caplog.at_level("INFO", logger="marketfs.store.migrations"):
        migrate(empty_dsn)
    jobs = _policies(empty_dsn)
    assert {jobs[("policy_compression", t)] for t in ("ohlcv_1m", "news_events", "feature_vectors")} == {"7 days"}
    assert jobs[("policy_retention", "ohlcv_1d")] == "5 years"
    assert "feature_vectors: columnstore policy after 7 days added" in caplog.text
    assert "ohlcv_1d: retention after 5 years added" in caplog.text
    monkeypatch.setenv("MARKETFS_COMPRESS_AFTER", "off")
    monkeypatch.delenv("MARKETFS_RETENTION_OHLCV_1D")
    migrate(empty_dsn)
    assert _policies(empty_dsn) == {}
    from marketfs.store import timescale

    with engine_for(empty_dsn).begin() as conn:
        assert timescale.reconcile_policies(conn) == []  # nothing to change: nothing changed
    monkeypatch.setenv("MARKETFS_RETENTION_NEWS_EVENTS", "ninety days")
    with pytest.raises(ValueError, match="MARKETFS_RETENTION_NEWS_EVENTS='ninety days' is not an interval"):
        migrate(empty_dsn)


def test_retention_leaves_the_rollup_and_takes_the_state_with_the_vectors(
    dsn: str, ts_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items 3 and 4: the rollup shows a run at once; retention then its refresh leave it whole."""
    assert materialize_range(dsn, "2024-01-02", "2024-01-04").success
    daily = "SELECT count(*), sum(vectors) FROM feature_quality_daily"
    counted = scalar(ts_engine, "SELECT count(*) FROM feature_vectors")
    with ts_engine.connect() as conn:
        rows, vectors = conn.execute(sa.text(daily)).one()
    assert rows > 0 and vectors == counted  # at once, not after the hourly refresh
    monkeypatch.setenv("MARKETFS_RETENTION_FEATURE_VECTORS", "400 days")  # the sample is older than that
    migrate(dsn)
    assert scalar(ts_engine, "SELECT count(*) FROM feature_state") == 0  # no state without its vectors
    run_jobs(ts_engine, "policy_retention", "policy_refresh_continuous_aggregate")
    assert scalar(ts_engine, "SELECT count(*) FROM feature_vectors") == 0  # retention ran
    with ts_engine.connect() as conn:
        assert tuple(conn.execute(sa.text(daily)).one()) == (rows, vectors)


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


def test_the_join_over_columnstore_chunks_matches_the_rowstore_one(dsn: str, ts_engine: sa.Engine) -> None:
    """Item 8: where the entities' range reaches converted chunks the join reads them once (a merge);
    the values are those of the lookups over the same chunks in the rowstore."""
    from datetime import UTC, datetime, timedelta

    import polars as pl

    from marketfs.retrieval import training_frame

    assert materialize_range(dsn, "2024-01-02", "2024-01-03").success
    start = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    entities = pl.DataFrame(
        {
            "instrument_id": [f"SYN00{i % 3}" for i in range(300)],
            "ts": [start + timedelta(minutes=7 * i, seconds=13) for i in range(300)],
        },
        schema={"instrument_id": pl.String, "ts": pl.Datetime("us", "UTC")},
    )
    features = ["ret_1", "rsi_14", "sentiment_mean_1h"]
    rowstore = training_frame(entities, features, timedelta(minutes=5), dsn=dsn, include_feature_ts=True)
    convert_all(ts_engine, "feature_vectors")
    columnstore = training_frame(entities, features, timedelta(minutes=5), dsn=dsn, include_feature_ts=True)
    assert columnstore.equals(rowstore) and rowstore["ret_1"].null_count() < rowstore.height
