"""Feature sets: one declaration each, in ``marketfs/feature_sets/<version>.py``, and what derives from it.

A declaration names the set's version, timeframes, owner and each feature: its family and
parameters (``rsi(n=14)``), its value bounds for the gate, whether it takes part in drift, owner
and description. From it come the computation (``compute.py``), the table's columns
(``store/migrations.py``), the recursion state columns, the expectation suites
(``expectations/generate.py``), the catalog (``docs/features.md``), the Dagster assets and their
code versions (``assets/features.py``). Adding a feature set is one new file in
``marketfs/feature_sets/``; a new family is its math plus an entry in ``families.py``.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from marketfs.features.events import EVENT_STATS
from marketfs.features.families import Bounds, Family, family
from marketfs.features.flags import QualityFlag
from marketfs.features.recursive import Recursion, seed_bars
from marketfs.features.timeframes import TIMEFRAMES

# Bars read before a window beyond the longest lookback: slack for bars skipped as invalid.
WARMUP_SLACK = 6


class DeclarationError(ValueError):
    """A feature set declaration that cannot be used as written."""


@dataclass(frozen=True)
class Feature:
    name: str
    family: str
    params: tuple[tuple[str, Any], ...]
    timeframes: tuple[str, ...] | None = None  # None: every timeframe of its set
    bounds: Bounds | dict[str, Bounds] | None = None  # None: the family's bounds
    drift: bool = False
    owner: str | None = None  # None: the set's owner
    description: str = ""
    version: str = "1"

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def spec(self) -> Family:
        return family(self.family)

    @property
    def lookback(self) -> int:
        return self.spec.lookback(self.p)

    @property
    def formula(self) -> str:
        return self.spec.formula(self.p)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.spec.inputs

    @property
    def is_event(self) -> bool:
        return self.spec.is_events

    @property
    def price_units(self) -> bool:
        return self.spec.price_units(self.p)

    def recursions(self) -> list[Recursion]:
        return self.spec.recursions(self.p)

    def null_reasons(self) -> tuple[QualityFlag, ...]:
        return self.spec.null_reasons(self.p)

    def gate_bounds(self, timeframe: str) -> tuple[float | None, float | None, str | None]:
        """(min, max, why) of the values the quality gate accepts at ``timeframe``."""
        declared = self.bounds.get(timeframe) if isinstance(self.bounds, dict) else self.bounds
        if declared is not None:
            return (*declared, None)
        return (*self.spec.bounds(self.p), self.spec.bounds_why(self.p))


def feature(
    name: str,
    family_name: str,
    *,
    timeframes: tuple[str, ...] | None = None,
    bounds: Bounds | dict[str, Bounds] | None = None,
    drift: bool = False,
    owner: str | None = None,
    description: str = "",
    version: str = "1",
    **params: Any,
) -> Feature:
    """A feature declaration: ``feature("rsi_14", "rsi", n=14, bounds=(0, 100), drift=True)``."""
    return Feature(
        name=name,
        family=family_name,
        params=tuple(sorted(params.items())),
        timeframes=timeframes,
        bounds=bounds,
        drift=drift,
        owner=owner,
        description=description,
        version=version,
    )


def event_features(
    window: str, *, timeframes: tuple[str, ...] | None = None, drift: bool = True
) -> tuple[Feature, ...]:
    """The five news-event statistics over the window ``(ts - window, ts]``, named ``<stat>_<window>``.

    ``sentiment_std`` never takes part in drift: it is null below two events, so its daily
    distribution follows the event count, which is already gated.
    """
    return tuple(
        feature(
            f"{stat}_{window}",
            "events",
            stat=stat,
            window=window,
            timeframes=timeframes,
            drift=drift and stat != "sentiment_std",
        )
        for stat in EVENT_STATS
    )


_WINDOW = re.compile(r"^(\d+)([mhd])$")


def parse_window(text: str) -> timedelta:
    match = _WINDOW.match(text)
    if not match:
        raise DeclarationError(f"event window {text!r} is not like '1h', '30m' or '1d'")
    return timedelta(**{{"m": "minutes", "h": "hours", "d": "days"}[match[2]]: int(match[1])})


@dataclass(frozen=True)
class FeatureSet:
    version: str
    timeframes: tuple[str, ...]
    features: tuple[Feature, ...]
    owner: str = "quant-platform"
    description: str = ""
    # What a cash dividend does to the series: "price" (price return, the default: dividends adjust nothing)
    # or "total" (total return: each dividend scales the earlier prices like a split, marketfs/corporate_actions.py).
    returns: str = "price"

    @property
    def total_return(self) -> bool:
        return self.returns == "total"

    def for_timeframe(self, timeframe: str) -> list[Feature]:
        if timeframe not in self.timeframes:
            raise KeyError(f"feature set {self.version} has no timeframe {timeframe!r}; it has {self.timeframes}")
        return [f for f in self.features if f.timeframes is None or timeframe in f.timeframes]

    def names(self, timeframe: str) -> list[str]:
        return [f.name for f in self.for_timeframe(timeframe)]

    def owner_of(self, f: Feature) -> str:
        return f.owner or self.owner

    def recursions(self, timeframe: str) -> list[Recursion]:
        return list(dict.fromkeys(r for f in self.for_timeframe(timeframe) for r in f.recursions()))

    def state_columns(self, timeframe: str) -> list[str]:
        return [r.key for r in self.recursions(timeframe)]

    def seed_bars(self, timeframe: str) -> int:
        return seed_bars(self.recursions(timeframe))

    def warmup_bars(self, timeframe: str) -> int:
        """Bars to read before a window: enough for the longest lookback, and the whole history of an
        instrument whose recursions are not seeded yet (it has no stored state to continue from)."""
        features = self.for_timeframe(timeframe)
        return max([f.lookback for f in features] + [self.seed_bars(timeframe), 1]) + WARMUP_SLACK

    def event_windows(self, timeframe: str) -> list[str]:
        """The event windows of a timeframe, in declaration order; the first one sets the event flags."""
        return list(dict.fromkeys(f.p["window"] for f in self.for_timeframe(timeframe) if f.is_event))

    def event_lookback(self, timeframe: str) -> timedelta:
        """How far before a window its events must be read."""
        return max((parse_window(w) for w in self.event_windows(timeframe)), default=timedelta(0))

    def drift_features(self, timeframe: str) -> list[str]:
        return [f.name for f in self.for_timeframe(timeframe) if f.drift]


def dataset_name(fs: FeatureSet, timeframe: str) -> str:
    """The name shared by a feature set's timeframe everywhere: its Dagster asset, its suites, quality_log."""
    return f"feature_vectors_{fs.version}_{timeframe}"


def _validate(fs: FeatureSet, origin: str) -> FeatureSet:
    def fail(what: str) -> DeclarationError:
        return DeclarationError(f"{origin}: feature set {fs.version!r}: {what}")

    if not re.fullmatch(r"[a-z][a-z0-9_]*", fs.version):
        raise fail("the version must be lowercase letters, digits and underscores (e.g. fs_v3)")
    if fs.returns not in ("price", "total"):
        raise fail(f"returns = {fs.returns!r}: 'price' (dividends not adjusted) or 'total' (total return)")
    unknown = [tf for tf in fs.timeframes if tf not in TIMEFRAMES]
    if unknown or not fs.timeframes:
        raise fail(f"timeframes {unknown or '()'} not among {list(TIMEFRAMES)}")
    seen: set[str] = set()
    for f in fs.features:
        if f.name in seen:
            raise fail(f"feature {f.name!r} is declared twice")
        seen.add(f.name)
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", f.name):
            raise fail(f"feature name {f.name!r} must be a lowercase identifier (it becomes a column)")
        if f.timeframes is not None and not set(f.timeframes) <= set(fs.timeframes):
            raise fail(f"feature {f.name!r} names timeframes {f.timeframes} outside the set's {fs.timeframes}")
        try:
            f.lookback, f.formula, f.recursions()  # noqa: B018 - evaluated to check the parameters
            if f.is_event:
                parse_window(f.p["window"])
        except (KeyError, TypeError, ValueError) as exc:
            raise fail(f"feature {f.name!r} ({f.family} with {f.p}): {exc}") from exc
        if isinstance(f.bounds, dict) and not set(f.bounds) <= set(fs.timeframes):
            raise fail(f"feature {f.name!r} has bounds for timeframes outside {fs.timeframes}")
    for tf in fs.timeframes:
        if not fs.for_timeframe(tf):
            raise fail(f"timeframe {tf} has no feature")
    return fs


@functools.cache
def _discover() -> dict[str, FeatureSet]:
    """Every ``FEATURE_SET`` declared in a module of ``marketfs.feature_sets``, by version.

    Found on first use, not at import: a declaration imports this module, and must be importable first.
    """
    import marketfs.feature_sets as package

    found: dict[str, FeatureSet] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        fs = getattr(module, "FEATURE_SET", None)
        origin = module.__file__ or info.name
        if not isinstance(fs, FeatureSet):
            raise DeclarationError(f"{origin}: a feature set module must define FEATURE_SET = FeatureSet(...)")
        if fs.version in found:
            raise DeclarationError(f"{origin}: feature set version {fs.version!r} is declared twice")
        found[fs.version] = _validate(fs, origin)
    return found


DEFAULT_VERSION = "fs_v1"


def __getattr__(name: str) -> object:
    # FEATURE_SETS and DEFAULT_FEATURE_SET, discovered on first use (PEP 562).
    if name == "FEATURE_SETS":
        return _discover()
    if name == "DEFAULT_FEATURE_SET":
        return _discover()[DEFAULT_VERSION]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def feature_set(version: str) -> FeatureSet:
    sets = _discover()
    try:
        return sets[version]
    except KeyError:
        raise KeyError(f"unknown feature set version {version!r}; known: {', '.join(sets)}") from None


def datasets() -> dict[str, tuple[FeatureSet, str]]:
    """Every (feature set, timeframe) by its dataset name."""
    return {dataset_name(fs, tf): (fs, tf) for fs in _discover().values() for tf in fs.timeframes}


def all_feature_columns() -> list[str]:
    """Every feature column of every version, in declaration order: the served table's value columns."""
    return list(dict.fromkeys(f.name for fs in _discover().values() for f in fs.features))


def all_state_columns() -> list[str]:
    """Every recursion state column of every version and timeframe: ``feature_state``'s value columns."""
    return list(dict.fromkeys(c for fs in _discover().values() for tf in fs.timeframes for c in fs.state_columns(tf)))
