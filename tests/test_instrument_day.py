"""The instrument-day is the unit of quarantine for row-level breaches: one bad print holds one instrument.

Three landing days of six instruments, one impossible bar (close = low = -5) of one instrument on the middle
day: the run fails; that instrument's rows and vectors of the middle day are held, and its later days with
them (its own state chain); the other five instruments are served on the middle day and the day after;
fixing the file and running the command the failure printed serves the held instrument too.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import sqlalchemy as sa
from dagster_helpers import dagster_process_env
from test_recompute import (
    new_database,  # noqa: F401  (fixture: fresh databases for stores and instances)
    pipelines,
)

from marketfs.db import engine_for
from marketfs.sources import SyntheticBars, SyntheticEvents

ROOT = Path(__file__).resolve().parents[1]

INSTRUMENTS = ("AAA", "BBB", "CCC", "DDD", "EEE", "FFF")
DAYS = ["2024-04-02", "2024-04-03", "2024-04-04"]
BAD_DAY = DAYS[1]


def _start(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


def _bars(day: str) -> pl.DataFrame:
    return SyntheticBars(instruments=INSTRUMENTS).bars(_start(day), _start(day) + timedelta(days=1))


def land(folder: Path, spoil: bool) -> tuple[str, datetime]:
    """The three days' files; with ``spoil`` one bar of one instrument on the middle day is impossible.
    Returns that bar's instrument and ts."""
    (folder / "bars").mkdir(parents=True, exist_ok=True)
    (folder / "events").mkdir(parents=True, exist_ok=True)
    bad = _bars(BAD_DAY).filter(pl.col("instrument_id") == "CCC")[150]
    for day in DAYS:
        bars = _bars(day)
        if spoil and day == BAD_DAY:
            hit = (pl.col("instrument_id") == "CCC") & (pl.col("ts") == bad["ts"][0])
            bars = bars.with_columns(
                pl.when(hit).then(-5.0).otherwise(pl.col("close")).alias("close"),
                pl.when(hit).then(-5.0).otherwise(pl.col("low")).alias("low"),
            )
        bars.write_parquet(folder / "bars" / f"{day}.parquet")
        start = _start(day)
        SyntheticEvents(instruments=INSTRUMENTS).events(start, start + timedelta(days=1)).write_parquet(
            folder / "events" / f"{day}.parquet"
        )
    return "CCC", bad["ts"][0]


def served(engine: sa.Engine, timeframe: str = "1m") -> dict[tuple[str, str], int]:
    """Served vectors per (day, instrument)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT to_char(ts, 'YYYY-MM-DD'), instrument_id, count(*) FROM feature_vectors "
                "WHERE timeframe = :tf AND feature_set_version = 'fs_v1' GROUP BY 1, 2"
            ),
            {"tf": timeframe},
        )
        return {(day, instrument): n for day, instrument, n in rows}


def _run_landed(new_database: Callable[[], str], tmp_path: Path, landing: Path):  # noqa: F811
    """The three days' run on their own store and Dagster instance, as a user runs it; it fails (a bad print)."""
    env = dagster_process_env(
        new_database(), new_database(), tmp_path, MARKETFS_SOURCE="landing", MARKETFS_LANDING_DIR=str(landing)
    )
    run = pipelines(env, "run", "--start", DAYS[0], "--end", DAYS[-1], "--no-snapshot")
    assert run.returncode == 1, run.stdout + run.stderr
    return env, engine_for(env["MARKETFS_DSN"]), run


def test_one_bad_print_holds_one_instrument_and_the_printed_fix_serves_it(
    new_database: Callable[[], str],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    landing = tmp_path / "landing"
    held, ts = land(landing, spoil=True)
    env, engine, run = _run_landed(new_database, tmp_path, landing)

    # The batch holds the instrument's rows of the day only; the others' bars of the day are stored.
    with engine.connect() as conn:
        [(batch_id, instruments, status)] = conn.execute(
            sa.text("SELECT batch_id, instruments, status FROM quarantine_batches")
        ).all()
        quarantined = conn.execute(
            sa.text("SELECT DISTINCT instrument_id FROM quarantine_ohlcv_1m WHERE batch_id = :b"), {"b": batch_id}
        ).scalars()
        assert instruments == [held] and status == "held" and list(quarantined) == [held]
        stored = conn.execute(
            sa.text("SELECT DISTINCT instrument_id FROM ohlcv_1m WHERE ts >= :s AND ts < :e ORDER BY 1"),
            {"s": _start(BAD_DAY), "e": _start(DAYS[2])},
        ).scalars()
        assert set(stored) == set(INSTRUMENTS) - {held}
    # The failure names the instrument, the day, the ts and the value, and the one command that fixes it.
    assert f"{held} {ts}" in run.stderr and "close=-5.0" in run.stderr, run.stderr
    assert f"instrument(s) held since {BAD_DAY}" in run.stderr and f"{held} since {BAD_DAY}" in run.stderr
    [command] = set(re.findall(r"make recompute FROM=\S+?(?=[.\s]|$)", run.stderr))
    assert command == f"make recompute FROM={BAD_DAY}"

    for timeframe in ("1m", "1d"):
        vectors = served(engine, timeframe)
        # The held instrument: served the day before, not the bad day, not the day after (its state chain).
        assert vectors.get((DAYS[0], held)), timeframe
        assert (BAD_DAY, held) not in vectors and (DAYS[2], held) not in vectors, timeframe
        # The five others: served on every day.
        for instrument in set(INSTRUMENTS) - {held}:
            assert all(vectors.get((day, instrument)) for day in DAYS), (timeframe, instrument)
    listed = subprocess.run(
        [str(Path(sys.executable).with_name("marketfs")), "quarantine", "list"], env=env, capture_output=True, text=True
    )
    assert held in listed.stdout and "held" in listed.stdout, listed.stdout + listed.stderr

    # The fix: the vendor re-sends the day; then the printed command (make's recipe, run as make runs it).
    land(landing, spoil=False)
    fixed = pipelines(env, "recompute", "--from", command.split("=")[1])
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    for timeframe in ("1m", "1d"):
        vectors = served(engine, timeframe)
        assert all(vectors.get((day, i)) for day in DAYS for i in INSTRUMENTS), timeframe
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM quarantine_batches")).scalars().all() == ["resolved"]


def test_a_discarded_instrument_day_is_a_gap_its_windows_restart_after(
    new_database: Callable[[], str],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    landing = tmp_path / "landing"
    held, _ = land(landing, spoil=True)
    env, engine, _ = _run_landed(new_database, tmp_path, landing)
    with engine.connect() as conn:
        [batch_id] = conn.execute(sa.text("SELECT batch_id FROM quarantine_batches")).scalars()
    # The vendor cannot re-send the day: a person discards it, and the day is missing for good for that instrument;
    # the discard recomputes what follows the day (not the raw day: the file still holds the bad print).
    marketfs = str(Path(sys.executable).with_name("marketfs"))
    discard = [marketfs, "quarantine", "discard", str(batch_id), "--by", "alice", "--note", "vendor has no fix"]
    discarded = subprocess.run(discard, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert discarded.returncode == 0, discarded.stdout + discarded.stderr
    assert "recomputing bars_1d, " in discarded.stdout and f"for {BAD_DAY} .. {DAYS[2]}" in discarded.stdout
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT timeframe, ts, ret_1, quality_flags FROM feature_vectors WHERE instrument_id = :i "
                "AND feature_set_version = 'fs_v1' AND ts >= :s ORDER BY timeframe, ts"
            ),
            {"i": held, "s": _start(BAD_DAY)},
        ).all()
        assert conn.execute(sa.text("SELECT count(*) FROM quarantine_batches WHERE status = 'held'")).scalar() == 0
    for timeframe in ("1m", "1d"):
        mine = [r for r in rows if r.timeframe == timeframe]
        # Nothing of the discarded day; the day after restarts: no return across the missing day, GAP says why.
        assert mine and all(r.ts >= _start(DAYS[2]) for r in mine), timeframe
        assert mine[0].ret_1 is None and "GAP" in mine[0].quality_flags, (timeframe, mine[0])


def test_a_bad_bar_of_every_instrument_serves_the_clean_day_before_and_the_printed_fix_completes_the_range(
    new_database: Callable[[], str],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    landing = tmp_path / "landing"
    land(landing, spoil=False)
    day = _bars(BAD_DAY).with_row_index("_row")
    # One impossible bar of every instrument: its 100th minute.
    hit = pl.col("_row").is_in(day.group_by("instrument_id").agg(pl.col("_row").sort().get(100))["_row"].implode())
    day.with_columns(
        pl.when(hit).then(-5.0).otherwise(pl.col("close")).alias("close"),
        pl.when(hit).then(-5.0).otherwise(pl.col("low")).alias("low"),
    ).drop("_row").write_parquet(landing / "bars" / f"{BAD_DAY}.parquet")
    env, engine, run = _run_landed(new_database, tmp_path, landing)
    # The clean day before the breach is served, for every instrument; nothing of the days after it.
    assert {d for d, _ in served(engine)} == {DAYS[0]}
    assert {i for _, i in served(engine)} == set(INSTRUMENTS)
    commands = set(re.findall(r"make recompute FROM=\S+?(?=[.\s]|$)", run.stdout + run.stderr))
    assert commands == {f"make recompute FROM={BAD_DAY}"}, run.stdout + run.stderr

    land(landing, spoil=False)
    fixed = pipelines(env, "recompute", "--from", BAD_DAY)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    for timeframe in ("1m", "1d"):
        vectors = served(engine, timeframe)
        assert all(vectors.get((d, i)) for d in DAYS for i in INSTRUMENTS), timeframe
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM quarantine_batches WHERE status = 'held'")).scalar() == 0


def test_a_delisted_instrument_is_not_expected_after_its_last_session_and_nothing_of_it_is_invented(
    dsn: str, tmp_path: Path, monkeypatch
) -> None:
    from dagster_helpers import materialize_range

    landing = tmp_path / "landing"
    land(landing, spoil=False)
    last_day = _bars(DAYS[2]).filter(pl.col("instrument_id") != "FFF")  # FFF delisted after 04-03
    last_day.write_parquet(landing / "bars" / f"{DAYS[2]}.parquet")
    universes = tmp_path / "universes.toml"
    universes.write_text(
        '[us_equities]\nmin_instrument_share = 1.0\n\n[us_equities.listings]\nFFF = { last = "2024-04-03" }\n'
    )
    monkeypatch.setenv("MARKETFS_UNIVERSES", str(universes))
    result = materialize_range(dsn, DAYS[0], DAYS[-1], landing_dir=landing, instruments=len(INSTRUMENTS))
    # Every session holds every instrument listed on it: the delisting is no missing delivery.
    assert result.success
    engine = engine_for(dsn)
    close = datetime(2024, 4, 3, 20, 0, tzinfo=UTC)
    with engine.connect() as conn:
        after = conn.execute(
            sa.text("SELECT count(*) FROM feature_vectors WHERE instrument_id = 'FFF' AND ts >= :c"), {"c": close}
        ).scalar()
        last = conn.execute(
            sa.text("SELECT max(ts) FROM feature_vectors WHERE instrument_id = 'FFF' AND timeframe = '1d'")
        ).scalar()
    assert after == 0  # no MISSING_OHLCV vector invented for bars it can no longer have (stale_after is 1d, 7d)
    assert last == datetime(2024, 4, 3, 19, 59, tzinfo=UTC)  # its last daily vector stays served


def test_a_listing_that_is_no_session_is_refused_naming_it(tmp_path: Path, monkeypatch) -> None:
    import pytest

    from marketfs.universe import UniverseError, active_universe

    universes = tmp_path / "universes.toml"
    universes.write_text('[us_equities.listings]\nFFF = { last = "2024-03-29" }\n')
    monkeypatch.setenv("MARKETFS_UNIVERSES", str(universes))
    with pytest.raises(UniverseError, match=r"listings.FFF.last = 2024-03-29: 2024-03-29 is no XNYS session"):
        active_universe()
