"""The storage layer on a real server: migrations, idempotent upserts, atomicity, TimescaleDB."""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa

from marketfs.db import timescaledb_installed
from marketfs.embedded_pg import EmbeddedPostgres
from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.features.compute import compute_feature_vectors
from marketfs.sources import SyntheticBars
from marketfs.store.feature_vectors import read_vectors, upsert_window
from marketfs.store.migrations import migrate

DAY = datetime(2024, 1, 3, tzinfo=UTC)
NEXT = DAY + timedelta(days=1)


def vectors() -> pl.DataFrame:
    return compute_feature_vectors(
        SyntheticBars(instruments=("A", "B")).bars(DAY, NEXT), "1m", start=DAY, end=NEXT
    ).vectors


def write(engine: sa.Engine, frame: pl.DataFrame) -> dict[str, int]:
    with engine.begin() as conn:
        return upsert_window(conn, frame, feature_set=FS_V1, timeframe="1m", start=DAY, end=NEXT, run_id="r")


def read(engine: sa.Engine) -> pl.DataFrame:
    with engine.connect() as conn:
        return read_vectors(conn, feature_set=FS_V1, timeframe="1m", start=DAY, end=NEXT)


def test_migrate_twice_applies_nothing_the_second_time(dsn: str) -> None:
    assert migrate(dsn) == []


def test_upsert_is_idempotent_and_drops_keys_no_longer_computed(engine: sa.Engine) -> None:
    full = vectors()
    write(engine, full)
    write(engine, full)
    assert read(engine).equals(full)
    fewer = full.filter(pl.col("instrument_id") == "A")
    stats = write(engine, fewer)
    assert stats["deleted_stale"] == full.height - fewer.height
    assert read(engine).equals(fewer)


def test_a_write_copied_in_slices_stores_every_row_once(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("marketfs.store.copy.ROWS_PER_COPY_SLICE", 7)  # hundreds of slices, one ragged
    frame = vectors()
    assert frame.height % 7 and write(engine, frame)["upserted"] == frame.height
    assert read(engine).equals(frame.sort("instrument_id", "ts"))


def test_failed_write_leaves_the_table_as_it_was(engine: sa.Engine) -> None:
    full = vectors()
    write(engine, full)
    changed = full.with_columns(pl.col("ret_1") * 2)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        upsert_window(conn, changed, feature_set=FS_V1, timeframe="1m", start=DAY, end=NEXT)
        raise RuntimeError("the run dies after the upsert, before commit")
    assert read(engine).equals(full)


def test_feature_vectors_is_a_hypertable_of_the_configured_chunk_interval(engine: sa.Engine) -> None:
    from marketfs.store.timescale import chunk_interval

    with engine.connect() as conn:
        if not timescaledb_installed(conn):
            pytest.skip("the test server has no TimescaleDB extension (set MARKETFS_TEST_DSN to a TimescaleDB server)")
        interval = conn.execute(
            sa.text(
                "SELECT time_interval FROM timescaledb_information.dimensions "
                "WHERE hypertable_name = 'feature_vectors' AND column_name = 'ts'"
            )
        ).scalar()
    assert interval == timedelta(days=int(chunk_interval("feature_vectors").split()[0]))  # 8 days at 50 instruments
    write(engine, vectors())
    assert read(engine).height == vectors().height


def test_plain_postgres_gets_a_plain_table_with_the_same_key(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        if timescaledb_installed(conn):
            pytest.skip("the test server has TimescaleDB; the plain-table path is covered on plain PostgreSQL")
        key = conn.execute(
            sa.text(
                "SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_index i "
                "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                "WHERE i.indrelid = 'feature_vectors'::regclass AND i.indisprimary"
            )
        ).scalar()
    assert key == ["instrument_id", "timeframe", "feature_set_version", "ts"]


def test_embedded_server_restarts_on_loopback_and_keeps_its_data() -> None:
    home = Path(tempfile.mkdtemp(prefix="marketfs-restart-"))
    home.chmod(0o755)
    server = EmbeddedPostgres(home, durable=False)
    try:
        dsn = server.ensure_running()
        assert "@127.0.0.1:" in dsn
        with sa.create_engine(dsn.replace("postgresql://", "postgresql+psycopg://")).begin() as conn:
            conn.execute(sa.text("CREATE TABLE kept (x int)"))
            conn.execute(sa.text("INSERT INTO kept VALUES (42)"))
        assert server.stop()
        assert not server.stop()
        dsn_again = server.ensure_running()
        engine = sa.create_engine(dsn_again.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT x FROM kept")).scalar() == 42
        engine.dispose()
        assert (home / "postgres.json").stat().st_mode & 0o077 == 0  # the password file is private
    finally:
        server.destroy()
        shutil.rmtree(home, ignore_errors=True)


def test_a_redelivered_event_is_kept_once_where_it_first_landed(engine: sa.Engine) -> None:
    from marketfs.features.events import EVENT_SCHEMA
    from marketfs.store.events import replace_events

    def events(*rows: tuple[str, datetime]) -> pl.DataFrame:
        return pl.DataFrame([(e, "A", t, 0.1, 0.5, "x") for e, t in rows], schema=EVENT_SCHEMA, orient="row")

    def stored() -> list[tuple]:
        with engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT n.event_id, n.published_at = i.published_at FROM news_events n "
                    "JOIN news_event_ids i USING (event_id) ORDER BY 1"
                )
            ).all()

    day2 = DAY + timedelta(days=1)
    with engine.begin() as conn:
        replace_events(conn, events(("e1", DAY + timedelta(hours=1)), ("e2", DAY + timedelta(hours=2))), DAY, NEXT)
    with engine.begin() as conn:  # e1 again, a day later: kept where it is
        replace_events(conn, events(("e1", day2 + timedelta(hours=1)), ("e3", day2)), day2, day2 + timedelta(days=1))
    assert stored() == [("e1", True), ("e2", True), ("e3", True)]
    with engine.begin() as conn:  # the first day re-delivered without e1: it is gone from there ...
        replace_events(conn, events(("e2", DAY + timedelta(hours=2))), DAY, NEXT)
    with engine.begin() as conn:  # ... and the second day's copy is now the one kept
        replace_events(conn, events(("e1", day2 + timedelta(hours=1)), ("e3", day2)), day2, day2 + timedelta(days=1))
    assert stored() == [("e1", True), ("e2", True), ("e3", True)]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT published_at FROM news_events WHERE event_id = 'e1'")).scalar() == (
            day2 + timedelta(hours=1)
        )
