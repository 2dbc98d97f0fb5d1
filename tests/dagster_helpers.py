"""Running the real assets with dg.materialize against a test database."""

from __future__ import annotations

import contextlib
import json
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
import polars as pl
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
def dagster_dev(env: dict[str, str], log_path: Path, workspace: Path | None = None) -> Iterator[str]:
    """`dagster dev` (webserver, daemon, and the code server unless ``workspace`` names a running one) on ``env``,
    its output in ``log_path``; yields its URL once it answers, and stops its whole process group after."""
    root = Path(__file__).resolve().parents[1]
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(workspace or root / "workspace.yaml")]
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


def graphql(base: str, query: str, variables: dict) -> dict:
    """The data of one query or mutation against the webserver at ``base``; its errors fail the test."""
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.load(response)
    assert "errors" not in body, body
    return body["data"]


# The mutation behind the UI's *Launch backfill*, and what a test reads back of a backfill.
LAUNCH_BACKFILL = """mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""

BACKFILL_STATUS = """query($id: String!) {
  partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } }
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) {
    ... on Runs { results { runId status startTime endTime tags { key value } assetSelection { path } } }
  }
}"""


def launch_backfill(base: str, assets: list[str], partition_keys: list[str]) -> str:
    """A backfill of ``assets`` over ``partition_keys``, launched as the UI launches it; returns its id."""
    launched = graphql(
        base,
        LAUNCH_BACKFILL,
        {
            "params": {
                "assetSelection": [{"path": [asset]} for asset in assets],
                "partitionNames": partition_keys,
                "fromFailure": False,
            }
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    return launched["backfillId"]


def wait_for_backfill(base: str, backfill_id: str, log: Path, timeout: float) -> tuple[str, list[dict]]:
    """The backfill's final status and its runs, once the daemon is done with it (``log`` is shown if not)."""
    deadline = time.monotonic() + timeout
    while True:
        state = graphql(base, BACKFILL_STATUS, {"id": backfill_id})
        status = state["partitionBackfillOrError"]["status"]
        if status not in ("REQUESTED", "CANCELING"):
            return status, state["runsOrError"]["results"]
        assert time.monotonic() < deadline, f"backfill still {status}: {state}\n{log.read_text()[-3000:]}"
        time.sleep(3)


def run_tag(run: dict, key: str) -> str:
    """A tag of a run as BACKFILL_STATUS returns it."""
    return next(t["value"] for t in run["tags"] if t["key"] == key)


def run_ranges(runs: list[dict]) -> list[tuple[str, str]]:
    """Each run's partition range (first, last key), sorted: one per shard when a backfill runs a shard's days
    as one ordered run."""
    return sorted(
        (run_tag(r, "dagster/asset_partition_range_start"), run_tag(r, "dagster/asset_partition_range_end"))
        for r in runs
    )


def served_rows(dsn: str) -> dict[str, pl.DataFrame]:
    """Every served row, every column but when and by which run it was written or ingested, in key order."""
    from psycopg import sql

    from marketfs.db import engine_for
    from marketfs.store.copy import copy_query_out

    tables = {
        "feature_vectors": "instrument_id, timeframe, feature_set_version, ts",
        "feature_state": "instrument_id, timeframe, feature_set_version, ts",
        "ohlcv_1m": "instrument_id, ts",
        "ohlcv_1d": "instrument_id, ts",
        "news_events": "event_id",
    }
    out = {}
    with engine_for(dsn).connect() as conn:
        for table, order in tables.items():
            columns = [
                c
                for c in conn.execute(
                    sa.text("SELECT column_name FROM information_schema.columns WHERE table_name = :t ORDER BY 1"),
                    {"t": table},
                ).scalars()
                if c not in ("written_at", "ingested_at", "run_id")
            ]
            query = sql.SQL("SELECT {} FROM {} ORDER BY " + order).format(
                sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns),
                sql.Identifier(table),
            )
            out[table] = copy_query_out(conn, query, {}, dict.fromkeys(columns, pl.String))
    return out


def served_content(dsn: str) -> dict[str, tuple[int, str]]:
    """Each served table's row count and content hash (assets.data_versions.content_version)."""
    from assets.data_versions import content_version

    return {table: (frame.height, content_version(frame)) for table, frame in served_rows(dsn).items()}
