"""Feature sets as declarations: what derives from them, when code versions change, and fs_v2's values."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa
import talib

from expectations import generate
from marketfs import catalog
from marketfs.db import engine_for
from marketfs.features import families, market, registry
from marketfs.features.code_version import code_version
from marketfs.features.compute import compute_feature_vectors
from marketfs.features.registry import FEATURE_SETS, DeclarationError, FeatureSet, feature
from marketfs.features.resample import resample, resampled_with_warmup
from marketfs.sources.synthetic import SyntheticBars
from marketfs.store import migrations
from marketfs.store.migrations import MIGRATIONS, migrate
from tests.dagster_helpers import ALL, materialize_range

FS_V1, FS_V2 = FEATURE_SETS["fs_v1"], FEATURE_SETS["fs_v2"]
ROOT = Path(__file__).resolve().parents[1]
START = datetime(2024, 1, 2, tzinfo=UTC)


def _replace_feature(fs: FeatureSet, name: str, **changes) -> FeatureSet:
    return dataclasses.replace(
        fs, features=tuple(dataclasses.replace(f, **changes) if f.name == name else f for f in fs.features)
    )


# --- derived files ----------------------------------------------------------------------------


def test_committed_suites_and_catalog_are_what_the_declarations_give() -> None:
    """CI runs this: a declaration or policy edit without `make docs` fails here, naming the files."""
    assert generate.stale_suites() == [], "run `make docs` and commit expectations/suites/ and docs/features.md"
    assert catalog.main(["--check"]) == 0


def test_a_changed_bound_makes_exactly_its_suite_stale(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    generate.write_suites(tmp_path)
    assert generate.stale_suites(tmp_path) == []
    monkeypatch.setitem(registry.FEATURE_SETS, "fs_v2", _replace_feature(FS_V2, "rsi_7", bounds=(5, 95)))
    assert generate.stale_suites(tmp_path) == ["feature_vectors_fs_v2_1m.json", "feature_vectors_fs_v2_5m.json"]
    generate.write_suites(tmp_path)
    suite = json.loads((tmp_path / "feature_vectors_fs_v2_5m.json").read_text())
    [rsi] = [e for e in suite["expectations"] if e["kwargs"].get("column") == "rsi_7"]
    assert (rsi["kwargs"]["min_value"], rsi["kwargs"]["max_value"]) == (5, 95)


def test_suites_take_bounds_from_features_and_ceilings_from_the_policy() -> None:
    policy = generate.load_policy()
    suite = generate.quality_suite(FS_V1, "1d", policy)
    by_column = {e["kwargs"].get("column"): e for e in suite["expectations"]}
    assert by_column["vol_20"]["kwargs"] == {"column": "vol_20", "min_value": 0, "max_value": 1.0}  # per timeframe
    assert by_column["rsi_14"]["kwargs"] == {"column": "rsi_14", "min_value": 0, "max_value": 100}  # the family's
    assert by_column["volume_z_20"]["kwargs"]["max_value"] == 4.3  # 19/sqrt(20) = 4.249, rounded up
    assert by_column["share__flag_INSUFFICIENT_OHLCV"]["severity"] == "warning"  # [flag_share.1d] override
    assert generate.quality_suite(FS_V1, "1m", policy)["expectations"] != suite["expectations"]
    drift = generate.drift_suite(FS_V2, "5m", policy)
    assert {e["meta"]["feature"] for e in drift["expectations"]} == set(FS_V2.drift_features("5m"))
    assert generate.drift_suite(FS_V1, "1d", policy) is None  # 1d is not in the policy's drift timeframes


def test_a_bad_declaration_is_refused_naming_the_feature() -> None:
    twice = dataclasses.replace(FS_V2, features=(*FS_V2.features, feature("rsi_7", "rsi", n=9)))
    with pytest.raises(DeclarationError, match="feature 'rsi_7' is declared twice"):
        registry._validate(twice, "fs_v2.py")
    unknown = dataclasses.replace(FS_V2, features=(feature("x_1", "kalman", q=1),))
    with pytest.raises(DeclarationError, match="fs_v2.py: feature set 'fs_v2': feature 'x_1'.*unknown feature family"):
        registry._validate(unknown, "fs_v2.py")
    missing = dataclasses.replace(FS_V2, features=(feature("rsi_x", "rsi"),))
    with pytest.raises(DeclarationError, match="feature 'rsi_x'"):
        registry._validate(missing, "fs_v2.py")


# --- code versions ----------------------------------------------------------------------------


def test_the_code_version_is_the_same_in_every_process() -> None:
    here = {(fs.version, tf): code_version(fs, tf) for fs in FEATURE_SETS.values() for tf in fs.timeframes}
    script = (
        "from marketfs.features.code_version import code_version\n"
        "from marketfs.features.registry import FEATURE_SETS\n"
        "print({(fs.version, tf): code_version(fs, tf) for fs in FEATURE_SETS.values() for tf in fs.timeframes})"
    )
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert there.stdout.strip() == repr(here)
    assert len(set(here.values())) == len(here)


def test_the_code_version_follows_the_declaration_and_only_it() -> None:
    before = code_version(FS_V1, "1m")
    assert (
        code_version(_replace_feature(FS_V1, "bb_upper", params=(("k", 2.5), ("n", 20), ("output", "upper"))), "1m")
        != before
    )
    assert code_version(_replace_feature(FS_V1, "ret_1", bounds=(-0.3, 0.3)), "1m") != before  # the gate decides writes
    # Words about a feature do not change what is computed or written.
    assert (
        code_version(_replace_feature(FS_V1, "ret_1", description="a new description", owner="someone"), "1m") == before
    )
    # Another timeframe's features do not either.
    assert code_version(_replace_feature(FS_V1, "event_count_1d", bounds=(0, 5)), "1m") == before


def test_the_code_version_follows_the_source_of_the_math_and_only_that(monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2 = code_version(FS_V1, "1m"), code_version(FS_V2, "5m")

    def scaled_bollinger(n: int, k: float, output: str) -> pl.Expr:
        return market.bollinger(n, k, output) * 1.0

    with monkeypatch.context() as patch:  # a family's math edited
        patch.setitem(
            families.FAMILIES,
            "bollinger",
            dataclasses.replace(
                families.FAMILIES["bollinger"], expr=lambda p: scaled_bollinger(p["n"], p["k"], p["output"])
            ),
        )
        assert code_version(FS_V1, "1m") != v1 and code_version(FS_V2, "5m") != v2

    def window_std(x: pl.Expr, n: int, ddof: int) -> pl.Expr:  # a helper two calls deep
        return (x.rolling_var(n, ddof=ddof)).sqrt()

    with monkeypatch.context() as patch:
        patch.setattr(market, "window_std", window_std)
        assert code_version(FS_V1, "1m") != v1

    def ema_cross(fast: int, slow: int) -> pl.Expr:  # only fs_v2 declares an EMA crossover
        return pl.lit(0.0)

    with monkeypatch.context() as patch:
        patch.setattr("marketfs.features.recursive.ema_cross", ema_cross)
        assert code_version(FS_V1, "1m") == v1
        assert code_version(FS_V2, "5m") != v2
    assert (code_version(FS_V1, "1m"), code_version(FS_V2, "5m")) == (v1, v2)


# --- fs_v2's values ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minutes() -> pl.DataFrame:
    return SyntheticBars(instruments=("A", "B"), seed=11).bars(START, START + timedelta(days=4))


@pytest.mark.parametrize("timeframe", ["1m", "5m"])
def test_rsi_7_and_the_ema_crossover_equal_ta_lib(minutes: pl.DataFrame, timeframe: str) -> None:
    bars = minutes if timeframe == "1m" else resample(minutes, "5m")
    vectors = compute_feature_vectors(bars, timeframe, feature_set=FS_V2).vectors
    checked = 0
    for (instrument,), own in bars.sort("ts").group_by("instrument_id"):
        close = own["close"].to_numpy()
        expected = {
            "rsi_7": talib.RSI(close, 7),
            "rsi_14": talib.RSI(close, 14),
            "ema_cross_12_26": talib.EMA(close, 12) / talib.EMA(close, 26) - 1,
        }
        got = own.select("ts").join(vectors.filter(pl.col("instrument_id") == instrument), on="ts", how="left")
        for name, values in expected.items():
            ours = got[name].to_numpy().astype(float)
            assert np.array_equal(np.isnan(values), np.isnan(ours)), name
            np.testing.assert_allclose(ours[~np.isnan(values)], values[~np.isnan(values)], rtol=1e-9, err_msg=name)
            checked += int((~np.isnan(values)).sum())
    assert checked > 1000


def test_five_minute_bars_hold_their_minutes_and_are_stamped_at_the_last_one() -> None:
    ts = [datetime(2024, 1, 2, 9, 30, tzinfo=UTC) + timedelta(minutes=i) for i in range(7)]
    minute = pl.DataFrame(
        {
            "instrument_id": ["A"] * 7,
            "ts": ts,
            "open": [10.0, 11, 12, 13, 14, 15, 16],
            "high": [10.5, 11.5, 19.0, 13.5, 14.5, 15.5, 16.5],
            "low": [9.5, 8.0, 11.5, 12.5, 13.5, 14.5, 15.5],
            "close": [10.2, 11.2, 12.2, 13.2, 14.2, 15.2, 16.2],
            "volume": [100.0, 200, 300, 400, 500, 600, 700],
        }
    )
    out = resample(minute, "5m")
    assert out.select("ts", "open", "high", "low", "close", "volume").rows() == [
        (datetime(2024, 1, 2, 9, 34, tzinfo=UTC), 10.0, 19.0, 8.0, 14.2, 1500.0),
        (datetime(2024, 1, 2, 9, 39, tzinfo=UTC), 15.0, 16.5, 14.5, 16.2, 1300.0),
    ]


def test_five_minute_days_run_one_by_one_equal_one_pass(minutes: pl.DataFrame) -> None:
    """Each day from its warm-up minutes (cut where a stored read would cut them) and the previous
    day's state, as the asset runs it, gives the bits of one pass over the whole history."""
    whole = compute_feature_vectors(resample(minutes, "5m"), "5m", feature_set=FS_V2).vectors
    warmup = FS_V2.warmup_bars("5m")
    read_limit = (warmup + 1) * 5
    state, days = None, []
    for offset in range(4):
        start, end = START + timedelta(days=offset), START + timedelta(days=offset + 1)
        warm = minutes.filter(pl.col("ts") < start).group_by("instrument_id", maintain_order=True).tail(read_limit)
        read = pl.concat([warm, minutes.filter((pl.col("ts") >= start) & (pl.col("ts") < end))])
        bars = resampled_with_warmup(read, "5m", start, read_limit)
        run = compute_feature_vectors(
            bars, "5m", state=state, feature_set=FS_V2, start=start, end=end, warmup_limit=warmup
        )
        days.append(run.vectors)
        # What read_state_before gives the next day: each instrument's newest state.
        kept = run.state if state is None else pl.concat([state, run.state])
        state = kept.sort("ts").group_by("instrument_id", maintain_order=True).last()
    assert pl.concat(days).sort("instrument_id", "ts").equals(whole)


# --- side by side, end to end -----------------------------------------------------------------


def test_fs_v2_is_materialised_beside_fs_v1_gated_by_its_own_suites_and_served(dsn: str, engine: sa.Engine) -> None:
    from marketfs.retrieval import latest, training_frame

    result = materialize_range(dsn, "2024-01-02", "2024-01-03", assets=ALL)
    assert result.success
    with engine.connect() as conn:
        counts = dict(
            conn.execute(
                sa.text("SELECT feature_set_version || '/' || timeframe, count(*) FROM feature_vectors GROUP BY 1")
            ).all()
        )
        logged = set(conn.execute(sa.text("SELECT DISTINCT suite FROM quality_log")).scalars())
    assert set(counts) == {"fs_v1/1m", "fs_v1/1d", "fs_v2/1m", "fs_v2/5m"}
    assert counts["fs_v2/1m"] == counts["fs_v1/1m"] and 0 < counts["fs_v2/5m"] < counts["fs_v2/1m"] / 4
    assert {"feature_vectors_fs_v2_1m", "feature_vectors_fs_v2_5m"} <= logged

    served = latest(["SYN000", "SYN001"], ["rsi_7", "ema_cross_12_26"], "5m", feature_set="fs_v2", dsn=dsn)
    assert served["ts"].dt.minute().to_list() == [59, 59] and served["rsi_7"].null_count() == 0
    entities = served.select("instrument_id", (pl.col("ts") + timedelta(minutes=2)).alias("ts"))
    frame = training_frame(entities, ["rsi_7"], timedelta(minutes=5), timeframe="5m", feature_set="fs_v2", dsn=dsn)
    assert frame["rsi_7"].to_list() == served["rsi_7"].to_list()


def test_assets_carry_the_declaration_in_standard_metadata() -> None:
    from assets.features import FEATURE_ASSETS

    by_name = {a.key.to_user_string(): a for a in FEATURE_ASSETS}
    assert set(by_name) == {
        f"feature_vectors_{fs.version}_{tf}" for fs in FEATURE_SETS.values() for tf in fs.timeframes
    }
    spec = next(iter(by_name["feature_vectors_fs_v2_5m"].specs))
    assert spec.owners == ["team:quant-platform"] and {"postgres", "polars"} <= set(spec.kinds)
    assert spec.code_version == code_version(FS_V2, "5m")
    columns = [c.name for c in spec.metadata["dagster/column_schema"].columns]
    assert columns[:4] == ["instrument_id", "timeframe", "ts", "feature_set_version"] and "rsi_7" in columns
    checks = {c.name for c in by_name["feature_vectors_fs_v2_5m"].check_specs}
    assert checks == {"quality_gate", "drift_gate"}
    assert {c.name for c in by_name["feature_vectors_fs_v1_1d"].check_specs} == {"quality_gate"}


# --- stored state -----------------------------------------------------------------------------


def test_fs_v1_state_stored_before_the_rename_carries_over(empty_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(migrations, "MIGRATIONS", MIGRATIONS[:7])
        patch.setattr(migrations, "all_state_columns", lambda: [])  # as the release before declarations left it
        migrate(empty_dsn)
    engine = engine_for(empty_dsn)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO feature_state (instrument_id, timeframe, feature_set_version, ts, bars_seen, ema_fast, "
                "rsi_avg_gain, atr) VALUES ('A', '1m', 'fs_v1', '2024-01-02 23:59+00', 400, 101.5, 0.25, 0.75)"
            )
        )
    assert MIGRATIONS[7].name in migrate(empty_dsn)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT macd12_26_9_fast, rsi14_avg_gain, atr14, rsi7_avg_gain FROM feature_state")
        ).one()
    assert tuple(row) == (101.5, 0.25, 0.75, None)
