"""Reports never block data: Data Docs that cannot be written (disk full, permissions) are a warning."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster_helpers import materialize_range
from test_day_is_the_unit import DAYS, land_days, negative_close, rows


@pytest.fixture
def unwritable_docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project home whose Data Docs folder cannot be created: every write under it fails with an
    OSError, as on a full disk or a read-only mount (root ignores permission bits, so chmod cannot
    stand in for it)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "gx").write_text("not a folder")
    monkeypatch.setenv("MARKETFS_HOME", str(home))
    return home


def _warnings(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if e.level == 30]  # logging.WARNING


def test_a_breach_is_still_judged_quarantined_and_logged_when_data_docs_cannot_be_written(
    dsn: str, engine: sa.Engine, tmp_path: Path, unwritable_docs: Path
) -> None:
    landing = tmp_path / "landing"
    land_days(landing, negative_close)
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize_range(dsn, DAYS[0], DAYS[-1], landing_dir=landing, instance=instance)
        warnings = _warnings(instance, result.run_id)
        errors = [e.user_message for e in instance.all_logs(result.run_id) if e.level == 40]  # logging.ERROR
    assert not result.success  # the breach, not the report, fails the run
    assert any("raw_ohlcv 2024-04-03 of instrument" in e and "breached its gate" in e for e in errors), errors
    assert rows(engine, "SELECT asset, partition FROM quarantine_batches") == [("raw_ohlcv", "2024-04-03")]
    # The held instrument's rows of the day are not stored; the other instrument's are.
    assert rows(engine, "SELECT to_char(ts, 'YYYY-MM-DD'), count(DISTINCT instrument_id) FROM ohlcv_1m GROUP BY 1") == [
        ("2024-04-02", 2),
        ("2024-04-03", 1),
        ("2024-04-04", 2),
    ]
    assert rows(engine, "SELECT count(*) > 0 FROM quality_log WHERE partition = '2024-04-03' AND NOT success") == [
        (True,)
    ]
    assert any("Data Docs page for raw_ohlcv 2024-04-03 not rendered" in w for w in warnings), warnings


def test_the_cli_run_succeeds_and_says_so_when_data_docs_cannot_be_written(empty_dsn: str, tmp_path: Path) -> None:
    """`make run` end to end, as a user runs it: the Data Docs index at the end is a report too."""
    from test_cli_messages import land, landing_env, pipelines

    land(tmp_path / "landing", "2024-04-02")
    (tmp_path / "gx").write_text("not a folder")  # MARKETFS_HOME of the run is tmp_path
    result = pipelines(landing_env(empty_dsn, tmp_path), "run", "--start", "2024-04-02", "--end", "2024-04-02")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data docs      not rebuilt (FileExistsError" in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
