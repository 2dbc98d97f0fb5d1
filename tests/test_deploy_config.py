"""The multi-node instance file a deployment starts from (deploy/docker/dagster.yaml) loads in Dagster, and
differs from the repository's dagster.yaml only by its run launcher."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import new_database
from dagster_helpers import dagster_process_env

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "docker" / "dagster.yaml"


def test_the_docker_instance_differs_from_the_repositorys_only_by_its_run_launcher() -> None:
    local = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    deployed = yaml.safe_load(DEPLOY.read_text())
    launcher = deployed.pop("run_launcher")
    assert launcher["class"] == "DockerRunLauncher"
    # Every variable that decides partitions or shards reaches the run containers.
    assert {"MARKETFS_DSN", "MARKETFS_DAGSTER_PG_URL", "MARKETFS_SHARDS"} <= set(launcher["config"]["env_vars"])
    assert deployed == local


def test_dagster_loads_the_docker_instance(server_dsn: str, tmp_path: Path) -> None:
    with new_database(server_dsn) as dsn:
        env = dagster_process_env(dsn, dsn, tmp_path, MARKETFS_SHARDS="2")
        shutil.copyfile(DEPLOY, Path(env["DAGSTER_HOME"]) / "dagster.yaml")
        info = subprocess.run(
            [sys.executable, "-m", "dagster", "instance", "info"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert info.returncode == 0, info.stdout + info.stderr
        assert "DockerRunLauncher" in info.stdout, info.stdout
        # The queue the daemon runs: one run per state chain (tag value), four at once.
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import dagster as dg; i = dg.DagsterInstance.get(); q = i.get_concurrency_config().run_queue_config; "
                "print(type(i.run_launcher).__name__, type(i.run_coordinator).__name__, q.max_concurrent_runs, "
                "q.tag_concurrency_limits)",
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert probe.stdout.startswith("DockerRunLauncher QueuedRunCoordinator 4 "), probe.stdout
        assert "'marketfs/state_chain'" in probe.stdout and "applyLimitPerUniqueValue" in probe.stdout, probe.stdout
