"""Feature math on hand-computed cases."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from marketfs.features.compute import compute_feature_vectors
from marketfs.sources.base import BAR_SCHEMA

T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


def bars(closes: list[float], instrument: str = "A", start: datetime = T0) -> pl.DataFrame:
    n = len(closes)
    return pl.DataFrame(
        {
            "instrument_id": [instrument] * n,
            "ts": [start + timedelta(minutes=i) for i in range(n)],
            "open": closes,
            "high": closes,
            "low": closes,
            "close": closes,
            "volume": [100.0] * n,
        },
        schema=BAR_SCHEMA,
    )


def test_ret_1_and_ret_5_hand_computed() -> None:
    closes = [100.0, 101.0, 99.0, 102.0, 102.0, 105.0, 110.0]
    out = compute_feature_vectors(bars(closes), "1m")
    assert out["ret_1"].to_list()[1:] == pytest.approx(
        [0.01, 99 / 101 - 1, 102 / 99 - 1, 0.0, 105 / 102 - 1, 110 / 105 - 1]
    )
    assert out["ret_1"][0] is None
    assert out["ret_5"].to_list()[:5] == [None] * 5
    assert out["ret_5"][5] == pytest.approx(105 / 100 - 1)
    assert out["ret_5"][6] == pytest.approx(110 / 101 - 1)


def test_vol_20_is_sample_std_of_last_20_returns_including_this_bar() -> None:
    closes = [100 * (1 + 0.001 * ((i * 7) % 5 - 2)) ** i for i in range(25)]
    out = compute_feature_vectors(bars(closes), "1m")
    rets = [closes[i] / closes[i - 1] - 1 for i in range(1, 25)]
    assert out["vol_20"].to_list()[:20] == [None] * 20  # 20 returns need 21 bars
    for row in range(20, 25):
        window = rets[row - 20 : row]
        assert out["vol_20"][row] == pytest.approx(statistics.stdev(window), rel=1e-9)


def test_instruments_do_not_leak_into_each_other() -> None:
    frame = pl.concat([bars([10.0, 11.0, 12.0], "A"), bars([50.0, 25.0], "B")])
    out = compute_feature_vectors(frame, "1m").sort("instrument_id", "ts")
    assert out.filter(pl.col("instrument_id") == "B")["ret_1"].to_list() == [None, pytest.approx(-0.5)]
    assert out.filter(pl.col("instrument_id") == "A")["ret_1"].to_list()[1:] == pytest.approx([0.1, 1 / 11])


def test_warmup_bars_feed_lookback_but_get_no_vector() -> None:
    frame = bars([100.0 + i for i in range(30)])
    start = T0 + timedelta(minutes=25)
    out = compute_feature_vectors(frame, "1m", start=start)
    assert out.height == 5
    assert out["ts"].min() == start
    assert out["vol_20"].null_count() == 0
    assert all(flags == [] for flags in out["quality_flags"].to_list())


def test_short_history_is_flagged_and_nonfinite_becomes_null_with_flag() -> None:
    out = compute_feature_vectors(bars([100.0, 0.0, 5.0]), "1m")
    assert "INSUFFICIENT_OHLCV" in out["quality_flags"][0]
    # 5 / 0 - 1 is inf: stored as null and flagged, never as a silent number.
    assert out["ret_1"][2] is None
    assert "COMPUTATION_ERROR" in out["quality_flags"][2]
    assert not any(isinstance(v, float) and math.isinf(v) for v in out["ret_1"].to_list())
