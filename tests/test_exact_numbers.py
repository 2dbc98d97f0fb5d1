"""Exact numbers: a flat window is exactly flat, and warm-up counts the bars the computation uses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import psycopg
import pytest
import sqlalchemy as sa
import talib

from marketfs.db import engine_for
from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.features.compute import VALID_BAR_SQL, compute_feature_vectors, valid_bar
from marketfs.features.registry import feature_set
from marketfs.features.resample import resample
from marketfs.sources import SyntheticBars
from marketfs.sources.base import BAR_SCHEMA
from marketfs.store.bars import read_bars, read_bars_for, replace_bars
from marketfs.store.feature_vectors import read_state_before, read_vectors, write_features

T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
START = datetime(2024, 1, 2, tzinfo=UTC)


def bars(closes: list[float], volumes: list[float]) -> pl.DataFrame:
    n = len(closes)
    return pl.DataFrame(
        {
            "instrument_id": ["A"] * n,
            "ts": [T0 + timedelta(minutes=i) for i in range(n)],
            "open": closes,
            "high": closes,
            "low": closes,
            "close": closes,
            "volume": volumes,
        },
        schema=BAR_SCHEMA,
    )


def test_a_flat_window_has_zero_width_and_its_ratios_are_null_and_flagged() -> None:
    closes = [100.0 + i for i in range(10)] + [99.55] * 25
    volumes = [1000.0 + 7 * i for i in range(10)] + [1234.56] * 25
    out = compute_feature_vectors(bars(closes, volumes), "1m", feature_set=FS_V1).vectors
    upper, middle, lower = talib.BBANDS(np.array(closes), 20, 2.0, 2.0)
    last = out.row(-1, named=True)
    assert upper[-1] - lower[-1] == 0.0  # TA-Lib: exactly no width
    assert last["bb_upper"] - last["bb_lower"] == 0.0
    assert last["bb_pct_b"] is None and last["volume_z_20"] is None
    assert "COMPUTATION_ERROR" in last["quality_flags"]
    assert last["vol_20"] == 0.0  # returns of a flat price are exactly 0
    # A window that is not flat is untouched: the bar before the flat stretch fills it.
    before = out.row(28, named=True)  # the window holds 100.0..109.0 and flat values
    assert before["bb_pct_b"] is not None and before["bb_upper"] > before["bb_lower"]


def test_the_database_and_the_computation_agree_on_which_bars_are_valid(dsn: str) -> None:
    nan, inf = float("nan"), float("inf")
    cases = [
        (10, 11, 9, 10, 100),
        (10, 11, 9, 0, 100),  # close 0
        (10, 11, 9, -1, 100),
        (10, 9, 11, 10, 100),  # high < low
        (10, 11, 9, 10, -5),
        (10, 11, 9, 10, 0),  # no volume is a valid bar
        (nan, 11, 9, 10, 100),
        (10, inf, 9, 10, 100),
        (10, 11, 9, 10, inf),
    ]
    frame = pl.DataFrame(cases, schema=["open", "high", "low", "close", "volume"], orient="row")
    expected = frame.select(valid_bar().alias("ok"))["ok"].to_list()
    with psycopg.connect(dsn) as conn:
        values = ", ".join("(%s::float8, %s::float8, %s::float8, %s::float8, %s::float8)" for _ in cases)
        rows = conn.execute(
            f"SELECT {VALID_BAR_SQL} FROM (VALUES {values}) t(open, high, low, close, volume)",  # noqa: S608
            [v for case in cases for v in case],
        ).fetchall()
    assert [r[0] for r in rows] == expected


@pytest.mark.parametrize("timeframe", ["1m", "5m"])
def test_invalid_bars_before_a_day_do_not_shorten_its_warm_up(dsn: str, engine: sa.Engine, timeframe: str) -> None:
    """Day by day through the database, as the assets run it, equals one pass over the whole history,
    although the 30 bars before each later day are zero-priced (as a released quarantine batch leaves
    them)."""
    fs = FS_V1 if timeframe == "1m" else feature_set("fs_v2")
    days = [START + timedelta(days=i) for i in range(3)]
    minute = SyntheticBars(instruments=("A", "B"), seed=5).bars(days[0], days[-1] + timedelta(days=1))
    last_of_day = minute.with_columns(
        pl.col("ts").rank("ordinal", descending=True).over("instrument_id", pl.col("ts").dt.date()).alias("_r")
    )
    spoiled = (pl.col("_r") <= 30) & (pl.col("ts") < days[-1])
    minute = last_of_day.with_columns(
        *[pl.when(spoiled).then(0.0).otherwise(pl.col(c)).alias(c) for c in ("open", "high", "low", "close")]
    ).drop("_r")
    warmup = fs.warmup_bars(timeframe)
    with engine.begin() as conn:
        for day in days:
            replace_bars(conn, minute.filter(pl.col("ts").dt.date() == day.date()), day, day + timedelta(days=1))
    for day in days:
        end = day + timedelta(days=1)
        with engine.begin() as conn:
            history = read_bars_for(conn, timeframe, day, end, warmup_bars=warmup)
            state = read_state_before(conn, feature_set=fs, timeframe=timeframe, start=day)
            run = compute_feature_vectors(
                history, timeframe, state=state, feature_set=fs, start=day, end=end, warmup_limit=warmup
            )
            write_features(conn, run, feature_set=fs, timeframe=timeframe, start=day, end=end)
    whole = minute if timeframe == "1m" else resample(minute, "5m")
    scratch = compute_feature_vectors(whole, timeframe, feature_set=fs).vectors
    with engine_for(dsn).connect() as conn:
        stored = read_vectors(conn, feature_set=fs, timeframe=timeframe, start=days[0], end=days[-1] + timedelta(1))
        # The warm-up read reaches past the zero-priced bars to enough valid ones.
        read = read_bars(conn, days[-1], days[-1] + timedelta(days=1), warmup_bars=warmup)
        # ... and one run of the whole range from the same stored bars, as a backfill reads them.
        history = read_bars_for(conn, timeframe, days[0], days[-1] + timedelta(days=1), warmup_bars=warmup)
    backfill = compute_feature_vectors(
        history, timeframe, feature_set=fs, start=days[0], end=days[-1] + timedelta(days=1), warmup_limit=warmup
    ).vectors
    assert stored.equals(scratch)
    assert backfill.equals(scratch)
    last_day = stored.filter(pl.col("ts") >= days[-1])
    assert last_day["ret_5"].null_count() < last_day.height / 10  # values, not nulls without a flag
    assert read.filter((pl.col("ts") < days[-1]) & valid_bar()).group_by("instrument_id").len()["len"].min() == warmup
