"""Kubernetes on paper: deploy/helm/values.yaml is valid for Dagster's Helm chart and runs what deploy/docker runs.

No helm binary can be installed here, so `helm template` is not run: the values are checked against the chart's
values schema (an extract, deploy/helm/README.md) the way Helm checks them, without the chart's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HELM = ROOT / "deploy" / "helm"
DOCKER = ROOT / "deploy" / "docker"
# The Secret the values name for the settings that are credentials (deploy/helm/values.yaml's header).
CREDENTIALS = {"MARKETFS_DSN", "MARKETFS_DAGSTER_PG_URL"}


def _checkable(schema: object) -> object:
    """The schema as it can be checked here, in two ways looser than Helm:

    - no `required` lists: Helm validates the values merged over the chart's defaults, which fill every required
      field, and those defaults are not here (types, enums and unknown keys still fail);
    - no references to Kubernetes' own definitions online (no network): the types Dagster's schema states beside
      each of them (an object, an array of objects, a map of strings) are checked instead.
    """
    if isinstance(schema, dict):
        return {
            k: _checkable(v)
            for k, v in schema.items()
            if k != "required" and not (k == "$ref" and str(v).startswith("https://kubernetesjsonschema.dev/"))
        }
    if isinstance(schema, list):
        return [_checkable(v) for v in schema]
    return schema


def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_checkable(json.loads((HELM / "values.schema.json").read_text())))


def _values() -> dict:
    return yaml.safe_load((HELM / "values.yaml").read_text())


def test_the_helm_values_are_valid_for_the_charts_schema() -> None:
    errors = sorted(_validator().iter_errors(_values()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_refuses_a_misspelt_key() -> None:
    values = _values()
    values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfg"] = {}
    with pytest.raises(jsonschema.ValidationError, match="runK8sConfg"):
        _validator().validate(values)


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
