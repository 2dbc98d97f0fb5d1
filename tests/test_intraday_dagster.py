"""Intraday through Dagster: the step job records observations of today's partition, a breach fails its run,
and the sensor launches one run per shard and closed minute."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from polars.testing import assert_frame_equal
from test_intraday import OPEN, _served, _store_history

from assets.resources import FeatureStore, MarketData
from expectations.gate import SUITES_DIR
from marketfs.db import engine_for
from marketfs.features.registry import feature_set
from pipelines.intraday import intraday_job, intraday_requests

ASSET = dg.AssetKey("feature_vectors_fs_v1_1m")


def _step(instance: dg.DagsterInstance, dsn: str, now: datetime) -> dg.ExecuteInProcessResult:
    return intraday_job.execute_in_process(
        instance=instance,
        run_config={"ops": {"step_today": {"config": {"shard": 0, "now": now.isoformat()}}}},
        resources={
            "store": FeatureStore(dsn=dsn),
            "market_data": MarketData(source="synthetic", synthetic_instruments=4),
        },
        raise_on_error=False,
    )


def _observations(instance: dg.DagsterInstance) -> list:
    records = instance.fetch_observations(ASSET, limit=100).records
    return sorted((r.asset_observation for r in records), key=lambda o: o.metadata["step_end"].value)


def test_each_step_is_an_observation_of_todays_partition_and_the_day_fills_up(dsn: str) -> None:
    engine = engine_for(dsn)
    _store_history(engine, through_today=None)  # today's bars come from the source, as delivered so far
    with dg.DagsterInstance.ephemeral() as instance:
        for minutes in (10, 25):
            result = _step(instance, dsn, OPEN + timedelta(minutes=minutes, seconds=30))
            assert result.success
        observed = _observations(instance)
        assert [o.partition for o in observed] == ["2024-01-03", "2024-01-03"]
        assert [o.metadata["filled_through"].value for o in observed] == [
            "2024-01-03 14:40 UTC",
            "2024-01-03 14:55 UTC",
        ]
        assert {o.metadata["status"].value for o in observed} == {"served"}
        # Observations, not materialisations: the end-of-day run is the one that completes the partition.
        assert not instance.get_materialized_partitions(ASSET)
    served = _served(engine, feature_set("fs_v1"), "1m")
    assert served["ts"].max() == OPEN + timedelta(minutes=24)


def test_an_intraday_breach_fails_the_step_run_and_names_the_minutes(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _store_history(engine_for(dsn), through_today=None)
    suites = _tightened_suites(tmp_path)
    monkeypatch.setenv("MARKETFS_SUITES_DIR", str(suites))
    with dg.DagsterInstance.ephemeral() as instance:
        result = _step(instance, dsn, OPEN + timedelta(minutes=5, seconds=30))
        assert not result.success
        failure = result.failure_data_for_node("step_today").error.message
        assert "feature_vectors_fs_v1_1m 2024-01-03" in failure and "quarantined" in failure and "ret_1" in failure
        observed = _observations(instance)
        assert observed[-1].metadata["status"].value == "quarantined"
        assert "quarantine_batch" in observed[-1].metadata


def test_the_sensor_asks_one_step_per_shard_and_closed_minute_during_a_session() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        before = intraday_requests(instance, datetime(2024, 1, 3, 14, 0, tzinfo=UTC))
        assert isinstance(before, dg.SkipReason) and "2024-01-02's session closed" in before.skip_message
        after = intraday_requests(instance, datetime(2024, 1, 3, 21, 20, tzinfo=UTC))
        assert isinstance(after, dg.SkipReason) and "end-of-day run" in after.skip_message
        requests = intraday_requests(instance, datetime(2024, 1, 3, 15, 0, 40, tzinfo=UTC))
        assert [r.run_key for r in requests] == ["2024-01-03-1500-shard0"]
        config = requests[0].run_config["ops"]["step_today"]["config"]
        assert config == {"shard": 0, "now": "2024-01-03T15:00:40+00:00"}
        assert requests[0].tags["marketfs/state_chain"] == "daily"  # never beside the shard's daily runs


def _tightened_suites(tmp_path: Path) -> Path:
    suites = tmp_path / "suites"
    shutil.copytree(SUITES_DIR, suites)
    path = suites / "feature_vectors_fs_v1_1m.json"
    suite = json.loads(path.read_text())
    for expectation in suite["expectations"]:
        if expectation["kwargs"].get("column") == "ret_1":
            expectation["kwargs"].update(min_value=-1e-6, max_value=1e-6)  # every real return breaches
    path.write_text(json.dumps(suite))
    return suites


@pytest.mark.parametrize("end_of_day", ["passes", "fails"])
def test_the_end_of_day_run_reconciles_a_day_built_intraday(
    dsn: str, end_of_day: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster_helpers import ALL, materialize_range

    engine = engine_for(dsn)
    fs = feature_set("fs_v1")
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize_range(dsn, "2024-01-02", instruments=4, instance=instance, assets=ALL).success  # yesterday
        for minutes in (10, 200, 391):  # the last one after the close: the whole session
            assert _step(instance, dsn, OPEN + timedelta(minutes=minutes, seconds=30)).success
        intraday = _served(engine, fs, "1m")
        assert intraday["ts"].max() == OPEN + timedelta(minutes=389)
        if end_of_day == "fails":
            monkeypatch.setenv("MARKETFS_SUITES_DIR", str(_tightened_suites(tmp_path)))
        result = materialize_range(dsn, "2024-01-03", instruments=4, instance=instance, assets=ALL)
        with engine.connect() as conn:
            steps = conn.execute(
                sa.text("SELECT status FROM intraday_steps WHERE day = '2024-01-03' AND timeframe = '1m'")
            ).scalars()
            superseded = conn.execute(
                sa.text("SELECT count(*) FROM feature_vectors_history WHERE ts >= :t AND timeframe = '1m'"),
                {"t": OPEN - timedelta(hours=18)},
            ).scalar()
        if end_of_day == "passes":
            assert result.success
            # The day computed once is the day the steps served: nothing superseded, every written_at kept.
            assert_frame_equal(_served(engine, fs, "1m"), intraday, check_exact=True)
            assert superseded == 0
            assert set(steps) == {"reconciled"}
            assert "2024-01-03" in instance.get_materialized_partitions(ASSET)
        else:
            assert not result.success
            assert _served(engine, fs, "1m").is_empty()  # nothing of a failed day stays served
            assert superseded == intraday.height  # what the steps served stays readable with as_of
            assert "2024-01-03" not in instance.get_materialized_partitions(ASSET)
