"""What the store does not hold: bars on a closed day are never served, and no window reads across a hole."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import sqlalchemy as sa
from dagster_helpers import dagster_process_env, materialize_range
from test_recompute import (
    new_database,  # noqa: F401  (fixture: fresh databases for stores and instances)
    pipelines,
)

from marketfs.db import engine_for
from marketfs.sources import SyntheticBars, SyntheticEvents

ROOT = Path(__file__).resolve().parents[1]

INSTRUMENTS = ("AAA", "BBB")


def _land(folder: Path, day: str, shifted: bool = False) -> None:
    """A day's bars and events file; ``shifted``: the bars of the session before, stamped one day later (a
    vendor's full day of bars dated on ``day`` when it is no session)."""
    (folder / "bars").mkdir(parents=True, exist_ok=True)
    (folder / "events").mkdir(parents=True, exist_ok=True)
    start = datetime.fromisoformat(day).replace(tzinfo=UTC) - timedelta(days=1 if shifted else 0)
    bars = SyntheticBars(instruments=INSTRUMENTS).bars(start, start + timedelta(days=1))
    assert bars.height
    if shifted:
        bars = bars.with_columns(pl.col("ts") + timedelta(days=1))
    bars.write_parquet(folder / "bars" / f"{day}.parquet")
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    SyntheticEvents(instruments=INSTRUMENTS).events(start, start + timedelta(days=1)).write_parquet(
        folder / "events" / f"{day}.parquet"
    )


def test_a_holidays_minute_bars_are_set_aside_and_nothing_stamped_on_it_is_served(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    # Good Friday 2024-03-29: XNYS closed. A vendor delivers a full day of minute bars dated on it.
    for day in ("2024-03-28", "2024-04-01"):
        _land(tmp_path, day)
    _land(tmp_path, "2024-03-29", shifted=True)
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_range(dsn, "2024-03-28", "2024-04-01", landing_dir=tmp_path, instance=instance)
    assert result.success
    holiday = {"s": datetime(2024, 3, 29, 4, tzinfo=UTC), "e": datetime(2024, 3, 30, 4, tzinfo=UTC)}
    with engine.connect() as conn:
        for table in ("ohlcv_1m", "feature_vectors"):
            stamped = conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE ts >= :s AND ts < :e"), holiday)
            assert stamped.scalar() == 0, table
        assert conn.execute(sa.text("SELECT count(*) FROM feature_vectors WHERE ts >= :e"), holiday).scalar() > 0
    logged = "\n".join(
        entry.user_message for entry in instance.all_logs(result.run_id) if "set aside" in entry.user_message
    )
    assert "2024-03-29.parquet, line 1:" in logged and "XNYS calendar is closed: 2024-03-29" in logged, logged


def _a_week_of_january(new_database: Callable[[], str], tmp_path: Path) -> dict[str, str]:  # noqa: F811
    """A store and instance holding the sample's 2024-01-08..01-12, and nothing after."""
    env = dagster_process_env(new_database(), new_database(), tmp_path, MARKETFS_SYNTHETIC_INSTRUMENTS="2")
    first = pipelines(env, "run", "--start", "2024-01-08", "--end", "2024-01-12", "--no-snapshot")
    assert first.returncode == 0, first.stdout + first.stderr
    return env


def test_a_range_after_sessions_never_materialised_is_refused_naming_them_and_the_printed_command_fills_them(
    new_database: Callable[[], str],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    env = _a_week_of_january(new_database, tmp_path)
    engine = engine_for(env["MARKETFS_DSN"])
    feb = {"s": datetime(2024, 1, 13, tzinfo=UTC)}

    refused = pipelines(env, "run", "--start", "2024-02-01", "--end", "2024-02-02", "--no-snapshot")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "holds no bar of the 12 session(s) 2024-01-16..2024-01-31" in refused.stderr, refused.stderr
    # The command that fills the hole (the other one printed, with --allow-gap, declares it missing for good).
    [command] = set(re.findall(r'Fill them first: make run ARGS="(--start \S+ --end \S+)"', refused.stderr))
    assert command == "--start 2024-01-16 --end 2024-02-02"
    with engine.connect() as conn:
        for table in ("ohlcv_1m", "ohlcv_1d", "feature_vectors"):
            assert conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE ts >= :s"), feb).scalar() == 0, table

    # The same for an intraday step of a day after the hole: refused, nothing of it computed.
    today = pipelines(env, "run", "--today", "--now", "2024-02-01T16:00:00+00:00")
    assert today.returncode == 1 and "refused, nothing of today computed" in today.stderr, today.stdout + today.stderr
    assert "2024-01-16..2024-01-31" in today.stderr and "Traceback" not in today.stderr
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM feature_vectors WHERE ts >= :s"), feb).scalar() == 0

    filled = pipelines(env, "run", *command.split(), "--no-snapshot")  # what make run ARGS="..." runs
    assert filled.returncode == 0, filled.stdout + filled.stderr
    with engine.connect() as conn:
        # Every 1m and 1d ret_1 of 02-01 now follows the session before it, 01-31.
        served = conn.execute(
            sa.text(
                "SELECT timeframe, count(*) FROM feature_vectors WHERE ts >= '2024-02-01' AND ts < '2024-02-02' "
                "AND ret_1 IS NOT NULL GROUP BY 1 ORDER BY 1"
            )
        ).all()
    assert {"1d", "1m"} <= {tf for tf, n in served if n}


def test_a_hole_declared_missing_for_good_restarts_every_window_after_it_and_says_gap(
    new_database: Callable[[], str],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    env = _a_week_of_january(new_database, tmp_path)
    refused = pipelines(env, "run", "--start", "2024-02-01", "--end", "2024-02-02", "--no-snapshot")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    # The printed alternative, run as make runs it.
    [printed] = re.findall(r'missing for good: make run ARGS="([^"]+)"', refused.stderr)
    assert printed == "--start 2024-02-01 --end 2024-02-02 --allow-gap"

    allowed = pipelines(env, "run", *printed.split(), "--no-snapshot")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "declared a gap: ohlcv_1d holds no bar of 2024-01-16..2024-01-31 (12 sessions)" in allowed.stdout
    engine = engine_for(env["MARKETFS_DSN"])
    with engine.connect() as conn:
        vectors = pl.DataFrame(
            conn.execute(
                sa.text(
                    "SELECT feature_set_version, timeframe, instrument_id, ts, ret_1, quality_flags "
                    "FROM feature_vectors WHERE ts >= '2024-02-01' ORDER BY 1, 2, 3, 4"
                )
            ).all(),
            schema=["fs", "tf", "instrument_id", "ts", "ret_1", "flags"],
            orient="row",
        )
    assert set(vectors["tf"]) == {"1m", "5m", "1d"}
    firsts = vectors.group_by("fs", "tf", "instrument_id", maintain_order=True).first()
    # The first vector after the gap of every dataset and instrument: no return across it, and GAP says why.
    assert firsts["ret_1"].is_null().all(), firsts
    assert all("GAP" in f and "INSUFFICIENT_OHLCV" in f for f in firsts["flags"]), firsts
    # Once its windows are warm again, a vector carries no GAP (the minute bars warm within the first hour).
    minute = vectors.filter((pl.col("tf") == "1m") & (pl.col("ts") >= datetime(2024, 2, 1, 16, tzinfo=UTC)))
    assert minute.height and not any("GAP" in f for f in minute["flags"])
