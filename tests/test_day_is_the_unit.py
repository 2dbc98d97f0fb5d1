"""A trading day is the unit of truth: per-day verdicts, quarantine, writes and records in a range run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from dagster_helpers import materialize_range

from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.sources import SyntheticBars, SyntheticEvents
from marketfs.store.feature_vectors import read_vectors

INSTRUMENTS = ("AAA", "BBB")
DAYS = ["2024-04-02", "2024-04-03", "2024-04-04"]


def _start(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


def land_days(folder: Path, bars_of_day=None) -> None:
    """One bars and one events file per day of DAYS; ``bars_of_day(day, bars)`` may spoil a day."""
    (folder / "bars").mkdir(parents=True, exist_ok=True)
    (folder / "events").mkdir(parents=True, exist_ok=True)
    for day in DAYS:
        start, end = _start(day), _start(day) + timedelta(days=1)
        bars = SyntheticBars(instruments=INSTRUMENTS).bars(start, end)
        if bars_of_day is not None:
            bars = bars_of_day(day, bars)
        bars.write_parquet(folder / "bars" / f"{day}.parquet")
        SyntheticEvents(instruments=INSTRUMENTS).events(start, end).write_parquet(folder / "events" / f"{day}.parquet")


def negative_close(day: str, bars: pl.DataFrame) -> pl.DataFrame:
    if day != "2024-04-03":
        return bars
    hit = pl.int_range(pl.len()) == 200
    return bars.with_columns(
        pl.when(hit).then(-5.0).otherwise(pl.col("close")).alias("close"),
        pl.when(hit).then(-5.0).otherwise(pl.col("low")).alias("low"),
    )


def spiked_close(day: str, bars: pl.DataFrame) -> pl.DataFrame:
    """A well-formed bar ten times too high: raw passes, the day's returns breach the feature gate."""
    if day != "2024-04-03":
        return bars
    hit = pl.int_range(pl.len()) == 200
    return bars.with_columns(
        pl.when(hit).then(pl.col("close") * 10).otherwise(pl.col("close")).alias("close"),
        pl.when(hit).then(pl.col("close") * 10).otherwise(pl.col("high")).alias("high"),
    )


def rows(engine: sa.Engine, query: str, **params) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(query), params)]


def evaluations(result, asset: str, check: str = "quality_gate") -> dict[str, bool]:
    return {
        e.partition: e.passed
        for e in result.get_asset_check_evaluations()
        if e.asset_key.to_user_string() == asset and e.check_name == check
    }


def day_records(result, asset: str) -> dict[str, dict]:
    """The last materialisation of each partition (what the UI shows for it), as plain metadata."""
    latest: dict[str, dict] = {}
    for event in result.get_asset_materialization_events():
        m = event.event_specific_data.materialization
        if m.asset_key.to_user_string() == asset:
            latest[m.partition] = {k: v.value for k, v in m.metadata.items()}
    return latest


def test_a_bad_bar_holds_only_its_instrument_day_and_gets_the_verdict_it_gets_alone(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    land_days(tmp_path, negative_close)
    result = materialize_range(dsn, DAYS[0], DAYS[-1], landing_dir=tmp_path)
    assert not result.success
    assert evaluations(result, "raw_ohlcv") == {"2024-04-02": True, "2024-04-03": False, "2024-04-04": True}
    bad = SyntheticBars(instruments=INSTRUMENTS).bars(_start(DAYS[1]), _start(DAYS[2]))[200]
    held = bad["instrument_id"][0]
    assert rows(engine, "SELECT asset, partition, instruments FROM quarantine_batches") == [
        ("raw_ohlcv", "2024-04-03", [held])
    ]
    # Every day is written and materialised; the held instrument's rows of 04-03 are not among them.
    assert rows(
        engine, "SELECT DISTINCT to_char(ts, 'YYYY-MM-DD') FROM ohlcv_1m WHERE instrument_id = :i ORDER BY 1", i=held
    ) == [
        ("2024-04-02",),
        ("2024-04-04",),
    ]
    assert sorted(day_records(result, "raw_ohlcv")) == DAYS
    assert held in day_records(result, "raw_ohlcv")["2024-04-03"]["held_instruments"]
    assert {r[0] for r in rows(engine, "SELECT DISTINCT partition FROM quality_log")} == set(DAYS)
    # The run fails in the feature steps, which served the other instrument on every day.
    message = result.failure_data_for_node("feature_vectors_fs_v1_1m").error.message
    assert f"{held} since 2024-04-03 (raw_ohlcv batch" in message
    assert f"{held} {bad['ts'][0]}" in message and "close=-5.0" in message

    in_range = rows(
        engine, "SELECT expectation, column_name FROM quality_log WHERE partition = '2024-04-03' AND NOT success"
    )
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE quality_log"))
    assert not materialize_range(dsn, DAYS[1], landing_dir=tmp_path).success
    alone = rows(engine, "SELECT expectation, column_name FROM quality_log WHERE NOT success")
    assert sorted(alone) == sorted(in_range) and alone


def test_a_feature_breach_of_one_instrument_holds_it_from_that_day_and_serves_the_others(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    land_days(tmp_path, spiked_close)
    result = materialize_range(dsn, DAYS[0], DAYS[-1], landing_dir=tmp_path)
    assert not result.success
    assert evaluations(result, "raw_ohlcv") == dict.fromkeys(DAYS, True)
    assert evaluations(result, "feature_vectors_fs_v1_1m") == {
        "2024-04-02": True,
        "2024-04-03": False,
        "2024-04-04": True,
    }
    held = SyntheticBars(instruments=INSTRUMENTS).bars(_start(DAYS[1]), _start(DAYS[2]))[200]["instrument_id"][0]
    other = next(i for i in INSTRUMENTS if i != held)
    assert rows(engine, "SELECT asset, partition, instruments FROM quarantine_batches") == [
        ("feature_vectors_fs_v1_1m", "2024-04-03", [held])
    ]
    served = (
        "SELECT DISTINCT to_char(ts, 'YYYY-MM-DD') FROM feature_vectors WHERE timeframe = '1m' "
        "AND instrument_id = :i ORDER BY 1"
    )
    # The held instrument: served before its breach, not on it, not after it (its state continues the breach).
    assert rows(engine, served, i=held) == [("2024-04-02",)]
    assert rows(engine, served, i=other) == [(d,) for d in DAYS]
    records = day_records(result, "feature_vectors_fs_v1_1m")
    assert sorted(records) == DAYS
    [(served_04_02,)] = rows(
        engine, "SELECT count(*) FROM feature_vectors WHERE timeframe = '1m' AND ts < :t", t=_start(DAYS[1])
    )
    assert records["2024-04-02"]["rows"] == served_04_02
    message = result.failure_data_for_node("feature_vectors_fs_v1_1m").error.message
    assert (
        f"2024-04-03 of instrument {held} breached its gate" in message and "make recompute FROM=2024-04-03" in message
    )


def test_each_partition_records_its_own_rows_and_a_warmed_up_preview(dsn: str, engine: sa.Engine) -> None:
    result = materialize_range(dsn, DAYS[0], DAYS[-1])
    assert result.success
    records = day_records(result, "feature_vectors_fs_v1_1m")
    per_day = dict(
        rows(
            engine,
            "SELECT to_char(ts, 'YYYY-MM-DD'), count(*) FROM feature_vectors WHERE timeframe = '1m' GROUP BY 1",
        )
    )
    assert {day: r["rows"] for day, r in records.items()} == per_day
    assert all(r["ts_min"].startswith(day) for day, r in records.items())
    preview = records["2024-04-03"]["preview"]
    header, _, first = (line.split(" | ") for line in preview.splitlines()[:3])
    warmed = dict(zip(header, first, strict=True))
    # The last vector of the day, not the first bars of a history: the indicators are warmed up.
    assert all(warmed[f] != "None" for f in ("rsi_14", "macd_signal", "atr_14", "vol_20", "bb_pct_b"))
    assert set(evaluations(result, "feature_vectors_fs_v1_1m")) == set(DAYS)


def test_a_run_in_one_day_chunks_equals_a_run_in_one_chunk(
    dsn: str, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunking only bounds memory: vectors, verdicts and drift references do not depend on it
    (the trailing drift reference is carried from chunk to chunk instead of read again)."""
    verdicts = (
        "SELECT asset, partition, suite, expectation, column_name, success, observed_value::text, reference "
        "FROM quality_log ORDER BY 1, 2, 3, 4, 5"
    )
    results = []
    for rows_per_chunk in (10_000_000, 1):
        monkeypatch.setattr("assets.partitions.ROWS_PER_CHUNK", rows_per_chunk)
        assert materialize_range(dsn, "2024-01-02", "2024-01-11").success
        with engine.connect() as conn:
            stored = [
                read_vectors(
                    conn, feature_set=FS_V1, timeframe=tf, start=_start("2024-01-01"), end=_start("2024-01-13")
                )
                for tf in ("1m", "1d")
            ]
        results.append((rows(engine, verdicts), stored))
        with engine.begin() as conn:
            conn.execute(sa.text("TRUNCATE feature_vectors, feature_state, quality_log"))
    (one_chunk_log, one_chunk_vectors), (daily_log, daily_vectors) = results
    assert any(r[2] == "feature_vectors_fs_v1_1m_drift" and r[7] and "trailing" in r[7] for r in one_chunk_log)
    assert daily_log == one_chunk_log
    assert all(a.height and a.equals(b) for a, b in zip(one_chunk_vectors, daily_vectors, strict=True))


def test_a_carried_reference_shortens_the_chunks_instead_of_raising_the_peak() -> None:
    """The drift reference a step carries counts in its chunk budget, up to half of it."""
    from assets.partitions import PEAK_BYTES_PER_VECTOR, DayChunks

    def lengths(held: int) -> list[int]:
        plan, found = DayChunks([f"day{i}" for i in range(20)], rows_per_chunk=400_000), []
        for days in plan:
            found.append(len(days))
            plan.saw(78_000 * len(days), len(days))  # 200 instruments x 390 minutes
            plan.hold(held)
        return found

    assert lengths(0) == [1, 5, 5, 5, 4]
    # 20 days of 10 gated columns of 200 instruments: 125 MB, ~85,000 rows at the peak's cost per vector.
    reference = 20 * 78_000 * 10 * 8
    assert reference // PEAK_BYTES_PER_VECTOR == 81_250
    assert lengths(reference) == [1, 4, 4, 4, 4, 3]
    assert lengths(10**12) == [1, *[2] * 9, 1]  # never below half the budget
