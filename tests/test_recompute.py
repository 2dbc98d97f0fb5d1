"""One action fixes a changed day: `python -m pipelines recompute` and a quarantine release through Dagster.

The commands run as a user runs them (subprocesses of `python -m pipelines` on their own Dagster
instance), on landing files; the result is compared with a from-scratch computation in a fresh database.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest
from dagster_helpers import dagster_process_env

from marketfs.db import engine_for
from marketfs.features.registry import DEFAULT_FEATURE_SET
from marketfs.sources import SyntheticBars, SyntheticEvents
from marketfs.store.feature_vectors import read_vectors

# Every feature asset: all are downstream of the raw bars.
FEATURE_ASSETS = [
    "feature_vectors_fs_v1_1d",
    "feature_vectors_fs_v1_1m",
    "feature_vectors_fs_v2_1m",
    "feature_vectors_fs_v2_5m",
]

ROOT = Path(__file__).resolve().parents[1]
FIRST = datetime(2024, 1, 2, tzinfo=UTC)
DAYS = [FIRST + timedelta(days=i) for i in range(4)]  # 01-02 .. 01-05
CHANGED = DAYS[1]
INSTRUMENTS = ("AAA", "BBB")


@pytest.fixture
def new_database(server_dsn: str) -> Iterator[Callable[[], str]]:
    """Make as many fresh databases as a test needs (feature stores and Dagster instances); dropped after."""
    from conftest import _with_database

    names: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return _with_database(server_dsn, name)

    yield make
    for name in names:
        engine_for(_with_database(server_dsn, name)).dispose()
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def land(folder: Path, day: datetime, bars: pl.DataFrame | None = None) -> None:
    (folder / "bars").mkdir(parents=True, exist_ok=True)
    (folder / "events").mkdir(parents=True, exist_ok=True)
    end = day + timedelta(days=1)
    bars = bars if bars is not None else SyntheticBars(instruments=INSTRUMENTS).bars(day, end)
    bars.write_parquet(folder / "bars" / f"{day:%Y-%m-%d}.parquet")
    events = SyntheticEvents(instruments=INSTRUMENTS).events(day, end)
    events.write_parquet(folder / "events" / f"{day:%Y-%m-%d}.parquet")


def corrected_bars(day: datetime) -> pl.DataFrame:
    """The vendor's correction of a day: every price 2 % higher from midday on."""
    bars = SyntheticBars(instruments=INSTRUMENTS).bars(day, day + timedelta(days=1))
    later = pl.col("ts") >= day + timedelta(hours=12)
    prices = ("open", "high", "low", "close")
    return bars.with_columns([pl.when(later).then(pl.col(c) * 1.02).otherwise(pl.col(c)) for c in prices])


def pipelines(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    return result


def vectors(dsn: str) -> dict[str, pl.DataFrame]:
    with engine_for(dsn).connect() as conn:
        return {
            tf: read_vectors(
                conn,
                feature_set=DEFAULT_FEATURE_SET,
                timeframe=tf,
                start=DAYS[0],
                end=DAYS[-1] + timedelta(days=1),
            )
            for tf in ("1m", "1d")
        }


def environment(new_database: Callable[[], str], tmp_path: Path, landing: Path, name: str) -> dict[str, str]:
    home = tmp_path / name
    home.mkdir()
    return dagster_process_env(
        new_database(), new_database(), home, MARKETFS_SOURCE="landing", MARKETFS_LANDING_DIR=str(landing)
    )


def test_recompute_from_a_changed_day_equals_a_computation_from_scratch(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    for day in DAYS:
        land(landing, day)
    live = environment(new_database, tmp_path, landing, "live")
    first, last = DAYS[0].date().isoformat(), DAYS[-1].date().isoformat()
    run = pipelines(live, "run", "--start", first, "--end", last, "--no-snapshot")
    assert run.returncode == 0, run.stdout + run.stderr
    before = vectors(live["MARKETFS_DSN"])

    land(landing, CHANGED, corrected_bars(CHANGED))  # a re-delivered file for 01-03
    recompute = pipelines(live, "recompute", "--from", CHANGED.date().isoformat())
    assert recompute.returncode == 0, recompute.stdout + recompute.stderr
    # Through the newest materialised day, in one ranged run.
    assert f"{CHANGED.date().isoformat()} .. {last} succeeded" in recompute.stdout

    scratch = environment(new_database, tmp_path, landing, "scratch")
    run = pipelines(scratch, "run", "--start", first, "--end", last, "--no-snapshot")
    assert run.returncode == 0, run.stdout + run.stderr
    after, expected = vectors(live["MARKETFS_DSN"]), vectors(scratch["MARKETFS_DSN"])
    for tf in ("1m", "1d"):
        assert after[tf].height == expected[tf].height > 0
        assert after[tf].equals(expected[tf]), f"{tf} vectors differ from a computation from scratch"
    # The change reached the last day (through the state chain), not only the changed one.
    last_day = pl.col("ts") >= DAYS[-1]
    assert not before["1m"].filter(last_day).equals(after["1m"].filter(last_day))


def test_recompute_says_what_it_would_do_without_history(new_database: Callable[[], str], tmp_path: Path) -> None:
    env = environment(new_database, tmp_path, tmp_path / "landing", "empty")
    result = pipelines(env, "recompute", "--from", "2024-01-03")
    assert result.returncode == 2 and "nothing materialised yet" in result.stdout


def test_release_is_recorded_in_dagster_and_recomputes_from_the_released_day(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    for day in DAYS:
        land(landing, day)
    bad = SyntheticBars(instruments=INSTRUMENTS).bars(CHANGED, CHANGED + timedelta(days=1))
    bad = bad.with_columns(  # one bar with low above high: the raw gate's critical pair expectation
        pl.when(pl.int_range(pl.len()) == 7).then(pl.col("high") * 2).otherwise(pl.col("low")).alias("low")
    )
    land(landing, CHANGED, bad)
    env = environment(new_database, tmp_path, landing, "release")
    first, last = DAYS[0].date().isoformat(), DAYS[-1].date().isoformat()
    run = pipelines(env, "run", "--start", first, "--end", last, "--no-snapshot")
    assert run.returncode == 1, run.stdout + run.stderr
    with engine_for(env["MARKETFS_DSN"]).connect() as conn:
        from marketfs.store import quality

        [batch] = [b for b in quality.list_batches(conn, "held") if b["asset"] == "raw_ohlcv"]

    # Under another shard count its partition does not exist: refused, and the batch stays held.
    other = pipelines(
        {**env, "MARKETFS_SHARDS": "2"}, "quarantine", "release", str(batch["batch_id"]), "--by", "bob", "--note", "x"
    )
    assert other.returncode == 2, other.stdout + other.stderr
    assert f"batch {batch['batch_id']} was held with MARKETFS_SHARDS=1, this deployment runs 2" in other.stderr
    with engine_for(env["MARKETFS_DSN"]).connect() as conn:
        assert batch["batch_id"] in [b["batch_id"] for b in quality.list_batches(conn, "held")]

    release = pipelines(env, "quarantine", "release", str(batch["batch_id"]), "--by", "alice", "--note", "vendor ok")
    assert release.returncode == 0, release.stdout + release.stderr
    # From the released day (the instrument-day held the one instrument alone: the day before was computed
    # whole, the other instrument every day) through the newest materialised day, 01-05.
    released_day = CHANGED.date().isoformat()
    assert f"recomputing bars_1d, {', '.join(FEATURE_ASSETS)} for {released_day} .. {last}" in release.stdout

    code = (
        "import json, dagster as dg; inst = dg.DagsterInstance.get(); "
        "recs = inst.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey('raw_ohlcv'), "
        f"asset_partitions=['{CHANGED.date().isoformat()}']), limit=1).records; "
        "m = recs[0].asset_materialization; "
        "print(json.dumps({'meta': {k: v.value for k, v in m.metadata.items()}, 'tags': dict(m.tags or {}), "
        "'features': sorted(inst.get_materialized_partitions(dg.AssetKey('feature_vectors_fs_v1_1m')))}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    recorded = json.loads(out.stdout.strip().splitlines()[-1])
    assert recorded["meta"]["quarantine_batch"] == batch["batch_id"]
    assert recorded["meta"]["released_by"] == "alice" and recorded["meta"]["note"] == "vendor ok"
    assert recorded["tags"]["dagster/data_version"] and recorded["tags"]["dagster/code_version"]
    assert recorded["features"] == [d.date().isoformat() for d in DAYS]


def test_recompute_from_a_day_whose_raw_assets_alone_were_materialised_computes_its_vectors(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    """A run killed once its raw steps were written, or raw assets materialised alone: the printed fix
    `recompute --from D` reaches D, the newest day any asset has reached, and computes its vectors."""
    landing = tmp_path / "landing"
    for day in DAYS[:3]:
        land(landing, day)
    env = environment(new_database, tmp_path, landing, "raw_only")
    first, second, third = (d.date().isoformat() for d in DAYS[:3])
    run = pipelines(env, "run", "--start", first, "--end", second, "--no-snapshot")
    assert run.returncode == 0, run.stdout + run.stderr
    raw_only = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "pipelines.definitions"]
        + ["--select", "raw_ohlcv,raw_events,bars_1d", "--partition", third],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert raw_only.returncode == 0, raw_only.stdout + raw_only.stderr
    assert not vectors(env["MARKETFS_DSN"])["1m"].filter(pl.col("ts") >= DAYS[2]).height

    recompute = pipelines(env, "recompute", "--from", third)
    assert recompute.returncode == 0, recompute.stdout + recompute.stderr
    assert f"{third} .. {third} succeeded" in recompute.stdout, recompute.stdout
    assert vectors(env["MARKETFS_DSN"])["1m"].filter(pl.col("ts") >= DAYS[2]).height > 700
