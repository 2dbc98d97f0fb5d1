"""Drift gates: each day's feature distributions against a reference, as a per-day profile.

The drift suite (``expectations/suites/<asset>_drift.json``) names, per gated feature and
statistic, one column of a *profile*: a table with one row per evaluated day. ``drift_profile``
computes it with polars and numpy; Great Expectations then validates the profile row-wise in one
validation (an unexpected row is a day that drifted), against bounds that are constants in the
suite. ``meta.reference`` says what each day is compared with: the trailing N partitions (default;
later days of a range draw on earlier days of the same range), a pinned window, or a pinned snapshot.

Why the bounds can be constants. A fixed threshold on a raw statistic cannot hold across universe
sizes: with 2 instruments a day's decile histogram of a 1h event feature rests on a few dozen
events, and its KL divergence from the reference is many times that of a 50-instrument day. So
every statistic is scored against the reference's own day-to-day variation, measured one
reference day at a time, that is at the sample size of one day of this universe:

- ``mean_z``, ``stdev_z``: the day's mean (standard deviation) of the feature against the m
  reference days' means (standard deviations), with center c and spread s their mean and sample
  standard deviation. ``t = (x - c) / (s * sqrt(1 + 1/m))`` is Student's t with m - 1 degrees of
  freedom for exchangeable, roughly normal days (the prediction interval of one new day), and the
  score is the standard normal quantile with the same tail probability. A score therefore means
  the same with 5 reference days as with 20 (a raw ``k * spread`` band does not: with 5 days, a day
  falls outside 6 spreads 400 times as often as with 20), and a bound of 3.41 reads "outside what
  the reference would produce once in 1,500 days". Days are not normal: a day's spread of returns
  or RSI rests on a few overnight gaps, and far tails measured several times normal, so the degrees
  of freedom are capped at ``meta.tail_df`` (10): a heavier-tailed prediction, which brought the
  clean-day trip rate from four times the target to below it (docs/drift.md).
- ``kl_score``: the KL divergence of the day's histogram from the pooled reference's, on the
  reference's decile bins, judged against the *leave-one-out* divergences of the reference days
  (each reference day against the other m - 1 pooled, on the same bins). Those m values are draws
  of the same statistic at the same sample size, so their level carries the universe size, the
  autocorrelation of overlapping windows and the real day-to-day variation of the distribution
  without a model of any of them. They are compared on the log scale, with the same Student's t
  step: a divergence is a scale (its level moves by a factor with the sample size) and the log
  turns the scale into a location, so the score depends on ``KL_day / typical leave-one-out KL``
  and on how much the leave-one-out values vary by a factor. On clean synthetic days the
  log scores are symmetric but for a lighter upper tail than normal (conservative), while cube
  roots (Wilson-Hilferty, right for a pure chi-square) leave an upper tail 2-3 times normal at
  z = 3: clean days' divergences are a mixture of scales. A ratio to an empirical quantile of the
  leave-one-out values (``KL / quantile_q``) cannot carry a 2% daily trip rate over 30 gates:
  that needs q near 0.999, which 20 values cannot estimate.

The suite's ``meta.trip_rate_target`` is the share of clean days allowed to trip any critical
gate; its bounds are the Bonferroni split of that rate over the critical gates (two-sided for mean
and stdev, one-sided for KL), and ``tests/test_drift_profile.py`` checks that the file agrees.
A feature with no finite value on a day, or fewer than two reference days with one, gets no
score (null, which the bounds let pass): missing values are the quality suite's to flag.

Vectorised: each day's values of a feature are sorted once and counted on a fine grid of the
pool's quantiles (the one loop over days, each step reading only that day's rows); cumulative sums
over days and gathers then give every day's pooled reference, its decile bins and all
leave-one-out divergences at once, whatever the reference's length. 252 days of 500 instruments
(53M vectors) take about 20 s, linear in the rows. scipy (a dependency of Great Expectations)
supplies Student's t; it is imported inside the function that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from marketfs.reference_days import DayOf, ReferenceDays, day_label

DAY = "day"
SCORES = {"mean": "mean_z", "stdev": "stdev_z", "kl": "kl_score"}  # statistic -> profile column prefix
FINE_BINS = 2048  # the grid a reference's deciles are placed on (to within one fine bin)
PSEUDO_COUNT = 0.5  # per histogram bin: a bin one side leaves empty still gives a finite divergence
KL_FLOOR = 1e-12  # identical histograms: a finite log
SPREAD_FLOOR = 1e-12  # a constant reference: any change scores high, but finitely
REFERENCE_COLUMNS = (
    "feature",
    "statistic",
    "observed",
    "lower",
    "upper",
    "score",
    "center",
    "spread",
    "reference_days",
    "reference_rows",
    "day_rows",
    "reference",
)


@dataclass(frozen=True)
class ReferenceSpec:
    kind: str  # "trailing", "window" or "snapshot"
    partitions: int = 20
    min_partitions: int = 5
    start: str | None = None
    end: str | None = None
    snapshot: str | None = None

    @classmethod
    def from_suite(cls, suite: dict[str, Any]) -> ReferenceSpec:
        raw = dict(suite.get("meta", {}).get("reference", {"kind": "trailing"}))
        try:
            spec = cls(**raw)
        except TypeError:
            spec = None
        if (
            spec is None
            or spec.kind not in ("trailing", "window", "snapshot")
            or (spec.kind == "window" and not (spec.start and spec.end))
            or (spec.kind == "snapshot" and not spec.snapshot)
        ):
            raise ValueError(
                f"drift suite {suite.get('name')}: meta.reference {raw} is invalid. Fix: use "
                '{"kind": "trailing", "partitions": 20}, '
                '{"kind": "window", "start": "2024-01-02", "end": "2024-02-01"} or '
                '{"kind": "snapshot", "snapshot": "<snapshot id>"}'
            )
        return spec

    def describe(self, days: list[str], source: str) -> str:
        what = {
            "trailing": f"trailing {len(days)} partitions",
            "window": f"pinned window {self.start}..{self.end}",
            "snapshot": f"pinned snapshot {self.snapshot}",
        }[self.kind]
        return f"{what} {days[0]}..{days[-1]} of {source}" if days else f"{what} of {source}: no partitions"


@dataclass(frozen=True)
class DriftGate:
    """One expectation of a drift suite: bounds on the score of ``statistic`` of ``feature``."""

    feature: str
    statistic: str  # "mean", "stdev" or "kl"
    column: str  # its profile column, e.g. "kl_score__ret_1"
    min_value: float | None
    max_value: float | None


def profile_column(statistic: str, feature: str) -> str:
    return f"{SCORES[statistic]}__{feature}"


def drift_gates(template: dict[str, Any]) -> list[DriftGate]:
    """The suite's expectations as gates; a malformed one is named with its fix."""
    gates = []
    for index, expectation in enumerate(template["expectations"]):
        meta, kwargs = expectation.get("meta") or {}, expectation.get("kwargs") or {}
        feature, statistic = meta.get("feature"), meta.get("statistic")
        where = f"drift suite {template.get('name')}: expectation #{index + 1} ({kwargs.get('column')})"
        if expectation.get("type") != "expect_column_values_to_be_between" or statistic not in SCORES or not feature:
            raise ValueError(
                f"{where} is not a drift gate. Fix: use expect_column_values_to_be_between with "
                f'"meta": {{"feature": <feature column>, "statistic": one of {sorted(SCORES)}}}'
            )
        if kwargs.get("column") != profile_column(statistic, feature):
            raise ValueError(
                f"{where}: gates {statistic} of {feature}. Fix: its column is {profile_column(statistic, feature)!r}"
            )
        gates.append(DriftGate(feature, statistic, kwargs["column"], kwargs.get("min_value"), kwargs.get("max_value")))
    return gates


def drift_columns(template: dict[str, Any]) -> list[str]:
    """The feature columns the suite gates: what the reference must hold."""
    return sorted({gate.feature for gate in drift_gates(template)})


@dataclass(frozen=True)
class DriftProfile:
    frame: pl.DataFrame  # one row per evaluated day: "day" (YYYY-MM-DD) + one float column per gate
    suite: dict  # the suite that validates ``frame`` (bounds are constants of the file)
    references: dict[str, pl.DataFrame]  # day -> one row per gate: what the day was compared with
    not_evaluated: dict[str, str]  # day -> why it has no row in ``frame``


def utc_date(ts: pl.Series) -> pl.Series:
    """The UTC date of each instant: the day of data that has no exchange calendar (tests, benchmarks)."""
    return ts.dt.date()


def drift_profile(
    vectors: pl.DataFrame,
    history: pl.DataFrame | ReferenceDays,
    template: dict,
    *,
    source: str,
    day_of: DayOf = utc_date,
) -> DriftProfile:
    """The drift profile of every day of ``vectors`` against its reference.

    ``day_of`` maps each ts to its day: the pipeline passes the trading day of the universe's
    calendar (an after-hours vector, or one of a session crossing UTC midnight, is judged with the
    session that closes next), so that a day here is a partition.

    ``history`` holds the stored vectors the reference may draw on (``ts`` plus the drift columns, or
    the same as ``ReferenceDays``, already split into days by ``day_of``):
    the trailing partitions before the first day of ``vectors``, the pinned window or the snapshot.
    A day with fewer than ``min_partitions`` reference days gets no row, and a reason. ``suite`` is
    ``template`` itself: its bounds are constants, nothing is filled in per run.

    ``references[day]`` has one row per gate: ``observed`` (the day's mean, stdev or KL divergence),
    ``lower``/``upper`` (the raw values at the suite's bounds), ``score``, ``center``/``spread`` (of
    the reference days' values; for KL the geometric mean of the leave-one-out divergences and
    their spread as a factor), ``reference_days`` (first..last), ``reference_rows``, ``day_rows``
    and ``reference`` (what and where from).
    """
    spec = ReferenceSpec.from_suite(template)
    gates = drift_gates(template)
    features = sorted({gate.feature for gate in gates})
    frames = [("vectors", vectors.columns)]
    frames.append(("history", history.columns if isinstance(history, pl.DataFrame) else ("ts", *history.columns)))
    for name, columns in frames:
        missing = [c for c in ("ts", *features) if c not in columns]
        if missing:
            raise ValueError(f"drift suite {template.get('name')}: {name} lack the columns {missing}")
    if isinstance(history, pl.DataFrame):
        history = ReferenceDays.from_frame(history, features, day_of)
    elif history.columns != tuple(features):
        history = history.select(features)
    bins = int(template.get("meta", {}).get("kl_bins", 10))
    tail_df = template.get("meta", {}).get("tail_df")
    pool = _pool(ReferenceDays.from_frame(vectors, features, day_of), history, spec)
    labels, day_slot, lo, hi = pool.labels, pool.day_slot, pool.lo, pool.hi
    found = hi - lo
    evaluated = found >= spec.min_partitions
    not_evaluated = {
        labels[s]: f"{n} reference partition(s), {spec.min_partitions} needed"
        for s, n in zip(day_slot[~evaluated], found[~evaluated], strict=True)
    }
    # A short day (an early close: 210 of 390 minutes) is not a sample of the same statistic as its full
    # reference days: its overnight gap weighs twice as much in its spread of returns, and on clean data
    # every half session of a 50-instrument universe tripped. Missing rows are the quality suite's.
    min_share = template.get("meta", {}).get("min_day_share")
    if min_share is not None:
        rows = np.diff(pool.offsets)
        for i in np.flatnonzero(evaluated):
            typical = float(np.median(rows[lo[i] : hi[i]]))
            if rows[day_slot[i]] < float(min_share) * typical:
                evaluated[i] = False
                not_evaluated[labels[day_slot[i]]] = (
                    f"a short day: {rows[day_slot[i]]} vectors against a median of {typical:.0f} on its reference "
                    f"days (meta.min_day_share {min_share}); an early close or missing instruments are not drift"
                )
    day_slot, lo, hi = day_slot[evaluated], lo[evaluated], hi[evaluated]
    days = [labels[s] for s in day_slot]
    schema = {DAY: pl.String, **{gate.column: pl.Float64 for gate in gates}}
    if not days:
        return DriftProfile(pl.DataFrame(schema=schema), template, {}, not_evaluated)

    # Reference slots of each evaluated day, padded to the widest reference (ref_in marks the real ones).
    ref_idx = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]
    ref_in = ref_idx < hi[:, None]
    ref_idx = np.where(ref_in, ref_idx, lo[:, None])
    summaries = {f: _summarise(pool.column(f), pool.offsets) for f in features}
    kl: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    scores: dict[str, np.ndarray] = {}
    tables = []
    common = {
        DAY: days,
        "reference_days": [f"{labels[a]}..{labels[b - 1]}" for a, b in zip(lo, hi, strict=True)],
        "reference": [spec.describe(labels[a:b], source) for a, b in zip(lo, hi, strict=True)],
    }
    for gate in gates:
        summary = summaries[gate.feature]
        if gate.statistic == "kl":
            if gate.feature not in kl:
                kl[gate.feature] = _kl_divergences(summary.below, day_slot, lo, hi, ref_idx, bins)
            observed, reference = kl[gate.feature]
        else:
            values = summary.mean if gate.statistic == "mean" else summary.stdev
            observed, reference = values[day_slot], values[ref_idx]
        rows = summary.rows
        ok = ref_in & np.isfinite(reference)
        score, center, spread, lower, upper = _score(
            observed, reference, ok, gate, log_scale=gate.statistic == "kl", tail_df=tail_df
        )
        scores[gate.column] = score
        tables.append(
            pl.DataFrame(
                {
                    **common,
                    "feature": gate.feature,
                    "statistic": gate.statistic,
                    "observed": observed,
                    "lower": lower,
                    "upper": upper,
                    "score": score,
                    "center": center,
                    "spread": spread,
                    "reference_rows": np.where(ok, rows[ref_idx], 0).sum(axis=1),
                    "day_rows": rows[day_slot],
                }
            )
        )
    frame = pl.DataFrame({DAY: days, **scores}, schema=schema).fill_nan(None)
    table = pl.concat(tables).fill_nan(None).select(*REFERENCE_COLUMNS, DAY)
    references = {key: part for (key,), part in table.partition_by(DAY, as_dict=True, include_key=False).items()}
    return DriftProfile(frame=frame, suite=template, references=references, not_evaluated=not_evaluated)


@dataclass(frozen=True)
class _Pool:
    """Every day the profile reads, as numbered slots, with the rows of each slot kept together.

    ``labels[s]`` is slot s's date; ``column(f)`` is feature f's values with slot s's at
    ``offsets[s]:offsets[s + 1]``. Per current day: its slot ``day_slot`` and reference ``[lo, hi)``.
    """

    labels: list[str]
    offsets: np.ndarray
    day_slot: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    columns: tuple[str, ...]
    slots: tuple[np.ndarray, ...]  # per slot, (features x rows)

    def column(self, feature: str) -> np.ndarray:
        index = self.columns.index(feature)
        if not self.slots:
            return np.empty(0)
        return np.concatenate([values[index] for values in self.slots])


def _pool(current: ReferenceDays, stored: ReferenceDays, spec: ReferenceSpec) -> _Pool:
    """Trailing: one slot per date in date order (a current day replaces a stored one of the same
    date); a day's reference is the ``spec.partitions`` slots before its own. Window or snapshot:
    the stored days, then the current ones; every current day's reference is all the stored days.
    Each slot's values come sorted per column (``ReferenceDays``).
    """
    current_days = np.asarray(current.days, np.int64)
    if spec.kind == "trailing":
        stored = stored.without(current.days)
        pooled = stored.merged(current)
        days = np.asarray(pooled.days, np.int64)
        slots = pooled.values
        day_slot = np.searchsorted(days, current_days)
        lo, hi = np.maximum(day_slot - spec.partitions, 0), day_slot
    else:
        days = np.asarray([*stored.days, *current.days], np.int64)
        slots = (*stored.values, *current.values)
        day_slot = len(stored.days) + np.arange(current_days.size)
        lo, hi = np.zeros_like(day_slot), np.full_like(day_slot, len(stored.days))
    rows = np.asarray([values.shape[1] for values in slots], np.int64)
    return _Pool(
        labels=[day_label(d) for d in days],
        offsets=np.concatenate([[0], rows.cumsum()]).astype(np.int64),
        day_slot=day_slot,
        lo=lo,
        hi=hi,
        columns=current.columns,
        slots=tuple(slots),
    )


@dataclass(frozen=True)
class _Days:
    """One feature, per slot (day): its finite values' count, mean and stdev, and ``below``: the count
    of values below each edge of a fine grid of the pool's quantiles (a first column of 0s, then
    one per edge, then all), i.e. the cumulative histogram on that grid."""

    rows: np.ndarray
    mean: np.ndarray
    stdev: np.ndarray
    below: np.ndarray


def _summarise(values: np.ndarray, offsets: np.ndarray) -> _Days:
    """``values`` by slot, slot s being ``values[offsets[s]:offsets[s + 1]]``, each slot sorted (``ReferenceDays``).

    Each day's values come sorted (a day's cumulative histogram is then a binary search, cheaper than
    binning the pool value by value), and the grid is placed on the pool's quantiles (``FINE_BINS``,
    fewer where values tie). The pool is a run of sorted days, which a merging sort takes as runs: its
    exact quantiles cost less than sorting a sample of it did (a strided sample above a million values,
    whose grid depended on the order the instruments were read in).
    """
    sample = np.sort(values[np.isfinite(values)], kind="stable")
    if sample.size:
        edges = np.unique(sample[np.linspace(0, sample.size - 1, FINE_BINS + 1)[1:-1].round().astype(np.int64)])
    else:
        edges = np.empty(0)
    n_slots = offsets.size - 1
    rows = np.zeros(n_slots, np.int64)
    mean, stdev = np.full(n_slots, np.nan), np.full(n_slots, np.nan)
    below = np.zeros((n_slots, edges.size + 2), np.int64)
    for s in range(n_slots):
        day = _sorted(values[offsets[s] : offsets[s + 1]])  # -inf first, then +inf and NaN last
        day = day[np.searchsorted(day, -np.inf, side="right") : np.searchsorted(day, np.inf, side="left")]
        rows[s] = day.size
        if day.size:
            mean[s] = day.mean()
            below[s, 1:-1] = np.searchsorted(day, edges, side="left")
            below[s, -1] = day.size
        if day.size > 1:
            stdev[s] = day.std(ddof=1)
    return _Days(rows, mean, stdev, below)


def _sorted(day: np.ndarray) -> np.ndarray:
    """``day`` as ``np.sort`` would return it: itself when it already is (a check is a tenth of a sort)."""
    finite = day.size - int(np.count_nonzero(np.isnan(day)))
    if np.isnan(day[finite:]).all() and (finite < 2 or bool((day[1:finite] >= day[: finite - 1]).all())):
        return day
    return np.sort(day)


def _kl_divergences(
    below: np.ndarray, day_slot: np.ndarray, lo: np.ndarray, hi: np.ndarray, ref_idx: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per evaluated day, KL(day || pooled reference) on the reference's ``bins`` quantile bins, and
    per reference day KL(that day || the other reference days pooled) on the same bins.

    ``below`` is the per-slot cumulative histogram on a fine grid (``_Days.below``); a reference's
    quantile bins are unions of fine bins, found from its cumulative counts. A bin counts where
    either histogram has values: a day with values where its reference has none diverges.
    """
    fine = below.shape[1] - 1
    by_slot = np.concatenate([np.zeros((1, fine), np.int64), np.diff(below, axis=1).cumsum(axis=0)], axis=0)
    pooled = (by_slot[hi] - by_slot[lo]).cumsum(axis=1)  # each reference, cumulative over fine bins
    quantiles = pooled[:, -1:] * np.arange(1, bins) / bins
    inner = (pooled[:, None, :] < quantiles[:, :, None]).sum(axis=2)  # the fine bin holding each quantile
    cuts = np.concatenate([np.zeros_like(inner[:, :1]), inner, np.full_like(inner[:, :1], fine)], axis=1)
    pooled = np.concatenate([np.zeros_like(pooled[:, :1]), pooled], axis=1)
    reference = np.diff(np.take_along_axis(pooled, cuts, axis=1), axis=1)
    day = np.diff(below[day_slot[:, None], cuts], axis=1)
    loo = np.diff(below[ref_idx[:, :, None], cuts[:, None, :]], axis=2)
    kl_day = _kl(day, reference, (reference > 0) | (day > 0))
    kl_loo = _kl(loo, reference[:, None, :] - loo, reference[:, None, :] > 0)
    kl_day = np.where((day.sum(axis=1) > 0) & (reference.sum(axis=1) > 0), kl_day, np.nan)
    return kl_day, np.where(loo.sum(axis=2) > 0, kl_loo, np.nan)


def _kl(counts: np.ndarray, reference: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """KL(counts || reference) over the last axis, on the valid bins, each with a pseudo-count."""
    p = np.where(valid, counts + PSEUDO_COUNT, 0.0)
    q = np.where(valid, reference + PSEUDO_COUNT, 0.0)
    p, q = p / p.sum(axis=-1, keepdims=True), q / q.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(valid, p * np.log(p / q), 0.0).sum(axis=-1)


def _score(
    observed: np.ndarray,
    reference: np.ndarray,
    ok: np.ndarray,
    gate: DriftGate,
    *,
    log_scale: bool,
    tail_df: int | None = None,
) -> tuple[np.ndarray, ...]:
    """Score of each day's ``observed`` against the ``ok`` values of its row of ``reference``.

    ``tail_df`` caps the degrees of freedom of the prediction: days' statistics have heavier tails
    than normal, which m - 1 degrees of freedom understate once m passes about 10.

    Returns the score and, in the statistic's own units, the reference's center and spread and the
    values at the gate's bounds.
    """
    from scipy import special, stats

    if log_scale:
        observed, reference = np.log(np.maximum(observed, KL_FLOOR)), np.log(np.maximum(reference, KL_FLOOR))
    m = ok.sum(axis=1)
    df = np.maximum(m - 1, 1) if tail_df is None else np.clip(m - 1, 1, tail_df)
    with np.errstate(divide="ignore", invalid="ignore"):
        center = np.where(ok, reference, 0.0).sum(axis=1) / m
        spread = np.sqrt(np.where(ok, (reference - center[:, None]) ** 2, 0.0).sum(axis=1) / (m - 1))
        spread = np.maximum(spread, np.maximum(1e-9 * np.abs(center), SPREAD_FLOOR))
        scale = spread * np.sqrt(1 + 1 / m)
        t = (observed - center) / scale
        # The normal quantile of t's tail probability, from its log: exact far into the tail.
        score = np.sign(t) * -special.ndtri_exp(stats.t.logsf(np.abs(t), df))
    known = (m >= 2) & np.isfinite(observed)
    score = np.where(known, score, np.nan)
    bounds = []
    for bound in (gate.min_value, gate.max_value):
        if bound is None:
            bounds.append(np.full(m.shape, np.nan))
        else:
            raw = center + np.sign(bound) * stats.t.isf(stats.norm.sf(abs(bound)), df) * scale
            bounds.append(np.where(m >= 2, raw, np.nan))
    if log_scale:
        return score, np.exp(center), np.exp(spread), np.exp(bounds[0]), np.exp(bounds[1])
    return score, center, spread, bounds[0], bounds[1]
