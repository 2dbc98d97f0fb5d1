"""One declaration per feature: name, formula, lookback, inputs, version, owner and the family that computes it.

Computation (``compute.py``), the table's columns (``store/migrations.py``), the expectation
suites and the catalog (``docs/features.md``) are all derived from ``FEATURE_SETS``. Adding a
feature is one entry here plus its math in the family module it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from marketfs.features.events import EVENT_STATS


@dataclass(frozen=True)
class FeatureDef:
    name: str
    formula: str
    lookback: int  # bars of history needed, this bar included (TA-Lib lookback + 1); 0 for event features
    inputs: tuple[str, ...]
    family: str  # the function group in compute.py that produces it
    version: str = "1"
    owner: str = "quant-platform"
    timeframes: tuple[str, ...] = ("1m", "1d")


@dataclass(frozen=True)
class FeatureSet:
    version: str
    timeframes: tuple[str, ...]
    features: tuple[FeatureDef, ...]

    def for_timeframe(self, timeframe: str) -> list[FeatureDef]:
        if timeframe not in self.timeframes:
            raise KeyError(f"feature set {self.version} has no timeframe {timeframe!r}; it has {self.timeframes}")
        return [f for f in self.features if timeframe in f.timeframes]

    def names(self, timeframe: str) -> list[str]:
        return [f.name for f in self.for_timeframe(timeframe)]

    def market(self, timeframe: str) -> list[FeatureDef]:
        return [f for f in self.for_timeframe(timeframe) if f.family != "events"]

    def get(self, name: str) -> FeatureDef:
        for feature in self.features:
            if feature.name == name:
                return feature
        known = ", ".join(f.name for f in self.features)
        raise KeyError(f"feature {name!r} is not in feature set {self.version}; known: {known}")


EVENT_WINDOWS: dict[str, tuple[timedelta, str]] = {"1m": (timedelta(hours=1), "1h"), "1d": (timedelta(days=1), "1d")}

OHLC = ("open", "high", "low", "close")

MARKET_FEATURES: tuple[FeatureDef, ...] = (
    FeatureDef("ret_1", "close / close[-1] - 1", 2, ("close",), "returns"),
    FeatureDef("ret_5", "close / close[-5] - 1", 6, ("close",), "returns"),
    FeatureDef(
        "vol_20", "sample std (ddof=1) of ret_1 over the last 20 bars, this bar included", 21, ("close",), "volatility"
    ),
    FeatureDef(
        "rsi_14",
        "TA-Lib RSI(14): 100*G/(G+L), G and L Wilder averages of gains and losses, seeded with their 14-bar mean",
        15,
        ("close",),
        "recursive",
    ),
    FeatureDef(
        "macd",
        "TA-Lib MACD(12,26,9) line: EMA12(close) - EMA26(close), EMAs seeded with SMAs aligned at "
        "bar 26; first output at bar 34",
        34,
        ("close",),
        "recursive",
    ),
    FeatureDef(
        "macd_signal", "EMA9 of the MACD line, seeded with the SMA of its first 9 values", 34, ("close",), "recursive"
    ),
    FeatureDef("macd_hist", "macd - macd_signal", 34, ("close",), "recursive"),
    FeatureDef("bb_upper", "SMA20(close) + 2 * population std20(close) (TA-Lib BBANDS)", 20, ("close",), "bollinger"),
    FeatureDef("bb_lower", "SMA20(close) - 2 * population std20(close) (TA-Lib BBANDS)", 20, ("close",), "bollinger"),
    FeatureDef("bb_pct_b", "(close - bb_lower) / (bb_upper - bb_lower)", 20, ("close",), "bollinger"),
    FeatureDef(
        "atr_14",
        "TA-Lib ATR(14): Wilder average of true range, seeded with the mean of the first 14",
        15,
        OHLC,
        "recursive",
    ),
    FeatureDef("volume_z_20", "(volume - mean20(volume)) / sample std20(volume)", 20, ("volume",), "volume"),
)

_EVENT_FORMULAS = {
    "event_count": "number of events with ts - W < published_at <= ts",
    "sentiment_mean": "mean sentiment of those events",
    "sentiment_conf_mean": "mean confidence of those events",
    "sentiment_weighted": "sum(sentiment * confidence) / sum(confidence)",
    "sentiment_std": "sample std (ddof=1) of sentiment; null below 2 events",
}

EVENT_FEATURES: tuple[FeatureDef, ...] = tuple(
    FeatureDef(
        f"{stat}_{label}",
        f"{_EVENT_FORMULAS[stat]}, W = {label}",
        0,
        ("sentiment", "confidence", "published_at"),
        "events",
        timeframes=(timeframe,),
    )
    for timeframe, (_, label) in EVENT_WINDOWS.items()
    for stat in EVENT_STATS
)

FS_V1 = FeatureSet(version="fs_v1", timeframes=("1m", "1d"), features=MARKET_FEATURES + EVENT_FEATURES)

FEATURE_SETS: dict[str, FeatureSet] = {FS_V1.version: FS_V1}
DEFAULT_FEATURE_SET = FS_V1


def feature_set(version: str) -> FeatureSet:
    try:
        return FEATURE_SETS[version]
    except KeyError:
        raise KeyError(f"unknown feature set version {version!r}; known: {', '.join(FEATURE_SETS)}") from None


def all_feature_columns() -> list[str]:
    """Every feature column of every version, in declaration order: the served table's value columns."""
    seen: dict[str, None] = {}
    for fs in FEATURE_SETS.values():
        for feature in fs.features:
            seen.setdefault(feature.name, None)
    return list(seen)


def definitions_hash(fs: FeatureSet, timeframe: str) -> str:
    """A short hash of every definition of a timeframe: changes whenever a formula, lookback or version does."""
    import hashlib

    text = repr([(f.name, f.formula, f.lookback, f.inputs, f.family, f.version) for f in fs.for_timeframe(timeframe)])
    return hashlib.sha256(text.encode()).hexdigest()[:10]
