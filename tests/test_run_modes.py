"""The same vectors whether partitions run one by one, as one backfill, or from scratch over all history."""

from __future__ import annotations

import polars as pl
import sqlalchemy as sa
from dagster_helpers import materialize_range, materialize_selection

from assets.partitions import day_window
from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.features.compute import compute_feature_vectors
from marketfs.features.resample import daily_bars
from marketfs.sources import SyntheticBars, SyntheticEvents
from marketfs.sources.normalize import normalize_bars
from marketfs.store.feature_vectors import read_vectors

DAYS = ["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05", "2024-01-08"]  # sessions, a weekend between
# Their trading days: from the close before 01-02 (Friday 2023-12-29, 21:00 UTC) to 01-08's close.
START, END = day_window(DAYS[0])[0], day_window(DAYS[-1])[1]
INSTRUMENTS = ("SYN000", "SYN001", "SYN002")


def stored(dsn: str, timeframe: str) -> pl.DataFrame:
    from marketfs.db import engine_for

    with engine_for(dsn).connect() as conn:
        return read_vectors(conn, feature_set=FS_V1, timeframe=timeframe, start=START, end=END)


def test_partitionwise_equals_backfill_equals_scratch(dsn: str, server_dsn: str, request) -> None:
    # One database materialised day by day ...
    for day in DAYS:
        assert materialize_range(dsn, day).success, day
    # ... another as one backfill run of the whole range.
    other = request.getfixturevalue("empty_dsn")
    from marketfs.store.migrations import migrate

    migrate(other)
    assert materialize_range(other, DAYS[0], DAYS[-1]).success

    minute = normalize_bars(SyntheticBars(instruments=INSTRUMENTS).bars(START, END))
    evts = SyntheticEvents(instruments=INSTRUMENTS).events(START, END)
    scratch = {
        "1m": compute_feature_vectors(minute, "1m", events=evts).vectors,
        "1d": compute_feature_vectors(daily_bars(minute), "1d", events=evts).vectors,
    }
    for timeframe in ("1m", "1d"):
        one_by_one, backfill = stored(dsn, timeframe), stored(other, timeframe)
        assert one_by_one.height == scratch[timeframe].height > 0
        assert one_by_one.equals(backfill), timeframe
        assert one_by_one.equals(scratch[timeframe]), timeframe
    # The range covers more than the MACD warm-up, so the stored state was really used.
    assert stored(dsn, "1m")["macd"].null_count() < stored(dsn, "1m").height


def test_skipping_a_day_fails_with_a_clear_message(dsn: str) -> None:
    assert materialize_range(dsn, "2024-01-02").success
    result = materialize_selection(dsn, ["raw_ohlcv", "raw_events"], "2024-01-03")
    assert result.success
    result = materialize_selection(dsn, ["raw_ohlcv", "raw_events", "feature_vectors_fs_v1_1m"], "2024-01-04")
    assert not result.success
    message = result.failure_data_for_node("feature_vectors_fs_v1_1m").error.message
    assert "materialise the previous partition" in message
    # Named by the partition that failed, not by its window's start (the close of 01-03).
    assert "Failure: feature_vectors_fs_v1_1m 2024-01-04: stored feature state" in message, message
    from marketfs.db import engine_for

    with engine_for(dsn).connect() as conn:
        n = conn.execute(
            sa.text("SELECT count(*) FROM feature_vectors WHERE ts >= '2024-01-04' AND timeframe = '1m'")
        ).scalar()
    assert n == 0
