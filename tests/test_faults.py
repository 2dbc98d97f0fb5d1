"""Concurrency and faults: same partition twice at once, a writer killed mid-transaction, the database gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster_helpers import PIPELINE, materialize_range, resources

ROOT = Path(__file__).resolve().parents[1]
SERVED = (
    "SELECT count(*), md5(string_agg(f::text, '' ORDER BY f::text)) FROM (SELECT instrument_id, timeframe, ts, "
    "ret_1, rsi_14, macd, quality_flags FROM feature_vectors) f"
)


def fingerprint(engine: sa.Engine) -> tuple:
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text(SERVED)).one())


def test_two_runs_of_one_partition_at_once_end_consistent(dsn: str, engine: sa.Engine) -> None:
    results = []
    threads = [threading.Thread(target=lambda: results.append(materialize_range(dsn, "2024-01-03"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.success for r in results] == [True, True]
    both = fingerprint(engine)
    with engine.connect() as conn:
        duplicates = conn.execute(
            sa.text(
                "SELECT count(*) FROM (SELECT 1 FROM feature_vectors GROUP BY instrument_id, timeframe, ts, "
                "feature_set_version HAVING count(*) > 1) d"
            )
        ).scalar()
    assert duplicates == 0
    assert materialize_range(dsn, "2024-01-03").success  # and a third, alone, changes nothing
    assert fingerprint(engine) == both


def test_writer_killed_mid_transaction_leaves_the_table_as_it_was(dsn: str, engine: sa.Engine, tmp_path: Path) -> None:
    assert materialize_range(dsn, "2024-01-03").success
    before = fingerprint(engine)
    marker = tmp_path / "inside-transaction"
    script = textwrap.dedent(f"""
        import time, pathlib
        from datetime import datetime, timedelta, UTC
        import polars as pl
        from marketfs.db import engine_for
        from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
        from marketfs.store.feature_vectors import read_vectors, upsert_window
        start = datetime(2024, 1, 3, tzinfo=UTC); end = start + timedelta(days=1)
        engine = engine_for({dsn!r})
        with engine.begin() as conn:
            current = read_vectors(conn, feature_set=FS_V1, timeframe="1m", start=start, end=end)
            changed = current.with_columns(pl.col("ret_1") * 7).head(current.height // 2)
            upsert_window(conn, changed, feature_set=FS_V1, timeframe="1m", start=start, end=end)
            pathlib.Path({str(marker)!r}).write_text("written, not committed")
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the writer died before it wrote"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # as an OOM killer or a lost node would
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    engine.dispose()
    assert fingerprint(engine) == before
    assert materialize_range(dsn, "2024-01-03").success  # a re-run completes (no lock left behind)
    assert fingerprint(engine) == before


def test_database_gone_fails_with_a_clear_message() -> None:
    gone = "postgresql://marketfs:secret@127.0.0.1:1/marketfs"
    result = dg.materialize(PIPELINE[:1], partition_key="2024-01-03", resources=resources(gone), raise_on_error=False)
    assert not result.success
    [init_failure] = [e for e in result.all_events if e.event_type_value == "RESOURCE_INIT_FAILURE"]
    error, messages = init_failure.event_specific_data.error, ""
    while error is not None:  # the chain: resource error -> our Failure -> the driver's error
        messages += error.message
        error = error.cause
    assert "cannot reach the feature store database 127.0.0.1:1/marketfs" in messages
    assert "secret" not in messages


def test_a_database_still_gone_after_the_outage_budget_is_the_clear_final_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psycopg

    from assets import resources
    from assets.resources import FeatureStore, translate_database_errors

    monkeypatch.setenv("MARKETFS_DB_OUTAGE_SECONDS", "2")
    monkeypatch.setattr(resources._bounded_retry, "gone", False)

    @translate_database_errors
    def body(context=None, store=None):
        yield "started"
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    steps = body(store=FeatureStore(dsn="postgresql://u:p@127.0.0.1:1/marketfs"))
    assert next(steps) == "started"
    began = time.monotonic()
    with pytest.raises(dg.Failure) as failure:
        next(steps)
    assert 1.5 < time.monotonic() - began < 10  # waited the budget for the server, then gave up
    assert "cannot reach the feature store database 127.0.0.1:1/marketfs" in failure.value.description
    assert "server closed the connection" in failure.value.description
    assert not failure.value.allow_retries  # retrying a server gone this long only delays the one line
    assert resources._bounded_retry.gone  # Dagster's writes of the failure try once


def test_a_connection_lost_to_a_server_that_answers_again_retries_the_step(dsn: str) -> None:
    """A restart dropped the connection; the server answers again at once: the attempt is retried, not the run."""
    import psycopg

    from assets.resources import FeatureStore, translate_database_errors

    @translate_database_errors
    def body(store=None) -> None:  # noqa: ANN001 - as Dagster passes it
        raise sa.exc.OperationalError(
            "SELECT 1", {}, psycopg.errors.AdminShutdown("terminating connection due to administrator command")
        )

    with pytest.raises(dg.Failure) as failure:
        body(store=FeatureStore(dsn=dsn))
    assert failure.value.allow_retries
    assert "lost the feature store database (terminating connection" in failure.value.description
    assert (
        "answered again after 0 s" in failure.value.description and "the step is retried" in failure.value.description
    )


def test_a_bad_statement_is_not_taken_for_a_lost_database() -> None:
    import psycopg

    from assets.resources import translate_database_errors

    @translate_database_errors
    def body(store=None) -> None:  # noqa: ANN001 - as Dagster passes it
        raise sa.exc.ProgrammingError("SELECT nope", {}, psycopg.errors.UndefinedColumn("column nope does not exist"))

    with pytest.raises(sa.exc.ProgrammingError):
        body(store=None)


def test_a_write_that_loses_a_deadlock_is_retried_and_named(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """As when the TimescaleDB columnstore job locks a chunk a writer holds and wants the writer's next one."""
    from marketfs.db import retry_on_conflict, write_conflict

    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE locks (id int PRIMARY KEY, v int NOT NULL)"))
        conn.execute(sa.text("INSERT INTO locks VALUES (1, 0), (2, 0)"))
    holds_two, attempts, errors = threading.Event(), [], []

    def other() -> None:  # holds row 2, then wants row 1; waits 10 s before it would check for a deadlock
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL deadlock_timeout = '10s'"))
            conn.execute(sa.text("UPDATE locks SET v = v + 10 WHERE id = 2"))
            holds_two.set()
            conn.execute(sa.text("UPDATE locks SET v = v + 10 WHERE id = 1"))

    def write() -> None:
        attempts.append(1)
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL deadlock_timeout = '50ms'"))  # this side detects it, and loses
            conn.execute(sa.text("UPDATE locks SET v = v + 1 WHERE id = 1"))
            if len(attempts) == 1:
                thread = threading.Thread(target=other)
                thread.start()
                holds_two.wait(10)
                try:
                    conn.execute(sa.text("UPDATE locks SET v = v + 1 WHERE id = 2"))
                except sa.exc.DBAPIError as exc:
                    errors.append(write_conflict(exc))
                    raise
                finally:
                    threading.Thread(target=thread.join).start()
            else:
                conn.execute(sa.text("UPDATE locks SET v = v + 1 WHERE id = 2"))

    with caplog.at_level("WARNING", logger="marketfs.db"):
        retry_on_conflict(write, "writing locks")
    assert len(attempts) == 2 and errors and "deadlock" in errors[0]
    assert "writing locks lost a deadlock" in caplog.text and "retrying (1 of 2)" in caplog.text
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT array_agg(v ORDER BY id) FROM locks")).scalar() == [11, 11]


def test_a_lost_deadlock_is_not_called_an_unreachable_database() -> None:
    import psycopg

    from assets.resources import translate_database_errors

    @translate_database_errors
    def asset_body(store=None) -> None:  # noqa: ANN001 - as Dagster passes it
        raise sa.exc.OperationalError("UPDATE ...", {}, psycopg.errors.DeadlockDetected("deadlock detected"))

    with pytest.raises(dg.Failure) as failure:
        asset_body(store=None)
    assert "lost a deadlock" in failure.value.description and "cannot reach" not in failure.value.description
