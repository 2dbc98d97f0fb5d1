"""Gates end to end: a breach fails the run, the served table is untouched, the evidence is kept, release works."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import polars as pl
import pytest
import sqlalchemy as sa
from dagster_helpers import materialize_range, materialize_selection

from marketfs.sources import SyntheticBars, SyntheticEvents
from marketfs.store import quality

DAY = datetime(2024, 1, 3, tzinfo=UTC)
NEXT = DAY + timedelta(days=1)
INSTRUMENTS = ("AAA", "BBB")


def land(folder: Path, day: datetime, bars: pl.DataFrame | None = None, events: pl.DataFrame | None = None) -> None:
    (folder / "bars").mkdir(parents=True, exist_ok=True)
    (folder / "events").mkdir(parents=True, exist_ok=True)
    end = day + timedelta(days=1)
    bars = bars if bars is not None else SyntheticBars(instruments=INSTRUMENTS).bars(day, end)
    events = events if events is not None else SyntheticEvents(instruments=INSTRUMENTS).events(day, end)
    bars.write_parquet(folder / "bars" / f"{day:%Y-%m-%d}.parquet")
    events.write_parquet(folder / "events" / f"{day:%Y-%m-%d}.parquet")


def count(engine: sa.Engine, query: str, **params) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(query), params).scalar())


def count_rows(engine: sa.Engine, query: str, **params) -> list:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text(query), params)]


def check(result, asset: str, name: str = "quality_gate"):
    [evaluation] = [
        c
        for c in result.get_asset_check_evaluations()
        if c.asset_key.to_user_string() == asset and c.check_name == name
    ]
    return evaluation


def test_bad_raw_bars_are_quarantined_as_delivered_and_released(dsn: str, engine: sa.Engine, tmp_path: Path) -> None:
    bars = SyntheticBars(instruments=INSTRUMENTS).bars(DAY, NEXT)
    bad = bars.with_columns(
        pl.when(pl.int_range(pl.len()) == 7).then(pl.col("high") * 2).otherwise(pl.col("low")).alias("low")
    )
    land(tmp_path, DAY, bars=bad)
    result = materialize_range(dsn, "2024-01-03", landing_dir=tmp_path)
    assert not result.success
    evaluation = check(result, "raw_ohlcv")
    assert not evaluation.passed
    assert "FAILED expect_column_pair_values_a_to_be_greater_than_b(high,low)" in evaluation.metadata
    batch_id = evaluation.metadata["quarantine_batch"].value
    # The instrument of the bad bar is held for the day; the other instrument's bars and vectors are served.
    held = bad.sort("instrument_id", "ts")[7]["instrument_id"][0]
    held_rows = bad.filter(pl.col("instrument_id") == held).height
    assert count(engine, "SELECT count(*) FROM ohlcv_1m") == bad.height - held_rows
    assert count(engine, "SELECT count(*) FROM feature_vectors WHERE instrument_id = :i", i=held) == 0
    assert count(engine, "SELECT count(*) FROM feature_vectors WHERE instrument_id <> :i", i=held) > 0
    assert count(engine, "SELECT count(*) FROM quarantine_ohlcv_1m WHERE batch_id = :b", b=batch_id) == held_rows
    assert (
        count(
            engine,
            "SELECT count(*) FROM quality_log WHERE batch_id = :b AND NOT success AND column_name = 'high,low'",
            b=batch_id,
        )
        == 1
    )
    docs = urlparse(evaluation.metadata["data_docs"].value).path
    assert Path(docs).exists() and docs.endswith(".html")

    with pytest.raises(quality.QuarantineError, match="who reviewed"), engine.begin() as conn:
        quality.release(conn, batch_id, actor="", note="")
    with engine.begin() as conn:
        released = quality.release(conn, batch_id, actor="alice", note="vendor confirmed the print")
    assert released["rows_written"] == held_rows
    assert count(engine, "SELECT count(*) FROM ohlcv_1m") == bad.height
    assert (
        count(
            engine,
            "SELECT count(*) FROM quality_log WHERE batch_id = :b AND kind = 'release' AND actor = 'alice'",
            b=batch_id,
        )
        == 1
    )
    with pytest.raises(quality.QuarantineError, match="already released by alice"), engine.begin() as conn:
        quality.discard(conn, batch_id, actor="bob", note="too late")
    # Released raw data now feeds features: the bad bar is treated as missing, never as a number.
    result = materialize_selection(dsn, ["feature_vectors_fs_v1_1m"], "2024-01-03")
    assert result.success
    assert count(engine, "SELECT count(*) FROM feature_vectors WHERE 'MISSING_OHLCV' = ANY(quality_flags)") >= 1


def test_bad_events_are_quarantined_and_discarded(dsn: str, engine: sa.Engine, tmp_path: Path) -> None:
    events = SyntheticEvents(instruments=INSTRUMENTS).events(DAY, NEXT)
    land(
        tmp_path,
        DAY,
        events=events.with_columns(
            pl.when(pl.int_range(pl.len()) == 3).then(1.7).otherwise(pl.col("sentiment")).alias("sentiment")
        ),
    )
    result = materialize_range(dsn, "2024-01-03", landing_dir=tmp_path)
    assert not result.success
    batch_id = check(result, "raw_events").metadata["quarantine_batch"].value
    held = events[3]["instrument_id"][0]
    assert count(engine, "SELECT count(*) FROM news_events WHERE instrument_id = :i", i=held) == 0
    assert count(engine, "SELECT count(*) FROM news_events") > 0  # the other instrument's events of the day
    with engine.begin() as conn:
        quality.discard(conn, batch_id, actor="bob", note="vendor resent the day")
    assert count(engine, "SELECT count(*) FROM quarantine_news_events") == 0
    with engine.connect() as conn:
        [batch] = quality.list_batches(conn)
    assert (batch["status"], batch["decided_by"]) == ("discarded", "bob")


def test_breaching_vectors_are_quarantined_with_state_and_release_serves_them(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    bars = SyntheticBars(instruments=INSTRUMENTS).bars(DAY, NEXT)
    jump = pl.int_range(pl.len()) == 200
    spiked = bars.with_columns(
        pl.when(jump).then(pl.col("close") * 3).otherwise(pl.col("close")).alias("close"),
        pl.when(jump).then(pl.col("close") * 3).otherwise(pl.col("high")).alias("high"),
    )
    land(tmp_path, DAY, bars=spiked)
    result = materialize_range(dsn, "2024-01-03", landing_dir=tmp_path)
    assert not result.success
    evaluation = check(result, "feature_vectors_fs_v1_1m")
    batch_id = evaluation.metadata["quarantine_batch"].value
    # The spiked instrument's vectors and state of the day are held; the other's are served.
    [instrument] = count_rows(engine, "SELECT instruments FROM quarantine_batches WHERE batch_id = :b", b=batch_id)
    assert instrument == [spiked.sort("instrument_id", "ts")[200]["instrument_id"][0]] or len(instrument) == 1
    served = count(engine, "SELECT count(*) FROM feature_vectors WHERE timeframe = '1m'")
    assert served > 350
    held = count(engine, "SELECT count(*) FROM quarantine_feature_vectors WHERE batch_id = :b", b=batch_id)
    assert held > 350
    assert count(engine, "SELECT count(*) FROM quarantine_feature_state WHERE batch_id = :b", b=batch_id) == 1
    with engine.begin() as conn:
        quality.release(conn, batch_id, actor="carol", note="real move: a takeover bid")
    assert count(engine, "SELECT count(*) FROM feature_vectors WHERE timeframe = '1m'") == served + held
    assert count(engine, "SELECT count(*) FROM feature_state WHERE timeframe = '1m'") == 2


def test_drift_gate_blocks_a_shifted_partition_and_says_what_drifted(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    days = [DAY + timedelta(days=i) for i in range(8)]  # Wed 3 .. Wed 10 January: 6 trading days
    for day in days[:-1]:
        land(tmp_path, day)
    assert materialize_range(dsn, "2024-01-03", "2024-01-09", landing_dir=tmp_path).success
    shifted = days[-1]
    noisy = SyntheticBars(instruments=INSTRUMENTS, minute_vol=0.008).bars(shifted, shifted + timedelta(days=1))
    land(tmp_path, shifted, bars=noisy)
    result = materialize_range(dsn, "2024-01-10", landing_dir=tmp_path)
    assert not result.success
    assert check(result, "feature_vectors_fs_v1_1m").passed  # quality is fine; the distribution is not
    drift = check(result, "feature_vectors_fs_v1_1m", "drift_gate")
    assert not drift.passed
    assert "trailing 5 partitions 2024-01-03..2024-01-09" in drift.metadata["reference"].value
    drifted = [k for k in drift.metadata if k.startswith("FAILED ")]
    assert any("__vol_20)" in k for k in drifted), drifted
    table = drift.metadata["reference_table"].value  # what each statistic was compared with
    assert "| feature | statistic | observed |" in table and "| vol_20 |" in table
    assert count(engine, "SELECT count(*) FROM feature_vectors WHERE ts >= :d AND timeframe = '1m'", d=shifted) == 0
    assert (
        count(engine, "SELECT count(*) FROM quality_log WHERE suite = 'feature_vectors_fs_v1_1m_drift' AND NOT success")
        > 0
    )


def test_drift_against_a_pinned_snapshot(
    dsn: str, engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import shutil

    from expectations.gate import SUITES_DIR
    from marketfs import snapshots

    days = [DAY + timedelta(days=i) for i in range(8)]
    for day in days[:-1]:
        land(tmp_path / "landing", day)
    assert materialize_range(dsn, "2024-01-03", "2024-01-09", landing_dir=tmp_path / "landing").success
    with engine.begin() as conn:
        snap = snapshots.create_snapshot(conn, feature_set_version="fs_v1", timeframe="1m", start=days[0], end=days[-1])
    suites = tmp_path / "suites"
    shutil.copytree(SUITES_DIR, suites)
    drift_file = suites / "feature_vectors_fs_v1_1m_drift.json"
    suite = json.loads(drift_file.read_text())
    suite["meta"]["reference"] = {"kind": "snapshot", "snapshot": snap.snapshot_id}
    drift_file.write_text(json.dumps(suite))
    monkeypatch.setenv("MARKETFS_SUITES_DIR", str(suites))

    noisy = SyntheticBars(instruments=INSTRUMENTS, minute_vol=0.008).bars(days[-1], days[-1] + timedelta(days=1))
    land(tmp_path / "landing", days[-1], bars=noisy)
    result = materialize_range(dsn, "2024-01-10", landing_dir=tmp_path / "landing")
    assert not result.success
    drift = check(result, "feature_vectors_fs_v1_1m", "drift_gate")
    assert not drift.passed
    assert f"pinned snapshot {snap.snapshot_id}" in drift.metadata["reference"].value
