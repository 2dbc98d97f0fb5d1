"""Instrument shards: a stable split that Python and PostgreSQL agree on, and vectors that do not depend on it.

The pipeline runs as a user runs it (``python -m pipelines run`` in a subprocess): the partitions are
defined when the code location is imported, so a shard count is a process's environment.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from conftest import new_database
from dagster_helpers import dagster_process_env, served_content

from marketfs.shards import SHARDS_ENV, Shard, ShardConfigError, shard_count, shards

ROOT = Path(__file__).resolve().parents[1]
IDS = [f"SYN{i:03d}" for i in range(300)] + ["AAPL", "BRK.B", "ÄÖÜ", "zz-top", "7203.T"]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_every_instrument_is_in_exactly_one_shard_and_python_and_postgresql_agree(engine, count: int) -> None:
    with engine.connect() as conn:
        for shard in shards(count):
            in_sql = set(
                conn.execute(
                    sa.text(f"SELECT i FROM unnest(CAST(:ids AS text[])) AS u(i) WHERE {shard.text_condition('i')}"),
                    {"ids": IDS, **shard.params},
                ).scalars()
            )
            assert in_sql == {i for i in IDS if shard.holds(i)}
            assert set(shard.filter(pl.DataFrame({"instrument_id": IDS}))["instrument_id"]) == in_sql
    owners = [[s.index for s in shards(count) if s.holds(i)] for i in IDS]
    assert all(len(o) == 1 for o in owners)
    if count > 1:  # a hash spreads a universe: no shard is empty or holds nearly everything
        sizes = [sum(o == [k] for o in owners) for k in range(count)]
        assert min(sizes) > len(IDS) / count / 2, sizes


def test_a_shard_count_that_cannot_be_is_one_error_naming_the_variable(monkeypatch) -> None:
    for bad in ("0", "-1", "two", "1000"):
        monkeypatch.setenv(SHARDS_ENV, bad)
        with pytest.raises(ShardConfigError, match=rf"{SHARDS_ENV}='{bad}' is not a shard count"):
            shard_count()
    monkeypatch.setenv(SHARDS_ENV, "4")
    assert shard_count() == 4
    with pytest.raises(ShardConfigError):
        Shard(4, 4)


def _run(dsn: str, tmp_path: Path, shards_env: str, *args: str) -> subprocess.CompletedProcess:
    env = dagster_process_env(dsn, dsn, tmp_path, MARKETFS_SHARDS=shards_env, MARKETFS_SYNTHETIC_INSTRUMENTS="12")
    return subprocess.run(
        [sys.executable, "-m", "pipelines", "run", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_vectors_and_state_do_not_depend_on_the_shard_count(server_dsn: str, tmp_path: Path) -> None:
    import psycopg

    results = {}
    for count in ("1", "4"):
        with new_database(server_dsn) as dsn:
            home = tmp_path / f"shards{count}"
            home.mkdir()
            result = _run(dsn, home, count, "--start", "2024-01-02", "--end", "2024-01-09", "--no-snapshot")
            assert result.returncode == 0, result.stdout + result.stderr
            if count == "4":
                assert result.stdout.count("succeeded") == 4, result.stdout  # one run per shard
                assert "x 4 of 4 shards, 4 run(s)" in result.stdout
            results[count] = served_content(dsn)
            with psycopg.connect(dsn) as conn:
                chains = conn.execute(
                    "SELECT count(DISTINCT partition) FROM quality_log WHERE asset = 'feature_vectors_fs_v1_1m'"
                ).fetchone()[0]
            # A verdict per day and shard that holds instruments (12 instruments may leave a shard of 4 empty).
            assert chains == 6 if count == "1" else (chains % 6 == 0 and chains > 6), chains
    assert results["1"]["feature_vectors"][0] > 0
    assert results["1"] == results["4"]


def test_partitions_are_day_by_shard_and_the_schedule_launches_each_shard(tmp_path: Path) -> None:
    code = (
        "import datetime as d, dagster as dg\n"
        "from pipelines.definitions import defs, daily_features_schedule\n"
        "a = defs.resolve_assets_def('feature_vectors_fs_v1_1m')\n"
        "p = a.partitions_def\n"
        "print(type(p).__name__, [x.name for x in p.partitions_defs])\n"
        "print('2024-01-02|1' in p.get_partition_keys())\n"
        "print(a.backfill_policy.policy_type.value, a.backfill_policy.max_partitions_per_run)\n"
        "t = d.datetime(2024, 1, 3, 1, 15, tzinfo=d.timezone.utc)\n"
        "rs = daily_features_schedule(dg.build_schedule_context(scheduled_execution_time=t))\n"
        "print(sorted((r.partition_key, r.tags['marketfs/state_chain']) for r in rs))\n"
    )
    env = dagster_process_env(
        "postgresql://unused@127.0.0.1:1/x", "postgresql://unused@127.0.0.1:1/x", tmp_path, MARKETFS_SHARDS="2"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "MultiPartitionsDefinition ['day', 'shard']"
    assert lines[1] == "True"
    # A backfill runs each shard's range as one ordered run (see assets/partitions.py, BACKFILL_POLICY).
    assert lines[2] == "SINGLE_RUN None"
    assert lines[3] == "[('2024-01-02|0', 'shard-0'), ('2024-01-02|1', 'shard-1')]"
