"""The drift reference as stored days gives the verdicts a read of the vectors gives; stale days are never read."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa

from expectations.drift import ReferenceSpec, drift_columns, drift_profile
from expectations.gate import load_suite_json, suite_path
from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.features.compute import FeatureComputation, compute_feature_vectors
from marketfs.reference_days import ReferenceDays
from marketfs.shards import ALL, Shard
from marketfs.sources import SyntheticBars, SyntheticEvents
from marketfs.store.feature_vectors import (
    read_vectors,
    recent_partitions_start,
    upsert_window,
    write_features,
)
from marketfs.store.reference_days import (
    _start_from_stored,
    read_reference_days,
    read_trailing_reference,
    write_reference_days,
)
from marketfs.universe import active_sessions

TEMPLATE = load_suite_json(suite_path("feature_vectors_fs_v1_1m_drift"))
COLUMNS = drift_columns(TEMPLATE)
SESSIONS = active_sessions()
DAYS = [d.isoformat() for d in SESSIONS.between("2024-01-02", "2024-01-12")]  # 9 sessions


@pytest.fixture(scope="module")
def vectors() -> pl.DataFrame:
    names = ("SYN000", "SYN001", "SYN002")
    start, end = SESSIONS.trading_day_window(DAYS[0])[0], SESSIONS.trading_day_window(DAYS[-1])[1]
    bars = SyntheticBars(instruments=names).bars(start - timedelta(days=2), end)
    events = SyntheticEvents(instruments=names).events(start - timedelta(days=2), end)
    return compute_feature_vectors(bars, "1m", events=events, start=start, end=end).vectors


def _days(frame: pl.DataFrame) -> ReferenceDays:
    return ReferenceDays.from_frame(frame, COLUMNS, SESSIONS.trading_day)


def _utc_dates(frame: pl.DataFrame) -> dict[str, list]:
    pairs = pl.DataFrame(
        {"day": SESSIONS.trading_day(frame["ts"]).dt.strftime("%Y-%m-%d"), "date": frame["ts"].dt.date()}
    )
    return {d: sorted(g["date"].unique().to_list()) for (d,), g in pairs.group_by("day")}


def _window(days: list[str]) -> tuple[datetime, datetime]:
    return SESSIONS.trading_day_window(days[0])[0], SESSIONS.trading_day_window(days[-1])[1]


def _in(frame: pl.DataFrame, days: list[str]) -> pl.DataFrame:
    start, end = _window(days)
    return frame.filter((pl.col("ts") >= start) & (pl.col("ts") < end))


def _same_profile(vectors: pl.DataFrame, a, b) -> None:
    one = drift_profile(vectors, a, TEMPLATE, source="t", day_of=SESSIONS.trading_day)
    two = drift_profile(vectors, b, TEMPLATE, source="t", day_of=SESSIONS.trading_day)
    assert one.frame.height and one.frame.equals(two.frame)
    assert one.not_evaluated == two.not_evaluated
    assert all(one.references[d].equals(two.references[d]) for d in one.references)


def test_a_reference_as_days_scores_as_the_frame_does(vectors: pl.DataFrame) -> None:
    history, current = _in(vectors, DAYS[:6]), _in(vectors, DAYS[6:])
    _same_profile(current, history, _days(history))
    # Carried through a run: the days written since, merged in, the oldest let go, as a fresh read would be.
    spec = {**TEMPLATE, "meta": {**TEMPLATE["meta"], "reference": {"kind": "trailing", "partitions": 5}}}
    rolled = _days(_in(vectors, DAYS[:3])).merged(_days(_in(vectors, DAYS[3:6]))).last(5)
    fresh = _days(_in(vectors, DAYS[1:6]))
    assert rolled.days == fresh.days
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(rolled.values, fresh.values, strict=True))
    assert ReferenceSpec.from_suite(spec).partitions == 5


def test_stored_days_read_back_as_the_vectors_and_a_rewrite_forgets_them(
    engine: sa.Engine, vectors: pl.DataFrame
) -> None:
    start, end = _window(DAYS)
    with engine.begin() as conn:
        write_features(
            conn, FeatureComputation(vectors=vectors, state=vectors.clear()), feature_set=FS_V1, timeframe="1m",
            start=start, end=end,
        )  # fmt: skip
        windows = {d: SESSIONS.trading_day_window(d) for d in DAYS}
        write_reference_days(
            conn, _days(vectors), feature_set=FS_V1, timeframe="1m", windows=windows, utc_dates=_utc_dates(vectors),
            shard=ALL, keep_days=67,
        )  # fmt: skip
    before = SESSIONS.trading_day_window(DAYS[-1])[1]

    def both() -> tuple[ReferenceDays, ReferenceDays]:
        with engine.connect() as conn:
            stored = read_trailing_reference(
                conn, feature_set=FS_V1, timeframe="1m", before=before, partitions=20, columns=COLUMNS, shard=ALL,
                day_of=SESSIONS.trading_day,
            )  # fmt: skip
            # What the reference was before stored days: the vectors of the recent partitions, read whole.
            start = recent_partitions_start(
                conn, feature_set=FS_V1, timeframe="1m", before=before, partitions=20, shard=ALL
            )
            read = read_vectors(
                conn, feature_set=FS_V1, timeframe="1m", start=start, end=before, columns=COLUMNS, shard=ALL
            )
        return stored, _days(read)

    def equal(a: ReferenceDays, b: ReferenceDays) -> bool:
        return a.days == b.days and all(
            np.array_equal(x, y, equal_nan=True) for x, y in zip(a.values, b.values, strict=True)
        )

    def stored_days() -> list[str]:
        with engine.connect() as conn:
            found = read_reference_days(conn, feature_set=FS_V1, timeframe="1m", days=DAYS, columns=COLUMNS, shard=ALL)
        return found.labels

    assert stored_days() == DAYS
    assert equal(*both())
    # The last N days found in the recent weeks alone (N = 5 here), or in the whole table (N = 20: only 9 exist);
    # from the stored rows' dates alone when they hold the N sessions before the run.
    with engine.connect() as conn:
        for n, first in ((5, DAYS[-5]), (20, DAYS[0])):
            found = recent_partitions_start(
                conn, feature_set=FS_V1, timeframe="1m", before=before, partitions=n, shard=ALL
            )
            assert found == SESSIONS.trading_day_window(first)[0]
            stored_start = _start_from_stored(conn, FS_V1, "1m", before, n, ALL)
            assert stored_start == (found if n == 5 else None)
    # A partial rewrite of one day (an intraday step, a restatement, a release) changes its vectors: its stored
    # row goes, and the reference reads that day from the vectors.
    day = DAYS[3]
    changed = _in(vectors, [day]).with_columns((pl.col(COLUMNS[0]) * 2).alias(COLUMNS[0]))
    with engine.begin() as conn:
        upsert_window(
            conn, changed.filter(pl.col("instrument_id") == "SYN001"), feature_set=FS_V1, timeframe="1m",
            start=_window([day])[0], end=_window([day])[1], only=["SYN001"],
        )  # fmt: skip
    assert stored_days() == [d for d in DAYS if d != day]
    stored, read = both()
    assert equal(stored, read)
    assert not np.array_equal(stored.day(stored.days[3]), _days(vectors).day(stored.days[3]), equal_nan=True)
    # Another shard's write leaves a shard's stored days alone; the whole universe's write does not.
    with engine.begin() as conn:
        write_reference_days(
            conn, _days(vectors.filter(Shard(0, 2).mask(vectors["instrument_id"]))), feature_set=FS_V1,
            timeframe="1m", windows={d: SESSIONS.trading_day_window(d) for d in DAYS}, utc_dates=_utc_dates(vectors),
            shard=Shard(0, 2), keep_days=67,
        )  # fmt: skip
        upsert_window(
            conn, _in(vectors, [DAYS[0]]).filter(Shard(1, 2).mask(_in(vectors, [DAYS[0]])["instrument_id"])),
            feature_set=FS_V1, timeframe="1m", start=_window([DAYS[0]])[0], end=_window([DAYS[0]])[1],
            shard=Shard(1, 2),
        )  # fmt: skip
        shard_days = read_reference_days(
            conn, feature_set=FS_V1, timeframe="1m", days=DAYS, columns=COLUMNS, shard=Shard(0, 2)
        ).labels
    assert shard_days == DAYS
    assert DAYS[0] not in stored_days()
