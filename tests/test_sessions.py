"""Markets as they trade: exchange sessions, daily deliveries, days that should have data (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from dagster_helpers import PIPELINE, dagster_process_env, materialize_range

from assets.partitions import DAILY, day_window, session_keys
from marketfs.calendars import CalendarError, sessions
from marketfs.features.resample import session_bars
from marketfs.sources import LandingFolderDailyBars, SourceFileError, SyntheticBars
from marketfs.sources.base import BAR_SCHEMA
from marketfs.universe import UniverseError, active_universe

HEADER = "instrument_id,ts,open,high,low,close,volume\n"
ROOT = Path(__file__).resolve().parents[1]
MINUTE = timedelta(minutes=1)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def minute_bars(instrument: str, first: datetime, count: int, price: float = 100.0, volume: float = 10.0):
    """``count`` one-minute bars from ``first``, close rising by 0.01 a minute."""
    ts = [first + i * MINUTE for i in range(count)]
    close = [price + 0.01 * i for i in range(count)]
    return pl.DataFrame(
        {
            "instrument_id": [instrument] * count,
            "ts": ts,
            "open": [c - 0.005 for c in close],
            "high": [c + 0.02 for c in close],
            "low": [c - 0.02 for c in close],
            "close": close,
            "volume": [volume] * count,
        },
        schema=BAR_SCHEMA,
    )


def rows(engine: sa.Engine, query: str, **params) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(query), params)]


# --- the calendar -----------------------------------------------------------------------------


def test_partitions_are_the_sessions_weekends_and_holidays_are_none() -> None:
    keys = DAILY.get_partition_keys()
    assert "2024-01-13" not in keys and "2024-01-14" not in keys  # a weekend
    assert "2024-01-15" not in keys  # Martin Luther King Jr. Day, NYSE closed
    assert "2024-11-29" in keys  # the early close after Thanksgiving is a session
    assert session_keys("2024-01-11", "2024-01-17") == ["2024-01-11", "2024-01-12", "2024-01-16", "2024-01-17"]
    nyse = sessions("XNYS")
    assert "holiday" in nyse.not_a_session("2024-01-15") and "2024-01-16" in nyse.not_a_session("2024-01-15")
    assert "weekend" in nyse.not_a_session("2024-01-13")


def test_trading_days_tile_time_from_close_to_close() -> None:
    # After the long weekend, 2024-01-16 holds everything since Friday's close.
    assert day_window("2024-01-16") == (utc(2024, 1, 12, 21), utc(2024, 1, 16, 21))
    assert day_window("2024-01-12")[1] == day_window("2024-01-16")[0]
    ts = pl.Series([utc(2024, 1, 12, 20, 59), utc(2024, 1, 12, 21, 0), utc(2024, 1, 15, 15, 0)])
    assert sessions("XNYS").trading_day(ts).to_list() == [date(2024, 1, 12), date(2024, 1, 16), date(2024, 1, 16)]


def test_a_session_that_crosses_utc_midnight_is_one_trading_day_and_one_daily_bar() -> None:
    cme = sessions("CMES")
    # CME Globex: the session of 2024-01-03 opens at 17:00 Chicago on 01-02 (23:00 UTC).
    opened, closed = cme.bounds("2024-01-03")
    assert (opened, closed) == (utc(2024, 1, 2, 23), utc(2024, 1, 3, 23))
    minutes = minute_bars("ES", opened, int((closed - opened) / MINUTE))
    daily = session_bars(minutes, cme)
    assert daily.height == 1  # not two halves split at UTC midnight
    bar = daily.row(0, named=True)
    assert bar["ts"] == closed - MINUTE  # known at the session's close
    assert bar["open"] == minutes["open"][0] and bar["close"] == minutes["close"][-1]
    assert bar["volume"] == minutes["volume"].sum()
    assert bar["source_flags"] == []
    # A 24/7 calendar (crypto) has a session every day, UTC midnight to midnight.
    crypto = sessions("24/7")
    assert crypto.is_session("2024-01-13") and crypto.bounds("2024-01-13") == (utc(2024, 1, 13), utc(2024, 1, 14))


def test_an_early_close_ends_the_daily_bar_and_the_synthetic_session() -> None:
    nyse = sessions("XNYS")
    assert nyse.bounds("2024-11-29") == (utc(2024, 11, 29, 14, 30), utc(2024, 11, 29, 18))  # 13:00 New York
    bars = SyntheticBars(instruments=("AAA",), drop_rate=0.0).bars(*day_window("2024-11-29"))
    assert bars.height == 210 and bars["ts"].max() == utc(2024, 11, 29, 17, 59)
    daily = session_bars(bars, nyse)
    assert daily["ts"].to_list() == [utc(2024, 11, 29, 17, 59)]
    assert daily["source_flags"].to_list() == [[]]  # a short session fully covered is not partial
    # Daylight saving time moves the open: 09:30 New York is 13:30 UTC in July.
    summer = SyntheticBars(instruments=("AAA",), drop_rate=0.0).bars(*day_window("2024-07-10"))
    assert summer["ts"].min() == utc(2024, 7, 10, 13, 30)


def test_an_after_hours_print_is_in_no_daily_bar() -> None:
    nyse = sessions("XNYS")
    regular = minute_bars("AAA", utc(2024, 1, 3, 14, 30), 390, price=98.0)
    after_hours = minute_bars("AAA", utc(2024, 1, 3, 22, 0), 120, price=97.0, volume=700.0)  # 17:00-19:00 NY
    regular_next = minute_bars("AAA", utc(2024, 1, 4, 14, 30), 390, price=98.03)
    daily = session_bars(pl.concat([regular, after_hours, regular_next]), nyse)
    assert daily["ts"].to_list() == [utc(2024, 1, 3, 20, 59), utc(2024, 1, 4, 20, 59)]
    jan4 = daily.row(1, named=True)
    assert jan4["open"] == pytest.approx(98.03 - 0.005)  # the official open, not the evening's print
    assert jan4["volume"] == 3900.0  # the evening's 84,000 shares are in neither day
    assert daily.row(0, named=True)["volume"] == 3900.0


def test_a_partly_covered_session_is_flagged() -> None:
    nyse = sessions("XNYS")
    single = minute_bars("AAA", utc(2024, 1, 3, 15, 0), 1, volume=253.0)
    stopped_at_noon = minute_bars("BBB", utc(2024, 1, 3, 14, 30), 150)
    whole = minute_bars("CCC", utc(2024, 1, 3, 14, 30), 390)
    daily = session_bars(pl.concat([single, stopped_at_noon, whole]), nyse)
    flags = dict(zip(daily["instrument_id"], daily["source_flags"].to_list(), strict=True))
    assert flags == {"AAA": ["PARTIAL_SESSION"], "BBB": ["PARTIAL_SESSION"], "CCC": []}
    # ... and so are the 1d vectors computed from those bars.
    from marketfs.features.compute import compute_feature_vectors

    vectors = compute_feature_vectors(daily, "1d").vectors
    partial = vectors.filter(pl.col("quality_flags").list.contains("PARTIAL_SESSION"))["instrument_id"].to_list()
    assert sorted(partial) == ["AAA", "BBB"]


def test_an_unknown_calendar_or_universe_is_named() -> None:
    with pytest.raises(CalendarError, match="unknown calendar 'XNOPE'.*XNYS"):
        sessions("XNOPE")
    assert active_universe().calendar == "XNYS"
    import marketfs.universe as universe_module

    with pytest.raises(UniverseError, match="'moon_equities'.*not declared.*us_equities"):
        universe_module._universe("moon_equities", universe_module.DEFAULT_FILE)


# --- daily deliveries --------------------------------------------------------------------------


def test_daily_files_take_date_only_timestamps_as_the_session_close(tmp_path: Path) -> None:
    folder = tmp_path / "bars_1d"
    folder.mkdir()
    (folder / "spx.csv").write_text(
        HEADER + "AAA,2024-01-03,10,11,9,10.5,1000\nAAA,2024-11-29,10,11,9,10.5,900\nAAA,2024-01-04,10,12,9,11,1200\n"
    )
    bars = LandingFolderDailyBars(folder).bars(utc(2024, 1, 1), utc(2024, 12, 31))
    assert bars["ts"].to_list() == [utc(2024, 1, 3, 20, 59), utc(2024, 1, 4, 20, 59), utc(2024, 11, 29, 17, 59)]


def test_a_daily_bar_dated_on_a_holiday_names_the_file_line_and_day(tmp_path: Path) -> None:
    folder = tmp_path / "bars_1d"
    folder.mkdir()
    (folder / "spx.csv").write_text(HEADER + "AAA,2024-01-12,10,11,9,10.5,1000\nAAA,2024-01-15,10,11,9,10.5,1000\n")
    expected = r"spx.csv, line 3: column 'ts' has '2024-01-15', not a session date of the XNYS calendar"
    with pytest.raises(SourceFileError, match=expected):
        LandingFolderDailyBars(folder).bars(utc(2024, 1, 1), utc(2024, 2, 1))


def test_daily_only_delivery_feeds_bars_1d_and_the_1d_vectors(dsn: str, engine: sa.Engine, tmp_path: Path) -> None:
    daily = SyntheticBars(instruments=("AAA", "BBB"), minutes_from=date(2030, 1, 1)).daily(
        day_window("2023-10-02")[0], day_window("2024-01-05")[1]
    )
    (tmp_path / "bars_1d").mkdir()
    daily.with_columns(pl.col("ts").dt.strftime("%Y-%m-%d")).write_csv(tmp_path / "bars_1d" / "history.csv")
    # No minute data and no news at all: a daily-only vendor delivers bars_1d/ alone, no bars/ or events/ folder.
    result = materialize_range(dsn, "2023-10-02", "2024-01-05", landing_dir=tmp_path)
    assert result.success
    stored = rows(engine, "SELECT count(*), min(ts), max(ts) FROM ohlcv_1d")
    assert stored == [(daily.height, utc(2023, 10, 2, 19, 59), utc(2024, 1, 5, 20, 59))]  # EDT, then EST
    vectors = rows(engine, "SELECT timeframe, count(*) FROM feature_vectors GROUP BY 1")
    assert vectors == [("1d", daily.height)]  # and no meaningless minute vectors
    # Warmed up after 34 sessions: only the missing news flags them (no events were delivered).
    late_flags = rows(
        engine, "SELECT DISTINCT unnest(quality_flags) FROM feature_vectors WHERE ts > :t", t=utc(2023, 12, 1)
    )
    assert late_flags == [("NO_EVENTS",)]


def test_an_empty_delivery_on_a_session_day_fails_the_gate_saying_what_was_expected(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    for day, name in (("2024-01-03", "a"), ("2024-01-04", "b")):
        SyntheticBars(instruments=("AAA", "BBB", "CCC")).bars(*day_window(day)).write_csv(
            _mkdir(tmp_path / "bars") / f"{name}.csv"
        )
    (tmp_path / "bars" / "c.csv").write_text(HEADER)  # 2024-01-05: the vendor sent a header, nothing else
    (tmp_path / "events").mkdir()
    assert materialize_range(dsn, "2024-01-03", "2024-01-04", landing_dir=tmp_path).success
    result = materialize_range(dsn, "2024-01-05", landing_dir=tmp_path)
    assert not result.success
    failure = _failure_text(result)
    assert "bars_1d 2024-01-05 breached its gate" in failure
    assert "at least 2 of the 3 expected instruments" in failure and "XNYS session 2024-01-05" in failure
    assert "missing: AAA, BBB, CCC" in failure
    checks = {
        (e.check_name, e.partition, e.passed)
        for e in result.get_asset_check_evaluations()
        if e.asset_key.to_user_string() == "bars_1d"
    }
    assert ("expected_data", "2024-01-05", False) in checks


def test_a_holiday_is_no_partition_its_bars_are_set_aside_and_after_hours_prints_belong_to_the_next_session(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    bars = SyntheticBars(instruments=("AAA", "BBB")).bars(*day_window("2024-01-16"))
    holiday_print = minute_bars("AAA", utc(2024, 1, 15, 16, 0), 3)  # prints on MLK day: XNYS is closed
    after_hours = minute_bars("AAA", utc(2024, 1, 12, 22, 0), 2)  # Friday 17:00 New York: after the close
    pl.concat([bars, holiday_print, after_hours]).write_csv(_mkdir(tmp_path / "bars") / "jan16.csv")
    (tmp_path / "events").mkdir()
    assert "2024-01-15" not in DAILY.get_partition_keys()
    raw = [a for a in PIPELINE if "fs_" not in a.key.to_user_string()]
    result = materialize_range(dsn, "2024-01-16", landing_dir=tmp_path, assets=raw)
    assert result.success
    # Nothing stamped on the closed day is stored; the after-hours prints are, with the session of 01-16 ...
    assert rows(engine, "SELECT ts FROM ohlcv_1m WHERE ts < :t ORDER BY ts", t=utc(2024, 1, 16)) == [
        (utc(2024, 1, 12, 22, 0),),
        (utc(2024, 1, 12, 22, 1),),
    ]
    # ... but outside its hours: not in its daily bar.
    assert rows(engine, "SELECT ts FROM ohlcv_1d WHERE instrument_id = 'AAA'") == [(utc(2024, 1, 16, 20, 59),)]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _failure_text(result) -> str:
    return "\n".join(
        str(e.step_failure_data.error.message) if e.step_failure_data and e.step_failure_data.error else ""
        for e in result.all_events
        if e.is_step_failure
    )


@pytest.mark.parametrize(
    ("universe", "saturday_is_a_partition", "first_window"),
    [
        ("crypto", True, ("2024-01-02 00:00:00+00:00", "2024-01-03 00:00:00+00:00")),
        # From the last close before New Year's Day to the close of the session that opened 01-01 23:00 UTC.
        ("cme_futures", False, ("2023-12-29 23:00:00+00:00", "2024-01-02 23:00:00+00:00")),
    ],
)
def test_a_universe_gives_the_code_location_its_calendar(
    universe: str, saturday_is_a_partition: bool, first_window: tuple[str, str]
) -> None:
    # The partitions are made when the code location loads: another universe is another process.
    code = (
        "from assets.partitions import DAILY, day_window; "
        "print('2024-01-13' in DAILY.get_partition_keys(), *map(str, day_window('2024-01-02')), sep='|')"
    )
    env = {**os.environ, "MARKETFS_UNIVERSE": universe}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    saturday, start, end = out.stdout.strip().splitlines()[-1].split("|")
    assert (saturday == "True", (start, end)) == (saturday_is_a_partition, first_window)


def test_drift_judges_an_after_hours_vector_with_the_session_that_closes_next() -> None:
    from test_drift_profile import suite

    from expectations.drift import drift_profile

    regular = [utc(2024, 1, 3, 14, 30) + i * MINUTE for i in range(300)]
    evening = [utc(2024, 1, 3, 22, 0) + i * MINUTE for i in range(100)]  # after the 21:00 UTC close
    vectors = pl.DataFrame({"ts": regular + evening, "a": [0.0] * 400, "b": [1.0] * 400})
    by_trading_day = drift_profile(vectors, vectors.clear(), suite(), source="t", day_of=sessions("XNYS").trading_day)
    by_utc_date = drift_profile(vectors, vectors.clear(), suite(), source="t")
    assert set(by_trading_day.not_evaluated) == {"2024-01-03", "2024-01-04"}  # the partitions the rows are in
    assert set(by_utc_date.not_evaluated) == {"2024-01-03"}


def test_a_declared_universe_is_what_a_session_must_hold() -> None:
    from assets.expected_data import session_verdicts
    from marketfs.universe import Universe

    universe = Universe(name="ten", calendar="XNYS", instruments=tuple(f"I{i}" for i in range(10)))
    bars = {"2024-01-03": pl.DataFrame({"instrument_id": [f"I{i}" for i in range(8)]})}
    verdicts = session_verdicts(bars, ["2024-01-03"], universe, set(universe.instruments), "declared")
    assert verdicts["2024-01-03"].passed  # 8 of 10 is the 80% asked
    bars = {"2024-01-03": pl.DataFrame({"instrument_id": ["I0", "I1", "I2"]})}
    [outcome] = session_verdicts(bars, ["2024-01-03"], universe, set(universe.instruments), "declared")[
        "2024-01-03"
    ].outcomes
    assert not outcome.success and "at least 8 of the 10" in outcome.bounds and "missing: I3, I4" in outcome.bounds


def test_a_run_of_non_sessions_says_so_and_runs_nothing(empty_dsn: str, tmp_path: Path) -> None:
    env = dagster_process_env(empty_dsn, empty_dsn, tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "pipelines", "run", "--start", "2024-01-13", "--end", "2024-01-15", "--no-snapshot"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2024-01-13 is no XNYS session (Saturday, a weekend)" in out.stdout
    assert "2024-01-15 is no XNYS session (Monday, a holiday)" in out.stdout
    assert "no XNYS session from 2024-01-13 through 2024-01-15: nothing to run" in out.stdout


def test_a_process_loads_the_calendar_without_exchange_calendars_once_it_was_built(tmp_path: Path) -> None:
    # Every Dagster process loads the partitions: the built calendar is kept, and equal to a fresh build.
    code = (
        "import sys; from marketfs.calendars import sessions; s = sessions('XNYS'); "
        "print('exchange_calendars' in sys.modules, len(s.days), s.days[-1], s.closes[-1], s.weekmask, sep='|')"
    )
    env = {**os.environ, "MARKETFS_HOME": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
        .stdout.strip()
        .split("|")
        for _ in range(2)
    ]
    assert runs[0][0] == "True" and runs[1][0] == "False"
    assert runs[0][1:] == runs[1][1:]
    assert len(list((tmp_path / "calendars").glob("XNYS-*.parquet"))) == 1
