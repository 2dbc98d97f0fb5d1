"""The database going away (`make stop`, a lost server) ends `python -m pipelines run` in one line naming the
server and what to do, within seconds, whichever connection notices first (the feature store's or Dagster's)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from dagster_helpers import dagster_process_env

from marketfs.embedded_pg import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def own_server() -> Iterator[EmbeddedPostgres]:
    """A server of this test alone: the test stops it."""
    home = Path(tempfile.mkdtemp(prefix="marketfs-gone-"))
    server = EmbeddedPostgres(home, durable=False)
    server.ensure_running()
    try:
        yield server
    finally:
        server.destroy()
        shutil.rmtree(home, ignore_errors=True)


def start_run(server: EmbeddedPostgres, tmp_path: Path, last_day: str) -> tuple[subprocess.Popen, str]:
    dsn = server.dsn("marketfs")
    env = dagster_process_env(dsn, dsn, tmp_path, MARKETFS_SYNTHETIC_INSTRUMENTS="10")
    command = [sys.executable, "-m", "pipelines", "run", "--start", "2024-01-02", "--end", last_day, "--no-snapshot"]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, dsn


def assert_one_clear_line(stdout: str, stderr: str, dsn: str) -> None:
    url = sa.make_url(dsn)
    output = stdout + stderr
    assert "cannot reach the " in stderr and f"{url.host}:{url.port}/{url.database}" in stderr, output
    assert "make dsn" in stderr
    assert url.password not in output
    for noise in ("Traceback", "DagsterPostgresException", "Retrying failed database connection", "Stack Trace"):
        assert noise not in output, output
    assert len([line for line in stderr.splitlines() if line.strip()]) == 1, stderr


def test_a_stopped_server_before_the_run_is_one_line(own_server: EmbeddedPostgres, tmp_path: Path) -> None:
    dsn = own_server.dsn("marketfs")
    own_server.stop()  # a saved MARKETFS_DSN, the server not running
    began = time.monotonic()
    env = dagster_process_env(dsn, dsn, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", "run", "--start", "2024-01-02", "--end", "2024-01-02"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert_one_clear_line(result.stdout, result.stderr, dsn)
    assert time.monotonic() - began < 40


def test_a_server_stopped_mid_run_is_one_line_within_seconds(own_server: EmbeddedPostgres, tmp_path: Path) -> None:
    proc, dsn = start_run(own_server, tmp_path, "2024-01-31")
    try:
        deadline = time.monotonic() + 120
        while True:  # until the run has written its first day of bars
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run wrote nothing in 2 minutes"
            try:
                with psycopg.connect(dsn, connect_timeout=5) as conn:
                    if conn.execute("SELECT count(*) FROM ohlcv_1m").fetchone()[0]:
                        break
            except (psycopg.OperationalError, psycopg.errors.UndefinedTable):  # not up, or not migrated yet
                pass
            time.sleep(0.3)
        own_server.stop()  # what `make stop` does
        stopped = time.monotonic()
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3, stdout + stderr
    assert_one_clear_line(stdout, stderr, dsn)
    assert took < 30, f"{took:.0f} s from the server's stop to the message"
