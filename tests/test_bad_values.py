"""Bars no price can be: NaN, inf and absurd values are verdicts for their day, and never served."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest
import sqlalchemy as sa
from dagster_helpers import materialize_range

from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.features.compute import compute_feature_vectors
from marketfs.sources import SyntheticBars, SyntheticEvents
from marketfs.store.bars import replace_bars
from marketfs.store.copy import NonFiniteWriteError
from marketfs.store.migrations import BAR_VALUE_COLUMNS, finite_constraint_name, migrate
from marketfs.store.quality import QuarantineError, log_verdicts, release

INSTRUMENTS = ("AAA", "BBB")
CLEAN = "2024-04-02"
# One spoiled bar (row 200 of the day's file) per day, each a value no price or volume can be.
SPOILED = {
    "2024-04-03": {"close": float("nan")},
    "2024-04-04": {"close": 1e300, "high": 1e300},
    "2024-04-05": {"close": float("inf"), "high": float("inf")},
    "2024-04-08": {"volume": float("inf")},
}
SPOILED_ROW = 200


def _start(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


def _day_bars(day: str) -> pl.DataFrame:
    return SyntheticBars(instruments=INSTRUMENTS).bars(_start(day), _start(day) + timedelta(days=1))


def _land(folder: Path, spoiled: dict[str, dict[str, float]]) -> None:
    """One bars and one events file per day from CLEAN through the last spoiled day."""
    (folder / "bars").mkdir(parents=True, exist_ok=True)
    (folder / "events").mkdir(parents=True, exist_ok=True)
    for day in [CLEAN, *spoiled]:
        hit = pl.int_range(pl.len()) == SPOILED_ROW
        values = spoiled.get(day, {})
        bars = _day_bars(day).with_columns(
            [pl.when(hit).then(pl.lit(v, pl.Float64)).otherwise(pl.col(c)).alias(c) for c, v in values.items()]
        )
        bars.write_parquet(folder / "bars" / f"{day}.parquet")
        events = SyntheticEvents(instruments=INSTRUMENTS).events(_start(day), _start(day) + timedelta(days=1))
        events.write_parquet(folder / "events" / f"{day}.parquet")


def _rows(engine: sa.Engine, query: str, **params) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(query), params)]


def _spelled(value: float) -> str:
    """A value as the gate's message writes it."""
    return {"nan": "NaN", "inf": "Infinity"}.get(str(value), repr(value))


def test_nan_inf_and_absurd_bars_are_quarantined_for_their_instrument_day_and_logged(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    _land(tmp_path, SPOILED)
    result = materialize_range(dsn, CLEAN, max(SPOILED), landing_dir=tmp_path)
    assert not result.success
    verdicts = {
        e.partition: e.passed
        for e in result.get_asset_check_evaluations()
        if e.asset_key.to_user_string() == "raw_ohlcv"
    }
    assert verdicts == {CLEAN: True, **dict.fromkeys(SPOILED, False)}
    # Each spoiled instrument-day is held alone; the other instrument's bars of the day and the clean day are
    # written; nothing non-finite is served.
    spoiled = _day_bars(CLEAN)[SPOILED_ROW]["instrument_id"][0]
    assert _rows(engine, "SELECT partition, instruments FROM quarantine_batches ORDER BY 1") == [
        (d, [spoiled]) for d in SPOILED
    ]
    stored = "SELECT DISTINCT to_char(ts, 'YYYY-MM-DD') FROM ohlcv_1m WHERE instrument_id = :i ORDER BY 1"
    assert _rows(engine, stored, i=spoiled) == [(CLEAN,)]
    assert _rows(engine, stored, i=next(i for i in INSTRUMENTS if i != spoiled)) == [(d,) for d in [CLEAN, *SPOILED]]
    # The held rows are kept as delivered, NaN and inf included.
    [(nan_rows,)] = _rows(engine, "SELECT count(*) FROM quarantine_ohlcv_1m WHERE close = 'NaN'")
    [(inf_rows,)] = _rows(engine, "SELECT count(*) FROM quarantine_ohlcv_1m WHERE volume = 'Infinity'")
    assert (nan_rows, inf_rows) == (1, 1)

    # Every verdict of every day is logged, the NaN day's included (it used to crash the log).
    failed = _rows(
        engine,
        "SELECT partition, column_name FROM quality_log WHERE asset = 'raw_ohlcv' AND NOT success "
        "AND severity = 'critical'",
    )
    assert ("2024-04-03", "close") in failed  # NaN counts as missing
    assert ("2024-04-04", "close") in failed and ("2024-04-04", "high_to_day_median") in failed
    assert ("2024-04-05", "close") in failed
    assert ("2024-04-08", "volume") in failed

    # A person may release an absurd price, never one that is not a number.
    [(nan_batch,)] = _rows(engine, "SELECT batch_id FROM quarantine_batches WHERE partition = '2024-04-03'")
    refused = pytest.raises(QuarantineError, match=r"batch \d+ holds 1 bar\(s\) with .* close=nan.*discard")
    with refused, engine.begin() as conn:
        release(conn, nan_batch, actor="alice", note="looks fine to me")
    assert _rows(engine, "SELECT status FROM quarantine_batches WHERE batch_id = :b", b=nan_batch) == [("held",)]

    # Each day's check names the bar; the run fails in the feature steps, for the instrument held.
    checks = {
        e.partition: "\n".join(str(v.value) for v in e.metadata.values())
        for e in result.get_asset_check_evaluations()
        if e.asset_key.to_user_string() == "raw_ohlcv"
    }
    for day, values in SPOILED.items():
        bad = _day_bars(day)[SPOILED_ROW]
        column, value = next(iter(values.items()))
        assert f"{bad['instrument_id'][0]} {bad['ts'][0]} {column}={_spelled(value)}" in checks[day]
    message = result.failure_data_for_node("feature_vectors_fs_v1_1m").error.message
    assert f"1 instrument(s) held since {min(SPOILED)}" in message and f"make recompute FROM={min(SPOILED)}" in message


def test_a_bar_fifty_times_its_day_median_is_refused_but_ten_times_is_left_to_the_feature_gate() -> None:
    from expectations.gate import validate_frame

    bars = _day_bars(CLEAN)
    hit = pl.int_range(pl.len()) == SPOILED_ROW

    def scaled(factor: float) -> set[str]:
        spiked = bars.with_columns(
            [pl.when(hit).then(pl.col(c) * factor).otherwise(pl.col(c)).alias(c) for c in ("high", "close")]
        )
        return {o.label for o in validate_frame(spiked, "raw_ohlcv").blocking_failures}

    assert scaled(100) == {"expect_column_values_to_be_between(high_to_day_median)"}
    assert scaled(10) == set()
    dropped = bars.with_columns(
        [pl.when(hit).then(pl.col(c) / 100).otherwise(pl.col(c)).alias(c) for c in ("low", "close")]
    )
    assert {o.label for o in validate_frame(dropped, "raw_ohlcv").blocking_failures} == {
        "expect_column_values_to_be_between(low_to_day_median)"
    }


def test_verdicts_with_non_finite_values_are_logged_as_strings(engine: sa.Engine) -> None:
    outcome = {
        "expectation": "expect_column_mean_to_be_between",
        "column": "close",
        "severity": "critical",
        "success": False,
        "observed_value": {"mean": float("nan"), "bounds": [float("-inf"), float("inf")]},
    }
    with engine.begin() as conn:
        log_verdicts(conn, run_id="r", asset="raw_ohlcv", partition=CLEAN, suite="raw_ohlcv", outcomes=[outcome])
    assert _rows(engine, "SELECT observed_value FROM quality_log") == [
        ({"mean": "NaN", "bounds": ["-Infinity", "Infinity"]},)
    ]


def _feature_table_columns(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        present = set(
            conn.execute(
                sa.text("SELECT column_name FROM information_schema.columns WHERE table_name = 'feature_vectors'")
            ).scalars()
        )
    return [c for c in FS_V1.names("1m") + FS_V1.names("1d") if c in present]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_the_database_refuses_non_finite_values_in_every_served_float_column(engine: sa.Engine, value: str) -> None:
    targets = [("ohlcv_1m", c) for c in BAR_VALUE_COLUMNS] + [("ohlcv_1d", c) for c in BAR_VALUE_COLUMNS]
    targets += [("feature_vectors", c) for c in _feature_table_columns(engine)]
    assert len(targets) > 20
    for table, column in targets:
        if table == "feature_vectors":
            insert = (
                "INSERT INTO feature_vectors (instrument_id, timeframe, ts, feature_set_version, "
                f"\"{column}\") VALUES ('AAA', '1m', now(), 'fs_v1', CAST(:v AS float8))"
            )
        else:
            values = ", ".join("CAST(:v AS float8)" if c == column else "1.0" for c in BAR_VALUE_COLUMNS)
            columns = "instrument_id, ts, open, high, low, close, volume"
            insert = f"INSERT INTO {table} ({columns}) VALUES ('AAA', now(), {values})"
        with pytest.raises(sa.exc.IntegrityError) as refused, engine.begin() as conn:
            conn.execute(sa.text(insert), {"v": value})
        assert isinstance(refused.value.orig, psycopg.errors.CheckViolation)
        assert refused.value.orig.diag.constraint_name == finite_constraint_name(table, column)
    # A finite value and a null feature are still welcome.
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO feature_vectors (instrument_id, timeframe, ts, feature_set_version, ret_1) "
                "VALUES ('AAA', '1m', now(), 'fs_v1', 0.01)"
            )
        )


def test_a_copy_of_a_non_finite_bar_fails_naming_table_column_and_row(engine: sa.Engine) -> None:
    bars = _day_bars(CLEAN).with_columns(pl.lit(float("inf")).alias("volume"))
    refused = pytest.raises(NonFiniteWriteError, match=r"ohlcv_1m: .* in column volume; Failing row contains \(AAA")
    with refused, engine.begin() as conn:
        replace_bars(conn, bars, _start(CLEAN), _start(CLEAN) + timedelta(days=1))
    assert _rows(engine, "SELECT count(*) FROM ohlcv_1m") == [(0,)]


def test_migrating_a_database_that_already_serves_non_finite_values(engine: sa.Engine, dsn: str) -> None:
    """A database written before the checks: its clean tables get them, its spoiled one gets them for new
    writes (NOT VALID) and a warning naming the day; once recomputed, the next migrate validates them."""
    with engine.begin() as conn:
        for table in ("ohlcv_1m", "ohlcv_1d"):
            for column in BAR_VALUE_COLUMNS:
                conn.execute(sa.text(f'ALTER TABLE {table} DROP CONSTRAINT "{finite_constraint_name(table, column)}"'))
        conn.execute(
            sa.text(
                "INSERT INTO ohlcv_1m (instrument_id, ts, open, high, low, close, volume) VALUES "
                "('AAA', '2024-04-03 14:30+00', 1, 1, 1, 1, 'Infinity'), ('AAA', '2024-04-03 14:31+00', 1, 2, 1, 2, 5)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO ohlcv_1d (instrument_id, ts, open, high, low, close, volume) "
                "VALUES ('AAA', '2024-04-03 23:59+00', 1, 2, 1, 2, 5)"
            )
        )
    with pytest.MonkeyPatch.context() as patch:
        warnings: list[str] = []
        patch.setattr("marketfs.store.migrations.logger.warning", warnings.append)
        assert migrate(dsn) == []
    [warning] = warnings
    assert warning.startswith("ohlcv_1m: ") and "2024-04-03" in warning and "make recompute" in warning

    def validated(table: str) -> dict[str, bool]:
        query = "SELECT conname, convalidated FROM pg_constraint WHERE conname LIKE :p"
        return dict(_rows(engine, query, p=f"{table}\\_%\\_finite"))

    assert set(validated("ohlcv_1d").values()) == {True} and len(validated("ohlcv_1d")) == 5
    # Some TimescaleDB versions validate NOT VALID checks on hypertables all the same (none can be added
    # yet); plain PostgreSQL and TimescaleDB 2.28 add them for new writes. The warning says which happened.
    if validated("ohlcv_1m") == {}:
        assert "not in place" in warning
    else:
        assert "in place for new writes only" in warning
        assert validated("ohlcv_1m") == {finite_constraint_name("ohlcv_1m", c): False for c in BAR_VALUE_COLUMNS}
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO ohlcv_1m (instrument_id, ts, open, high, low, close, volume) "
                    "VALUES ('BBB', '2024-04-03 14:30+00', 'NaN', 1, 1, 1, 1)"
                )
            )

    with engine.begin() as conn:  # the day recomputed without its bad bar
        conn.execute(sa.text("DELETE FROM ohlcv_1m WHERE volume = 'Infinity'"))
    warnings.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("marketfs.store.migrations.logger.warning", warnings.append)
        migrate(dsn)
    assert warnings == []
    assert set(validated("ohlcv_1m").values()) == {True} and len(validated("ohlcv_1m")) == 5


def test_feature_math_that_overflows_ends_as_null_and_flagged_never_inf() -> None:
    # A return from a tiny to a huge (valid, finite) price overflows to inf.
    t0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    closes = [1e-300] * 30 + [1e300]
    bars = pl.DataFrame(
        {
            "instrument_id": ["AAA"] * len(closes),
            "ts": [t0 + timedelta(minutes=i) for i in range(len(closes))],
            "open": closes,
            "high": closes,
            "low": closes,
            "close": closes,
            "volume": [100.0] * len(closes),
        }
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    vectors = compute_feature_vectors(bars, "1m", start=t0).vectors
    last = vectors.row(-1, named=True)
    assert last["ret_1"] is None and "COMPUTATION_ERROR" in last["quality_flags"]
    assert not any(
        isinstance(v, float) and not math.isfinite(v) for name in FS_V1.names("1m") for v in vectors[name].to_list()
    )
