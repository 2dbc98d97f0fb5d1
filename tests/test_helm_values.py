"""Kubernetes on paper: deploy/helm/values.yaml runs what deploy/docker runs.

No helm binary can be installed here, so the values are not rendered with Dagster's chart (`helm template`, which
also checks them against the chart's values schema, is the first step in docs/docker.md).
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HELM = ROOT / "deploy" / "helm"
DOCKER = ROOT / "deploy" / "docker"
# The Secret the values name for the settings that are credentials (deploy/helm/values.yaml's header).
CREDENTIALS = {"MARKETFS_DSN", "MARKETFS_DAGSTER_PG_URL"}


def _values() -> dict:
    return yaml.safe_load((HELM / "values.yaml").read_text())


def test_the_helm_values_run_deploy_dockers_image_settings_and_queue() -> None:
    values = _values()
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    instance = yaml.safe_load((DOCKER / "dagster.yaml").read_text())
    launcher = instance["run_launcher"]["config"]
    # The image's own code server and code location.
    assert deployment["codeServerArgs"] == ["-m", "pipelines.definitions", "-a", "defs"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    # Every setting the Docker runs get, from the env or the Secret; the landing folder at the same path, read-only.
    assert set(deployment["env"]) | CREDENTIALS == set(launcher["env_vars"])
    (landing,) = launcher["container_kwargs"]["volumes"]
    mount = landing.split(":")[1]
    assert deployment["env"]["MARKETFS_LANDING_DIR"] == mount
    assert deployment["volumeMounts"] == [{"name": "landing", "mountPath": mount, "readOnly": True}]
    # The same queue, per-chain limit and pool as the instance file.
    queue = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    runs = instance["concurrency"]["runs"]
    assert queue["maxConcurrentRuns"] == runs["max_concurrent_runs"]
    assert queue["tagConcurrencyLimits"] == runs["tag_concurrency_limits"]
    assert values["additionalInstanceConfig"]["concurrency"]["pools"] == instance["concurrency"]["pools"]
    limits = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]["resources"]
    assert limits["limits"]["memory"] == launcher["container_kwargs"]["mem_limit"].upper() + "i"
