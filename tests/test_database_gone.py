"""The database going away.

A server down when a command starts is said at once, in one line naming the server and what to do. A server
lost mid-run is waited for up to ``MARKETFS_DB_OUTAGE_SECONDS`` (a restart, a failover): a daemon-launched run
rides out a 30 s outage and ends with its days materialised; a server still gone after that ends
`python -m pipelines run` in the same one line, whichever connection noticed first (the feature store's or
Dagster's).
"""

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
from process_helpers import stop_process_group

from assets.partitions import day_window
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
    # A short outage budget: this server does not come back, and the test waits for the message.
    env = dagster_process_env(dsn, dsn, tmp_path, MARKETFS_SYNTHETIC_INSTRUMENTS="10", MARKETFS_DB_OUTAGE_SECONDS="5")
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
    assert time.monotonic() - began < 20  # one attempt, not the outage budget: nothing had started


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
    assert took < 35, f"{took:.0f} s from the server's stop to the message (outage budget 5 s)"


def wait_for(what: str, check, timeout: float, log: Path) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout:.0f} s; daemon log:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def query(dsn: str, sql: str) -> list[tuple]:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            return conn.execute(sql).fetchall()
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):  # down, or not migrated yet
        return []


def test_a_30_second_outage_under_the_daemon_ends_with_the_days_materialised(
    own_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """The landing sensor's run loses its server (feature store and Dagster instance alike) for 30 s mid-run,
    after its raw bars are written: nobody acts, and the run ends SUCCESS with every day's vectors served."""
    from marketfs.sources import SyntheticBars, SyntheticEvents

    landing = tmp_path / "landing"
    days = ["2024-01-03", "2024-01-04", "2024-01-05", "2024-01-08"]
    for sub in ("bars", "events"):
        (landing / sub).mkdir(parents=True)
    instruments = ("AAA", "BBB")
    for day in days:
        start, end = day_window(day)
        SyntheticBars(instruments=instruments).bars(start, end).write_parquet(landing / "bars" / f"{day}.parquet")
        SyntheticEvents(instruments=instruments).events(start, end).write_parquet(landing / "events" / f"{day}.parquet")
    dsn = own_server.dsn("marketfs")
    env = dagster_process_env(dsn, dsn, tmp_path, MARKETFS_SOURCE="landing", MARKETFS_LANDING_DIR=str(landing))
    assert "MARKETFS_DB_OUTAGE_SECONDS" not in env  # the default budget (60 s) is what is tested
    workspace = ["-w", str(ROOT / "workspace.yaml")]
    subprocess.run(
        [sys.executable, "-m", "dagster", "sensor", "start", "landing_files_sensor", *workspace],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log:
        daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", *workspace],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
            start_new_session=True,  # its code server and run workers join the group
        )
        try:
            wait_for(
                "the sensor's run writing its raw bars",
                lambda: query(dsn, "SELECT count(*) FROM ohlcv_1m") not in ([], [(0,)]),
                240,
                log_path,
            )
            assert query(dsn, "SELECT status FROM runs") == [("STARTED",)]
            own_server.stop()
            time.sleep(30)
            own_server.ensure_running()
            back = time.time()
            wait_for(
                "the run's end",
                lambda: query(dsn, "SELECT status FROM runs WHERE status NOT IN ('STARTED', 'STARTING', 'QUEUED')"),
                240,
                log_path,
            )
        finally:
            stop_process_group(daemon)
    assert query(dsn, "SELECT status FROM runs") == [("SUCCESS",)], log_path.read_text()[-4000:]
    served = dict(
        query(
            dsn,
            "SELECT (ts AT TIME ZONE 'UTC')::date::text, count(*) FROM feature_vectors "
            "WHERE timeframe = '1m' AND feature_set_version = 'fs_v1' GROUP BY 1",
        )
    )
    assert set(served) == set(days) and min(served.values()) >= 700, served
    assert query(dsn, "SELECT count(*) FROM quarantine_batches") == [(0,)]
    # The run was under way across the outage: it ended after the server came back.
    [(ended,)] = query(dsn, "SELECT end_time FROM runs")
    assert ended > back, (ended, back)


def test_an_event_whose_connection_is_lost_mid_write_is_stored_once(empty_dsn: str) -> None:
    """A restart ends the transaction an event is being written in: that transaction alone is written again.

    The server itself ends the connection (pg_terminate_backend, what a restart does to every session) just as
    the materialisation's second transaction (the asset's index) starts, after its event row was committed.
    """
    import dagster as dg
    from dagster_postgres import PostgresEventLogStorage

    from assets.resources import bound_instance_retries

    bound_instance_retries()
    url = sa.make_url(empty_dsn).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    storage = PostgresEventLogStorage(url)
    ended: list[int] = []

    @sa.event.listens_for(storage._engine, "before_cursor_execute")
    def end_the_session(conn, cursor, statement, parameters, context, executemany) -> None:
        if not ended and "asset_keys" in statement:
            ended.append(cursor.connection.get_backend_pid())
            with psycopg.connect(empty_dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (ended[0],))

    with dg.DagsterInstance.ephemeral() as instance:
        instance._event_storage = storage  # this test's PostgreSQL event log; runs and schedules stay in memory
        storage.register_instance(instance)
        instance.report_runless_asset_event(dg.AssetMaterialization("ridden_out"))
        assert ended, "no statement on asset_keys: the fault was never injected"
        stored = storage.get_event_records(
            dg.EventRecordsFilter(dg.DagsterEventType.ASSET_MATERIALIZATION, asset_key=dg.AssetKey("ridden_out"))
        )
        assert len(stored) == 1  # the committed event row was not written twice
        [record] = storage.get_asset_records([dg.AssetKey("ridden_out")])  # the asset's index was written too
        assert record.asset_entry.last_materialization_record.storage_id == stored[0].storage_id
    storage.dispose()
