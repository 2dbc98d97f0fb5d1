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


def vectors(frame: pl.DataFrame, **kwargs) -> pl.DataFrame:
    return compute_feature_vectors(frame, "1m", **kwargs).vectors


def test_ret_1_and_ret_5_hand_computed() -> None:
    closes = [100.0, 101.0, 99.0, 102.0, 102.0, 105.0, 110.0]
    out = vectors(bars(closes))
    assert out["ret_1"].to_list()[1:] == pytest.approx(
        [0.01, 99 / 101 - 1, 102 / 99 - 1, 0.0, 105 / 102 - 1, 110 / 105 - 1]
    )
    assert out["ret_1"][0] is None
    assert out["ret_5"].to_list()[:5] == [None] * 5
    assert out["ret_5"][5] == pytest.approx(105 / 100 - 1)
    assert out["ret_5"][6] == pytest.approx(110 / 101 - 1)


def test_vol_20_is_sample_std_of_last_20_returns_including_this_bar() -> None:
    closes = [100 * (1 + 0.001 * ((i * 7) % 5 - 2)) ** i for i in range(25)]
    out = vectors(bars(closes))
    rets = [closes[i] / closes[i - 1] - 1 for i in range(1, 25)]
    assert out["vol_20"].to_list()[:20] == [None] * 20  # 20 returns need 21 bars
    for row in range(20, 25):
        window = rets[row - 20 : row]
        assert out["vol_20"][row] == pytest.approx(statistics.stdev(window), rel=1e-9)


def test_instruments_do_not_leak_into_each_other() -> None:
    frame = pl.concat([bars([10.0, 11.0, 12.0], "A"), bars([50.0, 25.0], "B")])
    out = vectors(frame)
    b = out.filter(pl.col("instrument_id") == "B")
    assert b["ret_1"].to_list()[:2] == [None, pytest.approx(-0.5)]
    # A traded a third minute and B did not: B's vector there says so instead of being silently absent.
    assert b["ret_1"][2] is None and "MISSING_OHLCV" in b["quality_flags"][2]
    assert out.filter(pl.col("instrument_id") == "A")["ret_1"].to_list()[1:] == pytest.approx([0.1, 1 / 11])


def test_warmup_bars_feed_lookback_but_get_no_vector() -> None:
    frame = bars([100.0 + (i % 7) for i in range(40)])
    start = T0 + timedelta(minutes=35)
    out = vectors(frame, start=start)
    assert out.height == 5
    assert out["ts"].min() == start
    assert out["vol_20"].null_count() == 0
    assert not any("INSUFFICIENT_OHLCV" in flags for flags in out["quality_flags"].to_list())


def test_short_history_is_flagged() -> None:
    out = vectors(bars([100.0, 101.0, 102.0]))
    assert all("INSUFFICIENT_OHLCV" in flags for flags in out["quality_flags"])


def test_zero_or_nan_price_is_a_missing_bar_not_a_number() -> None:
    out = vectors(bars([100.0, 0.0, float("nan"), 105.0]))
    assert out["quality_flags"][1].to_list() == out["quality_flags"][2].to_list()
    assert "MISSING_OHLCV" in out["quality_flags"][1]
    assert out["ret_1"][1] is None and out["ret_1"][2] is None
    # The next valid bar is computed from the last valid one, not from the bad prints.
    assert out["ret_1"][3] == pytest.approx(0.05)
    assert "MISSING_OHLCV" not in out["quality_flags"][3]


def test_non_finite_result_is_null_and_flagged() -> None:
    # 20 identical closes: the Bollinger band has zero width and %b is 0/0.
    out = vectors(bars([100.0] * 25))
    assert out["bb_pct_b"][24] is None
    assert "COMPUTATION_ERROR" in out["quality_flags"][24]
    assert out["bb_upper"][24] == pytest.approx(100.0)
    assert not any(isinstance(v, float) and math.isinf(v) for v in out["ret_1"].to_list())


def test_event_windows_found_in_one_search_equal_a_search_per_instrument() -> None:
    from marketfs.features import events as ev
    from marketfs.sources.synthetic import SyntheticEvents

    start = datetime(2024, 1, 2, tzinfo=UTC)
    names = tuple(f"SYN{i:03d}" for i in range(7))
    events = SyntheticEvents(instruments=names).events(start, start + timedelta(days=2))
    ordered = events.sort("instrument_id", "published_at", "event_id").with_row_index("_e")
    keys = pl.DataFrame(
        {
            "instrument_id": [names[i % 7] for i in range(300)] + ["NOEVENTS"],
            "ts": [start + timedelta(minutes=13 * i) for i in range(300)] + [start],
        }
    ).with_row_index("_k")
    window = int(timedelta(hours=1) / timedelta(microseconds=1))
    packed = ev._spans(keys, ordered, window)
    # An instant 60 years away makes the range too wide to pack: the search per instrument runs.
    far = pl.DataFrame({"_k": [999], "instrument_id": [names[0]], "ts": [start + timedelta(days=365 * 60)]})
    looped = ev._spans(pl.concat([keys, far.cast(keys.schema)]), ordered, window).filter(pl.col("_k") != 999)
    assert packed.sort("_k").equals(looped.sort("_k"))
    assert (packed["_hi"] > packed["_lo"]).sum() > 50  # windows that hold events
