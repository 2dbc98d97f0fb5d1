"""One declaration per feature: name, formula, lookback, inputs, version and the polars expression.

Computation, the table's columns, the expectation suites and the catalog are all derived from
``FEATURE_SETS``; adding a feature is one entry here (plus its math in the module it belongs to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from marketfs.features import market


@dataclass(frozen=True)
class FeatureDef:
    name: str
    formula: str
    lookback: int  # bars needed, this bar included, before the value is defined
    inputs: tuple[str, ...]
    expr: Callable[[], pl.Expr] = field(repr=False, compare=False)
    version: str = "1"
    owner: str = "quant-platform"
    kind: str = "market"


@dataclass(frozen=True)
class FeatureSet:
    version: str
    timeframes: tuple[str, ...]
    features: tuple[FeatureDef, ...]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def max_lookback(self) -> int:
        return max(f.lookback for f in self.features)

    def get(self, name: str) -> FeatureDef:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"feature {name!r} is not in feature set {self.version}; known: {', '.join(self.names)}")


MARKET_FEATURES: tuple[FeatureDef, ...] = (
    FeatureDef("ret_1", "close / close[-1] - 1", 2, ("close",), market.ret_1),
    FeatureDef("ret_5", "close / close[-5] - 1", 6, ("close",), market.ret_5),
    FeatureDef(
        "vol_20",
        "sample standard deviation (ddof=1) of ret_1 over the last 20 bars, this bar included",
        21,
        ("close",),
        market.vol_20,
    ),
)

FS_V1 = FeatureSet(version="fs_v1", timeframes=("1m",), features=MARKET_FEATURES)

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
        for name in fs.names:
            seen.setdefault(name, None)
    return list(seen)
