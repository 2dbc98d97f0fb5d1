"""fs_v2: fs_v1's core on minute and five-minute bars, plus a fast RSI and an EMA crossover.

Declared beside fs_v1 and stored in the same table under its own version, so both can be served
and compared side by side. Five-minute bars are resampled from the stored minute bars.
"""

from marketfs.features.registry import FeatureSet, event_features, feature

FEATURE_SET = FeatureSet(
    version="fs_v2",
    timeframes=("1m", "5m"),
    owner="quant-platform",
    description="fs_v1's returns, volatility and oscillators on 1m and 5m bars, with RSI(7) and an EMA(12/26) "
    "crossover.",
    features=(
        feature("ret_1", "returns", n=1, bounds=(-0.5, 0.5), drift=True),
        feature("ret_5", "returns", n=5, bounds=(-0.8, 0.8), drift=True),
        feature("vol_20", "volatility", n=20, bounds={"1m": (0, 0.2), "5m": (0, 0.45)}, drift=True),
        feature("rsi_7", "rsi", n=7, drift=True, description="a faster RSI for short-horizon models"),
        feature("rsi_14", "rsi", n=14, drift=True),
        feature(
            "ema_cross_12_26",
            "ema_cross",
            fast=12,
            slow=26,
            drift=True,
            description="trend: above 0 while the fast EMA is above the slow one",
        ),
        feature("bb_pct_b", "bollinger", n=20, k=2.0, output="pct_b", drift=True),
        feature("atr_14", "atr", n=14),
        feature("volume_z_20", "volume_z", n=20, drift=True),
        *event_features("1h"),
    ),
)
