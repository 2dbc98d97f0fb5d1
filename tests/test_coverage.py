"""What the store does not hold: bars on a closed day are never served, and no window reads across a hole."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import sqlalchemy as sa
from dagster_helpers import materialize_range

from marketfs.sources import SyntheticBars, SyntheticEvents

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
