"""Which sessions should have data, and whether they do: the bars_1d gate's completeness check.

A session of the universe's calendar is expected to hold a daily bar (delivered, or built from its
minute bars) for at least ``min_instrument_share`` of the universe's instruments. The instruments
expected are, in this order: the universe's declared members, the synthetic source's, or those with
a daily bar in the last ``learn_sessions`` sessions before the run. An empty delivery on a session
day therefore fails here, with what was expected, instead of giving a green run of nothing.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl
import sqlalchemy as sa

from expectations.gate import ExpectationOutcome, GateResult
from marketfs.shards import ALL, Shard
from marketfs.universe import DEFAULT_FILE as UNIVERSES_FILE
from marketfs.universe import Universe

EXPECTED_CHECK = "expected_data"
EXPECTATION = "expect_session_to_hold_the_universe"


def expected_instruments(
    conn: sa.Connection, universe: Universe, declared: tuple[str, ...], before: datetime, shard: Shard = ALL
) -> tuple[set[str], str]:
    """The instruments a session (of ``shard``) is expected to hold, and where that list comes from."""
    where = "" if shard.is_all else f" in {shard}"
    if universe.instruments:
        mine = {i for i in universe.instruments if shard.holds(i)}
        return mine, f"universe {universe.name}'s declared instruments{where}"
    if declared:
        return {i for i in declared if shard.holds(i)}, f"the synthetic source's instruments{where}"
    sessions = universe.sessions
    # The last `learn_sessions` sessions that closed at or before `before` (a trading day's start).
    last = sessions.closes.search_sorted(before, side="right") - 1
    start = sessions.trading_day_window(sessions.days[max(0, last - universe.learn_sessions + 1)])[0]
    rows = conn.execute(
        sa.text(f"SELECT DISTINCT instrument_id FROM ohlcv_1d WHERE ts >= :s AND ts < :e AND {shard.text_condition()}"),
        {"s": start, "e": before, **shard.params},
    )
    return {r[0] for r in rows}, f"instruments with a daily bar in the {universe.learn_sessions} sessions before{where}"


def session_verdicts(
    bars_by_day: dict[str, pl.DataFrame],
    days: list[str],
    universe: Universe,
    expected: set[str],
    source: str,
    learnt: bool = True,
    held: dict[str, set[str]] | None = None,
) -> dict[str, GateResult]:
    """One verdict per session: did its daily bars cover enough of the expected instruments?

    ``learnt``: the list came from stored bars, not from a declaration. ``held``: per day, instruments whose
    bars of it are held in quarantine; they are known, not missing, and not expected of that day.
    """
    verdicts = {}
    expected_ever = expected
    for day in days:
        held_today = (held or {}).get(day, set())
        # Before its listing and after its delisting an instrument has nothing to deliver.
        expected = {i for i in expected_ever if universe.listed_on(i, day)} - held_today
        bars = bars_by_day.get(day)
        present = set(bars["instrument_id"].unique().to_list()) if bars is not None and bars.height else set()
        # Nothing expected at all is "nothing learnt yet": some bar must come. A shard that a declared list
        # leaves empty expects nothing, and rightly holds nothing.
        # Every expected instrument held (their rows are in quarantine, not missing): nothing more is due.
        nothing_due = 0 if held_today else (1 if learnt else 0)
        minimum = universe.min_instruments(len(expected)) if expected else nothing_due
        missing = sorted(expected - present)
        outcome = ExpectationOutcome(
            expectation=EXPECTATION,
            column="instrument_id",
            severity="critical",
            success=len(present) >= minimum,
            observed_value=f"bars of {len(present)} instrument(s)",
            unexpected_count=None,
            element_count=len(expected) if expected else None,
            bounds=(
                f"bars of at least {minimum} of the {len(expected)} expected instruments ({source}; "
                f"min_instrument_share {universe.min_instrument_share} of universe {universe.name}, "
                f"{universe.calendar} session {day}); missing: {', '.join(missing[:10])}"
                + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
                if expected
                else f"bars of at least {minimum} instrument(s) ({universe.calendar} session {day}; "
                + ("nothing learnt yet)" if learnt else f"no instrument expected: {source})")
            ),
        )
        verdicts[day] = GateResult(
            suite=EXPECTED_CHECK, suite_file=UNIVERSES_FILE, suite_version="1", outcomes=[outcome], label=day
        )
    return verdicts
