"""fs_v1 on hand-built cases: no look-ahead, event windows, gaps, halts, late starts, bad timestamps."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from marketfs.features.compute import compute_feature_vectors
from marketfs.features.events import EVENT_SCHEMA
from marketfs.features.flags import load_flag_config
from marketfs.features.resample import daily_bars
from marketfs.sources import SyntheticBars, SyntheticEvents
from marketfs.sources.base import BAR_SCHEMA
from marketfs.sources.normalize import normalize_bars, normalize_events

D1 = datetime(2024, 1, 2, tzinfo=UTC)
D2, D3, D4 = D1 + timedelta(days=1), D1 + timedelta(days=2), D1 + timedelta(days=3)
T0 = D1 + timedelta(hours=14, minutes=30)


def minute_bars(instrument: str, closes: list[float], start: datetime = T0) -> pl.DataFrame:
    n = len(closes)
    return pl.DataFrame(
        {
            "instrument_id": [instrument] * n,
            "ts": [start + timedelta(minutes=i) for i in range(n)],
            "open": closes,
            "high": [c * 1.001 for c in closes],
            "low": [c * 0.999 for c in closes],
            "close": closes,
            "volume": [100.0 + i for i in range(n)],
        },
        schema=BAR_SCHEMA,
    )


def events(rows: list[tuple[str, str, datetime, float, float]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(eid, inst, ts, s, c, "test") for eid, inst, ts, s, c in rows], schema=EVENT_SCHEMA, orient="row"
    )


def vectors(bars: pl.DataFrame, timeframe: str = "1m", **kwargs) -> pl.DataFrame:
    return compute_feature_vectors(bars, timeframe, **kwargs).vectors


def test_what_comes_after_a_vector_became_known_changes_nothing() -> None:
    """Bars after the cutoff's, and events from the cutoff bar's close (cutoff + 1 minute) on."""
    bars = SyntheticBars(instruments=("A", "B")).bars(D1, D3)
    evts = SyntheticEvents(instruments=("A", "B")).events(D1, D3)
    cutoff = D2 + timedelta(hours=16)
    base = vectors(bars, events=evts).filter(pl.col("ts") <= cutoff)

    future_bar = bars.filter(pl.col("ts") > cutoff).with_columns(pl.col("close") * 50, pl.col("high") * 50)
    future_event = events([("future", "A", cutoff + timedelta(minutes=1), 1.0, 1.0)])
    planted = pl.concat([bars.filter(pl.col("ts") <= cutoff), future_bar])
    after = vectors(planted, events=pl.concat([evts, future_event])).filter(pl.col("ts") <= cutoff)
    assert after.equals(base)


def test_event_window_is_the_hour_before_the_vector_became_known() -> None:
    """The bar stamped t closes, and its vector becomes known, at t + 1 minute: events count in
    [known - 1h, known), so one published during the bar counts and none published at its close."""
    bars = minute_bars("A", [100.0] * 3)
    t = T0 + timedelta(minutes=2)
    known = t + timedelta(minutes=1)
    evts = events(
        [
            ("out_early", "A", known - timedelta(hours=1, microseconds=1), 1.0, 1.0),
            ("e0", "A", known - timedelta(hours=1), 0.3, 0.5),  # exactly known - 1h: included
            ("e1", "A", t - timedelta(minutes=59), 0.5, 0.8),
            ("e2", "A", t - timedelta(minutes=30), -0.2, 0.4),
            ("e3", "A", t + timedelta(seconds=30), 0.1, 0.2),  # during the bar: known when it closes
            ("out_late", "A", known, -1.0, 1.0),  # exactly at the close: the next bar's
            ("other", "B", t, 1.0, 1.0),  # another instrument
        ]
    )
    row = vectors(bars, events=evts).filter(pl.col("ts") == t).row(0, named=True)
    s, c = [0.3, 0.5, -0.2, 0.1], [0.5, 0.8, 0.4, 0.2]
    assert row["event_count_1h"] == 4
    assert row["sentiment_mean_1h"] == pytest.approx(sum(s) / 4)
    assert row["sentiment_conf_mean_1h"] == pytest.approx(sum(c) / 4)
    assert row["sentiment_weighted_1h"] == pytest.approx(sum(a * b for a, b in zip(s, c, strict=True)) / sum(c))
    assert row["sentiment_std_1h"] == pytest.approx(statistics.stdev(s))
    assert "NO_EVENTS" not in row["quality_flags"] and "LOW_EVENT_COUNT" not in row["quality_flags"]


def test_event_flags_follow_the_configured_thresholds(tmp_path: Path) -> None:
    bars = minute_bars("A", [100.0] * 3)
    evts = events([("e1", "A", T0 + timedelta(minutes=1), 0.5, 0.1)])
    out = vectors(bars, events=evts)
    assert "NO_EVENTS" in out["quality_flags"][0]
    assert out["sentiment_mean_1h"][0] is None
    assert {"LOW_EVENT_COUNT", "LOW_SENTIMENT_CONFIDENCE"} <= set(out["quality_flags"][1])
    assert out["sentiment_std_1h"][1] is None  # one event has no sample std
    config_file = tmp_path / "flags.toml"
    config_file.write_text("low_event_count = 1\nlow_sentiment_confidence = 0.05\n")
    relaxed = vectors(bars, events=evts, config=load_flag_config(config_file))
    assert not {"LOW_EVENT_COUNT", "LOW_SENTIMENT_CONFIDENCE"} & set(relaxed["quality_flags"][1])


def test_bad_flag_config_names_the_file(tmp_path: Path) -> None:
    config_file = tmp_path / "flags.toml"
    config_file.write_text("low_event_count = 'many'\n")
    with pytest.raises(ValueError, match="flags.toml"):
        load_flag_config(config_file)


def test_duplicate_event_ids_are_kept_once() -> None:
    evts = events([("x", "A", T0, 0.1, 0.5), ("x", "A", T0 + timedelta(minutes=5), 0.9, 0.9), ("y", "A", T0, 0.2, 0.5)])
    kept = normalize_events(evts)
    assert sorted(kept["event_id"]) == ["x", "y"]
    assert kept.filter(pl.col("event_id") == "x")["sentiment"][0] == 0.1


def test_halt_gives_missing_vectors_and_values_resume_from_last_bars() -> None:
    a = minute_bars("A", [100.0 + i for i in range(60)])
    b = minute_bars("B", [50.0 + 0.1 * i for i in range(60)])
    halted = b.filter((pl.col("ts") < T0 + timedelta(minutes=30)) | (pl.col("ts") >= T0 + timedelta(minutes=40)))
    out = vectors(pl.concat([a, halted])).filter(pl.col("instrument_id") == "B")
    assert out.height == 60
    gap = out.filter((pl.col("ts") >= T0 + timedelta(minutes=30)) & (pl.col("ts") < T0 + timedelta(minutes=40)))
    assert all("MISSING_OHLCV" in f for f in gap["quality_flags"]) and gap["ret_1"].null_count() == 10
    resumed = out.filter(pl.col("ts") == T0 + timedelta(minutes=40)).row(0, named=True)
    assert resumed["ret_1"] == pytest.approx((50 + 4.0) / (50 + 2.9) - 1)


def test_instrument_starting_mid_range_has_no_vectors_before_and_flags_its_warmup() -> None:
    a = minute_bars("A", [100.0 + i for i in range(60)])
    late = minute_bars("C", [10.0 + 0.01 * i for i in range(30)], start=T0 + timedelta(minutes=30))
    out = vectors(pl.concat([a, late])).filter(pl.col("instrument_id") == "C")
    assert out["ts"].min() == T0 + timedelta(minutes=30)
    assert "INSUFFICIENT_OHLCV" in out["quality_flags"][0]
    assert "MISSING_OHLCV" not in out["quality_flags"][0]


def test_missing_day_is_flagged_in_daily_vectors() -> None:
    minute = SyntheticBars(instruments=("A", "B")).bars(D1, D4)
    minute = minute.filter(~((pl.col("instrument_id") == "B") & (pl.col("ts") >= D2) & (pl.col("ts") < D3)))
    out = vectors(daily_bars(minute), "1d").filter(pl.col("instrument_id") == "B")
    day2 = out.filter(pl.col("ts").dt.date() == D2.date()).row(0, named=True)
    assert "MISSING_OHLCV" in day2["quality_flags"] and day2["ret_1"] is None
    day3 = out.filter(pl.col("ts").dt.date() == D3.date()).row(0, named=True)
    assert "MISSING_OHLCV" not in day3["quality_flags"] and day3["ret_1"] is not None


def test_daily_bar_is_the_sessions_minute_bars_resampled_and_stamped_at_its_last_minute() -> None:
    minute = minute_bars("A", [10.0, 12.0, 9.0, 11.0])
    [bar] = daily_bars(minute).iter_rows(named=True)
    assert bar["ts"] == D1 + timedelta(hours=20, minutes=59)  # the NYSE closes at 21:00 UTC in winter
    assert (bar["open"], bar["close"]) == (10.0, 11.0)
    assert bar["high"] == pytest.approx(12.0 * 1.001) and bar["low"] == pytest.approx(9.0 * 0.999)
    assert bar["volume"] == 100 + 101 + 102 + 103
    assert bar["source_flags"] == ["PARTIAL_SESSION"]  # four minutes of a 390-minute session


def test_off_grid_and_duplicate_bars_are_flagged_timestamp_mismatch_and_row_order_is_not() -> None:
    bars = minute_bars("A", [100.0 + i for i in range(6)])
    delivered = pl.concat(
        [
            bars[0:2],
            bars[3:4],
            bars[2:3],  # minute 2 after minute 3: row order is not a fact about the bars
            bars[4:5],
            bars[4:5].with_columns(pl.col("close") + 1),  # minute 4 delivered twice
            bars[5:6].with_columns(pl.col("ts") + timedelta(seconds=17)),  # off the minute grid
        ]
    )
    out = vectors(normalize_bars(delivered))
    flagged = {row["ts"]: "TIMESTAMP_MISMATCH" in row["quality_flags"] for row in out.iter_rows(named=True)}
    assert [flagged[T0 + timedelta(minutes=i)] for i in range(5)] == [False, False, False, False, True]
    assert flagged[T0 + timedelta(minutes=5, seconds=17)]
    kept = normalize_bars(delivered).filter(pl.col("ts") == T0 + timedelta(minutes=4))
    assert kept["close"].to_list() == [105.0]  # the last delivery wins


def test_every_vector_has_finite_values_or_null() -> None:
    bars = SyntheticBars(instruments=("A",)).bars(D1, D3)
    out = vectors(bars, events=SyntheticEvents(instruments=("A",)).events(D1, D3))
    for column in out.select(pl.selectors.float()).columns:
        assert all(v is None or math.isfinite(v) for v in out[column].to_list()), column
