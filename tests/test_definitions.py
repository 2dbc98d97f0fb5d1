"""The code location loads through workspace.yaml, as the UI and daemon load it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_load_through_workspace_yaml(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    env.pop("MARKETFS_DAGSTER_PG_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_definitions_hold_assets_job_and_schedule() -> None:
    from pipelines.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"raw_ohlcv", "feature_vectors_fs_v1_1m"} <= keys
    assert defs.resolve_job_def("daily_features") is not None
    assert defs.resolve_schedule_def("daily_features_schedule") is not None
    assert defs.resolve_job_def("intraday_step") is not None
    assert defs.resolve_sensor_def("intraday_sensor").default_status == dg.DefaultSensorStatus.STOPPED


def test_code_location_does_not_import_great_expectations() -> None:
    code = "import sys, pipelines.definitions; print('great_expectations' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_feature_catalog_is_generated_from_the_registry() -> None:
    from marketfs.catalog import CATALOG_PATH, render_catalog

    assert CATALOG_PATH.read_text() == render_catalog(), "run: python -m marketfs.catalog --write"


def test_backfills_run_in_bounded_batches() -> None:
    from assets.partitions import SHARDED
    from pipelines.definitions import ALL_ASSETS

    assert not SHARDED  # sharded, one run per shard and range: tests/test_shards.py, tests/test_shards_ui.py
    for asset in ALL_ASSETS:
        assert asset.backfill_policy.max_partitions_per_run == 31, asset.key
