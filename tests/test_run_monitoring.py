"""No run is left STARTED: a killed in-process run ends FAILURE, and the daemon's run monitoring is on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster_helpers import dagster_process_env

from pipelines import run_health
from pipelines.run_health import fail_runs_whose_process_is_gone

ROOT = Path(__file__).resolve().parents[1]

# A daily-partitioned asset that takes its time, executed in-process as `python -m pipelines run` does.
SLOW_RUN = textwrap.dedent(
    """
    import time
    import dagster as dg
    from pipelines.run_health import process_tags

    @dg.asset(partitions_def=dg.DailyPartitionsDefinition(start_date="2024-01-01"))
    def slow(context):
        print("STARTED", context.run_id, flush=True)
        time.sleep(300)

    dg.materialize([slow], partition_key="2024-01-05", instance=dg.DagsterInstance.get(), tags=process_tags())
    """
)


def start_run(script: str, dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[subprocess.Popen, str]:
    """Start ``script`` in its own process on a test instance (this process then uses the same instance)
    and return the process and its run id once the asset is executing."""
    env = dagster_process_env(dsn, dsn, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    line, deadline = "", time.monotonic() + 60
    while not line.startswith("STARTED") and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError("the run process ended before its asset started")
    for name in ("DAGSTER_HOME", "MARKETFS_DAGSTER_PG_URL"):
        monkeypatch.setenv(name, env[name])
    return proc, line.split()[1]


def test_a_run_whose_process_was_killed_ends_failure_at_the_next_command(
    empty_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, run_id = start_run(SLOW_RUN, empty_dsn, tmp_path, monkeypatch)
    try:
        with dg.DagsterInstance.get() as instance:
            assert fail_runs_whose_process_is_gone(instance) == []  # alive: left alone
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED

            os.kill(proc.pid, signal.SIGKILL)  # as the OOM killer, or kill -9 of `make run`
            proc.wait(timeout=30)
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED  # what Dagster leaves

            assert fail_runs_whose_process_is_gone(instance) == [run_id]
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
            [failure] = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
            assert f"pid {proc.pid}" in failure.message and "recompute --from 2024-01-05" in failure.message
            assert fail_runs_whose_process_is_gone(instance) == []  # once
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_reused_pid_or_a_reboot_does_not_pass_for_the_run_process() -> None:
    tags = run_health.process_tags()
    assert not run_health._process_is_gone(tags)
    assert run_health._process_is_gone({**tags, run_health.PROCESS_START_TAG: "1"})  # same pid, another process
    assert run_health._process_is_gone({**tags, run_health.BOOT_TAG: "another-boot"})


def test_the_instance_monitors_runs_and_never_resumes_them() -> None:
    settings = yaml.safe_load((ROOT / "dagster.yaml").read_text())["run_monitoring"]
    with dg.instance_for_test(overrides={"run_monitoring": settings}) as instance:
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_resume_run_attempts == 0
        # A killed daemon-launched run ends by these limits; each must be finite.
        assert 0 < instance.run_monitoring_start_timeout_seconds <= 600
        assert 0 < instance.run_monitoring_cancel_timeout_seconds <= 600
        assert 0 < instance.run_monitoring_max_runtime_seconds <= 24 * 3600


# A run as the daemon's DefaultRunLauncher starts it: no marketfs process tags; the worker logs its pid
# in the engine event Dagster's own run worker writes (dagster/_grpc/impl.py, _run_in_subprocess).
WORKER_RUN = textwrap.dedent(
    """
    import os
    import time
    import dagster as dg
    from dagster._core.events import EngineEventData

    @dg.asset
    def slow(context):
        run = context.instance.get_run_by_id(context.run_id)
        context.instance.report_engine_event(
            f"Started process for run (pid: {os.getpid()}).", run, EngineEventData.in_process(os.getpid())
        )
        print("STARTED", context.run_id, flush=True)
        time.sleep(300)

    dg.materialize([slow], instance=dg.DagsterInstance.get())
    """
)


def test_the_dead_runs_sensor_fails_a_daemon_launched_run_whose_worker_was_killed(
    empty_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, run_id = start_run(WORKER_RUN, empty_dsn, tmp_path, monkeypatch)
    try:
        from pipelines.run_health import dead_runs

        with dg.DagsterInstance.get() as instance:
            assert "every unfinished run" in dead_runs(dg.build_sensor_context(instance=instance)).skip_message
            # Only the sensor, on the workers' host, reads worker pids; a command does not.
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            assert fail_runs_whose_process_is_gone(instance) == []
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED

            reason = dead_runs(dg.build_sensor_context(instance=instance)).skip_message
            assert run_id in reason
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
            [failure] = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
            assert f"pid {proc.pid}" in failure.message and "run worker" in failure.message
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
