"""Schema migrations on a real server: none forgotten, one transaction each, time indexes, TimescaleDB off."""

from __future__ import annotations

import inspect
import re
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa

from marketfs.db import engine_for, timescaledb_installed
from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.store import migrations
from marketfs.store.bars import read_bars
from marketfs.store.feature_vectors import read_vectors
from marketfs.store.migrations import MIGRATION_LOCK_ID, MIGRATIONS, TIME_COLUMNS, Migration, migrate, migration


def scalar(dsn: str, query: str, **params: object) -> object:
    with engine_for(dsn).connect() as conn:
        return conn.execute(sa.text(query), params).scalar()


def recorded_versions(dsn: str) -> list[int]:
    return scalar(dsn, "SELECT array_agg(version ORDER BY version) FROM schema_migrations")


def brin_indexes(dsn: str) -> list[str]:
    return scalar(
        dsn,
        "SELECT coalesce(array_agg(c.relname::text ORDER BY c.relname), '{}') FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam WHERE am.amname = 'brin'",
    )


def test_every_migration_function_is_registered_once_in_version_order() -> None:
    functions = {
        name: fn for name, fn in inspect.getmembers(migrations, inspect.isfunction) if re.match(r"_m\d{3}_", name)
    }
    assert sorted(step.apply.__name__ for step in MIGRATIONS) == sorted(functions), "a _mNNN_ function is unregistered"
    assert [step.version for step in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert all(step.apply.__name__.startswith(f"_m{step.version:03d}_") for step in MIGRATIONS)
    assert len({step.name for step in MIGRATIONS}) == len(MIGRATIONS)
    assert "_m007_time_range_indexes" in functions


def test_a_migration_out_of_sequence_is_refused_when_the_module_is_read() -> None:
    def _m099_skips_ahead(conn: sa.Connection, timescale: bool) -> None:
        pass

    before = list(MIGRATIONS)
    with pytest.raises(RuntimeError, match=f"the next version is {len(MIGRATIONS) + 1}"):
        migration(99, "skips ahead")(_m099_skips_ahead)
    assert before == MIGRATIONS


def test_a_database_at_version_6_gets_the_time_indexes_on_its_next_migrate(
    empty_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(migrations, "MIGRATIONS", MIGRATIONS[:6])
        migrate(empty_dsn)
    assert recorded_versions(empty_dsn) == [1, 2, 3, 4, 5, 6]
    assert migrate(empty_dsn) == [step.name for step in MIGRATIONS[6:]]
    assert recorded_versions(empty_dsn) == list(range(1, len(MIGRATIONS) + 1))
    # Every served table can range-scan its time column: a BRIN on a plain table, the hypertable's own b-tree.
    with engine_for(empty_dsn).connect() as conn:
        assert all(migrations._time_column_leads_an_index(conn, t, c) for t, c in TIME_COLUMNS.items())
        hypertables = timescaledb_installed(conn) and set(
            conn.execute(sa.text("SELECT hypertable_name FROM timescaledb_information.hypertables")).scalars()
        )
    expected = [f"{t}_{c}_brin" for t, c in TIME_COLUMNS.items() if t not in (hypertables or set())]
    assert brin_indexes(empty_dsn) == sorted(expected)
    assert migrate(empty_dsn) == []


def test_window_reads_on_plain_tables_use_the_time_index(empty_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETFS_TIMESCALEDB", "off")
    migrate(empty_dsn)
    engine = engine_for(empty_dsn)
    with engine.begin() as conn:
        # 10 days of four instruments' minutes, in time order as the pipeline writes them.
        for table, extra in (("ohlcv_1m", ", 1, 1, 1, 1, 1"), ("feature_vectors", ", '1m', 'fs_v1'")):
            columns = "open, high, low, close, volume" if table == "ohlcv_1m" else "timeframe, feature_set_version"
            conn.execute(
                sa.text(
                    f"INSERT INTO {table} (instrument_id, ts, {columns}) "
                    f"SELECT 'I' || i, timestamptz '2024-01-01' + m * interval '1 minute'{extra} "
                    "FROM generate_series(0, 14399) m, generate_series(1, 4) i ORDER BY m, i"
                )
            )
    with engine.connect() as conn:
        conn.execute(sa.text("ANALYZE ohlcv_1m"))
        conn.execute(sa.text("ANALYZE feature_vectors"))
        conn.commit()
        start, end = datetime(2024, 1, 5, tzinfo=UTC), datetime(2024, 1, 6, tzinfo=UTC)
        vectors = read_vectors(conn, feature_set=FS_V1, timeframe="1m", start=start, end=end)
        bars = read_bars(conn, start, end, warmup_bars=40)
        conn.commit()
        conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))  # this session's index counts, flushed when idle
        conn.commit()
        scans = dict(
            conn.execute(
                sa.text("SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE indexrelname LIKE '%_brin'")
            ).all()
        )
    assert vectors.height == 4 * 1440 and bars.height == 4 * 1440 + 4 * 40
    assert scans["feature_vectors_ts_brin"] >= 1, scans
    assert scans["ohlcv_1m_ts_brin"] >= 1, scans


def test_timescaledb_off_gives_plain_tables_although_the_extension_is_installed(
    empty_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except psycopg.Error as exc:
            pytest.skip(f"the test server cannot load TimescaleDB ({str(exc).splitlines()[0]}); set MARKETFS_TEST_DSN")
    monkeypatch.setenv("MARKETFS_TIMESCALEDB", "off")
    migrate(empty_dsn)
    assert scalar(empty_dsn, "SELECT count(*) FROM timescaledb_information.hypertables") == 0
    assert scalar(empty_dsn, "SELECT count(*) FROM timescaledb_information.continuous_aggregates") == 0
    assert brin_indexes(empty_dsn) == sorted(f"{t}_{c}_brin" for t, c in TIME_COLUMNS.items())


def _m003_fails_halfway(conn: sa.Connection, timescale: bool) -> None:
    conn.execute(sa.text("CREATE TABLE half_done (x int)"))
    conn.execute(sa.text("SELECT 1 / 0"))


def test_a_failing_migration_leaves_the_earlier_ones_committed_and_recorded(
    empty_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(migrations, "MIGRATIONS", [*MIGRATIONS[:2], Migration(3, "fails halfway", _m003_fails_halfway)])
        with pytest.raises(sa.exc.DBAPIError, match="division by zero"):
            migrate(empty_dsn)
    assert recorded_versions(empty_dsn) == [1, 2]
    assert scalar(empty_dsn, "SELECT to_regclass('ohlcv_1d')::text") == "ohlcv_1d"  # migration 2 stayed
    assert scalar(empty_dsn, "SELECT to_regclass('half_done')") is None  # the failed one left nothing
    # The lock went with the failure: another migrator is not blocked.
    assert scalar(empty_dsn, "SELECT pg_try_advisory_lock(:id) AND pg_advisory_unlock(:id)", id=MIGRATION_LOCK_ID)
    assert migrate(empty_dsn) == [step.name for step in MIGRATIONS[2:]]
    assert recorded_versions(empty_dsn) == list(range(1, len(MIGRATIONS) + 1))


def test_concurrent_migrators_take_turns_for_the_whole_run(empty_dsn: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(migrate, [empty_dsn, empty_dsn]))
    assert sorted(map(len, results)) == [0, len(MIGRATIONS)]
    assert recorded_versions(empty_dsn) == list(range(1, len(MIGRATIONS) + 1))
