"""Test fixtures: a real PostgreSQL for the session and a fresh database per test.

The server is the embedded one, started in a throwaway folder (fsync off), unless
MARKETFS_TEST_DSN points at another server (for example a TimescaleDB): then each test gets
its own database created on that server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from process_helpers import SESSION_MARKER_ENV, leftover_processes, stop_processes

from marketfs.embedded_pg import EmbeddedPostgres
from marketfs.store.migrations import migrate


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """At the end of the session, no process started by a test may still run (daemons, code servers).

    Set up before every other session fixture, so torn down after them: the session's own PostgreSQL is
    stopped by then. Children inherit a marker in their environment, so an orphan that was reparented
    away from pytest (a `dagster api grpc` whose daemon died) is found too.
    """
    os.environ[SESSION_MARKER_ENV] = uuid.uuid4().hex
    yield
    left = leftover_processes(os.environ[SESSION_MARKER_ENV])
    stop_processes(left)  # the machine is cleaned up either way; the failure names what was left
    assert not left, "processes left behind by the tests:\n" + "\n".join(f"  {p}" for p in left)


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Data Docs and other per-project files of the tests go to a temporary MARKETFS_HOME."""
    home = tmp_path_factory.mktemp("marketfs-home")
    previous = os.environ.get("MARKETFS_HOME")
    os.environ["MARKETFS_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("MARKETFS_HOME", None)
    else:
        os.environ["MARKETFS_HOME"] = previous


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "columnstore_policy: keeps TimescaleDB's columnstore policy (MARKETFS_COMPRESS_AFTER unset)"
    )


@pytest.fixture(autouse=True)
def columnstore_policy_off(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """No columnstore job in a test's database unless the test is about the policy (``columnstore_policy``).

    On TimescaleDB the default 30-day policy converts the tests' 2024 rows the moment it is added, while
    the test writes them directly (without the pipeline's retry on a lost deadlock): 8 deadlocks in 26
    loops of one test. A test of the policy, or of what it does, asks for it with the marker.
    """
    if request.node.get_closest_marker("columnstore_policy") is None:
        monkeypatch.setenv("MARKETFS_COMPRESS_AFTER", "off")
    else:
        monkeypatch.delenv("MARKETFS_COMPRESS_AFTER", raising=False)


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """DSN of a maintenance database on the test server."""
    external = os.environ.get("MARKETFS_TEST_DSN")
    if external:
        yield external
        return
    home = Path(tempfile.mkdtemp(prefix="marketfs-test-pg-"))
    server = EmbeddedPostgres(home, durable=False)
    server.ensure_running()
    try:
        yield server.dsn("postgres")
    finally:
        server.destroy()
        shutil.rmtree(home, ignore_errors=True)


def _with_database(dsn: str, name: str) -> str:
    return (
        sa.make_url(dsn)
        .set(database=name)
        .render_as_string(hide_password=False)
        .replace("postgresql+psycopg://", "postgresql://")
    )


@pytest.fixture
def empty_dsn(server_dsn: str) -> Iterator[str]:
    """A new, empty database for one test; dropped afterwards."""
    with new_database(server_dsn) as dsn:
        yield dsn


@contextlib.contextmanager
def new_database(server_dsn: str) -> Iterator[str]:
    """A new, empty database on the test server, dropped when the block ends."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = _with_database(server_dsn, name)
    try:
        yield dsn
    finally:
        from marketfs.db import engine_for

        engine_for(dsn).dispose()
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def dsn(empty_dsn: str) -> str:
    """A fresh database with the schema migrated."""
    migrate(empty_dsn)
    return empty_dsn


@pytest.fixture
def engine(dsn: str) -> sa.Engine:
    from marketfs.db import engine_for

    return engine_for(dsn)


@pytest.fixture
def ts_engine(engine: sa.Engine) -> sa.Engine:
    """The test's migrated database, on a server with TimescaleDB; the test skips, saying why, elsewhere."""
    from marketfs.db import timescaledb_installed

    with engine.connect() as conn:
        if not timescaledb_installed(conn):
            pytest.skip("no TimescaleDB on the test server: set MARKETFS_TEST_DSN to a server with the extension")
    return engine
