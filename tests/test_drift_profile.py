"""The drift profile on hand-built references whose answer is known; no database.

Each day holds ``ROWS`` values of two features, ``a`` and ``b``, drawn from N(0, 1) unless a test
plants something else.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from expectations.drift import (
    REFERENCE_COLUMNS,
    DriftProfile,
    ReferenceSpec,
    drift_columns,
    drift_gates,
    drift_profile,
    profile_column,
)
from expectations.gate import check_expectations, load_suite_json, suite_path

ROWS = 400
FIRST = date(2024, 1, 1)
TRAILING = {"kind": "trailing", "partitions": 20, "min_partitions": 5}


def suite(reference: dict | None = None, bound: float = 3.4, kl_bound: float = 3.2) -> dict:
    gates = []
    for feature in ("a", "b"):
        for statistic in ("mean", "stdev", "kl"):
            kwargs = {
                "column": profile_column(statistic, feature),
                "max_value": kl_bound if statistic == "kl" else bound,
            }
            if statistic != "kl":
                kwargs["min_value"] = -bound
            gates.append(
                {
                    "type": "expect_column_values_to_be_between",
                    "kwargs": kwargs,
                    "severity": "critical",
                    "meta": {"feature": feature, "statistic": statistic},
                }
            )
    return {"name": "t_drift", "meta": {"reference": reference or TRAILING, "kl_bins": 10}, "expectations": gates}


def day_frame(day: date, a: np.ndarray, b: np.ndarray | None = None) -> pl.DataFrame:
    start = datetime.combine(day, datetime.min.time(), UTC) + timedelta(hours=14, minutes=30)
    ts = [start + timedelta(milliseconds=i * 25_000_000 // a.size) for i in range(a.size)]  # within the day
    return pl.DataFrame({"ts": ts, "a": a, "b": a if b is None else b})


def clean_days(first: date, n: int, seed: int, rows: int = ROWS) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.concat(
        [day_frame(first + timedelta(days=i), rng.standard_normal(rows), rng.standard_normal(rows)) for i in range(n)]
    )


def scores(profile: DriftProfile, day: str) -> dict[str, float]:
    return profile.frame.filter(pl.col("day") == day).drop("day").row(0, named=True)


def breaches(profile: DriftProfile, template: dict) -> dict[str, list[str]]:
    """day -> profile columns outside the suite's bounds (what GX reports as unexpected rows)."""
    out: dict[str, list[str]] = {}
    for gate in drift_gates(template):
        low = -math.inf if gate.min_value is None else gate.min_value
        high = math.inf if gate.max_value is None else gate.max_value
        for day in profile.frame.filter(~pl.col(gate.column).is_between(low, high))["day"]:
            out.setdefault(day, []).append(gate.column)
    return out


@pytest.fixture(scope="module")
def history() -> pl.DataFrame:
    return clean_days(FIRST, 20, seed=1)


def test_clean_day_passes_and_shifted_days_are_flagged_by_the_statistic_that_moved(history: pl.DataFrame) -> None:
    template = suite()
    day = FIRST + timedelta(days=20)
    rng = np.random.default_rng(2)
    clean = rng.standard_normal(ROWS)
    # Same mean and stdev as N(0, 1), another shape: two tight clusters at -1 and +1.
    bimodal = np.sign(rng.standard_normal(ROWS)) * math.sqrt(1 - 0.1**2) + 0.1 * rng.standard_normal(ROWS)
    cases = {
        "clean": (clean, set()),
        "mean +0.5": (clean + 0.5, {"mean_z__a", "kl_score__a"}),
        "stdev x2": (clean * 2, {"stdev_z__a", "kl_score__a"}),
        "shape only": (bimodal, {"kl_score__a"}),
    }
    for name, (values, expected) in cases.items():
        profile = drift_profile(day_frame(day, values, clean), history, template, source="test")
        flagged = set(breaches(profile, template).get(day.isoformat(), []))
        assert flagged == expected, name
        assert profile.not_evaluated == {}


def test_mean_score_is_the_students_t_prediction_as_a_normal_quantile() -> None:
    """Reference day means 0..4 (m = 5), day mean 10: t = (10 - 2) / (sd(0..4) * sqrt(1 + 1/5)), 4 df."""
    from scipy import stats

    reference = pl.concat([day_frame(FIRST + timedelta(days=i), np.array([i - 1.0, i + 1.0])) for i in range(5)])
    day = FIRST + timedelta(days=5)
    profile = drift_profile(day_frame(day, np.array([9.0, 11.0])), reference, suite(), source="test")
    t = (10 - 2) / (np.std([0, 1, 2, 3, 4], ddof=1) * math.sqrt(1 + 1 / 5))
    assert scores(profile, day.isoformat())["mean_z__a"] == pytest.approx(stats.norm.isf(stats.t.sf(t, 4)))
    # Every reference day has the same stdev: a day with the same one scores 0.
    assert scores(profile, day.isoformat())["stdev_z__a"] == pytest.approx(0.0)
    row = profile.references[day.isoformat()].filter(pl.col("statistic") == "mean").row(0, named=True)
    assert row["observed"] == 10 and row["center"] == 2 and row["reference_rows"] == 10 and row["day_rows"] == 2
    # The raw bounds are where the score meets the suite's bound.
    half_width = stats.t.isf(stats.norm.sf(3.4), 4) * np.std([0, 1, 2, 3, 4], ddof=1) * math.sqrt(1.2)
    assert (row["lower"], row["upper"]) == pytest.approx((2 - half_width, 2 + half_width))


def test_tail_df_caps_the_degrees_of_freedom_of_the_prediction() -> None:
    """12 reference days (11 df) under meta.tail_df = 8: the score and the raw bounds use 8 df."""
    from scipy import stats

    means = np.arange(12.0)
    reference = pl.concat(
        [day_frame(FIRST + timedelta(days=i), np.array([m - 1.0, m + 1.0])) for i, m in enumerate(means)]
    )
    day = FIRST + timedelta(days=12)
    template = suite()
    template["meta"]["tail_df"] = 8
    capped = drift_profile(day_frame(day, np.array([19.0, 21.0])), reference, template, source="test")
    uncapped = drift_profile(day_frame(day, np.array([19.0, 21.0])), reference, suite(), source="test")
    t = (20 - means.mean()) / (np.std(means, ddof=1) * math.sqrt(1 + 1 / 12))
    assert scores(capped, day.isoformat())["mean_z__a"] == pytest.approx(stats.norm.isf(stats.t.sf(t, 8)))
    assert scores(uncapped, day.isoformat())["mean_z__a"] == pytest.approx(stats.norm.isf(stats.t.sf(t, 11)))
    # The heavier tail is the laxer gate: the same day scores lower and the raw bound lies further out.
    assert scores(capped, day.isoformat())["mean_z__a"] < scores(uncapped, day.isoformat())["mean_z__a"]
    upper = [
        p.references[day.isoformat()].filter(pl.col("statistic") == "mean")["upper"][0] for p in (capped, uncapped)
    ]
    assert upper[0] > upper[1]


def test_a_short_day_is_not_judged_against_full_days(history: pl.DataFrame) -> None:
    """An early close (here half the rows of the reference days) is left out under meta.min_day_share, saying why."""
    day = FIRST + timedelta(days=20)
    half = day_frame(day, np.random.default_rng(5).standard_normal(ROWS // 2) * 3)  # would trip on its stdev
    template = suite()
    assert breaches(drift_profile(half, history, template, source="test"), template)
    template["meta"]["min_day_share"] = 0.75
    profile = drift_profile(half, history, template, source="test")
    assert profile.frame.is_empty()
    assert "a short day: 200 vectors against a median of 400" in profile.not_evaluated[day.isoformat()]
    # A day at the share or above is judged as before.
    full = day_frame(day, np.random.default_rng(5).standard_normal(ROWS * 3 // 4) * 3)
    assert breaches(drift_profile(full, history, template, source="test"), template)


def test_kl_bound_follows_the_sample_size_of_a_day() -> None:
    """Days of 40 and of 4,000 rows: raw divergences differ a hundredfold, the scores do not trip."""
    template = suite()
    for rows in (40, 4000):
        vectors = clean_days(FIRST, 60, seed=rows, rows=rows)
        profile = drift_profile(vectors, vectors.clear(), template, source="test")
        assert profile.frame.height == 55
        assert breaches(profile, template) == {}, rows
        kl = pl.concat(profile.references.values()).filter(pl.col("statistic") == "kl")["observed"]
        assert (kl.median() > 0.05) if rows == 40 else (kl.median() < 0.005)


def test_trailing_reference_draws_on_earlier_days_of_the_range_and_needs_min_partitions() -> None:
    vectors = clean_days(FIRST, 8, seed=3)
    profile = drift_profile(vectors, vectors.clear(), suite(), source="src")
    days = [(FIRST + timedelta(days=i)).isoformat() for i in range(8)]
    assert profile.not_evaluated == {days[i]: f"{i} reference partition(s), 5 needed" for i in range(5)}
    assert profile.frame["day"].to_list() == days[5:]
    assert profile.frame.columns == ["day", *[g.column for g in drift_gates(suite())]]
    last = profile.references[days[7]]
    assert last.columns == list(REFERENCE_COLUMNS)
    assert set(last["reference_days"]) == {f"{days[0]}..{days[6]}"}
    assert set(last["reference"]) == {f"trailing 7 partitions {days[0]}..{days[6]} of src"}
    assert set(last["reference_rows"]) == {7 * ROWS}


def test_trailing_reference_takes_the_last_partitions_of_history_and_range() -> None:
    history = clean_days(FIRST, 30, seed=4)
    vectors = clean_days(FIRST + timedelta(days=30), 2, seed=5)
    profile = drift_profile(vectors, history, suite(reference={**TRAILING, "partitions": 10}), source="src")
    first, second = (FIRST + timedelta(days=30)).isoformat(), (FIRST + timedelta(days=31)).isoformat()
    assert set(profile.references[first]["reference_days"]) == {"2024-01-21..2024-01-30"}
    assert set(profile.references[second]["reference_days"]) == {"2024-01-22..2024-01-31"}


def test_too_few_reference_days_leave_the_day_unevaluated(history: pl.DataFrame) -> None:
    day = FIRST + timedelta(days=20)
    short = history.filter(pl.col("ts") >= datetime.combine(FIRST + timedelta(days=17), datetime.min.time(), UTC))
    profile = drift_profile(clean_days(day, 1, seed=6), short, suite(), source="test")
    assert profile.frame.height == 0 and profile.references == {}
    assert profile.not_evaluated == {day.isoformat(): "3 reference partition(s), 5 needed"}


@pytest.mark.parametrize(
    ("reference", "described"),
    [
        ({"kind": "window", "start": "2024-01-01", "end": "2024-01-21"}, "pinned window 2024-01-01..2024-01-21"),
        ({"kind": "snapshot", "snapshot": "snap-1"}, "pinned snapshot snap-1"),
    ],
)
def test_pinned_reference_is_the_same_for_every_day(history: pl.DataFrame, reference: dict, described: str) -> None:
    template = suite(reference={**reference, "min_partitions": 5})
    # The gated days include one inside the pinned window (a re-run of a reference day): it is
    # judged against the stored window, not against itself alone, and a shifted day still breaches.
    inside = history.filter(pl.col("ts").dt.date() == FIRST + timedelta(days=3))
    later = FIRST + timedelta(days=40)
    shifted = day_frame(later, np.random.default_rng(7).standard_normal(ROWS) + 1.0)
    profile = drift_profile(pl.concat([inside, shifted]), history, template, source="store")
    assert profile.frame["day"].to_list() == [inside["ts"].dt.date()[0].isoformat(), later.isoformat()]
    for table in profile.references.values():
        assert set(table["reference"]) == {f"{described} 2024-01-01..2024-01-20 of store"}
        assert set(table["reference_rows"]) == {20 * ROWS}
    assert "mean_z__a" in breaches(profile, template)[later.isoformat()]
    assert inside["ts"].dt.date()[0].isoformat() not in breaches(profile, template)


def test_missing_feature_values_leave_the_score_empty(history: pl.DataFrame) -> None:
    day = FIRST + timedelta(days=20)
    frame = day_frame(day, np.random.default_rng(8).standard_normal(ROWS)).with_columns(
        pl.lit(None, pl.Float64).alias("b")
    )
    row = scores(drift_profile(frame, history, suite(), source="test"), day.isoformat())
    assert row["mean_z__a"] is not None
    assert [row[c] for c in ("mean_z__b", "stdev_z__b", "kl_score__b")] == [None, None, None]


def test_a_malformed_gate_is_named_with_its_fix() -> None:
    template = suite()
    template["expectations"][1]["kwargs"]["column"] = "stdev__a"
    with pytest.raises(ValueError, match=r"expectation #2 \(stdev__a\).*its column is 'stdev_z__a'"):
        drift_profile(clean_days(FIRST, 1, seed=9), clean_days(FIRST, 1, seed=9).clear(), template, source="x")
    with pytest.raises(ValueError, match="meta.reference"):
        ReferenceSpec.from_suite({"meta": {"reference": {"kind": "window", "start": "2024-01-01"}}})


def test_shipped_suite_is_valid_and_its_bounds_split_the_declared_trip_rate() -> None:
    """GX accepts it; the bounds are the Bonferroni split of meta.trip_rate_target over the critical gates."""
    from scipy import stats

    path = suite_path("feature_vectors_fs_v1_1m_drift")
    template = load_suite_json(path)
    check_expectations(path, template)
    assert template == json.loads(path.read_text())
    gates = drift_gates(template)
    assert {e["severity"] for e in template["expectations"]} <= {"critical", "warning"}
    critical = [g for g, e in zip(gates, template["expectations"], strict=True) if e["severity"] == "critical"]
    share = template["meta"]["trip_rate_target"] / len(critical)
    for gate in critical:
        if gate.statistic == "kl":
            assert gate.min_value is None
            assert gate.max_value == pytest.approx(stats.norm.isf(share), abs=0.01)
        else:
            assert -gate.min_value == gate.max_value == pytest.approx(stats.norm.isf(share / 2), abs=0.01)
    assert len(drift_columns(template)) == 10
    assert ReferenceSpec.from_suite(template) == ReferenceSpec(kind="trailing", partitions=20, min_partitions=5)


def test_great_expectations_names_the_failing_day(history: pl.DataFrame) -> None:
    """The profile validated in one GX validation: the unexpected row is the shifted day."""
    from expectations.gate import validate_days

    rng = np.random.default_rng(10)
    days = [FIRST + timedelta(days=20 + i) for i in range(3)]
    vectors = pl.concat(
        [day_frame(d, rng.standard_normal(ROWS) + (3.0 if i == 2 else 0.0)) for i, d in enumerate(days)]
    )
    profile = drift_profile(vectors, history, suite(), source="test")
    results = validate_days(profile.frame, "t_drift", suite=profile.suite)
    assert {day: result.passed for day, result in results.items()} == {
        days[0].isoformat(): True,
        days[1].isoformat(): True,
        days[2].isoformat(): False,
    }
    assert {o.column for o in results[days[2].isoformat()].blocking_failures} >= {"mean_z__a", "kl_score__a"}
