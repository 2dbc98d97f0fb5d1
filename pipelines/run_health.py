"""Runs whose process is gone end FAILURE, instead of staying STARTED forever.

``python -m pipelines run`` and ``recompute`` execute runs in their own process, with no daemon to
watch them: a ``kill -9`` (or an OOM kill, or a reboot) leaves the run STARTED, and the state chain
then waits on it. Such runs carry tags naming their process (host, boot, pid and the pid's start time,
so a reused pid is not mistaken for it); the next command on the same host finds those whose process
no longer exists and reports them failed, saying why and what to re-run.

Runs launched by the daemon (``make ui``: sensor, schedule, backfill, the UI's Materialize) are
watched by Dagster's run monitoring instead (``run_monitoring`` in dagster.yaml).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import dagster as dg

HOST_TAG = "marketfs/host"
BOOT_TAG = "marketfs/boot_id"
PID_TAG = "marketfs/pid"
PROCESS_START_TAG = "marketfs/process_start"

# Where a run can be left behind by its process; QUEUED runs have no process yet.
_UNFINISHED = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def _boot_id() -> str:
    path = Path("/proc/sys/kernel/random/boot_id")
    return path.read_text().strip() if path.exists() else ""


def _process_start(pid: int) -> str:
    """The pid's start time in clock ticks since boot (field 22 of /proc/PID/stat); '' when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2 :].split()[19]


def process_tags() -> dict[str, str]:
    """Tags naming this process, for the runs it executes in-process (merge them into the run's tags)."""
    pid = os.getpid()
    return {
        HOST_TAG: socket.gethostname(),
        BOOT_TAG: _boot_id(),
        PID_TAG: str(pid),
        PROCESS_START_TAG: _process_start(pid),
    }


def _process_is_gone(tags: dict[str, str]) -> bool:
    if tags.get(BOOT_TAG) and tags[BOOT_TAG] != _boot_id():
        return True  # the machine restarted since: every process of that boot is gone
    pid = int(tags[PID_TAG])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    started = tags.get(PROCESS_START_TAG)
    return bool(started) and _process_start(pid) not in ("", started)  # the pid now names another process


def fail_runs_whose_process_is_gone(instance: dg.DagsterInstance) -> list[str]:
    """Report FAILURE for this host's in-process runs that are unfinished but whose process has died.

    Returns the ids of the runs it failed. Runs of other hosts, and runs without the process tags
    (launched by the daemon), are left to their own host and to Dagster's run monitoring.
    """
    failed: list[str] = []
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=_UNFINISHED, tags={HOST_TAG: socket.gethostname()}))
    for run in runs:
        if PID_TAG not in run.tags or not _process_is_gone(run.tags):
            continue
        first_day = run.tags.get("dagster/asset_partition_range_start") or run.tags.get("dagster/partition")
        rerun = f"re-run it: python -m pipelines recompute --from {first_day}" if first_day else "re-run it"
        instance.report_run_failed(
            run,
            f"the process that executed this run (pid {run.tags[PID_TAG]} on {run.tags[HOST_TAG]}) ended while the "
            f"run was {run.status.value} (killed, or the machine restarted), so it was marked failed. Each day is "
            f"written in one transaction: nothing is half-written; {rerun}.",
        )
        failed.append(run.run_id)
    return failed
