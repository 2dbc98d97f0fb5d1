"""TimescaleDB upkeep: storage after re-runs, the rollup under retention and concurrent refreshes, what an
operator sees of a configuration change, the join's method, chunk sizes, the supported versions.

They need a server with the extension (MARKETFS_TEST_DSN); elsewhere they skip, saying so.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from dagster_helpers import materialize_range
from timescale_helpers import convert_all, run_jobs, scalar

from marketfs.store import timescale
from marketfs.store.migrations import migrate


def _chunk_storage(engine: sa.Engine, table: str) -> list[tuple[str, int, int, int]]:
    """Per converted chunk of ``table``: name, rows left in its rowstore, its indexes' bytes, its index count."""
    with engine.connect() as conn:
        chunks = conn.execute(
            sa.text(
                "SELECT format('%I.%I', chunk_schema, chunk_name) FROM timescaledb_information.chunks "
                "WHERE hypertable_name = :t AND is_compressed ORDER BY range_start"
            ),
            {"t": table},
        ).scalars()
        return [
            (
                name,
                conn.execute(sa.text(f"SELECT count(*) FROM ONLY {name}")).scalar(),
                conn.execute(sa.text("SELECT pg_indexes_size(CAST(:c AS regclass))"), {"c": name}).scalar(),
                conn.execute(
                    sa.text("SELECT count(*) FROM pg_index WHERE indrelid = CAST(:c AS regclass)"), {"c": name}
                ).scalar(),
            )
            for name in chunks.all()
        ]


def _stored_bytes(engine: sa.Engine, table: str) -> int:
    """Bytes of ``table``'s chunks, their columnstore companions, TOAST and indexes; their main forks only (the
    free-space and visibility maps a first VACUUM creates are a few pages per chunk, once)."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                """
                WITH chunks AS (
                    SELECT format('%I.%I', c.schema_name, c.table_name)::regclass AS rel
                    FROM _timescaledb_catalog.chunk c JOIN _timescaledb_catalog.hypertable h ON h.id = c.hypertable_id
                    WHERE h.table_name = :t OR h.id = (SELECT compressed_hypertable_id
                                                       FROM _timescaledb_catalog.hypertable WHERE table_name = :t)
                ), tables AS (
                    SELECT rel FROM chunks
                    UNION ALL
                    SELECT reltoastrelid FROM pg_class WHERE oid IN (SELECT rel FROM chunks) AND reltoastrelid <> 0
                )
                SELECT sum(pg_relation_size(rel))::bigint FROM (
                    SELECT rel FROM tables
                    UNION ALL SELECT indexrelid FROM pg_index WHERE indrelid IN (SELECT rel FROM tables)
                ) r
                """
            ),
            {"t": table},
        ).scalar()


def test_a_rerun_leaves_converted_chunks_as_compact_as_before(dsn: str, ts_engine: sa.Engine) -> None:
    """Item 1: the rowstore a re-run passed through is empty afterwards, and so are its indexes."""
    tables = ("ohlcv_1m", "news_events", "feature_vectors")
    assert materialize_range(dsn, "2024-01-02", "2024-01-03").success
    convert_all(ts_engine, *tables)
    before = {t: _stored_bytes(ts_engine, t) for t in tables}
    assert materialize_range(dsn, "2024-01-02", "2024-01-03").success
    for table in tables:
        storage = _chunk_storage(ts_engine, table)
        assert storage, table
        for name, rows, index_bytes, indexes in storage:
            assert rows == 0, name
            assert index_bytes == indexes * timescale.EMPTY_INDEX_BYTES, name
        # Recompression may pack batches differently; what the re-run passed through is gone.
        assert _stored_bytes(ts_engine, table) <= before[table] * 1.1, (table, before[table])


def test_test_databases_have_no_columnstore_job(ts_engine: sa.Engine) -> None:
    """Item 5: the policy would convert the tests' 2024 rows while they write them (deadlocks)."""
    assert (
        scalar(ts_engine, "SELECT count(*) FROM timescaledb_information.jobs WHERE proc_name = 'policy_compression'")
        == 0
    )


@pytest.mark.columnstore_policy
def test_the_policy_tests_keep_the_columnstore_job(ts_engine: sa.Engine) -> None:
    assert (
        scalar(ts_engine, "SELECT count(*) FROM timescaledb_information.jobs WHERE proc_name = 'policy_compression'")
        == 3
    )


def _flagged_by_day(engine: sa.Engine, source: str) -> dict:
    column = "day" if source == timescale.ROLLUP else "time_bucket(INTERVAL '1 day', ts)"
    counted = "sum(flagged)" if source == timescale.ROLLUP else "count(*) FILTER (WHERE cardinality(quality_flags) > 0)"
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(f"SELECT {column}, {counted} FROM {source} GROUP BY 1")).all())


def test_concurrent_refreshes_of_the_rollup_take_turns(dsn: str, ts_engine: sa.Engine) -> None:
    """Item 5: two writers' refreshes, and one while the policy job refreshes, all land; none leaves a day stale."""
    assert materialize_range(dsn, "2024-01-02", "2024-01-04").success
    with ts_engine.begin() as conn:
        # Changed behind the rollup's back: every vector of the three days flagged, the materialised rows stale.
        conn.execute(sa.text("UPDATE feature_vectors SET quality_flags = '{GAP}'"))
        mat_id = conn.execute(
            sa.text("SELECT mat_hypertable_id FROM _timescaledb_catalog.continuous_agg WHERE user_view_name = :v"),
            {"v": timescale.ROLLUP},
        ).scalar()
    assert _flagged_by_day(ts_engine, timescale.ROLLUP) != _flagged_by_day(ts_engine, "feature_vectors")
    # A refresh in progress elsewhere (the hourly job): its window registered by a live session, as TimescaleDB
    # does, for a second; a refresh overlapping it is refused at once.
    with ts_engine.connect() as holder:
        pid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        holder.execute(
            sa.text(
                "INSERT INTO _timescaledb_catalog.continuous_aggs_jobs_refresh_ranges "
                "(materialization_id, start_range, end_range, pid, job_id, created_at) "
                "VALUES (:m, -9223372036854775807, 9223372036854775807, :p, 0, now())"
            ),
            {"m": mat_id, "p": pid},
        )
        holder.commit()
        errors: list[BaseException] = []

        def refresh(start: datetime, end: datetime) -> None:
            try:
                timescale.refresh_rollup(ts_engine, start, end)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        writers = [
            threading.Thread(target=refresh, args=(datetime(2024, 1, 2, tzinfo=UTC), datetime(2024, 1, 4, tzinfo=UTC))),
            threading.Thread(target=refresh, args=(datetime(2024, 1, 3, tzinfo=UTC), datetime(2024, 1, 6, tzinfo=UTC))),
        ]
        for writer in writers:
            writer.start()
        time.sleep(1.0)
        holder.execute(
            sa.text("DELETE FROM _timescaledb_catalog.continuous_aggs_jobs_refresh_ranges WHERE pid = :p"), {"p": pid}
        )
        holder.commit()
        for writer in writers:
            writer.join(timeout=90)
    assert errors == []
    assert _flagged_by_day(ts_engine, timescale.ROLLUP) == _flagged_by_day(ts_engine, "feature_vectors")


def _rollup(engine: sa.Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text(f"SELECT count(*), sum(vectors) FROM {timescale.ROLLUP}")).one())


def test_removing_or_lengthening_retention_keeps_the_rollup(
    dsn: str, ts_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 2: the refresh never moves back before the oldest vectors held, whatever retention says later."""
    assert materialize_range(dsn, "2024-01-02", "2024-01-04").success
    rollup = _rollup(ts_engine)
    assert rollup[0] > 0
    monkeypatch.setenv("MARKETFS_RETENTION_FEATURE_VECTORS", "400 days")  # the sample is older than that
    migrate(dsn)
    run_jobs(ts_engine, "policy_retention", "policy_refresh_continuous_aggregate")
    assert scalar(ts_engine, "SELECT count(*) FROM feature_vectors") == 0
    assert _rollup(ts_engine) == rollup
    for retention in ("1200 days", None):
        if retention is None:
            monkeypatch.delenv("MARKETFS_RETENTION_FEATURE_VECTORS")
        else:
            monkeypatch.setenv("MARKETFS_RETENTION_FEATURE_VECTORS", retention)
        said: list[str] = []
        migrate(dsn, report=lambda _level, message, said=said: said.append(message))
        run_jobs(ts_engine, "policy_refresh_continuous_aggregate")
        assert _rollup(ts_engine) == rollup, retention
        if retention == "1200 days":  # the first change moves the refresh; the next one finds it safe already
            assert any("not before the oldest feature vectors held" in line for line in said), said
    # Vectors written again for those days are aggregated again: the refresh after a write covers its window.
    assert materialize_range(dsn, "2024-01-02", "2024-01-04").success
    assert _rollup(ts_engine) == rollup


def test_a_changed_setting_is_said_in_the_runs_event_log(
    dsn: str, ts_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 3: the run that applies a changed setting says what it changed, where the operator looks."""
    import dagster as dg

    monkeypatch.setenv("MARKETFS_COMPRESS_AFTER", "7 days")
    monkeypatch.setenv("MARKETFS_RETENTION_OHLCV_1D", "5 years")
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize_range(dsn, "2024-01-02", instance=instance)
        assert result.success
        logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert "TimescaleDB: feature_vectors: columnstore policy after 7 days added" in logged
    assert "TimescaleDB: ohlcv_1d: retention after 5 years added" in logged


def test_a_changed_setting_is_said_by_make_run(dsn: str, ts_engine: sa.Engine, tmp_path: Path) -> None:
    """Item 3: `make run` (python -m pipelines run) prints what the configuration changed, once."""
    from test_cli_messages import land, landing_env, pipelines

    land(tmp_path / "landing", "2024-04-02")
    env = landing_env(dsn, tmp_path) | {"MARKETFS_COMPRESS_AFTER": "7 days"}
    result = pipelines(env, "run", "--start", "2024-04-02", "--end", "2024-04-02", "--no-snapshot")
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if line.startswith("configuration")]
    assert "configuration  TimescaleDB: news_events: columnstore policy after 7 days added" in said
    assert len(said) == 3, said  # the three tables; the run's own migrate finds nothing more to do
    again = pipelines(env, "run", "--start", "2024-04-02", "--end", "2024-04-02", "--no-snapshot")
    assert again.returncode == 0 and "configuration" not in again.stdout


def test_a_server_known_not_to_work_is_warned_about(dsn: str, ts_engine: sa.Engine) -> None:
    """Supported versions: TimescaleDB 2.28 on PostgreSQL 15 newer than 15.18 fails every background job."""
    bad = timescale.known_bad_combination("2.28.3", 150020, "15.20")
    assert bad is not None and "every TimescaleDB background job fails" in bad and "Fix: PostgreSQL 15.18" in bad
    assert timescale.known_bad_combination("2.28.3", 150018, "15.18") is None
    assert timescale.known_bad_combination("2.28.3", 160010, "16.10") is None
    assert "older than 2.18" in timescale.known_bad_combination("2.17.2", 150018, "15.18")
    # This server (the tested combination) is said to be fine; a bad one is said by migrate, as a warning.
    with ts_engine.connect() as conn:
        assert timescale.version_warning(conn) is None
    said: list[tuple[int, str]] = []
    migrate(dsn, report=lambda level, message: said.append((level, message)))
    assert said == []


def _chosen_method(dsn: str, entities: list[tuple[str, datetime]], tolerance: timedelta | None) -> str:
    """What training_frame's point-in-time join would choose for ``entities`` (1m vectors of fs_v1)."""
    import polars as pl
    import psycopg

    from marketfs import retrieval
    from marketfs.store.copy import copy_frame_in

    frame = pl.DataFrame(
        {"row_no": range(len(entities)), "instrument_id": [i for i, _ in entities], "ts": [t for _, t in entities]},
        schema={"row_no": pl.Int64, "instrument_id": pl.String, "ts": pl.Datetime("us", "UTC")},
    )
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "CREATE TEMP TABLE pit_entities (row_no bigint, instrument_id text, ts timestamptz) ON COMMIT DROP"
        )
        copy_frame_in(conn, "pit_entities", frame)
        return "merge" if retrieval._merge_wanted(conn, tolerance, retrieval._lag("1m"), "1m") else "lookup"


def test_the_join_method_follows_the_rows_it_reads(
    dsn: str, ts_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 4: sparse entities on the newest day, tolerance=None, over converted older days: looked up (the merge
    would read every instrument's history); dense entities over converted days: merged; same values either way."""
    import polars as pl

    from marketfs.retrieval import training_frame

    monkeypatch.setenv("MARKETFS_CHUNK_INTERVAL_FEATURE_VECTORS", "1 day")
    assert materialize_range(dsn, "2024-01-02", "2024-01-05").success
    convert_all(ts_engine, "feature_vectors", older_than=datetime(2024, 1, 5, tzinfo=UTC))
    newest = datetime(2024, 1, 5, 20, 0, tzinfo=UTC)
    sparse = [(f"SYN00{i}", newest) for i in range(3)]
    assert _chosen_method(dsn, sparse, None) == "lookup"
    # The same rows, each on a converted day: every lookup decompresses a batch, still fewer rows than 4 days.
    assert _chosen_method(dsn, [(i, t - timedelta(days=2)) for i, t in sparse], None) == "lookup"
    start = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    dense = [(f"SYN00{i % 3}", start + timedelta(minutes=7 * i, seconds=13)) for i in range(300)]
    assert _chosen_method(dsn, dense, timedelta(minutes=5)) == "merge"
    assert _chosen_method(dsn, dense, None) == "merge"
    frame = pl.DataFrame(
        {"instrument_id": [i for i, _ in sparse + dense], "ts": [t for _, t in sparse + dense]},
        schema={"instrument_id": pl.String, "ts": pl.Datetime("us", "UTC")},
    )
    chosen = training_frame(frame, ["ret_1", "rsi_14"], None, dsn=dsn, include_feature_ts=True)
    monkeypatch.setenv("MARKETFS_PIT_METHOD", "lookup")
    assert training_frame(frame, ["ret_1", "rsi_14"], None, dsn=dsn, include_feature_ts=True).equals(chosen)
    assert chosen["ret_1"].null_count() < chosen.height


def test_daily_only_history_is_held_in_chunks_that_compress(dsn: str, ts_engine: sa.Engine) -> None:
    """Item 6: 8-day chunks of daily vectors (6 rows per instrument) grew when converted; adjacent sparse chunks
    are merged after each write, converted ones included, into chunks of up to 90 days that compress."""
    assert materialize_range(dsn, "2023-10-02", "2023-10-31", instruments=10).success
    convert_all(ts_engine, "feature_vectors")  # as the policy does between runs
    assert materialize_range(dsn, "2023-11-01", "2023-12-15", instruments=10).success
    convert_all(ts_engine, "feature_vectors")
    with ts_engine.connect() as conn:
        chunks = conn.execute(
            sa.text(
                "SELECT c.range_start, c.range_end, s.before_compression_total_bytes, s.after_compression_total_bytes "
                "FROM timescaledb_information.chunks c JOIN chunk_columnstore_stats('feature_vectors') s "
                "ON s.chunk_schema = c.chunk_schema AND s.chunk_name = c.chunk_name "
                "WHERE c.hypertable_name = 'feature_vectors' ORDER BY c.range_start"
            )
        ).all()
        vectors = conn.execute(
            sa.text("SELECT count(*), count(DISTINCT (instrument_id, ts)) FROM feature_vectors")
        ).one()
    sessions = 54  # XNYS, 2023-10-02 .. 2023-12-15
    assert tuple(vectors) == (sessions * 10, sessions * 10)  # merging moved rows, lost and doubled none
    assert len(chunks) <= 2, chunks
    for first, last, before, after in chunks:
        assert last - first > timedelta(days=8)
        assert after < before, (first, last, before, after)
