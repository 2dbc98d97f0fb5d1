"""The session's guard finds processes a test left running, orphans included."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from process_helpers import SESSION_MARKER_ENV, leftover_processes, stop_process_group, stop_processes


def test_an_orphaned_grandchild_is_found_and_a_process_group_is_stopped_whole() -> None:
    marker = os.environ[SESSION_MARKER_ENV]
    # A parent that starts a grandchild and exits at once: the grandchild is reparented away from
    # pytest, as a `dagster api grpc` is when its daemon dies; the environment marker still finds it.
    subprocess.run(["sh", "-c", "sleep 120 >/dev/null 2>&1 &"], check=True)
    # The background child may not have exec'd `sleep` yet when its parent returns (a loaded machine): wait.
    deadline = time.monotonic() + 10
    orphans = []
    while not orphans and time.monotonic() < deadline:
        orphans = [p for p in leftover_processes(marker, grace=0) if p.cmdline == "sleep 120"]
        time.sleep(0.05)
    stop_processes(orphans)
    assert orphans and all(p.ppid != os.getpid() for p in orphans)

    group = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '121']); time.sleep(120)"],
        start_new_session=True,
    )
    time.sleep(0.5)
    stop_process_group(group, timeout=10)
    assert not [p for p in leftover_processes(marker, grace=0) if "sleep 121" in p.cmdline]
