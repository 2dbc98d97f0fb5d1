"""Corporate actions in the feature math (pure, no database): a split with its action known is the same series.

Six synthetic instruments over 2024-01-03..2024-01-12; one of them (SPL00) split 2-for-1 from 2024-01-10
(prices halved, volume doubled). With the action, every scale-free feature of SPL00 on and after the ex-date
equals the unsplit series' and price-unit features come out in post-split units; without it, the ex-date's
first vectors carry UNEXPLAINED_JUMP. A day-by-day computation continuing stored state, and one of the whole
range, agree bit for bit across the ex-date.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import polars as pl
import pytest

from marketfs.corporate_actions import ACTION_SCHEMA, CLOSE_SCHEMA, adjust, factors, in_effect
from marketfs.features.compute import compute_feature_vectors
from marketfs.features.registry import FeatureSet, feature_set
from marketfs.features.resample import session_bars
from marketfs.sources import SyntheticBars
from marketfs.universe import active_sessions

INSTRUMENTS = ("SPL00", "AAA", "BBB", "CCC", "DDD", "EEE")
START, END = datetime(2024, 1, 3, tzinfo=UTC), datetime(2024, 1, 13, tzinfo=UTC)
EX_DATE = date(2024, 1, 10)
FS = feature_set("fs_v1")
SCALE_FREE = [f.name for f in FS.for_timeframe("1m") if not f.price_units and not f.is_event]
PRICE_UNITS = [f.name for f in FS.for_timeframe("1m") if f.price_units]


def _minute() -> pl.DataFrame:
    return SyntheticBars(instruments=INSTRUMENTS, seed=11).bars(START, END)


def _scaled(bars: pl.DataFrame, instrument: str, ex_date: date, price: float, volume: float) -> pl.DataFrame:
    """``instrument``'s bars from ``ex_date``'s trading day on, prices times ``price`` and volume times ``volume``."""
    ex_ts = active_sessions().trading_day_window(ex_date)[0]
    hit = (pl.col("instrument_id") == instrument) & (pl.col("ts") >= ex_ts)
    return bars.with_columns(
        *[pl.when(hit).then(pl.col(c) * price).otherwise(pl.col(c)).alias(c) for c in ("open", "high", "low", "close")],
        pl.when(hit).then(pl.col("volume") * volume).otherwise(pl.col("volume")).alias("volume"),
    )


def _actions(*rows: tuple) -> pl.DataFrame:
    return pl.DataFrame(
        [dict(zip(ACTION_SCHEMA, row, strict=True)) for row in rows], schema=ACTION_SCHEMA, orient="row"
    )


def _split(ratio: float) -> pl.DataFrame:
    return _actions(("SPL00", EX_DATE, "split", ratio, datetime(2024, 1, 9, 22, tzinfo=UTC)))


def _bars(timeframe: str, bars: pl.DataFrame) -> pl.DataFrame:
    return bars if timeframe == "1m" else session_bars(bars, active_sessions())


def _vectors(timeframe: str, bars: pl.DataFrame, actions: pl.DataFrame | None, fs: FeatureSet = FS, closes=None):
    adjustments = None
    if actions is not None:
        adjustments = factors(in_effect(actions), active_sessions(), total_return=fs.total_return, closes=closes)
    return compute_feature_vectors(_bars(timeframe, bars), timeframe, feature_set=fs, adjustments=adjustments)


def _after_ex(vectors: pl.DataFrame) -> pl.DataFrame:
    ex_ts = active_sessions().trading_day_window(EX_DATE)[0]
    return vectors.filter((pl.col("instrument_id") == "SPL00") & (pl.col("ts") >= ex_ts)).sort("ts")


def assert_close(a: pl.DataFrame, b: pl.DataFrame, columns: list[str], scale: float = 1.0, floor: float = 1e-300):
    """Within 1e-9 relative; ``floor``: the magnitude below which the error is taken as absolute (a MACD line
    near 0 is a difference of two EMAs near the price: its error is relative to the price, not to itself)."""
    assert a.height == b.height and a.height > 0
    for name in columns:
        x, y = a[name], b[name] * scale
        assert x.is_null().to_list() == y.is_null().to_list(), name
        both = pl.DataFrame({"x": x, "y": y}).drop_nulls()
        worst = both.select(((pl.col("x") - pl.col("y")).abs() / pl.col("y").abs().clip(floor)).max()).item()
        assert worst is None or worst <= 1e-9, (name, worst)


@pytest.mark.parametrize("timeframe", ["1m", "1d"])
@pytest.mark.parametrize(("ratio", "label"), [(2.0, "2-for-1"), (1.5, "3-for-2"), (0.1, "1-for-10 reverse")])
def test_a_split_with_its_action_is_the_same_series_in_post_split_units(timeframe: str, ratio: float, label: str):
    plain = _minute()
    split = _scaled(plain, "SPL00", EX_DATE, 1 / ratio, ratio)
    expected = _after_ex(_vectors(timeframe, plain, None).vectors)
    got = _after_ex(_vectors(timeframe, split, _split(ratio)).vectors)
    assert_close(got, expected, SCALE_FREE)
    level = float(split.filter(pl.col("instrument_id") == "SPL00")["close"].median())
    assert_close(got, expected, [n for n in PRICE_UNITS if n in got.columns], scale=1 / ratio, floor=level)
    assert got["quality_flags"].to_list() == expected["quality_flags"].to_list(), label
    # The other instruments are untouched: the same bits.
    others = pl.col("instrument_id") != "SPL00"
    assert (
        _vectors(timeframe, split, _split(ratio))
        .vectors.filter(others)
        .equals(_vectors(timeframe, plain, None).vectors.filter(others))
    )


@pytest.mark.parametrize("timeframe", ["1m", "1d"])
def test_a_split_without_its_action_is_an_unexplained_jump_on_the_ex_date(timeframe: str) -> None:
    split = _scaled(_minute(), "SPL00", EX_DATE, 0.5, 2.0)
    computed = _vectors(timeframe, split, None)
    ex_day = _after_ex(computed.vectors).filter(pl.col("ts") < active_sessions().bounds(EX_DATE)[1])
    first = ex_day.row(0, named=True)
    assert first["ret_1"] < -0.4 and "UNEXPLAINED_JUMP" in first["quality_flags"]
    # Every vector of the day whose window spans the jump says so; none with a -50% return goes unflagged.
    assert ex_day.filter(
        (pl.col("ret_1") < -0.4) & ~pl.col("quality_flags").list.contains("UNEXPLAINED_JUMP")
    ).is_empty()
    # The jump is named with the prices that show it; no other instrument jumped.
    [jump] = computed.jumps.filter(pl.col("ts") >= active_sessions().trading_day_window(EX_DATE)[0]).rows(named=True)
    assert jump["instrument_id"] == "SPL00" and 0.45 < jump["open"] / jump["previous_close"] < 0.55
    flagged = computed.vectors.filter(pl.col("quality_flags").list.contains("UNEXPLAINED_JUMP"))
    assert set(flagged["instrument_id"]) == {"SPL00"}
    # The day after carries no flag: a day a person released (a real move) does not hold the next one.
    after = _after_ex(computed.vectors).filter(pl.col("ts") >= active_sessions().bounds(EX_DATE)[1])
    assert after.height and not after["quality_flags"].list.contains("UNEXPLAINED_JUMP").any()


@pytest.mark.parametrize("timeframe", ["1m", "1d"])
def test_day_by_day_with_stored_state_equals_the_whole_range_bit_for_bit_across_an_ex_date(timeframe: str) -> None:
    bars = _bars(timeframe, _scaled(_minute(), "SPL00", EX_DATE, 1 / 1.5, 1.5))
    adjustments = factors(in_effect(_split(1.5)), active_sessions(), total_return=False)
    whole = compute_feature_vectors(bars, timeframe, feature_set=FS, adjustments=adjustments)
    sessions = active_sessions()
    days = sessions.between(date(2024, 1, 8), date(2024, 1, 12))
    first = sessions.trading_day_window(days[0])[0]
    state = compute_feature_vectors(
        bars.filter(pl.col("ts") < first), timeframe, feature_set=FS, adjustments=adjustments
    ).state
    pieces = []
    for day in days:
        start, end = sessions.trading_day_window(day)
        latest = state.sort("ts").group_by("instrument_id", maintain_order=True).last()
        run = compute_feature_vectors(
            bars.filter(pl.col("ts") < end),
            timeframe,
            feature_set=FS,
            state=latest,
            start=start,
            end=end,
            adjustments=adjustments,
        )
        pieces.append(run.vectors)
        state = pl.concat([state, run.state])
    stepped = pl.concat(pieces).sort("instrument_id", "ts")
    assert stepped.equals(whole.vectors.filter(pl.col("ts") >= first).sort("instrument_id", "ts"))


def test_a_dividend_adjusts_a_total_return_set_and_leaves_a_price_return_set_alone() -> None:
    plain = _minute()
    ex_ts = active_sessions().trading_day_window(EX_DATE)[0]
    last_close = plain.filter((pl.col("instrument_id") == "SPL00") & (pl.col("ts") < ex_ts))["close"][-1]
    amount = round(last_close * 0.04, 2)
    # A 4% dividend: the stock opens that much lower on the ex-date, everything after it with it.
    paid = _scaled(plain, "SPL00", EX_DATE, (last_close - amount) / last_close, 1.0)
    dividend = _actions(("SPL00", EX_DATE, "cash_dividend", amount, datetime(2024, 1, 2, tzinfo=UTC)))
    closes = pl.DataFrame(
        {"instrument_id": ["SPL00"], "ex_date": [EX_DATE], "close": [last_close]}, schema=CLOSE_SCHEMA
    )
    total = FeatureSet(version="fs_tr", timeframes=("1m",), features=FS.features[:12], returns="total")
    expected = _after_ex(_vectors("1m", plain, None, total).vectors)
    got = _after_ex(_vectors("1m", paid, dividend, total, closes).vectors)
    assert_close(got, expected, [n for n in SCALE_FREE if n in got.columns])
    # Price return (fs_v1): the dividend is the price drop it was, the first return shows it.
    price = _after_ex(_vectors("1m", paid, dividend, FS, closes).vectors)
    assert price["ret_1"][0] == pytest.approx(expected["ret_1"][0] - 0.04, abs=2e-3)


def test_a_correction_known_later_replaces_the_action_and_the_factors_follow_the_known_instant() -> None:
    announced = ("SPL00", EX_DATE, "split", 3.0, datetime(2024, 1, 5, tzinfo=UTC))
    corrected = ("SPL00", EX_DATE, "split", 2.0, datetime(2024, 1, 9, tzinfo=UTC))
    actions = _actions(announced, corrected)
    assert in_effect(actions, datetime(2024, 1, 6, tzinfo=UTC))["ratio"].to_list() == [3.0]
    assert in_effect(actions)["ratio"].to_list() == [2.0]
    assert in_effect(actions, datetime(2024, 1, 4, tzinfo=UTC)).is_empty()
    bars = _minute().filter(pl.col("instrument_id") == "SPL00")
    adjusted = adjust(bars, factors(in_effect(actions), active_sessions(), total_return=False))
    ex_ts = active_sessions().trading_day_window(EX_DATE)[0]
    assert adjusted.filter(pl.col("ts") < ex_ts)["close"].equals(bars.filter(pl.col("ts") < ex_ts)["close"])
    assert (adjusted.filter(pl.col("ts") >= ex_ts)["_adj"] == 2.0).all()
