"""Quality gates: each expectation triggered by a crafted frame, and suite files that are wrong."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from expectations.gate import SUITES_DIR, SuiteFileError, validate_days, validate_frame
from marketfs.features.compute import compute_feature_vectors
from marketfs.features.events import EVENT_SCHEMA
from marketfs.features.flags import QualityFlag
from marketfs.sources import SyntheticBars, SyntheticEvents

D = datetime(2024, 1, 3, tzinfo=UTC)


@pytest.fixture(scope="module")
def clean_bars() -> pl.DataFrame:
    return SyntheticBars(instruments=("A", "B")).bars(D, D + timedelta(days=1))


@pytest.fixture(scope="module")
def clean_vectors() -> pl.DataFrame:
    start = D - timedelta(days=1)
    bars = SyntheticBars(instruments=("A", "B")).bars(start, D + timedelta(days=1))
    events = SyntheticEvents(instruments=("A", "B")).events(start, D + timedelta(days=1))
    return compute_feature_vectors(bars, "1m", events=events, start=D).vectors


def failed(frame: pl.DataFrame, suite: str) -> set[str]:
    gate = validate_frame(frame, suite)
    return {o.label for o in gate.blocking_failures}


def at(frame: pl.DataFrame, row: int, **values) -> pl.DataFrame:
    hit = pl.int_range(pl.len()) == row
    return frame.with_columns(
        [pl.when(hit).then(pl.lit(v, frame.schema[c])).otherwise(pl.col(c)).alias(c) for c, v in values.items()]
    )


def test_clean_partitions_pass(clean_bars: pl.DataFrame, clean_vectors: pl.DataFrame) -> None:
    assert failed(clean_bars, "raw_ohlcv") == set()
    assert failed(clean_vectors, "feature_vectors_fs_v1_1m") == set()


@pytest.mark.parametrize(
    ("change", "expectation"),
    [
        ({"low": 1e6}, "expect_column_pair_values_a_to_be_greater_than_b(high,low)"),
        ({"open": 1e6}, "expect_column_pair_values_a_to_be_greater_than_b(high,open)"),
        ({"close": 1e-6}, "expect_column_pair_values_a_to_be_greater_than_b(close,low)"),
        ({"open": 1e-6}, "expect_column_pair_values_a_to_be_greater_than_b(open,low)"),
        ({"close": 1e6}, "expect_column_pair_values_a_to_be_greater_than_b(high,close)"),
        ({"open": 0.0, "low": 0.0}, "expect_column_values_to_be_between(open)"),
        ({"low": -1.0}, "expect_column_values_to_be_between(low)"),
        ({"volume": -5.0}, "expect_column_values_to_be_between(volume)"),
        ({"close": float("nan")}, "expect_column_values_to_not_be_null(close)"),
        ({"instrument_id": None}, "expect_column_values_to_not_be_null(instrument_id)"),
        ({"volume": float("nan")}, "expect_column_values_to_not_be_null(volume)"),
        ({"volume": float("inf")}, "expect_column_values_to_be_between(volume)"),
        ({"volume": 1e16}, "expect_column_values_to_be_between(volume)"),
        ({"close": float("inf"), "high": float("inf")}, "expect_column_values_to_be_between(close)"),
        ({"low": float("-inf")}, "expect_column_values_to_be_between(low)"),
        ({"high": 1e9}, "expect_column_values_to_be_between(high)"),
    ],
)
def test_each_raw_bar_expectation_blocks(clean_bars: pl.DataFrame, change: dict, expectation: str) -> None:
    assert expectation in failed(at(clean_bars, 10, **change), "raw_ohlcv")


def test_duplicate_and_off_grid_bars_are_warnings_not_blocks(clean_bars: pl.DataFrame) -> None:
    crafted = pl.concat([clean_bars, clean_bars[:1], clean_bars[1:2].with_columns(pl.col("ts") + timedelta(seconds=7))])
    gate = validate_frame(crafted, "raw_ohlcv")
    assert gate.passed
    assert {o.label for o in gate.failures} == {
        "expect_compound_columns_to_be_unique(instrument_id,ts)",
        "expect_column_values_to_be_in_set(ts_offgrid_us)",
    }


@pytest.mark.parametrize(
    ("change", "expectation"),
    [
        ({"sentiment": 1.5}, "expect_column_values_to_be_between(sentiment)"),
        ({"confidence": -0.1}, "expect_column_values_to_be_between(confidence)"),
        ({"published_at": None}, "expect_column_values_to_not_be_null(published_at)"),
        ({"sentiment": float("nan")}, "expect_column_values_to_not_be_null(sentiment)"),
        ({"confidence": float("inf")}, "expect_column_values_to_be_between(confidence)"),
    ],
)
def test_each_raw_event_expectation_blocks(change: dict, expectation: str) -> None:
    events = pl.DataFrame(
        [(f"e{i}", "A", D + timedelta(minutes=i), 0.1, 0.5, "wire") for i in range(5)],
        schema=EVENT_SCHEMA,
        orient="row",
    )
    assert failed(events, "raw_events") == set()
    assert expectation in failed(at(events, 2, **change), "raw_events")


@pytest.mark.parametrize(
    ("change", "expectation"),
    [
        ({"rsi_14": 101.0}, "expect_column_values_to_be_between(rsi_14)"),
        ({"vol_20": -0.01}, "expect_column_values_to_be_between(vol_20)"),
        ({"ret_1": 0.9}, "expect_column_values_to_be_between(ret_1)"),
        ({"atr_14": -1.0}, "expect_column_values_to_be_between(atr_14)"),
        ({"volume_z_20": 5.0}, "expect_column_values_to_be_between(volume_z_20)"),
        ({"sentiment_mean_1h": -1.2}, "expect_column_values_to_be_between(sentiment_mean_1h)"),
        ({"sentiment_conf_mean_1h": 1.1}, "expect_column_values_to_be_between(sentiment_conf_mean_1h)"),
        ({"bb_lower": 1e9}, "expect_column_pair_values_a_to_be_greater_than_b(bb_upper,bb_lower)"),
        ({"macd": None}, "expect_column_values_to_be_in_set(unexplained_nulls)"),
        ({"instrument_id": None}, "expect_column_values_to_not_be_null(instrument_id)"),
    ],
)
def test_each_vector_expectation_blocks(clean_vectors: pl.DataFrame, change: dict, expectation: str) -> None:
    assert expectation in failed(at(clean_vectors, 100, **change), "feature_vectors_fs_v1_1m")


def test_duplicate_vector_keys_block(clean_vectors: pl.DataFrame) -> None:
    crafted = pl.concat([clean_vectors, clean_vectors[5:6]])
    assert "expect_compound_columns_to_be_unique(instrument_id,timeframe,ts,feature_set_version)" in failed(
        crafted, "feature_vectors_fs_v1_1m"
    )


def test_share_of_a_flag_above_its_ceiling_blocks(clean_vectors: pl.DataFrame) -> None:
    n = clean_vectors.height
    crafted = clean_vectors.with_columns(
        pl.when(pl.int_range(pl.len()) < n // 10)
        .then(pl.col("quality_flags").list.concat(pl.lit(["MISSING_OHLCV"])))
        .otherwise(pl.col("quality_flags"))
    )
    assert "expect_column_values_to_be_between(share__flag_MISSING_OHLCV)" in failed(
        crafted, "feature_vectors_fs_v1_1m"
    )


def _with_days(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """The frames as the given days: timestamps moved to the day (the key includes ts), ``day`` set."""
    return pl.concat(
        [
            f.with_columns(
                pl.col("ts") + (datetime.fromisoformat(day).replace(tzinfo=UTC) - D), pl.lit(day).alias("day")
            )
            for day, f in frames.items()
        ]
    )


def _missing_share(vectors: pl.DataFrame, share: float) -> pl.DataFrame:
    hit = pl.int_range(pl.len()) < int(vectors.height * share)
    return vectors.with_columns(
        pl.when(hit)
        .then(pl.col("quality_flags").list.concat(pl.lit(["MISSING_OHLCV"])))
        .otherwise(pl.col("quality_flags"))
    )


def test_a_flag_share_verdict_is_the_days_own_whatever_ran_beside_it(clean_vectors: pl.DataFrame) -> None:
    """30% MISSING_OHLCV on one day breaches its 5% ceiling alone and inside 31 days; 3% passes in both."""
    bad, fine = _missing_share(clean_vectors, 0.30), _missing_share(clean_vectors, 0.03)
    alone = validate_days(_with_days({"2024-01-17": bad}), "feature_vectors_fs_v1_1m")
    assert not alone["2024-01-17"].passed
    days = {f"2024-01-{d:02d}": clean_vectors for d in range(1, 32)}
    in_range = validate_days(_with_days({**days, "2024-01-17": bad, "2024-01-18": fine}), "feature_vectors_fs_v1_1m")
    assert [d for d, r in in_range.items() if not r.passed] == ["2024-01-17"]
    assert {o.label for o in in_range["2024-01-17"].blocking_failures} == {
        o.label for o in alone["2024-01-17"].blocking_failures
    }
    [share] = [o for o in in_range["2024-01-17"].outcomes if o.column == "share__flag_MISSING_OHLCV"]
    assert share.observed_value == pytest.approx(0.30, abs=0.01) and share.element_count == clean_vectors.height
    assert validate_days(_with_days({"2024-01-18": fine}), "feature_vectors_fs_v1_1m")["2024-01-18"].passed


def test_a_bad_bar_fails_only_its_day_and_names_instrument_and_ts(clean_bars: pl.DataFrame) -> None:
    bad = at(clean_bars, 10, close=-5.0)
    alone = validate_days(_with_days({"2024-04-03": bad}), "raw_ohlcv")
    in_range = validate_days(
        _with_days({"2024-04-02": clean_bars, "2024-04-03": bad, "2024-04-04": clean_bars}), "raw_ohlcv"
    )
    assert [d for d, r in in_range.items() if not r.passed] == ["2024-04-03"]
    assert {o.label for o in alone["2024-04-03"].blocking_failures} == {
        o.label for o in in_range["2024-04-03"].blocking_failures
    }
    [between] = [
        o for o in in_range["2024-04-03"].blocking_failures if o.label == "expect_column_values_to_be_between(close)"
    ]
    row = bad.row(10, named=True)
    assert between.unexpected_count == 1
    moved = row["ts"] + (datetime(2024, 4, 3, tzinfo=UTC) - D)
    assert between.partial_unexpected[0].startswith(f"{row['instrument_id']} {moved}")
    assert "close=-5.0" in between.partial_unexpected[0]


def test_mostly_over_rows_is_refused(clean_vectors: pl.DataFrame, tmp_path: Path) -> None:
    suite = tmp_path / "s.json"
    suite.write_text(
        json.dumps(
            {
                "name": "s",
                "expectations": [
                    {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "ret_1", "mostly": 0.9}}
                ],
            }
        )
    )
    with pytest.raises(SuiteFileError, match=r"s.json: expectation #1 .* `mostly` over rows.*share__"):
        validate_frame(clean_vectors, "s", suite_file=suite)


def test_editing_a_threshold_in_the_json_changes_the_gate(
    clean_vectors: pl.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suites = tmp_path / "suites"
    shutil.copytree(SUITES_DIR, suites)
    path = suites / "feature_vectors_fs_v1_1m.json"
    suite = json.loads(path.read_text())
    for e in suite["expectations"]:
        if e["kwargs"].get("column") == "ret_1":
            e["kwargs"]["max_value"] = 0.0001
    path.write_text(json.dumps(suite))
    monkeypatch.setenv("MARKETFS_SUITES_DIR", str(suites))
    assert "expect_column_values_to_be_between(ret_1)" in failed(clean_vectors, "feature_vectors_fs_v1_1m")


def test_malformed_suite_files_name_the_file_and_expectation(clean_vectors: pl.DataFrame, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x", "expectations": [\n  {"type": oops}\n]}')
    with pytest.raises(SuiteFileError, match=r"broken.json: not valid JSON at line 2"):
        validate_frame(clean_vectors, "x", suite_file=broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(
        json.dumps(
            {
                "name": "x",
                "expectations": [
                    {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "ts"}},
                    {"type": "expect_column_values_to_be_betwen", "kwargs": {"column": "ret_1", "min_value": 0}},
                ],
            }
        )
    )
    with pytest.raises(SuiteFileError, match=r"wrong.json: expectation #2 \(expect_column_values_to_be_betwen\)"):
        validate_frame(clean_vectors, "x", suite_file=wrong)


def _suite_expectations(name: str) -> list[dict]:
    return json.loads((SUITES_DIR / f"{name}.json").read_text())["expectations"]


def _flag_of(column: str | None) -> str | None:
    """The quality flag a derived suite's column reads (``flag_X`` or ``share__flag_X``), if any."""
    name = (column or "").removeprefix("share__")
    return name.removeprefix("flag_") if name.startswith("flag_") else None


def test_a_raw_warning_cannot_block_a_derived_suite() -> None:
    """Each blocking expectation of a derived suite on a flag is backed by a blocking raw expectation that
    raises that flag, or says in its `why` why it blocks; a flag that only restates a raw warning never blocks."""
    raw = [e for suite in ("raw_ohlcv", "raw_events") for e in _suite_expectations(suite)]
    for expectation in raw:  # a raw expectation that says it raises a flag declares it in meta.flags
        why = (expectation.get("meta") or {}).get("why", "")
        named = {flag.value for flag in QualityFlag if flag.value in why}
        assert named <= set((expectation.get("meta") or {}).get("flags", [])), expectation
    raised = {
        severity: {
            f for e in raw if e.get("severity", "critical") == severity for f in (e.get("meta") or {}).get("flags", [])
        }
        for severity in ("critical", "warning")
    }
    assert raised["warning"] == {"TIMESTAMP_MISMATCH"}
    derived = [p.stem for p in SUITES_DIR.glob("feature_vectors_*.json")]
    assert {"feature_vectors_fs_v1_1m", "feature_vectors_fs_v1_1d"} <= set(derived)
    checked = 0
    for suite in derived:
        for expectation in _suite_expectations(suite):
            flag = _flag_of(expectation["kwargs"].get("column"))
            if flag is None or expectation.get("severity", "critical") != "critical":
                continue
            checked += 1
            where = f"{suite}: {expectation['kwargs']['column']}"
            assert flag not in raised["warning"] - raised["critical"], f"{where} blocks on a raw warning"
            why = (expectation.get("meta") or {}).get("why", "")
            assert flag in raised["critical"] or "blocks" in why, f"{where} blocks without saying why"
    assert checked >= 4


def test_an_off_grid_and_a_duplicate_bar_warn_and_block_nothing(dsn: str, engine, tmp_path: Path) -> None:
    """With the sample's two instruments, one flagged bar flags one of two daily vectors (50%): a share no
    ceiling on TIMESTAMP_MISMATCH may block, since the raw suite keeps both bars as warnings."""
    from dagster_helpers import materialize_range
    from test_day_is_the_unit import DAYS, evaluations, land_days, rows

    def off_grid_and_duplicate(day: str, bars: pl.DataFrame) -> pl.DataFrame:
        if day != DAYS[1]:
            return bars
        # A re-delivery of a bar, in a second file, with another volume (an identical copy is the same fact,
        # dropped on landing; conflicting copies within one file are a file error).
        bars[300:301].with_columns(pl.col("volume") + 1).write_parquet(tmp_path / "bars" / f"{day}-resent.parquet")
        return pl.concat([bars, bars[100:101].with_columns(pl.col("ts") + timedelta(seconds=30))])

    land_days(tmp_path, off_grid_and_duplicate)
    result = materialize_range(dsn, DAYS[0], DAYS[-1], landing_dir=tmp_path)
    assert result.success
    import dagster as dg

    failed = {
        (e.asset_key.to_user_string(), e.partition): e.severity
        for e in result.get_asset_check_evaluations()
        if e.check_name == "quality_gate" and not e.passed
    }
    # The UI shows the day's warnings as a failed WARN check on the written partition, not as a pass.
    assert failed.get(("raw_ohlcv", DAYS[1])) == dg.AssetCheckSeverity.WARN
    assert failed.get(("feature_vectors_fs_v1_1d", DAYS[1])) == dg.AssetCheckSeverity.WARN
    assert set(failed.values()) == {dg.AssetCheckSeverity.WARN}
    # (1d vectors of a three-day history also warn on every day: INSUFFICIENT_OHLCV is a warning there.)
    assert {day for asset, day in failed if asset == "raw_ohlcv"} == {DAYS[1]}
    for asset in ("raw_ohlcv", "feature_vectors_fs_v1_1m", "feature_vectors_fs_v1_1d"):
        assert set(evaluations(result, asset)) == set(DAYS), asset
    served = "SELECT DISTINCT to_char(ts, 'YYYY-MM-DD') FROM feature_vectors WHERE timeframe = :tf ORDER BY 1"
    for timeframe in ("1m", "1d"):
        assert rows(engine, served, tf=timeframe) == [(d,) for d in DAYS]
    warned = rows(
        engine,
        "SELECT asset, column_name FROM quality_log WHERE partition = :d AND NOT success AND severity = 'warning'",
        d=DAYS[1],
    )
    assert ("raw_ohlcv", "ts_offgrid_us") in warned and ("raw_ohlcv", "instrument_id,ts") in warned
    assert ("feature_vectors_fs_v1_1d", "share__flag_TIMESTAMP_MISMATCH") in warned
    [check] = [
        e
        for e in result.get_asset_check_evaluations()
        if e.asset_key.to_user_string() == "feature_vectors_fs_v1_1d" and e.partition == DAYS[1]
    ]
    assert "FAILED expect_column_values_to_be_between(share__flag_TIMESTAMP_MISMATCH)" in check.metadata
    assert not rows(engine, "SELECT * FROM quarantine_batches")
