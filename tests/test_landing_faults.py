"""Landing files read as a set of facts; a bad file spoils only its own days (issue 10)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster_helpers import materialize_range

from assets.partitions import day_window
from marketfs.sources import LandingFolderBars, LandingFolderEvents, SourceFileError, SyntheticBars, SyntheticEvents
from marketfs.sources.landing import BARS
from marketfs.sources.landing_index import LandingIndex
from marketfs.sources.normalize import normalize_bars

HEADER = "instrument_id,ts,open,high,low,close,volume\n"
JAN3 = datetime(2024, 1, 3, tzinfo=UTC)
DAY = timedelta(days=1)
JAN3_BARS = SyntheticBars(instruments=("AAA", "BBB")).bars(JAN3, JAN3 + DAY).height  # what land() writes for 01-03


def write(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def land(folder: Path, day: datetime, *, name: str | None = None, newest_first: bool = False) -> None:
    """One day of synthetic bars (as CSV, optionally newest row first) and events for AAA and BBB."""
    bars = SyntheticBars(instruments=("AAA", "BBB")).bars(day, day + DAY)
    if newest_first:
        bars = bars.reverse()
    name = name or f"{day:%Y-%m-%d}"
    (folder / "bars").mkdir(parents=True, exist_ok=True)
    bars.write_csv(folder / "bars" / f"{name}.csv")
    events = SyntheticEvents(instruments=("AAA", "BBB")).events(day, day + DAY)
    events.write_parquet(write(folder / "events" / f"{name}.parquet", ""))


def table_hash(engine: sa.Engine, table: str) -> tuple:
    """Row count and a hash of every row's content (not when or by which run it was written)."""
    row = "(to_jsonb(t) - 'run_id' - 'written_at' - 'ingested_at')::text"
    sql = f"SELECT count(*), md5(string_agg({row}, '' ORDER BY {row})) FROM {table} t"
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text(sql)).one())


def rows(engine: sa.Engine, query: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(query))]


# --- rows are facts, not arrival order ---------------------------------------------------------


def test_a_newest_first_file_stores_the_same_bars_and_vectors_as_oldest_first(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    stored = []
    for newest_first in (False, True):
        land(tmp_path / str(newest_first), JAN3, newest_first=newest_first)
        result = materialize_range(dsn, "2024-01-03", landing_dir=tmp_path / str(newest_first))
        assert result.success
        stored.append(
            (
                table_hash(engine, "ohlcv_1m"),
                table_hash(engine, "feature_vectors"),
                rows(engine, "SELECT count(*) FROM ohlcv_1m WHERE cardinality(source_flags) > 0"),
            )
        )
        with engine.begin() as conn:
            conn.execute(sa.text("TRUNCATE ohlcv_1m, ohlcv_1d, news_events, feature_vectors, feature_state"))
    (oldest_bars, oldest_vectors, oldest_flags), (newest_bars, newest_vectors, newest_flags) = stored
    assert oldest_bars[0] > 700 and oldest_vectors[0] > 700
    assert newest_flags == oldest_flags == [(0,)]  # no bar flagged TIMESTAMP_MISMATCH for arriving "late"
    assert newest_bars == oldest_bars
    assert newest_vectors == oldest_vectors


def test_identical_duplicates_collapse_and_a_later_file_corrects_an_earlier_one(tmp_path: Path) -> None:
    twice = "AAA,2024-01-03T14:30:00Z,1,1,1,1,5\n" * 2
    write(tmp_path / "a.csv", HEADER + "AAA,2024-01-03T14:31:00Z,1,2,1,2,5\n" + twice)
    write(tmp_path / "b.csv", HEADER + "AAA,2024-01-03T14:30:00Z,1,1,1,1,5\nAAA,2024-01-03T14:31:00Z,1,3,1,3,7\n")
    delivered = LandingFolderBars(tmp_path).bars(JAN3, JAN3 + DAY)
    # 14:30 three times, identical: one row. 14:31 differs between a.csv and b.csv: both, b.csv's last.
    assert delivered.select("ts", "close").rows() == [
        (datetime(2024, 1, 3, 14, 30, tzinfo=UTC), 1.0),
        (datetime(2024, 1, 3, 14, 31, tzinfo=UTC), 2.0),
        (datetime(2024, 1, 3, 14, 31, tzinfo=UTC), 3.0),
    ]
    bars = normalize_bars(delivered)
    assert bars.select("close", "volume").rows() == [(1.0, 5.0), (3.0, 7.0)]
    assert bars["source_flags"].to_list() == [[], ["TIMESTAMP_MISMATCH"]]  # the conflict stays visible


def test_a_conflict_inside_one_file_fails_that_day_naming_the_lines(tmp_path: Path) -> None:
    body = HEADER + "AAA,2024-01-03T14:30:00Z,1,1,1,1,5\nAAA,2024-01-04T14:30:00Z,1,1,1,1,5\n"
    path = write(tmp_path / "a.csv", body + "AAA,2024-01-04T14:30:00Z,1,1,1,1,9\n")
    source = LandingFolderBars(tmp_path)
    assert source.bars(*day_window("2024-01-03")).height == 1
    with pytest.raises(SourceFileError) as err:
        source.bars(*day_window("2024-01-04"))
    assert err.value.path == path and err.value.line == 3
    assert "lines 3, 4 with different values" in str(err.value)


# --- instrument ids ----------------------------------------------------------------------------


def test_instrument_ids_are_trimmed(tmp_path: Path) -> None:
    write(tmp_path / "a.csv", HEADER + " K29A ,2024-01-03T14:30:00Z,1,1,1,1,5\nK29A,2024-01-03T14:31:00Z,1,1,1,1,5\n")
    assert LandingFolderBars(tmp_path).bars(JAN3, JAN3 + DAY)["instrument_id"].unique().to_list() == ["K29A"]


@pytest.mark.parametrize("bad", ["K2 9A", "K29A\x00", "K\x0729A", "   ", "K" * 65])
def test_an_instrument_id_that_cannot_be_valid_names_file_line_value_and_fix(tmp_path: Path, bad: str) -> None:
    body = HEADER + f"K29A,2024-01-03T14:30:00Z,1,1,1,1,5\n{bad},2024-01-03T14:31:00Z,1,1,1,1,5\n"
    path = tmp_path / "ids.csv"
    path.write_bytes(body.encode())
    with pytest.raises(SourceFileError) as err:
        LandingFolderBars(tmp_path).bars(JAN3, JAN3 + DAY)
    message = str(err.value)
    assert err.value.path == path and err.value.line == 3
    assert repr(bad) in message
    assert "instrument id" in message and "Fix: write the id" in message


# --- a bad file spoils only its own days -------------------------------------------------------


def test_a_range_read_opens_only_the_files_holding_its_days(tmp_path: Path) -> None:
    land(tmp_path, JAN3)
    # A session far ahead (the calendar knows the sessions of about a year from today).
    write(tmp_path / "bars" / "2030.csv", HEADER + "AAA,2027-01-04T14:30:00Z,1,one,1,1,5\n")
    write(tmp_path / "bars" / "garbage.parquet", "not a parquet file")
    index_path = tmp_path / "index.json"
    source = LandingFolderBars(tmp_path / "bars", index_path=index_path)
    with pytest.warns(UserWarning, match="garbage.parquet"):  # reported, blocks nothing
        assert source.bars(JAN3, JAN3 + DAY).height == JAN3_BARS
    index = LandingIndex(tmp_path / "bars", BARS, index_path)
    assert index.days_of(tmp_path / "bars" / "2030.csv") == ["2027-01-04"]
    with pytest.raises(SourceFileError, match=r"2030.csv, line 2: column 'high' has 'one'"):
        source.bars(*day_window("2027-01-04"))
    # Indexed once: a read of 2024-01-03 now opens 2024-01-03.csv alone.
    index.refresh(keep_days={"2024-01-03"})
    assert index.reads == []
    assert index.files_holding({"2024-01-03"}) == [tmp_path / "bars" / "2024-01-03.csv"]


def test_events_are_on_the_same_footing(tmp_path: Path) -> None:
    land(tmp_path, JAN3)
    good = '{"event_id": "e1", "instrument_id": "AAA", "published_at": "2027-01-04T10:00:00Z", '
    write(tmp_path / "events" / "2030.jsonl", good + '"sentiment": "bad", "confidence": 0.5, "source": "x"}\n')
    source = LandingFolderEvents(tmp_path / "events", index_path=tmp_path / "events-index.json")
    assert source.events(JAN3, JAN3 + DAY).height > 0
    with pytest.raises(SourceFileError, match=r"2030.jsonl, line 1: column 'sentiment' has 'bad'"):
        source.events(*day_window("2027-01-04"))


def test_an_unchanged_file_is_not_reread_and_a_changed_one_is(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", HEADER + "AAA,2024-01-03T14:30:00Z,1,1,1,1,5\n")
    index_path = tmp_path / "index.json"
    assert LandingIndex(tmp_path, BARS, index_path).refresh() == {}
    # Same size and mtime, other content: only a re-read would see the new day.
    stat = path.stat()
    path.write_text(HEADER + "AAA,2024-01-05T14:30:00Z,1,1,1,1,5\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    index = LandingIndex(tmp_path, BARS, index_path)
    index.refresh()
    assert index.reads == [] and index.days_of(path) == ["2024-01-03"]
    # Changed (a new mtime): re-indexed.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    index = LandingIndex(tmp_path, BARS, index_path)
    index.refresh()
    assert index.reads == [path] and index.days_of(path) == ["2024-01-05"]


def test_a_malformed_2030_file_does_not_stop_2024_01_03(dsn: str, engine: sa.Engine, tmp_path: Path) -> None:
    land(tmp_path, JAN3)
    write(tmp_path / "bars" / "zz-2030.csv", HEADER + "AAA,2030-01-02T14:30:00Z,1,one,1,1,5\n")
    write(tmp_path / "bars" / "broken.parquet", "not a parquet file")
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_range(dsn, "2024-01-03", landing_dir=tmp_path, instance=instance)
    assert result.success
    assert rows(engine, "SELECT count(*) FROM ohlcv_1m") == [(JAN3_BARS,)]
    assert rows(engine, "SELECT count(DISTINCT instrument_id) FROM feature_vectors") == [(2,)]
    warnings = [e.user_message for e in instance.all_logs(result.run_id) if e.level == 30]  # logging.WARNING
    assert any("broken.parquet" in w and "cannot be read" in w for w in warnings)


def test_a_bad_line_fails_its_day_and_the_other_days_are_written(dsn: str, engine: sa.Engine, tmp_path: Path) -> None:
    land(tmp_path, JAN3)
    land(tmp_path, JAN3 + DAY)
    bad = tmp_path / "bars" / "2024-01-04.csv"
    lines = bad.read_text().splitlines(keepends=True)
    lines[5] = lines[5].replace(",", ",x", 3)  # line 6: a price that is not a number
    bad.write_text("".join(lines))
    result = materialize_range(dsn, "2024-01-03", "2024-01-04", landing_dir=tmp_path)
    assert not result.success
    message = result.failure_data_for_node("raw_ohlcv").error.message
    assert f"raw_ohlcv 2024-01-04 was not ingested (nothing of it written): {bad}, line 6: column" in message
    assert "Written: 2024-01-03." in message and "Fix:" in message
    assert rows(engine, "SELECT DISTINCT to_char(ts, 'YYYY-MM-DD') FROM ohlcv_1m") == [("2024-01-03",)]
    checks = {
        e.partition: e.passed
        for e in result.get_asset_check_evaluations()
        if e.asset_key.to_user_string() == "raw_ohlcv"
    }
    assert checks == {"2024-01-03": True, "2024-01-04": False}
    written = {
        m.event_specific_data.materialization.partition
        for m in result.get_asset_materialization_events()
        if m.event_specific_data.materialization.asset_key.to_user_string() == "raw_ohlcv"
    }
    assert written == {"2024-01-03"}
    assert rows(engine, "SELECT count(DISTINCT to_char(published_at, 'YYYY-MM-DD')) FROM news_events") == [(2,)]


def test_the_sensor_takes_a_new_files_days_from_the_index(tmp_path: Path) -> None:
    from assets.resources import MarketData
    from pipelines.definitions import defs, landing_files_sensor
    from pipelines.sensors import RANGE_END_TAG, RANGE_START_TAG

    land(tmp_path, JAN3)
    path = write(tmp_path / "bars" / "late.csv", HEADER + "AAA,2024-01-05T14:30:00Z,1,1,1,1,5\n")
    LandingFolderBars(tmp_path / "bars").bars(JAN3, JAN3 + DAY)  # a run indexed the folder
    stat = path.stat()
    path.write_text(HEADER + "AAA,2024-01-09T14:30:00Z,1,1,1,1,5\n")  # same size and mtime: not re-read
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with dg.build_sensor_context(
        definitions=defs, resources={"market_data": MarketData(source="landing", landing_dir=str(tmp_path))}
    ) as context:
        [request] = landing_files_sensor(context)
    assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == ("2024-01-03", "2024-01-05")


def test_a_junk_file_past_the_size_limit_is_refused_unread_naming_it_and_blocks_no_day(tmp_path: Path) -> None:
    folder = tmp_path / "bars"
    folder.mkdir()
    start, end = day_window("2024-01-03")
    SyntheticBars(instruments=("AAA",)).bars(start, end).write_parquet(folder / "jan03.parquet")
    junk = folder / "zz.csv"
    with junk.open("wb") as f:  # sparse: 2 GiB of nothing, as `truncate -s 2G` makes, at no cost to the disk
        f.truncate(2 * 1024**3)
    delivery = LandingFolderBars(folder, index_path=tmp_path / "index.json").delivery(start, end)
    assert delivery.rows.height > 300 and not delivery.day_errors
    [refused] = delivery.unplaced
    assert refused.path == junk and "2,048 MiB, over the 512 MiB" in str(refused)
    assert "MARKETFS_LANDING_MAX_BYTES" in str(refused) and "split it" in str(refused)
