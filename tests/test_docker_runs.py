"""Runs in containers, on a real Docker Engine: a two-shard backfill launched through the instance, whose daemon's
DockerRunLauncher (deploy/docker/dagster.yaml) starts one container of the user-code image per shard run, stores
the same rows as a local run of the same days, and leaves no container behind.

The code server runs in a container of the image (`make image`, deploy/docker/build_image.sh, reused when up to
date); the webserver and daemon run on the host (`dagster dev` on deploy/docker/workspace.yaml, pointed at the
container's port). Every container is on the host's network: the runs reach the test's PostgreSQL, the code
server and nothing else on 127.0.0.1. Skipped, saying why, where no Docker engine answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from conftest import new_database
from dagster_helpers import (
    BACKFILL_STATUS,
    PIPELINE,
    dagster_dev,
    dagster_process_env,
    free_port,
    graphql,
    launch_backfill,
    materialize_range,
    run_ranges,
    run_tag,
    served_content,
    wait_for_backfill,
)

from assets.partitions import ROWS_PER_CHUNK, SESSIONS
from marketfs.sources import SyntheticBars, SyntheticEvents
from marketfs.store.migrations import migrate
from marketfs.universe import DEFAULT_UNIVERSE

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "docker"
IMAGE = os.environ.get("MARKETFS_IMAGE", "marketfs:latest")
# Where the deployment mounts the landing folder in its containers (dagster.yaml, compose.yaml).
LANDING_IN_CONTAINERS = "/srv/marketfs/landing"
DAYS = [d.isoformat() for d in SESSIONS.between(date(2024, 1, 2), date(2024, 1, 31))[:3]]
INSTRUMENTS = tuple(f"SYN{i:03d}" for i in range(6))
# Two backfills, as an operator runs a new range: the landing files into the store, then the features from it.
# One backfill of both would also request the days after DAYS downstream of each (a feature's lookback maps a
# bar's day onto the days that read it), and split each shard's range by asset.
INGEST = ["raw_ohlcv", "raw_events", "bars_1d", "corporate_actions"]
FEATURES = [a.key.to_user_string() for a in PIPELINE if a.key.to_user_string() not in INGEST]


def _docker_client():
    """The Docker engine's client, or the reason there is none (the test then skips saying it)."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:  # any failure to reach an engine means: no Docker here
        return None, f"no Docker engine answers ({type(exc).__name__}: {exc}); .ci/run installs and starts dockerd"
    return client, ""


DOCKER, WHY_NOT = _docker_client()
pytestmark = pytest.mark.skipif(DOCKER is None, reason=WHY_NOT)


def _base_image() -> str:
    """The base the image is built on: MARKETFS_BASE_IMAGE, else Debian's packages where debootstrap can build it
    (no registry reachable here), else python:3.11-slim."""
    chosen = os.environ.get("MARKETFS_BASE_IMAGE")
    if chosen:
        return chosen
    return "debootstrap" if shutil.which("debootstrap") else "python:3.11-slim"


@pytest.fixture(scope="module")
def image() -> str:
    """The user-code image, built by the one script that `make image` and .ci/run call (seconds when up to date)."""
    env = {**os.environ, "MARKETFS_IMAGE": IMAGE, "MARKETFS_BASE_IMAGE": _base_image()}
    built = subprocess.run(
        [str(DEPLOY / "build_image.sh")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200
    )
    assert built.returncode == 0, built.stdout + built.stderr
    return IMAGE


def _write_landing(folder: Path) -> None:
    """A vendor's delivery of DAYS, readable by the image's unprivileged user through the read-only mount."""
    for day in DAYS:
        start = datetime.fromisoformat(day).replace(tzinfo=UTC)
        end = start + timedelta(days=1)
        for kind, frame in (
            ("bars", SyntheticBars(INSTRUMENTS).bars(start, end)),
            ("events", SyntheticEvents(INSTRUMENTS).events(start, end)),
        ):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            frame.write_parquet(folder / kind / f"{day}.parquet")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _docker_home(env: dict[str, str], landing: Path) -> None:
    """deploy/docker/dagster.yaml as the instance, its landing volume's host side moved to the test's folder."""
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    kwargs = instance["run_launcher"]["config"]["container_kwargs"]
    kwargs["volumes"] = [f"{landing}:{LANDING_IN_CONTAINERS}:ro"]
    (Path(env["DAGSTER_HOME"]) / "dagster.yaml").write_text(yaml.safe_dump(instance))


def _workspace(folder: Path, port: int) -> Path:
    """deploy/docker/workspace.yaml, on the port the test's code server listens on."""
    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())
    workspace["load_from"][0]["grpc_server"]["port"] = port
    path = folder / "workspace.yaml"
    path.write_text(yaml.safe_dump(workspace))
    return path


@pytest.fixture
def code_server(image: str, tmp_path: Path, dsn: str) -> Iterator[tuple[dict[str, str], int]]:
    """The code location in a container of the image on the host's network: its environment and gRPC port."""
    landing = tmp_path / "landing"
    _write_landing(landing)
    env = dagster_process_env(
        dsn,
        dsn,
        tmp_path,
        MARKETFS_SHARDS="2",
        MARKETFS_SOURCE="landing",
        MARKETFS_LANDING_DIR=LANDING_IN_CONTAINERS,
        # The launcher passes each name of its env_vars from the daemon's environment, and refuses to launch
        # when one is unset: the deployment sets them all (compose.yaml), at their defaults here.
        MARKETFS_UNIVERSE=DEFAULT_UNIVERSE,
        MARKETFS_CHUNK_ROWS=str(ROWS_PER_CHUNK),
    )
    _docker_home(env, landing)
    port = free_port()
    # The code server gets what the daemon passes to the runs (deploy/docker/dagster.yaml's env_vars).
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    settings = {name: env[name] for name in instance["run_launcher"]["config"]["env_vars"]}
    container = DOCKER.containers.run(
        image,
        ["dagster", "code-server", "start", "-h", "127.0.0.1", "-p", str(port)]
        + ["-m", "pipelines.definitions", "-a", "defs"],
        detach=True,
        auto_remove=True,
        name=f"marketfs-test-code-{uuid.uuid4().hex[:8]}",
        network_mode="host",
        environment={**settings, "DAGSTER_CURRENT_IMAGE": image},
        volumes=[f"{landing}:{LANDING_IN_CONTAINERS}:ro"],
    )
    try:
        _wait_for_grpc(port, container)
        yield env, port
    finally:
        container.stop(timeout=10)  # auto_remove deletes it


def _wait_for_grpc(port: int, container, timeout: float = 180) -> None:
    import docker.errors

    deadline = time.monotonic() + timeout
    while True:
        check = subprocess.run(
            [
                str(Path(sys.executable).parent / "dagster"),
                "api",
                "grpc-health-check",
                "-p",
                str(port),
                "-h",
                "127.0.0.1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check.returncode == 0:
            return
        try:
            container.reload()
            logs = container.logs().decode(errors="replace")[-3000:]
        except docker.errors.NotFound:
            pytest.fail("the code server's container exited")
        assert container.status == "running", logs
        assert time.monotonic() < deadline, f"the code server did not answer on {port}:\n{logs}"
        time.sleep(2)


def _containers_of(run_id: str, since: float) -> tuple[list[str], list[str]]:
    """The containers Docker created for a run since ``since`` (by the launcher's label), and those still there."""
    label = f"dagster/run_id={run_id}"
    events = DOCKER.events(
        since=int(since), until=int(time.time()) + 1, filters={"type": "container", "label": label}, decode=True
    )
    created = [e["id"] for e in events if e.get("status") == "create"]
    left = [c.id for c in DOCKER.containers.list(all=True, filters={"label": label})]
    return created, left


def _wait_for_runs(base: str, backfill: str, log: Path, count: int, timeout: float = 300) -> None:
    """Until the backfill has launched ``count`` runs and every one of them has finished."""
    deadline = time.monotonic() + timeout
    while True:
        runs = graphql(base, BACKFILL_STATUS, {"id": backfill})["runsOrError"]["results"]
        if len(runs) >= count and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):
            return
        assert time.monotonic() < deadline, f"backfill {backfill}'s runs still {runs}:\n{log.read_text()[-3000:]}"
        time.sleep(2)


def test_a_two_shard_backfill_runs_one_container_per_shard_and_stores_what_a_local_run_does(
    code_server: tuple[dict[str, str], int], server_dsn: str, tmp_path: Path
) -> None:
    env, port = code_server
    began = time.time()
    log = tmp_path / "dagster-dev.log"
    keys = [f"{day}|{shard}" for day in DAYS for shard in "01"]
    with dagster_dev(env, log, workspace=_workspace(tmp_path, port)) as base:
        ingest = launch_backfill(base, INGEST, keys)
        # The features start once the ingest's runs have written the bars: a daemon tick (30 s) before the ingest
        # backfill itself is marked complete. Both backfills' status and runs are checked at the end.
        _wait_for_runs(base, ingest, log, count=2)
        features = launch_backfill(base, FEATURES, keys)
        stages = [wait_for_backfill(base, backfill, log, timeout=300) for backfill in (features, ingest)]
    runs = []
    for assets, (status, stage) in zip((FEATURES, INGEST), stages, strict=True):
        assert status == "COMPLETED_SUCCESS" and all(r["status"] == "SUCCESS" for r in stage), (
            assets,
            status,
            stage,
            log.read_text()[-4000:],
        )
        # One run per shard, over the shard's days, in a container of the image.
        assert run_ranges(stage) == [(f"{DAYS[0]}|{s}", f"{DAYS[-1]}|{s}") for s in "01"], (assets, stage)
        runs += stage
    assert {run_tag(r, "dagster/image") for r in runs} == {IMAGE}, runs
    deadline = time.monotonic() + 60  # auto_remove: Docker deletes a container just after its process exits
    while True:
        containers = {r["runId"]: _containers_of(r["runId"], began) for r in runs}
        if not any(left for _, left in containers.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    for run in runs:
        created, left = containers[run["runId"]]
        assert created == [run_tag(run, "docker/container_id")], (run["runId"], created)
        assert not left, f"run {run['runId']}'s container {left} is still there"

    # The same days in this process, one shard, from the same landing folder: the same rows, to the hash.
    with new_database(server_dsn) as local:
        migrate(local)
        result = materialize_range(local, DAYS[0], DAYS[-1], landing_dir=tmp_path / "landing")
        assert result.success
        expected = served_content(local)
    assert expected["feature_vectors"][0] > 0, expected
    assert served_content(env["MARKETFS_DSN"]) == expected
