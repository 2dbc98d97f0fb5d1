"""Point-in-time joins and latest() on hand-built vectors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import polars as pl
import pytest
import sqlalchemy as sa

from marketfs import retrieval, snapshots
from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.feature_sets.fs_v2 import FEATURE_SET as FS_V2
from marketfs.features.registry import FeatureSet
from marketfs.retrieval import OnlineReader, RetrievalError, latest, training_frame
from marketfs.store.feature_vectors import upsert_window, vector_schema

DAY = datetime(2024, 1, 3, tzinfo=UTC)
T = DAY + timedelta(hours=10)


def vectors(
    instrument: str, minutes: list[int], values: list[float], timeframe: str = "1m", fs: FeatureSet = FS_V1
) -> pl.DataFrame:
    schema = vector_schema(fs, timeframe)
    rows = {name: [None] * len(minutes) for name in schema}
    rows.update(
        instrument_id=[instrument] * len(minutes),
        timeframe=[timeframe] * len(minutes),
        ts=[T + timedelta(minutes=m) for m in minutes],
        feature_set_version=[fs.version] * len(minutes),
        ret_1=values,
        quality_flags=[[] for _ in minutes],
    )
    if timeframe == "1m":
        rows["rsi_14"] = [v * 10 for v in values]
    if "rsi_7" in schema:
        rows["rsi_7"] = [v / 2 for v in values]
    return pl.DataFrame(rows, schema=schema)


@pytest.fixture
def stored(dsn: str, engine: sa.Engine) -> str:
    with engine.begin() as conn:
        frame = pl.concat([vectors("A", [0, 5, 10], [1.0, 2.0, 3.0]), vectors("B", [7], [7.0])])
        upsert_window(conn, frame, feature_set=FS_V1, timeframe="1m", start=DAY, end=DAY + timedelta(days=1))
        daily = vectors("A", [11], [99.0], timeframe="1d")
        upsert_window(conn, daily, feature_set=FS_V1, timeframe="1d", start=DAY, end=DAY + timedelta(days=1))
    return dsn


@pytest.fixture
def two_sets(stored: str, engine: sa.Engine) -> str:
    """``stored`` (fs_v1) and fs_v2 1m vectors beside it: A at T+0 and T+8 (ret_1 50, 60; rsi_7 25, 30), not B."""
    with engine.begin() as conn:
        frame = vectors("A", [0, 8], [50.0, 60.0], fs=FS_V2).with_columns(pl.lit(["STALE"]).alias("quality_flags"))
        upsert_window(conn, frame, feature_set=FS_V2, timeframe="1m", start=DAY, end=DAY + timedelta(days=1))
    return stored


def entities(*rows: tuple[str, int | float], known: bool = True) -> pl.DataFrame:
    """Entity rows at minute m of the vectors' grid; with ``known`` at the instant the vector stamped m
    became known (its bar's close, one minute later), the natural time to ask for it."""
    lag = timedelta(minutes=1) if known else timedelta(0)
    return pl.DataFrame(
        {"instrument_id": [r[0] for r in rows], "ts": [T + timedelta(minutes=r[1]) + lag for r in rows]},
        schema={"instrument_id": pl.String, "ts": pl.Datetime("us", "UTC")},
    )


def test_point_in_time_cases(stored: str) -> None:
    e = entities(
        ("A", 5),  # exact hit
        ("A", 6),  # between vectors: the earlier one
        ("A", 12),  # 2 minutes after the last vector: inside a 2-minute tolerance (inclusive)
        ("A", 12.5),  # 2.5 minutes after: gap longer than the tolerance
        ("A", -60),  # before any data
        ("A", 6),  # a duplicate entity row stays a row
        ("B", 8),
        ("C", 8),  # an instrument with no vectors
    )
    out = training_frame(e, ["ret_1", "rsi_14"], timedelta(minutes=2), dsn=stored, include_feature_ts=True)
    assert out["ret_1"].to_list() == [2.0, 2.0, 3.0, None, None, 2.0, 7.0, None]
    assert out["rsi_14"].to_list() == [20.0, 20.0, 30.0, None, None, 20.0, 70.0, None]
    assert out["feature_ts"][1] == T + timedelta(minutes=5)
    assert out.select("instrument_id", "ts").equals(e)  # entity rows, in order
    # The 1d vector at T+11 never leaks into 1m results, and the other way round.
    daily = training_frame(entities(("A", 12)), ["ret_1"], timedelta(hours=1), dsn=stored, timeframe="1d")
    assert daily["ret_1"].to_list() == [99.0]


def test_a_vector_is_matched_from_its_bars_close_not_its_stamp(stored: str) -> None:
    """The bar stamped T+5 holds T+5:00-T+5:59 and is known at T+6: at T+5:30 it is the future."""
    e = entities(("A", 5.5), ("A", 6), known=False)
    out = training_frame(e, ["ret_1"], timedelta(hours=1), dsn=stored, include_feature_ts=True)
    assert out["ret_1"].to_list() == [1.0, 2.0]  # a join on the stamp would give 2.0 at T+5:30: a bar's look-ahead
    assert out["feature_known_at"].to_list() == [T + timedelta(minutes=1), T + timedelta(minutes=6)]


def test_unbounded_tolerance_flags_and_several_timeframes(stored: str) -> None:
    e = entities(("A", 500), ("B", 8), ("C", 1))
    assert training_frame(e, ["ret_1"], None, dsn=stored)["ret_1"].to_list() == [3.0, 7.0, None]
    out = training_frame(e, ["rsi_14", "1d:ret_1"], None, dsn=stored, include_flags=True)
    assert out.columns == ["instrument_id", "ts", "rsi_14", "quality_flags_1m", "ret_1", "quality_flags_1d"]
    assert out["ret_1"].to_list() == [99.0, None, None] and out["rsi_14"].to_list() == [30.0, 70.0, None]
    assert out["quality_flags_1m"].to_list() == [[], [], None]


def test_a_name_taken_twice_is_refused_or_prefixed_on_request(stored: str) -> None:
    labelled = entities(("A", 5)).with_columns(pl.lit(0.5).alias("ret_1"))
    with pytest.raises(RetrievalError, match="'ret_1'.*already in the entities.*full_feature_names=True"):
        training_frame(labelled, ["ret_1"], timedelta(minutes=5), dsn=stored)
    with pytest.raises(RetrievalError, match="'ret_1' \\(1d ret_1\\) is already in the 1m request"):
        training_frame(entities(("A", 5)), ["ret_1", "1d:ret_1"], None, dsn=stored)
    out = training_frame(labelled, ["ret_1", "1d:ret_1"], None, dsn=stored, full_feature_names=True)
    assert out.columns == ["instrument_id", "ts", "ret_1", "fs_v1_1m__ret_1", "fs_v1_1d__ret_1"]
    assert out.row(0)[2:] == (0.5, 2.0, None)  # the label stays; the 1d vector is not known yet at T+6


def test_the_cli_names_its_own_option_for_a_taken_name_and_that_option_runs(
    stored: str, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from marketfs.cli import main as marketfs_main

    path = tmp_path / "labelled.csv"
    entities(("A", 5)).with_columns(pl.lit(0.5).alias("ret_1")).write_csv(path)
    monkeypatch.setenv("MARKETFS_DSN", stored)
    argv = ["frame", str(path), "--features", "ret_1", "--tolerance", "5m"]
    assert marketfs_main(argv) == 2
    err = capsys.readouterr().err
    option = re.search(r"marketfs frame (--[a-z-]+)", err)
    assert option, err
    out = tmp_path / "out.csv"
    assert marketfs_main([*argv, option.group(1), "--out", str(out)]) == 0
    frame = pl.read_csv(out)
    assert frame.columns == ["instrument_id", "ts", "ret_1", "fs_v1_1m__ret_1"]
    assert frame.row(0)[2:] == (0.5, 2.0)


def test_future_vectors_never_match(stored: str) -> None:
    out = training_frame(entities(("A", 9.99)), ["ret_1"], timedelta(hours=1), dsn=stored)
    assert out["ret_1"].to_list() == [2.0]  # the vector at 10 is in the entity's future


def test_pandas_in_pandas_out(stored: str) -> None:
    frame = entities(("A", 5), ("B", 7)).to_pandas()
    out = training_frame(frame, ["ret_1"], timedelta(0), dsn=stored, output="pandas")
    assert isinstance(out, pd.DataFrame)
    assert out["ret_1"].tolist() == [2.0, 7.0]


def test_caller_errors_are_clear(stored: str) -> None:
    e = entities(("A", 5))
    with pytest.raises(RetrievalError, match="unknown feature.*nope.*known: ret_1"):
        training_frame(e, ["nope"], timedelta(minutes=1), dsn=stored)
    with pytest.raises(RetrievalError, match="timezone-naive"):
        training_frame(e.with_columns(pl.col("ts").dt.replace_time_zone(None)), ["ret_1"], timedelta(1), dsn=stored)
    with pytest.raises(RetrievalError, match="empty"):
        training_frame(e.clear(), ["ret_1"], timedelta(minutes=1), dsn=stored)
    with pytest.raises(RetrievalError, match="unknown snapshot 'missing'"):
        training_frame(e, ["ret_1"], timedelta(minutes=1), snapshot="missing", dsn=stored)
    with pytest.raises(RetrievalError, match="missing ts"):
        training_frame(e.drop("ts"), ["ret_1"], timedelta(minutes=1), dsn=stored)


def test_arguments_that_cannot_be_right_are_retrieval_errors(stored: str) -> None:
    """NUL bytes reach no SQL, unknown timeframes and versions are named: RetrievalError, never a raw error."""
    e = entities(("A", 5))
    nul = pl.DataFrame({"instrument_id": ["A", "B\x00"], "ts": [T, T]})
    with pytest.raises(RetrievalError, match=r"entities row 1 .*NUL byte"):
        training_frame(nul, ["ret_1"], timedelta(minutes=1), dsn=stored)
    with pytest.raises(RetrievalError, match=r"instrument 'A\\x00' contains a NUL byte"):
        latest(["A\x00"], ["ret_1"], dsn=stored)
    with pytest.raises(RetrievalError, match="NUL byte"):
        training_frame(e, ["ret_1"], timedelta(minutes=1), snapshot="s\x00", dsn=stored)
    with pytest.raises(RetrievalError, match="NUL byte"):
        training_frame(e, ["ret_1\x00"], timedelta(minutes=1), dsn=stored)
    with pytest.raises(RetrievalError, match="has no timeframe '5s'"):
        training_frame(e, ["ret_1"], timedelta(minutes=1), timeframe="5s", dsn=stored)
    with pytest.raises(RetrievalError, match="has no timeframe '1h'"):
        latest(["A"], ["ret_1"], timeframe="1h", dsn=stored)
    with pytest.raises(RetrievalError, match="unknown feature set version 'fs_v9'"):
        latest(["A"], ["ret_1"], feature_set_version="fs_v9", dsn=stored)
    with pytest.raises(RetrievalError, match="tolerance must be >= 0"):
        training_frame(e, ["ret_1"], timedelta(minutes=-1), dsn=stored)
    with pytest.raises(RetrievalError, match="tolerance must be a timedelta"):
        training_frame(e, ["ret_1"], 5, dsn=stored)  # type: ignore[arg-type]
    with pytest.raises(RetrievalError, match="instrument_id must be text"):
        training_frame(e.with_columns(pl.lit(1).alias("instrument_id")), ["ret_1"], timedelta(1), dsn=stored)
    # The reader is still usable after the refusals: nothing reached the connection.
    assert latest(["A"], ["ret_1"], dsn=stored)["ret_1"].to_list() == [3.0]


def test_training_frame_from_a_snapshot_ignores_later_changes(stored: str, engine: sa.Engine) -> None:
    with engine.begin() as conn:
        snap = snapshots.create_snapshot(
            conn, feature_set_version="fs_v1", timeframe="1m", start=DAY, end=DAY + timedelta(days=1)
        )
        conn.execute(sa.text("UPDATE feature_vectors SET ret_1 = -1"))
    e = entities(("A", 6), ("B", 8))
    assert training_frame(e, ["ret_1"], timedelta(minutes=5), dsn=stored)["ret_1"].to_list() == [-1.0, -1.0]
    frozen = training_frame(e, ["ret_1"], timedelta(minutes=5), snapshot=snap.snapshot_id, dsn=stored)
    assert frozen["ret_1"].to_list() == [2.0, 7.0]


def test_latest_returns_the_newest_vector_per_instrument(stored: str) -> None:
    out = latest(["B", "A", "C"], ["ret_1", "rsi_14"], dsn=stored)
    assert out["instrument_id"].to_list() == ["B", "A", "C"]
    assert out["ret_1"].to_list() == [7.0, 3.0, None]
    assert out["ts"][1] == T + timedelta(minutes=10)
    assert latest(["C"], ["ret_1"], dsn=stored).row(0)[:3] == ("C", None, None)  # one instrument, no vector
    records = OnlineReader(stored).latest(["A"], ["ret_1"], output="records")
    ts = T + timedelta(minutes=10)
    known = ts + timedelta(minutes=1)  # the close of the bar it is stamped with
    assert records == [{"instrument_id": "A", "ts": ts, "quality_flags": [], "ret_1": 3.0, "known_at": known}]
    assert out["known_at"][1] == known
    with pytest.raises(RetrievalError, match="unknown feature"):
        latest(["A"], ["bogus"], dsn=stored)


def test_latest_frames_keep_their_dtypes_and_values(two_sets: str) -> None:
    """The default output, built from integers since 2026-12: the same frame as built from the records."""
    reader = OnlineReader(two_sets)
    dt = pl.Datetime("us", "UTC")
    for instruments, version in ((["A"], "fs_v2"), (["C"], "fs_v2"), (["B", "A", "C"], "fs_v1"), (["A", "B"], "fs_v2")):
        records = reader.latest(instruments, ["ret_1", "rsi_14"], feature_set=version, output="records")
        frame = reader.latest(instruments, ["ret_1", "rsi_14"], feature_set=version)
        schema = {"instrument_id": pl.String, "ts": dt, "quality_flags": pl.List(pl.String)}
        schema |= {"ret_1": pl.Float64, "rsi_14": pl.Float64, "known_at": dt}
        assert frame.schema == pl.Schema(schema)
        assert frame.equals(pl.DataFrame(records, schema=schema)), (instruments, version)
        pandas = reader.latest(instruments, ["ret_1", "rsi_14"], feature_set=version, output="pandas")
        assert pandas.equals(pl.DataFrame(records, schema=schema).to_pandas())
    one = reader.latest(["A"], ["ret_1", "rsi_14"], feature_set="fs_v2")
    assert one.row(0) == ("A", T + timedelta(minutes=8), ["STALE"], 60.0, 600.0, T + timedelta(minutes=9))
    assert reader.latest(["C"], ["ret_1"]).row(0) == ("C", None, None, None, None)
    reader.close()


def _at(engine: sa.Engine, table: str, column: str, minutes: int) -> None:
    """Move every row's ``column`` of ``table`` to T + minutes: a timeline the test controls."""
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {table} SET {column} = :t"), {"t": T + timedelta(minutes=minutes)})


def test_as_of_reads_the_values_served_at_an_instant(dsn: str, engine: sa.Engine) -> None:
    window = {"feature_set": FS_V1, "timeframe": "1m", "start": DAY, "end": DAY + timedelta(days=1)}
    with engine.begin() as conn:
        upsert_window(conn, vectors("A", [0, 5, 10], [1.0, 2.0, 3.0]), **window)
    _at(engine, "feature_vectors", "written_at", 20)  # first written at T+20
    with engine.begin() as conn:  # an identical re-run is the same version: no history, same written_at
        assert upsert_window(conn, vectors("A", [0, 5, 10], [1.0, 2.0, 3.0]), **window)["superseded"] == 0
    with engine.begin() as conn:  # a correction of minute 5, and minute 10 no longer computed
        stats = upsert_window(conn, vectors("A", [0, 5], [1.0, 20.0]), **window)
    assert (stats["superseded"], stats["deleted_stale"]) == (1, 1)
    _at(engine, "feature_vectors_history", "superseded_at", 40)  # replaced at T+40
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE feature_vectors SET written_at = :t WHERE ts = :five"),
            {"t": T + timedelta(minutes=40), "five": T + timedelta(minutes=5)},
        )

    e = entities(("A", 5), ("A", 10), known=True)  # at T+6 and T+11
    now = training_frame(e, ["ret_1"], None, dsn=dsn)
    assert now["ret_1"].to_list() == [20.0, 20.0]
    then = training_frame(e, ["ret_1"], None, dsn=dsn, as_of=T + timedelta(minutes=30))
    assert then["ret_1"].to_list() == [2.0, 3.0]
    assert training_frame(e, ["ret_1"], None, dsn=dsn, as_of=T + timedelta(minutes=10))["ret_1"].to_list() == [
        None,
        None,
    ]

    # As a live model saw it: at each row's own ts, only what had been written by then.
    live = entities(("A", 5), ("A", 29), ("A", 49), known=True)  # T+6, T+30, T+50
    assert training_frame(live, ["ret_1"], None, dsn=dsn, as_of="entity")["ret_1"].to_list() == [None, 3.0, 20.0]
    with pytest.raises(RetrievalError, match="timezone-aware datetime"):
        training_frame(e, ["ret_1"], None, dsn=dsn, as_of="yesterday")


def test_history_retention_drops_versions_replaced_before_the_horizon(
    dsn: str, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from marketfs.store.migrations import migrate

    window = {"feature_set": FS_V1, "timeframe": "1m", "start": DAY, "end": DAY + timedelta(days=1)}
    for value in (1.0, 2.0, 3.0):
        with engine.begin() as conn:
            upsert_window(conn, vectors("A", [0], [value]), **window)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE feature_vectors_history SET superseded_at = now() - interval '100 days' WHERE ret_1 = 1.0")
        )
    monkeypatch.setenv("MARKETFS_HISTORY_RETENTION", "90 days")
    migrate(dsn)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT ret_1 FROM feature_vectors_history")).scalars().all() == [2.0]
    monkeypatch.setenv("MARKETFS_HISTORY_RETENTION", "ninety days")
    with pytest.raises(ValueError, match="MARKETFS_HISTORY_RETENTION='ninety days' is not an interval"):
        migrate(dsn)


def test_split_over_connections_gives_the_same_frame(stored: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import marketfs.retrieval as retrieval

    e = entities(("A", 5), ("B", 8), ("A", 6), ("C", 1), ("A", 12), ("B", 7), ("A", 500))
    monkeypatch.setenv("MARKETFS_RETRIEVAL_CONNECTIONS", "1")
    one = training_frame(e, ["ret_1", "1d:rsi_14"], None, dsn=stored, include_flags=True)
    monkeypatch.setenv("MARKETFS_RETRIEVAL_CONNECTIONS", "3")
    monkeypatch.setattr(retrieval, "PARALLEL_FROM_ROWS", 1)
    assert len(retrieval._parts(e.with_row_index("row_no"))) > 1
    assert training_frame(e, ["ret_1", "1d:rsi_14"], None, dsn=stored, include_flags=True).equals(one)


@pytest.mark.parametrize("tolerance", [timedelta(minutes=2), None])
def test_the_merge_gives_what_the_lookups_give(
    stored: str, monkeypatch: pytest.MonkeyPatch, tolerance: timedelta | None
) -> None:
    """The join used where the range reaches columnstore chunks, forced here on plain tables."""
    e = entities(("A", 5), ("A", 5.5), ("A", 12), ("A", 12.5), ("A", -60), ("B", 8), ("C", 1), ("A", 6), ("A", 500))
    monkeypatch.setenv("MARKETFS_PIT_METHOD", "lookup")
    looked_up = training_frame(
        e, ["ret_1", "rsi_14"], tolerance, dsn=stored, include_feature_ts=True, include_flags=True
    )
    monkeypatch.setenv("MARKETFS_PIT_METHOD", "merge")
    merged = training_frame(e, ["ret_1", "rsi_14"], tolerance, dsn=stored, include_feature_ts=True, include_flags=True)
    assert merged.equals(looked_up)
    assert looked_up["ret_1"].null_count() >= 2  # the cases without a match are in there


def test_a_write_that_waited_for_the_writers_lock_is_dated_when_it_could_first_be_seen(dsn: str) -> None:
    """written_at (what as_of reads) is stamped once the lock is held, not at the transaction's start: a
    training_frame(as_of=t) never returns a value no reader could see at t."""
    import threading
    import time
    from datetime import UTC, datetime

    import psycopg
    import sqlalchemy as sa

    from marketfs.db import engine_for
    from marketfs.features.compute import compute_feature_vectors
    from marketfs.features.registry import DEFAULT_FEATURE_SET
    from marketfs.sources import SyntheticBars
    from marketfs.store.feature_vectors import write_features
    from marketfs.store.migrations import migrate

    migrate(dsn)
    start, end = datetime(2024, 1, 3, tzinfo=UTC), datetime(2024, 1, 4, tzinfo=UTC)
    computed = compute_feature_vectors(SyntheticBars(instruments=("AAA",)).bars(start, end), "1m", start=start, end=end)
    scope = f"{DEFAULT_FEATURE_SET.version}/1m/0"
    holder = psycopg.connect(sa.make_url(dsn).set(drivername="postgresql").render_as_string(hide_password=False))
    holder.execute("SELECT pg_advisory_lock(hashtext('feature_vectors'), hashtext(%s))", (scope,))

    def write() -> None:
        with engine_for(dsn).begin() as conn:
            conn.execute(sa.text("SELECT 1"))  # the transaction starts here, before the lock
            write_features(conn, computed, feature_set=DEFAULT_FEATURE_SET, timeframe="1m", start=start, end=end)

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(2)
    released = holder.execute("SELECT clock_timestamp()").fetchone()[0]
    holder.execute("SELECT pg_advisory_unlock(hashtext('feature_vectors'), hashtext(%s))", (scope,))
    writer.join(timeout=60)
    holder.close()
    with engine_for(dsn).connect() as conn:
        first = conn.execute(sa.text("SELECT min(written_at) FROM feature_vectors")).scalar()
    assert first >= released, (first, released)


def test_several_feature_sets_in_one_call(two_sets: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fs_v2:1m:rsi_7`` beside the call's own set: each (set, timeframe) is its own point-in-time join."""
    e = entities(("A", 5), ("A", 9), ("B", 8), ("A", -60))  # at T+6, T+10, T+9, T-59
    out = training_frame(e, ["ret_1", "fs_v2:1m:rsi_7", "rsi_14"], None, dsn=two_sets)
    assert out.columns == ["instrument_id", "ts", "ret_1", "rsi_14", "rsi_7"]
    assert out["ret_1"].to_list() == [2.0, 2.0, 7.0, None]  # fs_v1: T+10's vector is known at T+11
    assert out["rsi_14"].to_list() == [20.0, 20.0, 70.0, None]
    assert out["rsi_7"].to_list() == [25.0, 30.0, None, None]  # fs_v2: T+8's vector is known at T+9; no B vectors
    alone = training_frame(e, ["rsi_7"], None, feature_set="fs_v2", dsn=two_sets)
    assert out["rsi_7"].equals(alone["rsi_7"])  # the same join as asking fs_v2 on its own
    # The call's set can be fs_v2 and a reference fs_v1; the tolerance bounds each join.
    back = training_frame(e, ["rsi_7", "fs_v1:1m:ret_1"], timedelta(minutes=2), feature_set="fs_v2", dsn=two_sets)
    assert back.columns == ["instrument_id", "ts", "rsi_7", "ret_1"]
    assert back["rsi_7"].to_list() == [None, 30.0, None, None] and back["ret_1"].to_list() == [2.0, None, 7.0, None]
    # Three forms in one call, with flags: suffixed by set and timeframe once sets differ.
    flagged = training_frame(
        e, ["rsi_14", "1d:ret_1", "fs_v2:1m:rsi_7"], None, dsn=two_sets, include_flags=True, include_feature_ts=True
    )
    assert [c for c in flagged.columns if c.startswith("quality_flags")] == [
        "quality_flags_fs_v1_1m",
        "quality_flags_fs_v1_1d",
        "quality_flags_fs_v2_1m",
    ]
    assert flagged["quality_flags_fs_v2_1m"].to_list() == [["STALE"], ["STALE"], None, None]
    assert flagged["feature_ts_fs_v2_1m"][1] == T + timedelta(minutes=8)
    assert flagged["ret_1"].to_list() == [None, None, None, None]  # the 1d vector (T+11) is not known yet
    # The merge (used over columnstore chunks) and the split over connections give the same frame.
    monkeypatch.setenv("MARKETFS_PIT_METHOD", "merge")
    assert training_frame(e, ["ret_1", "fs_v2:1m:rsi_7", "rsi_14"], None, dsn=two_sets).equals(out)
    monkeypatch.setenv("MARKETFS_PIT_METHOD", "lookup")
    monkeypatch.setenv("MARKETFS_RETRIEVAL_CONNECTIONS", "2")
    monkeypatch.setattr(retrieval, "PARALLEL_FROM_ROWS", 1)
    assert training_frame(e, ["ret_1", "fs_v2:1m:rsi_7", "rsi_14"], None, dsn=two_sets).equals(out)


def test_one_feature_name_from_two_sets_is_refused_or_prefixed_on_request(two_sets: str) -> None:
    e = entities(("A", 9))
    with pytest.raises(
        RetrievalError,
        match=r"column 'ret_1' \(fs_v2 1m ret_1\) is already in the fs_v1 1m request; .*full_feature_names=True "
        r".* fs_v2_1m__ret_1",
    ):
        training_frame(e, ["ret_1", "fs_v2:1m:ret_1"], None, dsn=two_sets)
    out = training_frame(e, ["ret_1", "fs_v2:1m:ret_1", "fs_v2:1m:rsi_7"], None, dsn=two_sets, full_feature_names=True)
    assert out.columns == ["instrument_id", "ts", "fs_v1_1m__ret_1", "fs_v2_1m__ret_1", "fs_v2_1m__rsi_7"]
    assert out.row(0)[2:] == (2.0, 60.0, 30.0)
    # One feature written two ways is asked for once.
    twice = training_frame(e, ["rsi_7", "fs_v2:1m:rsi_7"], None, feature_set="fs_v2", dsn=two_sets)
    assert twice.columns == ["instrument_id", "ts", "rsi_7"] and twice["rsi_7"].to_list() == [30.0]


def test_a_reference_that_cannot_be_served_names_itself_and_what_exists(two_sets: str) -> None:
    e = entities(("A", 5))
    cases = {
        "fs_v9:1m:rsi_7": r"unknown feature set version 'fs_v9'; known: fs_v1, fs_v2 \(in feature reference "
        r"'fs_v9:1m:rsi_7'; the forms are <feature>, <timeframe>:<feature>",
        "fs_v2:1d:rsi_7": r"feature set fs_v2 has no timeframe '1d'; it has \('1m', '5m'\) \(in feature reference "
        r"'fs_v2:1d:rsi_7'",
        "fs_v2:1m:nope": r"unknown feature\(s\) fs_v2:1m:nope for fs_v2 1m; known: ret_1, ret_5, vol_20, rsi_7",
        "fs_v2:rsi_7": r"'fs_v2:rsi_7' names feature set fs_v2 but no timeframe; write fs_v2:<timeframe>:rsi_7, "
        r"e.g. fs_v2:1m:rsi_7",
        "fs_v2:1m:rsi_7:x": r"feature reference 'fs_v2:1m:rsi_7:x' is not <feature>, <timeframe>:<feature> "
        r"\(1d:rsi_14\) or <feature set>:<timeframe>:<feature> \(fs_v2:1m:rsi_7\)",
        "1d:": r"feature reference '1d:' is not <feature>",
    }
    for reference, message in cases.items():
        with pytest.raises(RetrievalError, match=message):
            training_frame(e, ["ret_1", reference], None, dsn=two_sets)
    # A set given by argument keeps its message: no reference wrote it.
    with pytest.raises(RetrievalError, match=r"^unknown feature set version 'fs_v9'; known: fs_v1, fs_v2$"):
        training_frame(e, ["ret_1"], None, feature_set="fs_v9", dsn=two_sets)


def test_a_snapshot_serves_references_to_its_own_set_and_refuses_others(two_sets: str, engine: sa.Engine) -> None:
    with engine.begin() as conn:
        snap = snapshots.create_snapshot(
            conn, feature_set_version="fs_v1", timeframe="1m", start=DAY, end=DAY + timedelta(days=1)
        ).snapshot_id
    e = entities(("A", 6), ("B", 8))
    full = training_frame(e, ["fs_v1:1m:ret_1", "1m:rsi_14"], None, snapshot=snap, dsn=two_sets)
    assert full["ret_1"].to_list() == [2.0, 7.0] and full["rsi_14"].to_list() == [20.0, 70.0]
    for reference, other in (("fs_v2:1m:rsi_7", "fs_v2 1m"), ("1d:ret_1", "fs_v1 1d")):
        with pytest.raises(
            RetrievalError,
            match=rf"snapshot {snap} holds fs_v1 1m vectors only, and '{reference}' asks for {other}; ask for the "
            rf"snapshot's features by name alone, or read {other} from the live table \(no snapshot\)",
        ):
            training_frame(e, ["ret_1", reference], None, snapshot=snap, dsn=two_sets)


def test_the_cli_takes_feature_set_references(
    two_sets: str, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from marketfs.cli import main as marketfs_main

    path, out = tmp_path / "entities.csv", tmp_path / "out.csv"
    entities(("A", 5), ("A", 9), ("B", 8)).write_csv(path)
    monkeypatch.setenv("MARKETFS_DSN", two_sets)
    argv = ["frame", str(path), "--features", "ret_1,fs_v2:1m:rsi_7", "--tolerance", "none", "--out", str(out)]
    assert marketfs_main(argv) == 0
    frame = pl.read_csv(out)
    assert frame.columns == ["instrument_id", "ts", "ret_1", "rsi_7"]
    assert frame["ret_1"].to_list() == [2.0, 2.0, 7.0] and frame["rsi_7"].to_list() == [25.0, 30.0, None]
    assert marketfs_main([*argv[:3], "ret_1,fs_v9:1m:rsi_7", *argv[4:]]) == 2
    assert "unknown feature set version 'fs_v9'; known: fs_v1, fs_v2 (in feature reference" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lookup", "merge"])
def test_a_tolerance_beyond_any_timestamp_is_no_bound(
    stored: str, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """timedelta.max (or any tolerance reaching before 4714 BC, PostgreSQL's first instant) matches as None does,
    where PostgreSQL would otherwise refuse to compute the window's start."""
    monkeypatch.setenv("MARKETFS_PIT_METHOD", method)
    e = entities(("A", 500), ("B", 8), ("C", 1), ("A", -60))
    unbounded = training_frame(e, ["ret_1", "1d:rsi_14"], None, dsn=stored, include_feature_ts=True)
    assert unbounded["ret_1"].to_list() == [3.0, 7.0, None, None]
    for tolerance in (timedelta.max, timedelta(days=3_000_000), timedelta(days=365 * 6738)):
        out = training_frame(e, ["ret_1", "1d:rsi_14"], tolerance, dsn=stored, include_feature_ts=True)
        assert out.equals(unbounded), tolerance
    # Entities millennia apart: the earliest row's window reaches before 4714 BC (no bound for it), the latest's
    # does not (still bounded: 5,000 years back from 2024 leaves out nothing here, but is computed).
    ancient = pl.DataFrame(
        {"instrument_id": ["A", "A"], "ts": [datetime(1, 1, 1, tzinfo=UTC), T + timedelta(minutes=11)]},
        schema={"instrument_id": pl.String, "ts": pl.Datetime("us", "UTC")},
    )
    assert training_frame(ancient, ["ret_1"], timedelta(days=365 * 5000), dsn=stored)["ret_1"].to_list() == [None, 3.0]
    # A bounded tolerance still bounds.
    assert training_frame(e, ["ret_1"], timedelta(minutes=2), dsn=stored)["ret_1"].to_list() == [None, 7.0, None, None]


def test_the_cli_takes_a_tolerance_beyond_any_timestamp_as_no_bound(
    stored: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from marketfs.cli import main as marketfs_main

    path = tmp_path / "entities.csv"
    entities(("A", 500), ("B", 8), ("C", 1)).write_csv(path)
    monkeypatch.setenv("MARKETFS_DSN", stored)
    for tolerance in ("999999999d", "1000000000d", "99999999999999999999999s"):  # the last two: beyond timedelta
        out = tmp_path / "out.csv"
        argv = ["frame", str(path), "--features", "ret_1", "--tolerance", tolerance, "--out", str(out)]
        assert marketfs_main(argv) == 0, tolerance
        assert pl.read_csv(out)["ret_1"].to_list() == [3.0, 7.0, None], tolerance


def test_entity_columns_named_like_the_joins_own_columns_are_kept(stored: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """row_no, row (and the names the join uses instead) are the caller's columns, passed through untouched."""
    e = entities(("A", 5), ("B", 8), ("A", 12)).with_columns(
        pl.Series("row_no", [30, 10, 20]),
        pl.Series("row", ["x", "y", "z"]),
        pl.Series("_marketfs_row", [1.5, 2.5, 3.5]),
        pl.Series("_part", [7, 8, 9]),
        pl.Series("_known_at", [True, False, True]),
    )
    expected = e.with_columns(pl.Series("ret_1", [2.0, 7.0, 3.0]), pl.Series("rsi_14", [20.0, 70.0, 30.0]))
    assert training_frame(e, ["ret_1", "1m:rsi_14"], timedelta(minutes=5), dsn=stored).equals(expected)
    assert training_frame(e.to_pandas(), ["ret_1", "rsi_14"], timedelta(minutes=5), dsn=stored, output="pandas").equals(
        expected.to_pandas()
    )
    monkeypatch.setenv("MARKETFS_PIT_METHOD", "merge")
    monkeypatch.setenv("MARKETFS_RETRIEVAL_CONNECTIONS", "2")
    monkeypatch.setattr(retrieval, "PARALLEL_FROM_ROWS", 1)
    assert training_frame(e, ["ret_1", "rsi_14"], timedelta(minutes=5), dsn=stored).equals(expected)
