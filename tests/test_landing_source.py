"""Landing files: good files load, bad files stop with a message naming file, line and fix."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from marketfs.sources import LandingFolderBars, LandingFolderEvents, SourceFileError

HEADER = "instrument_id,ts,open,high,low,close,volume\n"
DAY = (datetime(2024, 1, 2, tzinfo=UTC), datetime(2024, 1, 3, tzinfo=UTC))


def write(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def test_csv_and_parquet_load_in_utc(tmp_path: Path) -> None:
    write(tmp_path, "a.csv", HEADER + "AAA,2024-01-02T09:30:00-05:00,10,11,9,10.5,100\n")
    pl.DataFrame(
        {
            "instrument_id": ["BBB"],
            "ts": [datetime(2024, 1, 2, 14, 31)],
            "open": [1.0],
            "high": [1.0],
            "low": [1.0],
            "close": [1.0],
            "volume": [5],
        }
    ).write_parquet(tmp_path / "b.parquet")
    out = LandingFolderBars(tmp_path).bars(*DAY)
    assert out["instrument_id"].to_list() == ["AAA", "BBB"]
    assert out["ts"].to_list() == [datetime(2024, 1, 2, 14, 30, tzinfo=UTC), datetime(2024, 1, 2, 14, 31, tzinfo=UTC)]
    assert out["volume"].dtype == pl.Float64


def test_close_stamped_files_are_read_as_bars_stamped_at_their_open(tmp_path: Path) -> None:
    """A vendor stamping 09:31 for the trades of 09:30-09:31: with stamp="close" the bar is 09:30, and one
    stamped at midnight belongs to the day before."""
    body = HEADER + "AAA,2024-01-02T14:31:00Z,10,11,9,10.5,100\nAAA,2024-01-03T00:00:00Z,10,11,9,10.5,100\n"
    write(tmp_path / "close", "a.csv", body)
    out = LandingFolderBars(tmp_path / "close", index_path=tmp_path / "close.json", stamp="close").bars(*DAY)
    assert out["ts"].to_list() == [datetime(2024, 1, 2, 14, 30, tzinfo=UTC), datetime(2024, 1, 2, 23, 59, tzinfo=UTC)]
    as_open = LandingFolderBars(tmp_path / "close", index_path=tmp_path / "open.json").bars(*DAY)
    assert as_open["ts"].to_list() == [datetime(2024, 1, 2, 14, 31, tzinfo=UTC)]  # midnight: the next day's
    with pytest.raises(SourceFileError, match="MARKETFS_BAR_STAMP"):
        LandingFolderBars(tmp_path / "close", stamp="end").bars(*DAY)


def test_missing_column_names_file_and_fix(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.csv", "instrument_id,ts,open,high,low,close\nAAA,2024-01-02T14:30:00Z,1,1,1,1\n")
    with pytest.raises(SourceFileError) as err:
        LandingFolderBars(tmp_path).bars(*DAY)
    message = str(err.value)
    assert str(path) in message and "volume" in message and "Fix:" in message


def test_unparsable_timestamp_names_the_line(tmp_path: Path) -> None:
    body = HEADER + "AAA,2024-01-02T14:30:00Z,1,1,1,1,1\nAAA,02/01/2024 14:31,1,1,1,1,1\n"
    path = write(tmp_path, "bad_ts.csv", body)
    with pytest.raises(SourceFileError) as err:
        LandingFolderBars(tmp_path).bars(*DAY)
    assert err.value.path == path
    assert err.value.line == 3
    assert "'ts'" in str(err.value) and "ISO 8601" in str(err.value)


def test_wrong_type_names_column_and_line(tmp_path: Path) -> None:
    write(
        tmp_path, "bad_num.csv", HEADER + "AAA,2024-01-02T14:30:00Z,1,1,1,1,1\nAAA,2024-01-02T14:31:00Z,1,one,1,1,1\n"
    )
    with pytest.raises(SourceFileError, match=r"line 3: column 'high' has 'one', not a number"):
        LandingFolderBars(tmp_path).bars(*DAY)


def test_missing_folder_says_how_to_configure(tmp_path: Path) -> None:
    with pytest.raises(SourceFileError, match="MARKETFS_LANDING_DIR"):
        LandingFolderBars(tmp_path / "nope" / "bars").bars(*DAY)


def test_a_landing_folder_without_bars_or_events_delivers_none_of_them(tmp_path: Path) -> None:
    # A daily-only vendor: the landing folder exists, with bars_1d/ and no bars/ or events/.
    assert LandingFolderBars(tmp_path / "bars").bars(*DAY).is_empty()
    assert LandingFolderEvents(tmp_path / "events").events(*DAY).is_empty()
