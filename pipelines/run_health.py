"""Runs whose process is gone end FAILURE, instead of staying STARTED forever.

``python -m pipelines run`` and ``recompute`` execute runs in their own process, with no daemon to
watch them: a ``kill -9`` (or an OOM kill, or a reboot) leaves the run STARTED, and the state chain
then waits on it. Such runs carry tags naming their process (host, boot, pid and the pid's start time,
so a reused pid is not mistaken for it); the next command on the same host finds those whose process
no longer exists and reports them failed, saying why and what to re-run.

Runs launched by the daemon (``make ui``: sensor, schedule, backfill, the UI's Materialize) run in a
worker process that the code server starts (Dagster's DefaultRunLauncher) and whose pid Dagster logs
("Started process for run (pid: N)"). Dagster's run monitoring cannot ask that launcher whether the
worker is alive, so it would end such a run only at ``max_runtime_seconds``; the ``dead_runs`` sensor
(every minute, evaluated by that same code server, so on the workers' host) fails those whose worker
is gone, and the in-process runs above when no command comes along. Under any other launcher (a pod
or a container per run) pids mean nothing here: those runs are left to run monitoring.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
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


def _report_failed(instance: dg.DagsterInstance, run: dg.DagsterRun, pid: str, where: str) -> None:
    first_day = run.tags.get("dagster/asset_partition_range_start") or run.tags.get("dagster/partition")
    rerun = f"re-run it: python -m pipelines recompute --from {first_day}" if first_day else "re-run it"
    instance.report_run_failed(
        run,
        f"the process that executed this run (pid {pid} on {where}) ended while the run was {run.status.value} "
        f"(killed, or the machine restarted), so it was marked failed. Each day is written in one transaction: "
        f"nothing is half-written; {rerun}.",
    )


def fail_runs_whose_process_is_gone(instance: dg.DagsterInstance, *, launched_here: bool = False) -> list[str]:
    """Report FAILURE for this host's in-process runs that are unfinished but whose process has died.

    With ``launched_here`` (only where the code server that starts the run workers evaluates this,
    i.e. in the ``dead_runs`` sensor), also for runs of the DefaultRunLauncher whose worker is gone.
    Returns the ids of the runs it failed. Runs of other hosts are left to their own host and to
    Dagster's run monitoring.
    """
    failed: list[str] = []
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=_UNFINISHED, tags={HOST_TAG: socket.gethostname()}))
    for run in runs:
        if PID_TAG not in run.tags or not _process_is_gone(run.tags):
            continue
        _report_failed(instance, run, run.tags[PID_TAG], run.tags[HOST_TAG])
        failed.append(run.run_id)
    if launched_here and _launches_local_workers(instance):
        for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
            worker = None if PID_TAG in run.tags else _worker_of(instance, run.run_id)
            if worker is not None and _worker_is_gone(*worker):
                _report_failed(instance, run, str(worker[0]), f"{socket.gethostname()}, its run worker")
                failed.append(run.run_id)
    return failed


def _launches_local_workers(instance: dg.DagsterInstance) -> bool:
    from dagster._core.launcher.default_run_launcher import DefaultRunLauncher

    return isinstance(instance.run_launcher, DefaultRunLauncher)


def _worker_of(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """The run worker's pid and when it said it started, from the engine event Dagster logs for it."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        if (entry.message or "").startswith("Started process for run (pid:"):
            pid = entry.dagster_event.engine_event_data.metadata.get("pid")
            if pid is not None:
                return int(pid.value), entry.timestamp
    return None


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _worker_is_gone(pid: int, said_started_at: float) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    ticks = _process_start(pid)
    if not ticks:
        return False  # no /proc: cannot tell a reused pid, so assume the worker
    started = _boot_time() + int(ticks) / os.sysconf("SC_CLK_TCK")
    # A process that started after the worker said it had started is another one under a reused pid.
    return started > said_started_at + 1


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def dead_runs(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Fails runs whose process is gone (killed, out of memory, machine restarted), within about a minute."""
    failed = fail_runs_whose_process_is_gone(context.instance, launched_here=True)
    checked = datetime.now(UTC).strftime("%H:%M:%S")
    if failed:
        return dg.SkipReason(f"{checked}: marked FAILURE, their process is gone: {', '.join(failed)}")
    return dg.SkipReason(f"{checked}: every unfinished run of this host has its process")
