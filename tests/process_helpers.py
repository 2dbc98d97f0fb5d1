"""Processes started by tests: stop a whole process group, and find what a test session left running.

Read from /proc (psutil is not a dependency): Linux only, as the embedded server already is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# Each test session puts a value of its own here; every process it starts inherits it.
SESSION_MARKER_ENV = "MARKETFS_TEST_SESSION"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    state: str
    cmdline: str

    def __str__(self) -> str:
        return f"pid {self.pid} (parent {self.ppid}, group {self.pgid}): {self.cmdline[:200]}"


def _read(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return Proc(pid, int(fields[1]), int(fields[2]), fields[0], cmdline)


def _all() -> list[Proc]:
    procs = (_read(int(d.name)) for d in Path("/proc").iterdir() if d.name.isdigit())
    return [p for p in procs if p is not None and p.state != "Z"]  # a zombie is gone, only unreaped


def _marked(pid: int, marker: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{SESSION_MARKER_ENV}={marker}".encode() in environ.split(b"\0")


def leftover_processes(marker: str, grace: float = 15.0) -> list[Proc]:
    """Descendants of this process, and processes carrying ``marker``, still alive after ``grace`` seconds."""
    me = os.getpid()
    deadline = time.monotonic() + grace
    while True:
        procs = _all()
        children: dict[int, list[int]] = {}
        for p in procs:
            children.setdefault(p.ppid, []).append(p.pid)
        descendants: set[int] = set()
        todo = list(children.get(me, []))
        while todo:
            pid = todo.pop()
            if pid not in descendants:
                descendants.add(pid)
                todo.extend(children.get(pid, []))
        left = [p for p in procs if p.pid != me and (p.pid in descendants or _marked(p.pid, marker))]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def stop_processes(procs: list[Proc]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p.pid, signal.SIGKILL)


def stop_process_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the group ``proc`` leads (started with ``start_new_session=True``); SIGKILL what outlives it.

    Waiting for the leader is not enough: a daemon's or webserver's code server (`dagster api grpc`)
    is in the same group and may outlive it.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    # Once the leader is gone, what is left of its group gets a few seconds only: `dagster dev` restarts a code
    # server that the SIGTERM ended just before its daemon stops, and that orphan waits 45 s for a heartbeat.
    deadline = min(deadline, time.monotonic() + 5)
    while any(p.pgid == proc.pid for p in _all()) and time.monotonic() < deadline:
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
