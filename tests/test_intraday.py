"""Intraday: today computed in steps equals today computed once; corrections and breaches inside the day."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
import sqlalchemy as sa
from polars.testing import assert_frame_equal

from marketfs.db import engine_for
from marketfs.features.compute import FeatureComputation
from marketfs.features.registry import FEATURE_SETS, feature_set
from marketfs.ingest import PushError, push_bars, push_events
from marketfs.intraday import IntradayBreach, intraday_timeframes, retract_day, step
from marketfs.retrieval import training_frame
from marketfs.shards import ALL
from marketfs.sources import SyntheticBars
from marketfs.sources.synthetic import SyntheticEvents
from marketfs.store.bars import replace_bars
from marketfs.store.events import replace_events
from marketfs.store.feature_vectors import compute_stored, read_vectors, write_features
from marketfs.universe import active_sessions

INSTRUMENTS = ("SYN000", "SYN001", "SYN002", "SYN003")
YESTERDAY, TODAY = "2024-01-02", "2024-01-03"
OPEN = datetime(2024, 1, 3, 14, 30, tzinfo=UTC)  # 09:30 New York


def _window(day: str) -> tuple[datetime, datetime]:
    return active_sessions().trading_day_window(day)


def _datasets() -> list[tuple]:
    return [(fs, tf) for fs in FEATURE_SETS.values() for tf in intraday_timeframes(fs)]


def _store_history(
    engine: sa.Engine, through_today: datetime | None, split_today: str | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Yesterday's bars and events and its features (as a daily run writes them); today's bars and events
    up to ``through_today`` (None: none of today). ``split_today``: that instrument split 2-for-1 today."""
    start, _ = _window(YESTERDAY)
    _, end = _window(TODAY)
    bars = SyntheticBars(instruments=INSTRUMENTS).bars(start, end)
    if split_today is not None:
        today = (pl.col("instrument_id") == split_today) & (pl.col("ts") >= _window(TODAY)[0])
        bars = bars.with_columns(
            *[
                pl.when(today).then(pl.col(c) / 2).otherwise(pl.col(c)).alias(c)
                for c in ("open", "high", "low", "close")
            ],
            pl.when(today).then(pl.col("volume") * 2).otherwise(pl.col("volume")).alias("volume"),
        )
    events = SyntheticEvents(instruments=INSTRUMENTS).events(start, end)
    y_start, y_end = _window(YESTERDAY)
    with engine.begin() as conn:
        replace_bars(conn, bars.filter(pl.col("ts") < y_end), start, y_end)
        replace_events(conn, events.filter(pl.col("published_at") < y_end), start, y_end)
        for fs, tf in [(s, t) for s in FEATURE_SETS.values() for t in s.timeframes if t != "1d"]:
            computation = compute_stored(conn, fs, tf, y_start, y_end, ALL)
            write_features(conn, computation, feature_set=fs, timeframe=tf, start=y_start, end=y_end)
        if through_today is not None:
            replace_bars(conn, bars.filter((pl.col("ts") >= y_end) & (pl.col("ts") < through_today)), y_end, end)
            replace_events(
                conn,
                events.filter((pl.col("published_at") >= y_end) & (pl.col("published_at") < through_today)),
                y_end,
                end,
            )
    return bars.filter(pl.col("ts") >= y_end), events.filter(pl.col("published_at") >= y_end)


def _served(engine: sa.Engine, fs, tf: str, day: str = TODAY) -> pl.DataFrame:
    start, end = _window(day)
    with engine.connect() as conn:
        return read_vectors(conn, feature_set=fs, timeframe=tf, start=start, end=end)


def _complete(engine: sa.Engine, fs, tf: str, through: datetime | None = None) -> FeatureComputation:
    """The day computed once, from yesterday's state (what the end-of-day run computes)."""
    start, end = _window(TODAY)
    with engine.connect() as conn:
        computation = compute_stored(conn, fs, tf, start, through or end, ALL)
    return computation


def test_a_day_built_in_steps_equals_the_day_computed_once(dsn: str) -> None:
    engine = engine_for(dsn)
    _store_history(engine, through_today=_window(TODAY)[1])
    # Step ends that split the 20-bar warm-up windows (07, 13), the 26/35-bar MACD seeds, a 5m bar, and
    # the 1h event window (61, 75); the last one, at 21:00:20, computes the bar that closed at 21:00.
    minutes = [3, 7, 13, 22, 38, 61, 75, 133, 240, 389, 390]
    done = []
    for minute in minutes:
        for fs, tf in _datasets():
            outcome = step(engine, fs, tf, now=OPEN + timedelta(minutes=minute, seconds=20))
            assert outcome.status in ("served", "nothing to do"), outcome.describe()
            done.append(outcome)
    with engine.connect() as conn:
        steps = conn.execute(sa.text("SELECT count(*) FROM intraday_steps WHERE day = :d"), {"d": TODAY}).scalar()
    assert steps == sum(o.status == "served" for o in done) >= len(minutes) * len(_datasets()) - 3
    # Later, today has nothing left to do (until the next open, a step fills the day that closed).
    fs = feature_set("fs_v1")
    assert step(engine, fs, "1m", now=OPEN + timedelta(hours=8)).status == "nothing to do"
    for fs, tf in _datasets():
        once = _complete(engine, fs, tf)
        served = _served(engine, fs, tf)
        assert served.height == once.vectors.height > 0
        assert_frame_equal(served, once.vectors, check_exact=True)
        # The state at the day's last bar, where tomorrow starts, is the same too.
        with engine.connect() as conn:
            from marketfs.store.feature_vectors import read_state_before

            state = read_state_before(conn, feature_set=fs, timeframe=tf, start=_window(TODAY)[1])
        last = once.state.sort("ts").group_by("instrument_id").last().sort("instrument_id")
        assert_frame_equal(state.sort("instrument_id"), last.select(state.columns), check_exact=True)


def test_steps_across_an_ex_date_equal_the_day_computed_once(dsn: str) -> None:
    """A split today with its action known: the steps continue yesterday's state on the one scale, as the
    end-of-day computation does, bit for bit, and no jump is flagged."""
    from marketfs.corporate_actions import ACTION_SCHEMA
    from marketfs.store.corporate_actions import write_actions

    engine = engine_for(dsn)
    _store_history(engine, through_today=_window(TODAY)[1], split_today="SYN001")
    action = pl.DataFrame(
        [("SYN001", datetime(2024, 1, 3).date(), "split", 2.0, datetime(2024, 1, 2, 22, tzinfo=UTC))],
        schema=ACTION_SCHEMA,
        orient="row",
    )
    with engine.begin() as conn:
        write_actions(conn, action, "test")
    for minute in (3, 38, 390):
        for fs, tf in _datasets():
            outcome = step(engine, fs, tf, now=OPEN + timedelta(minutes=minute, seconds=20))
            assert outcome.status in ("served", "nothing to do"), outcome.describe()
    for fs, tf in _datasets():
        served = _served(engine, fs, tf)
        assert_frame_equal(served, _complete(engine, fs, tf).vectors, check_exact=True)
        assert not served["quality_flags"].list.contains("UNEXPLAINED_JUMP").any()
        first = served.filter(pl.col("instrument_id") == "SYN001").row(0, named=True)
        assert abs(first["ret_1"]) < 0.1, (fs.version, tf, first["ret_1"])


def test_only_closed_minutes_are_computed_and_a_step_continues_where_the_last_ended(dsn: str) -> None:
    engine = engine_for(dsn)
    _store_history(engine, through_today=_window(TODAY)[1])
    fs = feature_set("fs_v1")
    first = step(engine, fs, "1m", now=OPEN + timedelta(minutes=10, seconds=59))
    assert first.end == OPEN + timedelta(minutes=10)  # the 14:40 bar closes at 14:41
    assert _served(engine, fs, "1m")["ts"].max() == OPEN + timedelta(minutes=9)
    again = step(engine, fs, "1m", now=OPEN + timedelta(minutes=10, seconds=59))
    assert again.status == "nothing to do"
    later = step(engine, fs, "1m", now=OPEN + timedelta(minutes=12))
    assert (later.start, later.end) == (first.end, OPEN + timedelta(minutes=12))
    five = step(engine, feature_set("fs_v2"), "5m", now=OPEN + timedelta(minutes=12))
    assert five.end == OPEN + timedelta(minutes=10)  # the 14:40 5m bar closes at 14:45


def _bar(instrument: str, ts: datetime, close: float) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "instrument_id": [instrument],
            "ts": [ts],
            "open": [close],
            "high": [close],
            "low": [close],
            "close": [close],
            "volume": [1000.0],
        }
    )


def test_pushed_bars_are_served_at_once_and_a_late_bar_recomputes_from_its_step(dsn: str) -> None:
    engine = engine_for(dsn)
    today_bars, today_events = _store_history(engine, through_today=None)
    fs = feature_set("fs_v1")
    # The feed delivers each minute's bars and events right after the minute closes.
    for minute in range(0, 20):
        t = OPEN + timedelta(minutes=minute)
        now = t + timedelta(minutes=1, seconds=2)
        if minute % 5 == 4:  # events come in bursts; those of the session so far (re-delivered ones are kept once)
            push_events(today_events.filter(pl.col("published_at") < now), now=now, dsn=dsn)
        push_bars(today_bars.filter(pl.col("ts") == t), now=now, dsn=dsn)
        latest = _served(engine, fs, "1m")
        assert latest["ts"].max() == t  # the minute that just closed is served
    # A correction of the 14:40 bar of SYN001, pushed at 14:50:02: recomputed from the step holding it.
    t = OPEN + timedelta(minutes=10)
    row = today_bars.filter((pl.col("instrument_id") == "SYN001") & (pl.col("ts") == t))
    corrected = row.with_columns((pl.col(c) * 1.01).alias(c) for c in ("open", "high", "low", "close"))
    served_before = datetime.now(UTC)  # the steps' vectors carry the real instant they were written
    before = _served(engine, fs, "1m").filter((pl.col("instrument_id") == "SYN001") & (pl.col("ts") == t))
    outcomes = push_bars(corrected, now=OPEN + timedelta(minutes=20, seconds=2), dsn=dsn)
    first = next(o for o in outcomes if o.dataset == "feature_vectors_fs_v1_1m")
    assert first.start == t and first.end == OPEN + timedelta(minutes=20)
    through = OPEN + timedelta(minutes=20)
    once = _complete(engine, fs, "1m", through=through)
    assert_frame_equal(_served(engine, fs, "1m"), once.vectors, check_exact=True)
    with engine.connect() as conn:
        superseded = conn.execute(
            sa.text(
                "SELECT count(*) FROM feature_vectors_history WHERE instrument_id = 'SYN001' AND ts >= :t "
                "AND feature_set_version = 'fs_v1' AND timeframe = '1m'"
            ),
            {"t": t},
        ).scalar()
    assert superseded >= 1
    # What a model saw before the correction, and what it sees now (the entity row at the bar's close).
    entity = pl.DataFrame({"instrument_id": ["SYN001"], "ts": [t + timedelta(minutes=1)]})
    then = training_frame(entity, ["ret_1"], None, dsn=dsn, as_of=served_before)
    now = training_frame(entity, ["ret_1"], None, dsn=dsn)
    assert then["ret_1"].to_list() == before["ret_1"].to_list() != now["ret_1"].to_list()
    # A bar that does not change anything recomputes nothing.
    again = push_bars(corrected, now=OPEN + timedelta(minutes=20, seconds=30), dsn=dsn)
    assert all(o.status == "nothing to do" for o in again)


def _one_event(event_id: str, published_at: datetime) -> pl.DataFrame:
    """One positive news event of SYN001."""
    return pl.DataFrame(
        {
            "event_id": [event_id],
            "instrument_id": ["SYN001"],
            "published_at": [published_at],
            "sentiment": [0.8],
            "confidence": [0.9],
            "source": ["test"],
        }
    )


def test_an_event_of_the_minute_after_the_last_step_recomputes_nothing_served(dsn: str) -> None:
    """The first vector an event counts for is the one of its own minute: an event published during the
    minute after a step does not reach back into that step (which, holding the whole day so far, would
    have recomputed the day from its start at every later step)."""
    engine = engine_for(dsn)
    t = OPEN + timedelta(minutes=60)
    today_bars, _ = _store_history(engine, through_today=t)
    for fs, tf in _datasets():  # the session so far in one step, as a first fill does
        assert step(engine, fs, tf, now=t + timedelta(seconds=5)).start == _window(TODAY)[0]
    event = _one_event("late-1", t + timedelta(seconds=30))
    assert all(o.status == "nothing to do" for o in push_events(event, now=t + timedelta(seconds=40), dsn=dsn))
    outcomes = push_bars(today_bars.filter(pl.col("ts") == t), now=t + timedelta(minutes=1, seconds=2), dsn=dsn)
    one_minute = [o for o in outcomes if o.dataset.endswith("_1m")]
    assert one_minute and all((o.start, o.vectors) == (t, len(INSTRUMENTS)) for o in one_minute)
    fs = feature_set("fs_v1")
    once = _complete(engine, fs, "1m", through=t + timedelta(minutes=1))
    served = _served(engine, fs, "1m")
    assert_frame_equal(served, once.vectors, check_exact=True)
    counted = served.filter((pl.col("instrument_id") == "SYN001") & (pl.col("ts") == t))
    before = served.filter((pl.col("instrument_id") == "SYN001") & (pl.col("ts") == t - timedelta(minutes=1)))
    assert counted["event_count_1h"][0] == before["event_count_1h"][0] + 1  # the event counts from its minute


def test_a_minute_is_computed_when_its_bars_come_not_when_it_closes(dsn: str) -> None:
    """A step after a minute closed but before its bars came (an events push, a timer) serves nothing of
    it; the bars' push then computes it once, as the next step, not as a correction of MISSING_OHLCV
    vectors (which recomputed back to the last boundary and sent every vector of it to the history)."""
    engine = engine_for(dsn)
    t = OPEN + timedelta(minutes=30)
    today_bars, _ = _store_history(engine, through_today=t)
    for fs, tf in _datasets():
        step(engine, fs, tf, now=t + timedelta(seconds=5))
    now = t + timedelta(minutes=1, seconds=2)  # the minute stamped t has closed; none of its bars is stored
    event = _one_event("early-1", t + timedelta(seconds=20))
    waiting = [o for o in push_events(event, now=now, dsn=dsn) if o.dataset.endswith("_1m")]
    assert waiting and all((o.status, o.end) == ("nothing to do", t) for o in waiting), [o.describe() for o in waiting]
    fs = feature_set("fs_v1")
    assert _served(engine, fs, "1m")["ts"].max() == t - timedelta(minutes=1)
    # One instrument's bar of the minute is enough: the others' vectors of it say their bar is missing.
    first = today_bars.filter((pl.col("ts") == t) & (pl.col("instrument_id") != "SYN003"))
    outcomes = [o for o in push_bars(first, now=now, dsn=dsn) if o.dataset.endswith("_1m")]
    assert outcomes and all((o.start, o.end, o.vectors) == (t, t + timedelta(minutes=1), 4) for o in outcomes)
    served = _served(engine, fs, "1m")
    assert_frame_equal(served, _complete(engine, fs, "1m", through=t + timedelta(minutes=1)).vectors, check_exact=True)
    late = served.filter((pl.col("instrument_id") == "SYN003") & (pl.col("ts") == t))
    assert "MISSING_OHLCV" in late["quality_flags"][0]
    with engine.connect() as conn:
        superseded = conn.execute(
            sa.text("SELECT count(*) FROM feature_vectors_history WHERE ts >= :t"), {"t": t - timedelta(hours=1)}
        ).scalar()
    assert superseded == 0  # nothing served was replaced
    counted = served.filter((pl.col("instrument_id") == "SYN001") & (pl.col("ts") == t))
    before = served.filter((pl.col("instrument_id") == "SYN001") & (pl.col("ts") == t - timedelta(minutes=1)))
    assert counted["event_count_1h"][0] == before["event_count_1h"][0] + 1


def test_an_intraday_breach_quarantines_its_minutes_and_later_minutes_are_still_served(dsn: str) -> None:
    engine = engine_for(dsn)
    today_bars, _ = _store_history(engine, through_today=None)
    fs = feature_set("fs_v1")
    spike_at = OPEN + timedelta(minutes=30)
    spiked = today_bars.with_columns(
        pl.when((pl.col("instrument_id") == "SYN002") & (pl.col("ts") == spike_at))
        .then(pl.col(c) * 1.6)
        .otherwise(pl.col(c))
        .alias(c)
        for c in ("open", "high", "low", "close")
    )
    push_bars(spiked.filter(pl.col("ts") < spike_at), now=spike_at + timedelta(seconds=5), dsn=dsn)
    with pytest.raises(IntradayBreach, match=r"feature_vectors_fs_v1_1m 2024-01-03 15:00-15:03 UTC.*ret_1"):
        push_bars(
            spiked.filter((pl.col("ts") >= spike_at) & (pl.col("ts") < spike_at + timedelta(minutes=3))),
            now=spike_at + timedelta(minutes=3, seconds=5),
            dsn=dsn,
        )
    served = _served(engine, fs, "1m")
    assert served.filter((pl.col("ts") >= spike_at) & (pl.col("ts") < spike_at + timedelta(minutes=3))).is_empty()
    with engine.connect() as conn:
        batch = conn.execute(
            sa.text(
                "SELECT batch_id, window_start, window_end, reason FROM quarantine_batches "
                "WHERE asset = 'feature_vectors_fs_v1_1m' AND status = 'held'"
            )
        ).one()
        held = conn.execute(
            sa.text("SELECT count(*) FROM quarantine_feature_vectors WHERE batch_id = :b"), {"b": batch.batch_id}
        ).scalar()
        logged = conn.execute(
            sa.text("SELECT count(*) FROM quality_log WHERE batch_id = :b AND NOT success"), {"b": batch.batch_id}
        ).scalar()
    assert (batch.window_start, batch.window_end) == (spike_at, spike_at + timedelta(minutes=3))
    assert held == 3 * len(INSTRUMENTS) and logged >= 1 and "ret_1" in batch.reason
    # The next minutes continue from the quarantined step's state and pass their own gate.
    push_bars(
        spiked.filter(
            (pl.col("ts") >= spike_at + timedelta(minutes=3)) & (pl.col("ts") < spike_at + timedelta(minutes=9))
        ),
        now=spike_at + timedelta(minutes=9, seconds=5),
        dsn=dsn,
    )
    later = _served(engine, fs, "1m").filter(pl.col("ts") >= spike_at)
    assert later["ts"].min() == spike_at + timedelta(minutes=3) and later["ts"].max() == spike_at + timedelta(minutes=8)
    once = _complete(engine, fs, "1m", through=spike_at + timedelta(minutes=9))
    expected = once.vectors.filter((pl.col("ts") < spike_at) | (pl.col("ts") >= spike_at + timedelta(minutes=3)))
    assert_frame_equal(_served(engine, fs, "1m"), expected, check_exact=True)
    # The end-of-day judgement can still fail the day: then nothing of it stays served.
    with engine.begin() as conn:
        retracted = retract_day(conn, fs, "1m", ALL, TODAY)
    assert retracted == expected.height and _served(engine, fs, "1m").is_empty()


def test_a_pushed_frame_that_cannot_be_stored_is_refused_whole(dsn: str) -> None:
    bad = _bar("SYN000", OPEN, float("inf"))
    with pytest.raises(PushError, match=r"row 0 \(SYN000 2024-01-03 14:30:00\+00:00\) holds a non-finite value"):
        push_bars(bad, now=OPEN + timedelta(minutes=2), dsn=dsn)
    with pytest.raises(PushError, match="timezone-aware"):
        push_bars(_bar("SYN000", OPEN, 1.0).with_columns(pl.col("ts").dt.replace_time_zone(None)), dsn=dsn)
    with engine_for(dsn).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ohlcv_1m")).scalar() == 0


def test_pushed_bars_land_as_files_the_end_of_day_run_reads(dsn: str, tmp_path) -> None:
    from marketfs.sources.landing import LandingFolderBars

    engine = engine_for(dsn)
    today_bars, _ = _store_history(engine, through_today=None)
    pushed = today_bars.filter(pl.col("ts") < OPEN + timedelta(minutes=2))
    push_bars(pushed, now=OPEN + timedelta(minutes=2, seconds=1), dsn=dsn, landing_dir=tmp_path)
    files = sorted((tmp_path / "bars" / "pushed" / TODAY).glob("*.parquet"))
    assert len(files) == 1 and not list((tmp_path / "bars").rglob("*.partial"))
    start, end = _window(TODAY)
    landed = LandingFolderBars(tmp_path / "bars", index_path=tmp_path / "index.json").bars(start, end)
    assert_frame_equal(landed.select(pushed.columns).sort("instrument_id", "ts"), pushed.sort("instrument_id", "ts"))


def test_a_step_over_a_whole_trading_day_says_both_dates() -> None:
    """A trading day runs from the previous close: "21:00-21:00 UTC" read as one minute."""
    from marketfs.intraday import StepOutcome

    start, end = datetime(2024, 1, 11, 21, tzinfo=UTC), datetime(2024, 1, 12, 21, tzinfo=UTC)
    whole = StepOutcome("fs_v1_1m", ALL, "2024-01-12", start, end, "served", 3900)
    assert whole.describe() == "fs_v1_1m 2024-01-12 2024-01-11 21:00 to 2024-01-12 21:00 UTC: 3900 vectors served"
    minute = StepOutcome(
        "fs_v1_1m", ALL, "2024-01-12", end.replace(hour=15), end.replace(hour=15, minute=1), "served", 10
    )
    assert minute.describe() == "fs_v1_1m 2024-01-12 15:00-15:01 UTC: 10 vectors served"
