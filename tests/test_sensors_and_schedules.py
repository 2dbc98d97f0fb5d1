"""The landing sensor and the daily schedule: evaluated directly, and firing for real under dagster-daemon."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from dagster_helpers import dagster_process_env
from process_helpers import stop_process_group

from assets.partitions import day_window
from assets.resources import MarketData
from marketfs.sources import SyntheticBars, SyntheticEvents
from pipelines.definitions import ALL_ASSETS, daily_features_schedule, defs, landing_files_sensor
from pipelines.sensors import CHAIN_END_ASSET, RANGE_END_TAG, RANGE_START_TAG, STATE_CHAIN_TAG

ROOT = Path(__file__).resolve().parents[1]
DAY = datetime(2024, 1, 3, tzinfo=UTC)


def drop(landing: Path, day: datetime, name: str | None = None) -> None:
    """The bars and events of one trading day (previous close to close), as a vendor delivers a session."""
    day, end = day_window(day.date().isoformat())
    (landing / "bars").mkdir(parents=True, exist_ok=True)
    (landing / "events").mkdir(parents=True, exist_ok=True)
    name = name or f"{end:%Y-%m-%d}"
    SyntheticBars(instruments=("AAA", "BBB")).bars(day, end).write_parquet(landing / "bars" / f"{name}.parquet")
    SyntheticEvents(instruments=("AAA", "BBB")).events(day, end).write_parquet(landing / "events" / f"{name}.parquet")


def evaluate(landing: Path, cursor: str | None = None, instance: dg.DagsterInstance | None = None):
    with dg.build_sensor_context(
        cursor=cursor,
        instance=instance,
        definitions=defs,
        resources={"market_data": MarketData(source="landing", landing_dir=str(landing))},
    ) as context:
        result = landing_files_sensor(context)
        return (result if isinstance(result, list) else []), context.cursor


def ranges(requests: list[dg.RunRequest]) -> list[tuple[str, str]]:
    return [(r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]) for r in requests]


def test_sensor_requests_one_ordered_run_from_the_earliest_touched_day(tmp_path: Path) -> None:
    drop(tmp_path, DAY)
    drop(tmp_path, DAY + timedelta(days=2), name="later")
    requests, cursor = evaluate(tmp_path)
    # One run over 01-03..01-05 (01-04 carries 01-03's state into 01-05), never one run per day.
    assert ranges(requests) == [("2024-01-03", "2024-01-05")]
    assert requests[0].partition_key is None and requests[0].tags[STATE_CHAIN_TAG]
    assert evaluate(tmp_path, cursor)[0] == []  # nothing new
    drop(tmp_path, DAY + timedelta(days=1), name="late-delivery")
    requests, cursor = evaluate(tmp_path, cursor)
    assert ranges(requests) == [("2024-01-04", "2024-01-04")]
    (tmp_path / "bars" / "broken.csv").write_text("instrument_id,ts\nAAA,2024-01-05T14:30:00Z\n")
    assert evaluate(tmp_path, cursor)[0] == []  # a malformed file launches nothing (its run would fail)


def test_a_daily_delivery_launches_the_sessions_it_holds(tmp_path: Path) -> None:
    (tmp_path / "bars_1d").mkdir(parents=True)
    (tmp_path / "bars_1d" / "eod.csv").write_text(
        "instrument_id,ts,open,high,low,close,volume\nAAA,2024-01-12,10,11,9,10.5,1000\nAAA,2024-01-16,10,11,9,10,900\n"
    )
    requests, _ = evaluate(tmp_path)
    assert ranges(requests) == [("2024-01-12", "2024-01-16")]  # two sessions, the holiday between is none


def test_sensor_runs_through_the_newest_materialised_day_and_backfills_past_31_days(tmp_path: Path) -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        for day in ("2024-01-02", "2024-01-09"):
            instance.report_runless_asset_event(dg.AssetMaterialization(CHAIN_END_ASSET, partition=day))
        drop(tmp_path, DAY)
        requests, cursor = evaluate(tmp_path, instance=instance)
        assert ranges(requests) == [("2024-01-03", "2024-01-09")]  # 01-04..01-09 carry 01-03's state

        instance.report_runless_asset_event(dg.AssetMaterialization(CHAIN_END_ASSET, partition="2024-03-01"))
        drop(tmp_path, DAY, name="re-sent")
        [request] = evaluate(tmp_path, cursor, instance=instance)[0]
    # 41 sessions (no weekends, no MLK or Presidents Day): a backfill in runs of up to 31, tagged as the chain.
    assert request.requires_backfill_daemon and request.tags[STATE_CHAIN_TAG]
    subset = request.asset_graph_subset
    assert {k.to_user_string() for k in subset.asset_keys} == {a.key.to_user_string() for a in ALL_ASSETS}
    keys = sorted(subset.get_partitions_subset(CHAIN_END_ASSET).get_partition_keys())
    assert (keys[0], keys[-1], len(keys)) == ("2024-01-03", "2024-03-01", 41)


def test_the_instance_queues_state_chain_runs_behind_each_other() -> None:
    concurrency = yaml.safe_load((ROOT / "dagster.yaml").read_text())["concurrency"]
    with dg.instance_for_test(overrides={"concurrency": concurrency}) as instance:
        queue = instance.get_concurrency_config().run_queue_config
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    # One run at a time per chain: `daily`, or each shard's `shard-<i>` (MARKETFS_SHARDS > 1) on its own.
    assert {"key": STATE_CHAIN_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in (
        queue.tag_concurrency_limits
    )


@pytest.mark.parametrize(
    ("tick", "session"),
    [
        (datetime(2024, 1, 4, 0, 15, tzinfo=UTC), "2024-01-03"),  # overnight: the last close
        (datetime(2024, 1, 4, 21, 15, tzinfo=UTC), "2024-01-04"),  # 15 minutes after the close
        (datetime(2024, 1, 4, 21, 5, tzinfo=UTC), "2024-01-03"),  # too soon after it: late prints settle
        (datetime(2024, 1, 13, 12, 15, tzinfo=UTC), "2024-01-12"),  # a Saturday: Friday's session
        (datetime(2024, 1, 15, 22, 15, tzinfo=UTC), "2024-01-12"),  # MLK day: no session closed
        (datetime(2024, 11, 29, 18, 15, tzinfo=UTC), "2024-11-29"),  # the early close, at 18:00 UTC
    ],
)
def test_schedule_asks_for_the_session_that_closed_last(tick: datetime, session: str) -> None:
    [request] = daily_features_schedule(dg.build_schedule_context(scheduled_execution_time=tick))
    assert (request.partition_key, request.run_key) == (session, session)


def test_daemon_fires_the_sensor_and_the_schedule(
    dsn: str, server_dsn: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    landing = tmp_path / "landing"
    drop(landing, DAY)
    env = dagster_process_env(
        dsn,
        request.getfixturevalue("empty_dsn"),
        tmp_path,
        MARKETFS_SOURCE="landing",
        MARKETFS_LANDING_DIR=str(landing),
        MARKETFS_DAILY_CRON="* * * * *",
    )
    dagster = [sys.executable, "-m", "dagster"]
    workspace = ["-w", str(ROOT / "workspace.yaml")]
    for kind, name in (("sensor", "landing_files_sensor"), ("schedule", "daily_features_schedule")):
        subprocess.run([*dagster, kind, "start", name, *workspace], env=env, cwd=ROOT, check=True, capture_output=True)
    log = open(tmp_path / "daemon.log", "w")  # noqa: SIM115 - outlives this block; closed in finally
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", *workspace],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=log,
        start_new_session=True,  # its code server joins the group; stopping the daemon alone orphans it
    )
    try:
        sensor_run = schedule_run = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (sensor_run and schedule_run):
            time.sleep(3)
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            runs = _runs(env)
            sensor_run = next((r for r in runs if r["sensor"] and r["status"] == "SUCCESS"), None)
            # The schedule's session (the last one closed) has nothing in the landing folder: its run must
            # fail on the expected-data check instead of going green with nothing.
            schedule_run = next((r for r in runs if r["schedule"] and r["status"] in ("SUCCESS", "FAILURE")), None)
            failed = [r for r in runs if r["status"] == "FAILURE" and not r["schedule"]]
            assert not failed, f"a daemon-launched run failed: {failed}"
        assert sensor_run, f"no successful sensor run; daemon log:\n{(tmp_path / 'daemon.log').read_text()[-3000:]}"
        assert schedule_run, f"no successful schedule run; runs: {_runs(env)}"
    finally:
        stop_process_group(daemon)
        log.close()
    assert (sensor_run["range_start"], sensor_run["range_end"]) == ("2024-01-03", "2024-01-03")
    assert sensor_run["state_chain"]
    assert schedule_run["partition"] <= datetime.now(UTC).date().isoformat()  # a closed session
    assert schedule_run["status"] == "FAILURE"
    from marketfs.db import engine_for

    with engine_for(dsn).connect() as conn:
        verdict = (
            conn.execute(
                sa.text("SELECT success FROM quality_log WHERE asset = 'bars_1d' AND partition = :p AND suite = :s"),
                {"p": schedule_run["partition"], "s": "expected_data"},
            )
            .scalars()
            .all()
        )
    # Which of the daemon's two runs goes first is up to the daemon. The schedule's run alone on an empty store
    # fails its expected-data check; after the sensor's run it is refused before judging anything, since its
    # session follows ~700 sessions the store holds no bar of (nothing may be computed across them).
    assert verdict in ([False], [])
    if not verdict:
        with engine_for(dsn).connect() as conn:
            logged = conn.execute(
                sa.text("SELECT count(*) FROM quality_log WHERE partition = :p"), {"p": schedule_run["partition"]}
            ).scalar()
        assert logged == 0

    with engine_for(dsn).connect() as conn:
        vectors = conn.execute(
            sa.text("SELECT count(*) FROM feature_vectors WHERE ts >= :d AND ts < :e AND timeframe = '1m'"),
            {"d": DAY, "e": DAY + timedelta(days=1)},
        ).scalar()
    assert vectors > 700


def _runs(env: dict[str, str]) -> list[dict]:
    """Runs in the daemon's instance, read in a subprocess (its DAGSTER_HOME is not this process's)."""
    code = (
        "import json, dagster as dg; inst = dg.DagsterInstance.get(); "
        "print(json.dumps([{'status': r.status.value, 'partition': r.tags.get('dagster/partition'), "
        "'sensor': r.tags.get('dagster/sensor_name'), 'schedule': r.tags.get('dagster/schedule_name'), "
        "'range_start': r.tags.get('dagster/asset_partition_range_start'), "
        "'range_end': r.tags.get('dagster/asset_partition_range_end'), "
        "'state_chain': r.tags.get('marketfs/state_chain')} "
        "for r in inst.get_runs()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])
