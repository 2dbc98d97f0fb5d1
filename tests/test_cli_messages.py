"""The command line says each failure once, where it is and how to fix it; arguments that cannot be right are
usage errors. The pipeline runs as a user runs it: `python -m pipelines` in a subprocess, on landing files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from dagster_helpers import dagster_process_env

from marketfs.cli import main as marketfs_main
from marketfs.sources import SyntheticBars, SyntheticEvents
from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
INSTRUMENTS = ("AAA", "BBB")


def land(folder: Path, day: str, spoil: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> None:
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    end = start + timedelta(days=1)
    (folder / "bars").mkdir(parents=True, exist_ok=True)
    (folder / "events").mkdir(parents=True, exist_ok=True)
    bars = SyntheticBars(instruments=INSTRUMENTS).bars(start, end)
    (spoil(bars) if spoil else bars).write_parquet(folder / "bars" / f"{day}.parquet")
    SyntheticEvents(instruments=INSTRUMENTS).events(start, end).write_parquet(folder / "events" / f"{day}.parquet")


def negative_close(bars: pl.DataFrame) -> pl.DataFrame:
    hit = pl.int_range(pl.len()) == 200
    return bars.with_columns(pl.when(hit).then(-5.0).otherwise(pl.col(c)).alias(c) for c in ("close", "low"))


def off_grid_bar(bars: pl.DataFrame) -> pl.DataFrame:
    """One extra bar 30 s off the minute grid: a warning (kept, flagged), never a blocking failure."""
    extra = bars.head(1).with_columns(pl.col("ts") + timedelta(seconds=30))
    return pl.concat([bars, extra])


def pipelines(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def landing_env(dsn: str, tmp_path: Path) -> dict[str, str]:
    return dagster_process_env(
        dsn,
        dsn,  # Dagster's runs and event log in the same database, as with MARKETFS_DSN alone
        tmp_path,
        MARKETFS_SOURCE="landing",
        MARKETFS_LANDING_DIR=str(tmp_path / "landing"),
    )


def test_a_bad_bar_is_said_once_with_day_instrument_and_ts_and_counted_apart_from_warnings(
    empty_dsn: str, tmp_path: Path
) -> None:
    land(tmp_path / "landing", "2024-04-02", off_grid_bar)
    land(tmp_path / "landing", "2024-04-03", negative_close)
    result = pipelines(landing_env(empty_dsn, tmp_path), "run", "--start", "2024-04-02", "--end", "2024-04-03")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "Stack Trace" not in output, output
    assert output.count("breached its gate") == 1, output
    # One instrument's bar: that instrument's day is held, the other's is served.
    assert "raw_ohlcv 2024-04-03 of instrument AAA breached its gate" in output
    # The instrument and ts of the bad bar: the 201st minute of a session opening at 13:30 UTC (EDT).
    assert "AAA 2024-04-03 16:52:00+00:00 close=-5.0" in output
    assert "make recompute FROM=2024-04-03" in output  # and the fix
    # Day 02's off-grid bar is a warning of raw_ohlcv; day 03 is the one blocking failure.
    # Day 02's off-grid bar is a warning of raw_ohlcv; AAA's day 03 is the one blocking failure. The feature
    # steps ran (BBB is served on both days): their checks count too, warnings of two-day histories among them.
    assert re.search(r"gate checks    \d+ passed, 1 blocking failure, \d+ warnings", result.stdout), result.stdout
    assert "held           1 instrument(s) since 2024-04-03: AAA" in result.stdout, result.stdout
    assert "Checks tab" in result.stdout  # failed expectations: the UI shows them with their rows


def test_a_malformed_file_names_the_file_and_line_without_the_expectations_hint(empty_dsn: str, tmp_path: Path) -> None:
    land(tmp_path / "landing", "2024-04-02")
    bad = tmp_path / "landing" / "bars" / "2024-04-02.parquet"
    bad.unlink()
    bad.with_suffix(".csv").write_text(
        "instrument_id,ts,open,high,low,close,volume\n"
        "AAA,2024-04-02T09:30:00Z,10,11,9,10.5,100\n"
        "AAA,2024-04-02T09:31:00Z,10,11,9,abc,100\n"
    )
    env = landing_env(empty_dsn, tmp_path)
    result = pipelines(env, "run", "--start", "2024-04-02", "--end", "2024-04-02", "--no-snapshot")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "2024-04-02.csv, line 3" in output and "'close'" in output, output
    assert output.count("was not ingested") == 1, output
    assert "Traceback" not in output and "Stack Trace" not in output, output
    assert "expectation" not in output.lower(), output  # a file error: no expectation failed

    verbose = pipelines(env, "recompute", "--from", "2024-04-02", "--to", "2024-04-02", "--verbose")
    assert verbose.returncode == 1, verbose.stdout + verbose.stderr
    assert "2024-04-02.csv, line 3" in verbose.stderr
    assert 'assets/raw.py", line' in verbose.stderr  # the traceback, asked for


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["run", "--start", "2024-13-01"], "'2024-13-01' is not a day; write it as YYYY-MM-DD"),
        (["run", "--start", "yesterday"], "'yesterday' is not a day"),
        (["run", "--start", "2024-01-05", "--end", "2024-01-02"], "--end 2024-01-02 is before --start 2024-01-05"),
        (["recompute", "--from", "2024-01-05", "--to", "2024-01-02"], "--to 2024-01-02 is before --from 2024-01-05"),
        (["recompute", "--from", "2024-01-0\x005"], "is not a day"),
        (["quarantine", "release", "7", "--by", "al\x00ice", "--note", "ok"], "contains a NUL byte"),
        (["ui", "--port", "70000"], "--port 70000 is not a TCP port"),
    ],
)
def test_arguments_that_cannot_be_right_are_usage_errors(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert said in err and "usage: python -m pipelines" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["frame", "e.csv", "--features", "ret_1", "--tolerance=-5m"], "never negative; write '5m'"),
        (["frame", "e.csv", "--features", "ret_1", "--tolerance", "-5m"], "never negative; write '5m'"),
        (["frame", "e.csv", "--features", "ret_1", "--tolerance", "five minutes"], "'five minutes' is not a duration"),
        (["frame", "e.csv", "--features", "ret_1", "--tolerance", "none", "--as-of", "2024-03-01"], "with its offset"),
        (["latest", "AAA", "--features", " , "], "name at least one feature"),
        (["latest", "AA\x00A", "--features", "ret_1"], "contains a NUL byte"),
        (["quarantine", "show", "x7"], "invalid int value: 'x7'"),
    ],
)
def test_marketfs_arguments_that_cannot_be_right_are_usage_errors(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        marketfs_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert said in err and "usage: marketfs" in err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["latest", "AAA", "--features", "ret_1", "--timeframe", "5m"], "timeframe"),
        (["latest", "AAA", "--features", "ret_1,no_such_feature"], "no_such_feature"),
        (["frame", "{entities}", "--features", "ret_1", "--tolerance", "5m", "--timeframe", "1w"], "timeframe"),
        (["frame", "{missing}", "--features", "ret_1", "--tolerance", "5m"], "cannot read entities file"),
    ],
)
def test_marketfs_requests_that_cannot_be_served_are_one_line(
    argv: list[str], said: str, dsn: str, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    entities = tmp_path / "entities.csv"
    entities.write_text("instrument_id,ts\nAAA,2024-01-02T10:00:00+00:00\n")
    monkeypatch.setenv("MARKETFS_DSN", dsn)
    argv = [a.format(entities=entities, missing=tmp_path / "missing.csv") for a in argv]
    assert marketfs_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said in err and len(err.strip().splitlines()) == 1, err


def test_marketfs_with_the_database_gone_says_which_server(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MARKETFS_DSN", "postgresql://marketfs:secret@127.0.0.1:1/marketfs")
    assert marketfs_main(["quarantine", "list"]) == 3
    err = capsys.readouterr().err
    assert "cannot reach the feature store database 127.0.0.1:1/marketfs" in err and "make dsn" in err
    assert "secret" not in err and len(err.strip().splitlines()) == 1


def test_a_damaged_state_file_is_one_message_from_both_commands(tmp_path: Path) -> None:
    """The embedded server's own errors say what to do; the CLIs print them once, without a traceback."""
    from marketfs.embedded_pg import EmbeddedPostgres

    home = tmp_path / ".marketfs"
    server = EmbeddedPostgres(home, durable=False)
    server.ensure_running()
    server.stop()
    (home / "postgres.json").write_text("")
    unset = ("MARKETFS_DSN", "MARKETFS_DAGSTER_PG_URL", "MARKETFS_TEST_DSN", "DAGSTER_HOME")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(MARKETFS_HOME=str(home), PYTHONWARNINGS="ignore")
    try:
        for command in ([sys.executable, "-m", "pipelines", "run"], [sys.executable, "-m", "marketfs.cli", "dsn"]):
            result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert result.returncode == 3, result.stderr
            [line] = result.stderr.strip().splitlines()
            assert line.startswith(f"error: {home / 'postgres.json'} is empty"), line
            assert "reset-password" in line and "Traceback" not in result.stderr
    finally:
        server.destroy()
