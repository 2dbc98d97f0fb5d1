"""fs_v1: returns, volatility, RSI, MACD, Bollinger bands, ATR and volume z-score, with news sentiment.

Bounds given here are the gate's policy for this set (a daily return beyond 50% is a data error
here); families supply the bounds that are mathematical facts (RSI in [0, 100]).
"""

from marketfs.features.registry import FeatureSet, event_features, feature

FEATURE_SET = FeatureSet(
    version="fs_v1",
    timeframes=("1m", "1d"),
    owner="quant-platform",
    description="The first feature set: classic TA-Lib indicators on minute and daily bars, and news sentiment.",
    features=(
        feature("ret_1", "returns", n=1, bounds=(-0.5, 0.5), drift=True),
        feature("ret_5", "returns", n=5, bounds=(-0.8, 0.8), drift=True),
        feature("vol_20", "volatility", n=20, bounds={"1m": (0, 0.2), "1d": (0, 1.0)}, drift=True),
        feature("rsi_14", "rsi", n=14, drift=True),
        feature("macd", "macd", fast=12, slow=26, signal=9, output="line"),
        feature("macd_signal", "macd", fast=12, slow=26, signal=9, output="signal"),
        feature("macd_hist", "macd", fast=12, slow=26, signal=9, output="hist"),
        feature("bb_upper", "bollinger", n=20, k=2.0, output="upper"),
        feature("bb_lower", "bollinger", n=20, k=2.0, output="lower"),
        feature("bb_pct_b", "bollinger", n=20, k=2.0, output="pct_b", drift=True),
        feature("atr_14", "atr", n=14),
        feature("volume_z_20", "volume_z", n=20, drift=True),
        *event_features("1h", timeframes=("1m",)),
        *event_features("1d", timeframes=("1d",), drift=False),
    ),
)
