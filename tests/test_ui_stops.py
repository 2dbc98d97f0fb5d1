"""`make ui` (`python -m pipelines ui`) stops whole on SIGTERM and SIGHUP, as on Ctrl-C: webserver, daemon and
code servers, within seconds."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dagster_helpers import dagster_process_env
from process_helpers import _all

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    procs = _all()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for p in procs:
            if p.ppid == parent and p.pid not in found:
                found.add(p.pid)
                todo.append(p.pid)
    return found


def _alive(pids: set[int]) -> set[int]:
    running = {p.pid for p in _all()}
    return pids & running


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_ui_stops_whole_on_sigterm_and_sighup(empty_dsn: str, tmp_path: Path, signum: int) -> None:
    port = _free_port()
    env = dagster_process_env(empty_dsn, empty_dsn, tmp_path)
    ui = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "ui", "--port", str(port)],
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # until the webserver answers
            assert ui.poll() is None, "the UI ended by itself"
            assert time.monotonic() < deadline, "the webserver did not answer in 3 minutes"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as response,
            ):
                if response.status == 200:
                    break
            time.sleep(1)
        processes = {ui.pid} | _descendants(ui.pid)
        assert len(processes) >= 3  # this command, dagster dev, and the webserver and daemon under it
        os.kill(ui.pid, signum)  # the command alone, as systemd, docker stop or a closed terminal would
        stopped = time.monotonic()
        while _alive(processes) - {ui.pid} or ui.poll() is None:
            assert time.monotonic() - stopped < 15, f"still alive 15 s after the signal: {_alive(processes)}"
            time.sleep(0.2)
        assert ui.returncode == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            for pid in _alive({ui.pid} | _descendants(ui.pid)):
                os.kill(pid, signal.SIGKILL)
        ui.wait(timeout=10)
