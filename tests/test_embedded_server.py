"""The embedded server: root touches nothing outside the project, the port survives restarts, and a
damaged state file is recovered without losing data."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from marketfs import embedded_pg
from marketfs.embedded_pg import PORT_ENV, EmbeddedPostgres, EmbeddedPostgresError

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the root path is only taken by root")


def _query(dsn: str, sql: str):
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    """One embedded server shared by the tests of this module (each leaves it running and usable)."""
    home = Path(tempfile.mkdtemp(prefix="marketfs-embedded-"))
    server = EmbeddedPostgres(home, durable=False)
    server.ensure_running()
    try:
        yield server
    finally:
        server.destroy()
        shutil.rmtree(home, ignore_errors=True)


@as_root
def test_as_root_the_server_runs_unprivileged_and_touches_nothing_outside_the_project() -> None:
    private = Path(tempfile.mkdtemp(prefix="marketfs-private-"))  # 0700, like /root
    private.chmod(0o700)
    home = private / "project" / ".marketfs"
    parents = [private.parent, *private.parent.parents]
    modes_before = {p: p.stat().st_mode for p in [private, *parents]}
    users_before = sorted(pwd.getpwall())
    server = EmbeddedPostgres(home, durable=False)
    try:
        dsn = server.ensure_running()
        assert _query(dsn, "SELECT 1") == [(1,)]
        assert {p: p.stat().st_mode for p in [private, *parents]} == modes_before  # no o+x up to /
        assert sorted(pwd.getpwall()) == users_before  # no user created
        assert server.data_dir.stat().st_uid == 0  # nothing chowned to another user
        pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        # The postmaster is root's process, confined to a user namespace of its own.
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert server.stop() and server.running_port() is None  # pg_ctl reaches it from a new namespace
    finally:
        server.destroy()
        shutil.rmtree(private, ignore_errors=True)


@as_root
@pytest.mark.parametrize("unshare", ["missing", "refused"])
def test_as_root_without_user_namespaces_one_message_says_what_to_do(
    unshare: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if unshare == "refused":  # as in containers whose seccomp profile forbids unshare(CLONE_NEWUSER)
        fake = bin_dir / "unshare"
        fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    embedded_pg._namespace_prefix.cache_clear()
    try:
        with pytest.raises(EmbeddedPostgresError) as error:
            EmbeddedPostgres(tmp_path / "home").ensure_running()
    finally:
        embedded_pg._namespace_prefix.cache_clear()
    message = str(error.value)
    assert "as root" in message and "non-root user" in message and "MARKETFS_DSN" in message
    assert ("not installed" if unshare == "missing" else "Operation not permitted") in message


def _plain_bind_fails(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def test_port_is_kept_across_a_restart_while_old_connections_linger(server: EmbeddedPostgres) -> None:
    dsn = server.ensure_running()
    port = server.running_port()
    # As with `make stop` mid-run: clients still hold connections, so the server's closed sockets
    # linger on its port (FIN-WAIT-2, then TIME_WAIT) after it exits.
    connections = [psycopg.connect(dsn) for _ in range(5)]
    try:
        for conn in connections:
            conn.execute("SELECT 1")
        assert server.stop()
        assert _plain_bind_fails(port), "precondition: the port looks taken to a bind without SO_REUSEADDR"
        assert server.ensure_running() == dsn
        assert server.running_port() == port
    finally:
        for conn in connections:
            conn.close()


def test_a_port_taken_by_another_process_is_named_never_silently_replaced(
    server: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = server.running_port()
    server.stop()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(EmbeddedPostgresError) as error:
            server.ensure_running()
        assert f"port {port}" in str(error.value) and PORT_ENV in str(error.value)
        assert json.loads(server.state_file.read_text())["port"] == port  # the record is not changed

        with socket.socket() as probe:  # the variable chooses another port, and that is recorded
            probe.bind(("127.0.0.1", 0))
            other = probe.getsockname()[1]
        monkeypatch.setenv(PORT_ENV, str(other))
        dsn = server.ensure_running()
    assert f":{other}/" in dsn and server.running_port() == other
    assert json.loads(server.state_file.read_text())["port"] == other
    assert _query(dsn, "SELECT 1") == [(1,)]


@pytest.mark.parametrize("damage", ["", '{"password": "abc'], ids=["empty", "truncated"])
def test_a_damaged_state_file_is_named_and_reset_password_recovers_without_losing_data(
    damage: str, server: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = server.ensure_running()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    port = server.running_port()
    server.state_file.write_text(damage)
    with pytest.raises(EmbeddedPostgresError) as error:
        server.ensure_running()
    message = str(error.value)
    assert str(server.state_file) in message and "reset-password" in message and "untouched" in message
    assert f'"port": {port}' in message  # the port is recovered from the running server

    server.stop()  # recovery works from a stopped server too: the port then comes from the server log
    monkeypatch.setenv("MARKETFS_HOME", str(server.home))
    assert embedded_pg.main(["reset-password"]) == 0
    dsn_after = server.ensure_running()
    assert server.running_port() == port and f":{port}/" in dsn_after
    assert (42,) in _query(dsn_after, "SELECT x FROM kept")
    assert server.state_file.stat().st_mode & 0o077 == 0


@as_root
def test_a_data_dir_left_by_the_old_system_user_is_taken_back(server: EmbeddedPostgres) -> None:
    dsn = server.ensure_running()
    server.stop()
    for folder, dirs, files in os.walk(server.root_dir):  # as the earlier root mode left it
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.lchown(name, 4242, 4242)
    assert server.ensure_running() == dsn
    assert server.data_dir.stat().st_uid == 0


def test_a_new_home_says_it_creates_an_empty_database_once(capsys: pytest.CaptureFixture[str]) -> None:
    """A command run from another folder (another MARKETFS_HOME) starts a second, empty store: said on stderr,
    naming the folder, the first time only."""
    home = Path(tempfile.mkdtemp(prefix="marketfs-newhome-"))
    server = EmbeddedPostgres(home)  # durable, as `make run` and the CLIs create it
    try:
        server.ensure_running()
        said = capsys.readouterr().err
        assert f"no embedded database in {home} yet: creating a new, empty one there" in said
        assert "MARKETFS_HOME" in said
        server.ensure_running()
        assert "no embedded database" not in capsys.readouterr().err
    finally:
        server.destroy()
        shutil.rmtree(home, ignore_errors=True)
