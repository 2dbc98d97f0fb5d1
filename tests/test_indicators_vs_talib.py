"""Market indicators against TA-Lib, the reference implementation, on the same bars."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from marketfs.features.compute import compute_feature_vectors
from marketfs.sources.base import BAR_SCHEMA

talib = pytest.importorskip("talib", reason="TA-Lib is a dev dependency: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def bars() -> pl.DataFrame:
    rng = np.random.default_rng(42)
    n = 400
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    open_ = np.concatenate([[100.0], close[:-1]])
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.001, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.001, n)))
    volume = np.round(rng.lognormal(7, 0.5, n))
    t0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    return pl.DataFrame(
        {
            "instrument_id": ["X"] * n,
            "ts": [t0 + timedelta(minutes=i) for i in range(n)],
            "open": open_,
            "high": high,
            "low": low,
            "close": close,
            "volume": volume,
        },
        schema=BAR_SCHEMA,
    )


def ours(bars: pl.DataFrame, name: str) -> np.ndarray:
    vectors = compute_feature_vectors(bars, "1m").vectors
    return vectors[name].fill_null(np.nan).to_numpy()


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    # Same warm-up (NaN/null positions) and the same values.
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_allclose(actual[~np.isnan(actual)], expected[~np.isnan(expected)], rtol=1e-9, atol=1e-12)


def test_rsi_14(bars: pl.DataFrame) -> None:
    assert_same(ours(bars, "rsi_14"), talib.RSI(bars["close"].to_numpy(), 14))


def test_macd_12_26_9(bars: pl.DataFrame) -> None:
    macd, signal, hist = talib.MACD(bars["close"].to_numpy(), 12, 26, 9)
    assert_same(ours(bars, "macd"), macd)
    assert_same(ours(bars, "macd_signal"), signal)
    assert_same(ours(bars, "macd_hist"), hist)


def test_bollinger_20_2(bars: pl.DataFrame) -> None:
    upper, _, lower = talib.BBANDS(bars["close"].to_numpy(), 20, 2.0, 2.0, 0)
    assert_same(ours(bars, "bb_upper"), upper)
    assert_same(ours(bars, "bb_lower"), lower)
    close = bars["close"].to_numpy()
    assert_same(ours(bars, "bb_pct_b"), (close - lower) / (upper - lower))


def test_atr_14(bars: pl.DataFrame) -> None:
    expected = talib.ATR(bars["high"].to_numpy(), bars["low"].to_numpy(), bars["close"].to_numpy(), 14)
    assert_same(ours(bars, "atr_14"), expected)


def test_volume_z_20_uses_sample_std(bars: pl.DataFrame) -> None:
    volume = bars["volume"].to_numpy()
    mean = talib.SMA(volume, 20)
    sample_std = talib.STDDEV(volume, 20, 1.0) * np.sqrt(20 / 19)  # TA-Lib STDDEV is the population std
    assert_same(ours(bars, "volume_z_20"), (volume - mean) / sample_std)
