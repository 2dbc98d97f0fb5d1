"""The pipeline end to end on a real database: write, re-run, gate breach, bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import sqlalchemy as sa
from dagster_helpers import materialize_range

from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.features.compute import compute_feature_vectors
from marketfs.sources import SyntheticBars, SyntheticEvents
from marketfs.store.feature_vectors import read_vectors

DAY = datetime(2024, 1, 3, tzinfo=UTC)
NEXT = DAY + timedelta(days=1)


def stored(engine: sa.Engine, start: datetime = DAY, end: datetime = NEXT) -> pl.DataFrame:
    with engine.connect() as conn:
        return read_vectors(conn, feature_set=FS_V1, timeframe="1m", start=start, end=end)


def table_fingerprint(engine: sa.Engine, table: str, columns: str = "t.*") -> tuple:
    """Row count and a hash of every row (all columns unless told), to prove a table did not change."""
    query = f"SELECT count(*), md5(string_agg(r::text, '' ORDER BY r::text)) FROM (SELECT {columns} FROM {table} t) r"
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text(query)).one())


def test_partition_rows_read_back_equal_the_computation(dsn: str, engine: sa.Engine) -> None:
    result = materialize_range(dsn, "2024-01-02", "2024-01-03")
    assert result.success
    got = stored(engine)
    instruments = ("SYN000", "SYN001", "SYN002")
    history = (DAY - timedelta(days=1), NEXT)
    expected = compute_feature_vectors(
        SyntheticBars(instruments=instruments).bars(*history),
        "1m",
        events=SyntheticEvents(instruments=instruments).events(*history),
        start=DAY,
        end=NEXT,
    ).vectors
    assert got.height == expected.height > 1000
    assert got.equals(expected)
    # Warnings (e.g. 1d INSUFFICIENT_OHLCV on a two-day history) show as failed WARN checks; none blocks.
    assert all(c.passed or c.severity == dg.AssetCheckSeverity.WARN for c in result.get_asset_check_evaluations())


def test_rerun_gives_the_same_rows_not_twice_as_many(dsn: str, engine: sa.Engine) -> None:
    assert materialize_range(dsn, "2024-01-03").success
    first = stored(engine)
    bar_values = "instrument_id, ts, open, high, low, close, volume"
    bars_first = table_fingerprint(engine, "ohlcv_1m", bar_values)
    assert materialize_range(dsn, "2024-01-03").success
    assert stored(engine).equals(first)
    assert table_fingerprint(engine, "ohlcv_1m", bar_values) == bars_first
    with engine.connect() as conn:
        assert (
            conn.execute(sa.text("SELECT count(*) FROM feature_vectors WHERE timeframe = '1m'")).scalar()
            == first.height
        )


def _landing_day(folder: Path, spike_at: int | None = None) -> None:
    (folder / "bars").mkdir(exist_ok=True)
    (folder / "events").mkdir(exist_ok=True)
    bars = SyntheticBars(instruments=("AAA", "BBB")).bars(DAY, NEXT)
    if spike_at is not None:
        # A bad print: one close ten times too high; the raw bar is well-formed, the returns are not.
        bars = bars.with_columns(
            pl.when(pl.int_range(pl.len()) == spike_at)
            .then(pl.col("close") * 10)
            .otherwise(pl.col("close"))
            .alias("close"),
            pl.when(pl.int_range(pl.len()) == spike_at)
            .then(pl.col("close") * 10)
            .otherwise(pl.col("high"))
            .alias("high"),
        )
    bars.write_parquet(folder / "bars" / "bars.parquet")


def test_breaching_partition_fails_run_and_leaves_feature_vectors_unchanged(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    _landing_day(tmp_path)
    assert materialize_range(dsn, "2024-01-03", landing_dir=tmp_path).success
    # The 1m vectors are the breached asset's rows; the 1d asset passes its own gate and may write.
    served_1m = "(SELECT * FROM feature_vectors WHERE timeframe = '1m')"
    before = table_fingerprint(engine, served_1m)

    _landing_day(tmp_path, spike_at=100)
    result = materialize_range(dsn, "2024-01-03", landing_dir=tmp_path)
    assert not result.success
    assert table_fingerprint(engine, served_1m) == before

    [check] = [
        c
        for c in result.get_asset_check_evaluations()
        if c.asset_key.to_user_string() == "feature_vectors_fs_v1_1m" and c.check_name == "quality_gate"
    ]
    assert not check.passed and check.partition == "2024-01-03"
    failed = {k: v.value for k, v in check.metadata.items() if k.startswith("FAILED ")}
    assert "FAILED expect_column_values_to_be_between(ret_1)" in failed
    assert "2 of" in failed["FAILED expect_column_values_to_be_between(ret_1)"]  # the jump up and back down
    failure = result.failure_data_for_node("feature_vectors_fs_v1_1m")
    # A breach of AAA's rows alone holds AAA's day: its served vectors stay as they were (the fingerprint above).
    assert "2024-01-03 of instrument AAA breached its gate: those rows are held" in failure.error.message
    assert "AAA 2024-01-03 " in failure.error.message  # the instrument and an example ts


def test_malformed_landing_file_fails_with_clear_error_and_writes_nothing(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    (tmp_path / "bars").mkdir()
    (tmp_path / "events").mkdir()
    (tmp_path / "bars" / "day.csv").write_text(
        "instrument_id,ts,open,high,low,close,volume\nAAA,2024-01-03T14:30:00Z,1,1,1,1,1\nAAA,not-a-time,1,1,1,1,1\n"
    )
    result = materialize_range(dsn, "2024-01-03", landing_dir=tmp_path)
    assert not result.success
    message = result.failure_data_for_node("raw_ohlcv").error.message
    assert "day.csv, line 3" in message and "'ts'" in message and "Fix:" in message
    assert table_fingerprint(engine, "ohlcv_1m")[0] == 0
    assert table_fingerprint(engine, "feature_vectors")[0] == 0
