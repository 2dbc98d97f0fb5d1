"""Running the real assets with dg.materialize against a test database."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from process_helpers import stop_process_group

from assets.resources import FeatureStore, MarketData
from pipelines.definitions import ALL_ASSETS

# Raw assets and fs_v1's: what the gating, recompute and run-mode tests are about. fs_v2 has tests of its
# own (tests/test_feature_sets.py); running it everywhere would only double the suite's time.
PIPELINE = [a for a in ALL_ASSETS if "fs_v2" not in a.key.to_user_string()]
ALL = ALL_ASSETS


def resources(dsn: str, landing_dir: Path | None = None, instruments: int = 3) -> dict:
    market = (
        MarketData(source="landing", landing_dir=str(landing_dir))
        if landing_dir is not None
        else MarketData(source="synthetic", synthetic_instruments=instruments)
    )
    return {"store": FeatureStore(dsn=dsn), "market_data": market}


def materialize_range(dsn: str, first: str, last: str | None = None, **kwargs) -> dg.ExecuteInProcessResult:
    """One run over partitions ``first..last`` (inclusive), as a batched backfill runs them."""
    landing_dir = kwargs.pop("landing_dir", None)
    instruments = kwargs.pop("instruments", 3)
    assets = kwargs.pop("assets", PIPELINE)
    if last is None or last == first:
        return dg.materialize(
            assets,
            partition_key=first,
            resources=resources(dsn, landing_dir, instruments),
            raise_on_error=False,
            **kwargs,
        )
    return dg.materialize(
        assets,
        resources=resources(dsn, landing_dir, instruments),
        tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
        raise_on_error=False,
        **kwargs,
    )


def materialize_selection(dsn: str, names: list[str], partition: str) -> dg.ExecuteInProcessResult:
    """Only the named assets of the pipeline, for one partition."""
    selected = [a for a in PIPELINE if a.key.to_user_string() in names]
    return dg.materialize(selected, partition_key=partition, resources=resources(dsn), raise_on_error=False)


def dagster_process_env(dsn: str, instance_dsn: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for Dagster processes (daemon, webserver, runs) of a test: its own instance and home."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copyfile(Path(__file__).resolve().parents[1] / "dagster.yaml", home / "dagster.yaml")
    instance_url = sa.make_url(instance_dsn).set(drivername="postgresql+psycopg2")
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MARKETFS_HOME": str(tmp_path),
        "MARKETFS_DSN": dsn,
        "MARKETFS_DAGSTER_PG_URL": instance_url.render_as_string(hide_password=False),
        "PYTHONWARNINGS": "ignore",
        **extra,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def dagster_dev(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`dagster dev` (webserver, daemon, code server) on ``env``, its output in ``log_path``; yields its URL once
    it answers, and stops its whole process group after."""
    root = Path(__file__).resolve().parents[1]
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(root / "workspace.yaml")]
            + ["-h", "127.0.0.1", "-p", str(port)],
            env=env,
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/server_info", timeout=2):
                        break
                except OSError:
                    assert proc.poll() is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, "dagster dev did not come up"
                    time.sleep(1)
            yield base
        finally:
            stop_process_group(proc)  # the webserver's code server and daemon too, not only `dagster dev`
