"""Corporate actions through the pipeline, as a user delivers them: a split is data, not a breach.

Six instruments landed over 2024-01-03..2024-01-12, one of them (SPL00) split 2-for-1 from 2024-01-10 (prices
halved, volume doubled):

- with ``SPL00,2024-01-10,split,2,2024-01-09T22:00:00Z`` in ``corporate_actions/actions.csv`` the run is green and
  every scale-free fs_v1 feature of SPL00 on and after the ex-date equals the unsplit run's (1m and 1d);
- without it, SPL00's ex-date is held (UNEXPLAINED_JUMP, the failure names the day and the ratio seen), the five
  others are served, and delivering the action then running the printed command serves SPL00 adjusted;
- an action delivered after the vectors were served restates SPL00's vectors alone, and ``as_of`` before it
  returns what was served then.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import sqlalchemy as sa
from dagster_helpers import dagster_process_env
from test_corporate_action_math import assert_close
from test_recompute import (
    new_database,  # noqa: F401  (fixture: fresh databases for stores and instances)
    pipelines,
)

from marketfs.db import engine_for
from marketfs.sources import SyntheticBars, SyntheticEvents
from marketfs.universe import active_sessions

ROOT = Path(__file__).resolve().parents[1]
INSTRUMENTS = ("SPL00", "AAA", "BBB", "CCC", "DDD", "EEE")
FIRST, LAST = "2024-01-03", "2024-01-12"
EX_DATE = "2024-01-10"
ACTION = "SPL00,2024-01-10,split,2,2024-01-09T22:00:00Z"
SHORT = "2024-01-08"  # where a test needs days before the ex-date, not the whole range
SCALE_FREE = ["ret_1", "ret_5", "vol_20", "rsi_14", "bb_pct_b", "volume_z_20"]


def land(folder: Path, *, split: float | None, action: str | None, first: str = FIRST) -> None:
    """The ten days' bar and event files; ``split``: SPL00's prices divided by it (volume multiplied) from the
    ex-date; ``action``: the line of actions.csv."""
    sessions = active_sessions()
    start = sessions.trading_day_window(date.fromisoformat(first))[0]
    end = sessions.trading_day_window(date.fromisoformat(LAST))[1]
    bars = SyntheticBars(instruments=INSTRUMENTS, seed=3).bars(start, end)
    if split:
        hit = (pl.col("instrument_id") == "SPL00") & (pl.col("ts") >= sessions.trading_day_window(EX_DATE)[0])
        bars = bars.with_columns(
            *[
                pl.when(hit).then(pl.col(c) / split).otherwise(pl.col(c)).alias(c)
                for c in ("open", "high", "low", "close")
            ],
            pl.when(hit).then(pl.col("volume") * split).otherwise(pl.col("volume")).alias("volume"),
        )
    for kind in ("bars", "events"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    bars.write_parquet(folder / "bars" / "bars.parquet")
    SyntheticEvents(instruments=INSTRUMENTS, seed=3).events(start, end).write_parquet(
        folder / "events" / "events.parquet"
    )
    deliver_action(folder, action)


def deliver_action(folder: Path, action: str | None) -> None:
    (folder / "corporate_actions").mkdir(parents=True, exist_ok=True)
    path = folder / "corporate_actions" / "actions.csv"
    if action is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text("instrument_id,ex_date,kind,ratio,known_at\n" + action + "\n")


def run(
    new_database: Callable[[], str],  # noqa: F811
    tmp_path: Path,
    name: str,
    *,
    split: float | None,
    action: str | None,
    first: str = FIRST,
):
    landing = tmp_path / name
    land(landing, split=split, action=action, first=first)
    (tmp_path / f"{name}-home").mkdir()
    env = dagster_process_env(
        new_database(),
        new_database(),
        tmp_path / f"{name}-home",
        MARKETFS_SOURCE="landing",
        MARKETFS_LANDING_DIR=str(landing),
    )
    result = pipelines(env, "run", "--start", first, "--end", LAST, "--no-snapshot")
    return env, engine_for(env["MARKETFS_DSN"]), result, landing


def vectors(engine: sa.Engine, timeframe: str, instrument: str | None = "SPL00", since: str = EX_DATE) -> pl.DataFrame:
    start = active_sessions().trading_day_window(since)[0]
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT instrument_id, ts, quality_flags, written_at, {', '.join(SCALE_FREE)}, macd "
                "FROM feature_vectors WHERE feature_set_version = 'fs_v1' AND timeframe = :tf AND ts >= :s "
                "AND (CAST(:i AS text) IS NULL OR instrument_id = :i) ORDER BY instrument_id, ts"
            ),
            {"tf": timeframe, "s": start, "i": instrument},
        ).all()
    schema = {"instrument_id": pl.String, "ts": pl.Datetime("us", "UTC"), "quality_flags": pl.List(pl.String)}
    schema |= {"written_at": pl.Datetime("us", "UTC"), **dict.fromkeys([*SCALE_FREE, "macd"], pl.Float64)}
    return pl.DataFrame([tuple(r) for r in rows], schema=schema, orient="row")


def assert_same_scale_free(got: pl.DataFrame, expected: pl.DataFrame) -> None:
    """The same instants, and every scale-free feature within 1e-9 relative, nulls in the same places."""
    assert got["ts"].equals(expected["ts"])
    assert_close(got, expected, [c for c in SCALE_FREE if c in got.columns])


def test_a_split_with_its_action_is_served_as_the_same_series(
    new_database: Callable[[], str],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, plain, plain_run, _ = run(new_database, tmp_path, "plain", split=None, action=None)
    _, split, split_run, _ = run(new_database, tmp_path, "split", split=2.0, action=ACTION)
    assert plain_run.returncode == 0, plain_run.stdout + plain_run.stderr
    assert split_run.returncode == 0, split_run.stdout + split_run.stderr
    for timeframe in ("1m", "1d"):
        got, expected = vectors(split, timeframe), vectors(plain, timeframe)
        assert_same_scale_free(got, expected)
        assert got["quality_flags"].to_list() == expected["quality_flags"].to_list()
        # Price-unit features in post-split units: half the unsplit series' MACD.
        both = pl.DataFrame({"x": got["macd"], "y": expected["macd"] / 2}).drop_nulls()
        assert ((both["x"] - both["y"]).abs() <= 1e-9 * 100).all(), timeframe
    with split.connect() as conn:
        stored = conn.execute(sa.text("SELECT instrument_id, ex_date, kind, ratio FROM corporate_actions")).all()
    assert [tuple(r) for r in stored] == [("SPL00", date(2024, 1, 10), "split", 2.0)]
    # A snapshot records the actions its vectors were computed with.
    from marketfs.snapshots import create_snapshot

    sessions = active_sessions()
    window = sessions.trading_day_window(date.fromisoformat(FIRST))[0], sessions.trading_day_window(LAST)[1]
    with split.begin() as conn:
        snapshot = create_snapshot(conn, feature_set_version="fs_v1", timeframe="1m", start=window[0], end=window[1])
    assert snapshot.manifest["returns"] == "price"
    assert snapshot.manifest["corporate_actions"] == [
        {
            "instrument_id": "SPL00",
            "ex_date": "2024-01-10",
            "kind": "split",
            "ratio": 2.0,
            "known_at": "2024-01-09T22:00:00+00:00",
        }
    ]


def test_a_split_without_its_action_holds_that_instrument_day_and_the_printed_fix_serves_it_adjusted(
    new_database: Callable[[], str],  # noqa: F811
    tmp_path: Path,
) -> None:
    env, engine, result, landing = run(new_database, tmp_path, "bare", split=2.0, action=None, first=SHORT)
    assert result.returncode == 1, result.stdout + result.stderr
    # The failure names the instrument, the day, the move seen and how to deliver the action.
    assert "SPL00 2024-01-10" in result.stderr and "overnight" in result.stderr, result.stderr
    assert "corporate_actions/" in result.stderr, result.stderr
    for timeframe in ("1m", "1d"):
        served = vectors(engine, timeframe, instrument=None)
        ex_day = served.filter(pl.col("ts") < active_sessions().bounds(EX_DATE)[1])
        # Nothing of SPL00 on the ex-date is served with a -40% return and no flag; the five others are served.
        unflagged = ex_day.filter(
            (pl.col("instrument_id") == "SPL00")
            & (pl.col("ret_1") < -0.4)
            & ~pl.col("quality_flags").list.contains("UNEXPLAINED_JUMP")
        )
        assert unflagged.is_empty(), timeframe
        assert set(ex_day["instrument_id"]) >= set(INSTRUMENTS) - {"SPL00"}, timeframe

    # The fix: deliver the action, then the command the failure printed.
    deliver_action(landing, ACTION)
    [command] = set(re.findall(r"make recompute FROM=\S+?(?=[.\s]|$)", result.stderr))
    fixed = pipelines(env, "recompute", "--from", command.split("=")[1])
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    for timeframe in ("1m", "1d"):
        mine = vectors(engine, timeframe)
        assert mine.height and mine["ts"].min() < active_sessions().bounds(EX_DATE)[1], timeframe
        assert not mine["quality_flags"].list.contains("UNEXPLAINED_JUMP").any(), timeframe
        assert mine.filter(pl.col("ret_1") < -0.4).is_empty(), timeframe
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM quarantine_batches WHERE status = 'held'")).scalar() == 0


def test_an_action_delivered_after_the_fact_restates_that_instrument_alone_and_as_of_sees_what_was_served(
    new_database: Callable[[], str],  # noqa: F811
    tmp_path: Path,
) -> None:
    from marketfs.retrieval import training_frame

    # An 11-for-10 split (prices / 1.1) is within what a day may move: without its action it is served, as a -9%
    # overnight return.
    env, engine, result, landing = run(new_database, tmp_path, "late", split=1.1, action=None, first=SHORT)
    assert result.returncode == 0, result.stdout + result.stderr
    before = {tf: vectors(engine, tf, instrument=None) for tf in ("1m", "1d")}
    served_at = datetime.now(UTC)

    # The action arrives late: known a second after the vectors were served; the next scheduled day's run sees it.
    known_at = (served_at + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    deliver_action(landing, f"SPL00,{EX_DATE},split,1.1,{known_at}")
    restated = pipelines(env, "run", "--start", LAST, "--end", LAST, "--no-snapshot")
    assert restated.returncode == 0, restated.stdout + restated.stderr
    assert "restating      SPL00 from 2024-01-10" in restated.stdout, restated.stdout

    for timeframe, old in before.items():
        now = vectors(engine, timeframe, instrument=None)
        changed = now.join(old, on=["instrument_id", "ts"], suffix="_old").filter(
            pl.col("written_at") != pl.col("written_at_old")
        )
        # Only SPL00's vectors were rewritten, and only from the ex-date.
        assert set(changed["instrument_id"]) == {"SPL00"}, timeframe
        first_return = now.filter(pl.col("instrument_id") == "SPL00").row(0, named=True)
        old_return = old.filter(pl.col("instrument_id") == "SPL00").row(0, named=True)
        # The ex-date's first return is the old one with the split taken out.
        assert abs((1 + first_return["ret_1"]) - (1 + old_return["ret_1"]) * 1.1) < 1e-9, timeframe

    entity = pl.DataFrame(
        # When the ex-date's first vector became known: its return spans the split.
        {"instrument_id": ["SPL00"], "ts": [active_sessions().bounds(EX_DATE)[0] + timedelta(minutes=1)]}
    )
    then = training_frame(entity, ["ret_1"], None, as_of=served_at, dsn=env["MARKETFS_DSN"])
    later = training_frame(entity, ["ret_1"], None, dsn=env["MARKETFS_DSN"])
    # A minute vector is known at its bar's close, a minute after its stamp.
    known = pl.col("ts") + timedelta(minutes=1) <= entity["ts"][0]
    old_value = before["1m"].filter((pl.col("instrument_id") == "SPL00") & known)[-1]
    assert then["ret_1"][0] == old_value["ret_1"][0]
    assert later["ret_1"][0] != then["ret_1"][0]


def test_a_bad_action_row_holds_its_instrument_names_its_line_and_each_printed_fix_serves_it(
    new_database: Callable[[], str],  # noqa: F811
    tmp_path: Path,
) -> None:
    bad_aaa, bad_bbb = "AAA,2024-01-10,split,-2,2024-01-09T22:00:00Z", "BBB,2024-01-10,split,0,2024-01-09T22:00:00Z"
    env, engine, result, landing = run(
        new_database, tmp_path, "badrow", split=None, action=f"{bad_aaa}\n{bad_bbb}", first="2024-01-09"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "actions.csv, line 2" in output and "actions.csv, line 3" in output and "ratio" in output, output
    served = vectors(engine, "1m", instrument=None)
    assert set(served["instrument_id"]) == set(INSTRUMENTS) - {"AAA", "BBB"}
    with engine.connect() as conn:
        batches = {
            r.instruments[0]: r
            for r in conn.execute(sa.text("SELECT batch_id, asset, instruments, status FROM quarantine_batches"))
        }
        quarantined = dict(conn.execute(sa.text("SELECT instrument_id, ratio FROM quarantine_corporate_actions")).all())
    assert {(i, b.asset, b.status) for i, b in batches.items()} == {
        ("AAA", "corporate_actions", "held"),
        ("BBB", "corporate_actions", "held"),
    }
    assert quarantined == {"AAA": "-2.0", "BBB": "0.0"}

    # BBB: the vendor has no fix; the discard the run printed, as printed (a name and a note filled in). The row
    # stays in the file and is not held again; BBB is computed without it.
    marketfs = str(Path(sys.executable).with_name("marketfs"))
    [discard] = [
        m
        for m in re.findall(r"marketfs quarantine discard (\d+) --by NAME --note WHY", output)
        if int(m) == batches["BBB"].batch_id
    ]
    argv = [marketfs, "quarantine", "discard", discard, "--by", "alice", "--note", "no such split"]
    discarded = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert discarded.returncode == 0, discarded.stdout + discarded.stderr
    assert "BBB" in set(vectors(engine, "1m", instrument=None)["instrument_id"])

    # AAA: the vendor corrects the row (it was a dividend); the command the failure printed serves AAA.
    deliver_action(landing, f"AAA,2024-01-10,cash_dividend,0.2,2024-01-09T22:00:00Z\n{bad_bbb}")
    [command] = set(re.findall(r"make recompute FROM=\S+?(?=[.\s]|$)", result.stderr))
    fixed = pipelines(env, "recompute", "--from", command.split("=")[1])
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert set(vectors(engine, "1m", instrument=None)["instrument_id"]) == set(INSTRUMENTS)
    with engine.connect() as conn:
        statuses = dict(conn.execute(sa.text("SELECT instruments[1], status FROM quarantine_batches")).all())
        assert statuses == {"AAA": "resolved", "BBB": "discarded"}
        assert conn.execute(sa.text("SELECT kind, ratio FROM corporate_actions")).all() == [("cash_dividend", 0.2)]


def test_pushed_actions_are_all_or_nothing_and_a_redelivery_is_a_no_op(dsn: str, engine: sa.Engine) -> None:
    from marketfs.ingest import PushError, push_corporate_actions
    from marketfs.store.bars import replace_bars

    day = datetime(2024, 1, 9, tzinfo=UTC)
    with engine.begin() as conn:
        replace_bars(
            conn, SyntheticBars(instruments=("SPL00",)).bars(day, day + timedelta(days=1)), day, day + timedelta(1)
        )
    actions = pl.DataFrame(
        {
            "instrument_id": ["SPL00", "NOPE"],
            "ex_date": [date(2024, 1, 10), date(2024, 1, 13)],
            "kind": ["split", "split"],
            "ratio": [2.0, 3.0],
            "known_at": [datetime(2024, 1, 9, 22, tzinfo=UTC)] * 2,
        }
    )
    try:
        push_corporate_actions(actions, dsn=dsn)
        raise AssertionError("a bad row was accepted")
    except PushError as exc:
        # The unknown instrument and the Saturday ex-date are named; nothing was stored.
        assert "NOPE" in str(exc) and "session" in str(exc) and "bars in the store" in str(exc), exc
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM corporate_actions")).scalar() == 0
    first = push_corporate_actions(actions.head(1), dsn=dsn)
    again = push_corporate_actions(actions.head(1), dsn=dsn)
    assert first["stored"].height == 1 and again["stored"].height == 0 and first["restatements"] == []


def test_a_reverse_split_and_a_total_return_dividend_read_from_the_store_are_the_series_without_them(
    engine: sa.Engine,
) -> None:
    """From the stored bars and actions, as every run computes: SPL00 reverse-split 1-for-10 (prices x10, volume
    / 10) and AAA paying a 3% dividend, each equal to its series without the action (a total-return set for AAA)."""
    from marketfs.corporate_actions import ACTION_SCHEMA
    from marketfs.features.compute import compute_feature_vectors
    from marketfs.features.registry import FeatureSet, feature_set
    from marketfs.store.bars import replace_bars
    from marketfs.store.corporate_actions import write_actions
    from marketfs.store.feature_vectors import compute_stored

    sessions = active_sessions()
    start = sessions.trading_day_window(date(2024, 1, 8))[0]
    end = sessions.trading_day_window(date(2024, 1, 12))[1]
    ex_ts = sessions.trading_day_window(EX_DATE)[0]
    plain = SyntheticBars(instruments=("SPL00", "AAA"), seed=9).bars(start, end)
    after = pl.col("ts") >= ex_ts
    last_close = plain.filter((pl.col("instrument_id") == "AAA") & ~after)["close"][-1]
    amount = round(last_close * 0.03, 4)
    drop = (last_close - amount) / last_close
    spl, aaa = (pl.col("instrument_id") == "SPL00") & after, (pl.col("instrument_id") == "AAA") & after
    delivered = plain.with_columns(
        *[
            pl.when(spl).then(pl.col(c) * 10).when(aaa).then(pl.col(c) * drop).otherwise(pl.col(c)).alias(c)
            for c in ("open", "high", "low", "close")
        ],
        pl.when(spl).then(pl.col("volume") / 10).otherwise(pl.col("volume")).alias("volume"),
    )
    known = datetime(2024, 1, 5, tzinfo=UTC)
    actions = pl.DataFrame(
        [("SPL00", date(2024, 1, 10), "split", 0.1, known), ("AAA", date(2024, 1, 10), "cash_dividend", amount, known)],
        schema=ACTION_SCHEMA,
        orient="row",
    )
    with engine.begin() as conn:
        replace_bars(conn, delivered, start, end)
        assert write_actions(conn, actions, "test").height == 2
    fs = feature_set("fs_v1")
    total = FeatureSet(version="fs_tr", timeframes=("1m",), features=fs.for_timeframe("1m")[:12], returns="total")
    for chosen, instrument in ((fs, "SPL00"), (total, "AAA")):
        with engine.connect() as conn:
            stored = compute_stored(conn, chosen, "1m", start, end).vectors
        expected = compute_feature_vectors(plain, "1m", feature_set=chosen).vectors
        got = stored.filter((pl.col("instrument_id") == instrument) & after).sort("ts")
        want = expected.filter((pl.col("instrument_id") == instrument) & after).sort("ts")
        assert_same_scale_free(got, want)
        assert not got["quality_flags"].list.contains("UNEXPLAINED_JUMP").any()


def test_the_restatement_sensor_launches_one_run_of_the_datasets_for_those_instruments(
    dsn: str, engine: sa.Engine
) -> None:
    import dagster as dg

    from assets.features import RESTATE_TAG
    from assets.resources import FeatureStore
    from pipelines.definitions import defs, restatement_sensor
    from pipelines.sensors import RANGE_END_TAG, RANGE_START_TAG

    def evaluate() -> list[dg.RunRequest] | dg.SkipReason:
        with dg.build_sensor_context(definitions=defs, resources={"store": FeatureStore(dsn=dsn)}) as context:
            return restatement_sensor(context)

    assert isinstance(evaluate(), dg.SkipReason)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO corporate_action_restatements (instrument_id, dataset, from_date, reason) VALUES "
                "('SPL00', 'feature_vectors_fs_v1_1m', '2024-01-10', 'late'), "
                "('SPL00', 'feature_vectors_fs_v1_1d', '2024-01-10', 'late')"
            )
        )
    [request] = evaluate()
    assert request.tags[RESTATE_TAG] == "SPL00"
    assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == ("2024-01-10", "2024-01-10")
    assert sorted(k.to_user_string() for k in request.asset_selection) == [
        "feature_vectors_fs_v1_1d",
        "feature_vectors_fs_v1_1m",
    ]


def test_a_released_or_discarded_action_batch_ends_the_hold_without_applying_the_row(engine: sa.Engine) -> None:
    from marketfs.sources.corporate_actions import check_store, parse, problems
    from marketfs.store import quality
    from marketfs.store.corporate_actions import quarantine_actions
    from marketfs.store.holds import read_holds

    raw = pl.DataFrame(
        {
            "instrument_id": ["AAA", "BBB"],
            "ex_date": ["2024-01-10", "2024-01-10"],
            "kind": ["split", "split"],
            "ratio": ["0", "-1"],
            "known_at": ["2024-01-09T22:00:00Z"] * 2,
        }
    )
    bad = problems(check_store(parse(raw, "actions.csv", 2), {"AAA", "BBB"}))
    window = active_sessions().trading_day_window("2024-01-11")
    with engine.begin() as conn:
        lines = quarantine_actions(conn, bad, run_id="r1", verdict=None, fallback=("2024-01-11", *window))
        # The same rows delivered again are not set aside twice.
        assert quarantine_actions(conn, bad, run_id="r2", verdict=None, fallback=("2024-01-11", *window)) == []
    assert len(lines) == 2 and "actions.csv, line 2" in lines[0] and "marketfs quarantine discard" in lines[0]
    end = datetime(2024, 1, 13, tzinfo=UTC)
    with engine.begin() as conn:
        held = read_holds(conn, ("corporate_actions",), end)
        assert set(held.held) == {"AAA", "BBB"} and held.held["AAA"].day == "2024-01-10"
        batches = {r.instruments[0]: r.batch_id for r in conn.execute(sa.text("SELECT * FROM quarantine_batches"))}
        released = quality.release(conn, batches["AAA"], actor="alice", note="no split after all")
        discarded = quality.discard(conn, batches["BBB"], actor="alice", note="vendor error")
        assert released["rows_written"] == 0 and discarded["gaps"] == []
        assert not read_holds(conn, ("corporate_actions",), end)
        assert conn.execute(sa.text("SELECT count(*) FROM corporate_actions")).scalar() == 0
