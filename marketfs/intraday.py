"""Today as a partition that fills up: intraday steps over the bars that have closed.

A step computes a feature set's vectors of ``[start, end)`` of today's trading day, where ``end`` is
the newest bar boundary that has passed (a bar stamped at its open ``t`` has closed at ``t + step``)
and whose bars have come (at least one instrument's: the others' vectors of it are MISSING_OHLCV,
and corrected if their bars come later), and ``start`` is where the previous step ended. It reads
the bars with their warm-up and the recursion state stored at each instrument's last bar before
``start``, and calls the same ``compute_feature_vectors`` a daily run calls: a day built in many
steps equals, bit for bit, the day computed once after the close (the state a step stores is what
a one-pass run carries at that bar). Each step is gated, then served (vectors and state written in one transaction), or
quarantined (its vectors and verdict kept under a batch, nothing of its range served; its state is
stored, so later minutes continue, and are served when their own gate passes).

A bar or event that arrives for minutes already computed (a correction) makes the next step start
at the last step boundary at or before it, where a state was stored, and recompute from there.
Each step is a row of ``intraday_steps``; the day's last step is the end-of-day run, which
recomputes and judges the complete day as any daily run does (``record_day_written``), and which
can still fail the day (``retract_day``).

The gate is found by entry point (group ``marketfs.gates``, name ``intraday``): the core names no
suite library; the project registers its Great Expectations gate there (``expectations/intraday.py``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

import polars as pl

from marketfs.features.compute import FeatureComputation, vector_schema
from marketfs.features.registry import FeatureSet, dataset_name
from marketfs.features.timeframes import timeframe as timeframe_spec
from marketfs.shards import ALL, Shard
from marketfs.universe import active_sessions

if TYPE_CHECKING:
    import sqlalchemy as sa

GATE_ENTRY_POINTS = "marketfs.gates"
# A stored minute bar (stamped at its open) is whole when its minute closes.
BAR_CLOSES_AFTER = timeframe_spec("1m").available_after
Status = Literal["served", "quarantined", "nothing to do"]


@dataclass(frozen=True)
class GateVerdict:
    """What a step's gate said: ``passed`` unless a critical expectation failed."""

    passed: bool
    suite: str
    outcomes: list[dict[str, Any]]  # quality_log rows (``ExpectationOutcome.as_log_row``)
    problems: list[str] = field(default_factory=list)  # one line per failed critical expectation


class StepGate(Protocol):
    def __call__(
        self, vectors: pl.DataFrame, *, dataset: str, day: str, day_vectors: int, day_flags: dict[str, int]
    ) -> GateVerdict:
        """Row-level expectations on ``vectors``; day-level ones on the day so far (``day_vectors``
        vectors, ``day_flags`` of them carrying each flag, this step's included)."""
        ...


@functools.cache
def default_gate() -> StepGate:
    """The gate the installed project registers (entry point ``marketfs.gates:intraday``)."""
    from importlib.metadata import entry_points

    found = entry_points(group=GATE_ENTRY_POINTS, name="intraday")
    if not found:
        raise RuntimeError(
            f"no intraday gate is installed (entry point group {GATE_ENTRY_POINTS!r}, name 'intraday'). Fix: "
            "install the project (`make install`, or `pip install -e .`), which registers expectations.intraday:gate"
        )
    return next(iter(found)).load()


@dataclass(frozen=True)
class StepOutcome:
    """One step of one feature set, timeframe and shard."""

    dataset: str
    shard: Shard
    day: str
    start: datetime
    end: datetime
    status: Status
    vectors: int = 0
    batch_id: int | None = None
    verdict: GateVerdict | None = None
    note: str | None = None  # e.g. a correction before today, which a step cannot reach

    def describe(self) -> str:
        shard = "" if self.shard.is_all else f" shard {self.shard.index}"
        # Both ends dated when they fall on different dates: "21:00-21:00" read as one minute, not a trading day.
        if self.start.date() == self.end.date():
            span = f"{self.start:%H:%M}-{self.end:%H:%M} UTC"
        else:
            span = f"{self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC"
        if self.status == "nothing to do":
            return f"{self.dataset} {self.day}{shard}: up to date through {self.end:%H:%M} UTC"
        text = f"{self.dataset} {self.day}{shard} {span}: {self.vectors} vectors {self.status}"
        if self.status == "quarantined":
            text += f" (batch {self.batch_id}: {'; '.join(self.verdict.problems) if self.verdict else ''})"
        return text + (f"; {self.note}" if self.note else "")


class IntradayBreach(ValueError):
    """A step's gate failed: its minutes are quarantined (everything else of the call was committed)."""

    def __init__(self, outcomes: list[StepOutcome]) -> None:
        self.outcomes = outcomes
        failed = [o for o in outcomes if o.status == "quarantined"]
        lines = [o.describe() for o in failed]
        super().__init__(
            "\n".join(lines)
            + "\nNothing of these minutes is served; later minutes are computed and served where their gate passes. "
            "Inspect the batch (quarantine_feature_vectors, quality_log), then correct the bars (push them again: "
            "the step recomputes from there) or let the end-of-day run judge the whole day."
        )


def intraday_timeframes(fs: FeatureSet) -> list[str]:
    """The timeframes of ``fs`` whose bars close during a session (a daily bar closes with the session)."""
    return [tf for tf in fs.timeframes if not timeframe_spec(tf).per_session]


def closed_end(timeframe: str, now: datetime) -> datetime:
    """Where the bars that have closed by ``now`` end: the newest stamp known by ``now``, plus the time
    it takes to be known (``ts + 1 minute``: a 1m bar stamped 14:39 closes at 14:40; a 5m bar, stamped at
    its last minute 14:39, closes at 14:40 too). Every vector stamped before it is final."""
    spec = timeframe_spec(timeframe)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    us = int((now - spec.available_after - epoch) / timedelta(microseconds=1))
    newest = us - (us - spec.stamp_offset_us) % spec.step_us
    return epoch + timedelta(microseconds=newest) + spec.available_after


def active_day(now: datetime) -> str | None:
    """The trading day a step at ``now`` fills: the session that opened last, at or before ``now``.

    Between a close and the next open that is the day that closed, so a step after the close
    computes its last minutes (the end-of-day run then reconciles it)."""
    sessions = active_sessions()
    i = sessions.opens.search_sorted(now, side="right") - 1
    return sessions.days[i].isoformat() if i >= 0 else None


def trading_days(instants: pl.Series) -> pl.Series:
    """The trading day (partition key, YYYY-MM-DD) each instant falls in; null past the calendar."""
    return active_sessions().trading_day(instants).dt.strftime("%Y-%m-%d")


def trading_day_of(instant: datetime) -> str | None:
    """``trading_days`` of one instant."""
    return trading_days(pl.Series([instant], dtype=pl.Datetime("us", "UTC"))).item()


# The rows of intraday_steps of one feature set, timeframe, shard and day (parameters of ``_scope``).
_SCOPE = "feature_set_version = :v AND timeframe = :tf AND shard_index = :si AND shard_count = :sc AND day = :day"


def _scope(fs: FeatureSet, timeframe: str, shard: Shard, day: str) -> dict[str, Any]:
    return {"v": fs.version, "tf": timeframe, "si": shard.index, "sc": shard.count, "day": date.fromisoformat(day)}


def _steps(conn: sa.Connection, fs: FeatureSet, timeframe: str, shard: Shard, day: str) -> list[Any]:
    import sqlalchemy as sa

    return conn.execute(
        sa.text(
            f"SELECT step_start, step_end, status, vectors, flag_counts FROM intraday_steps WHERE {_SCOPE} "
            "ORDER BY step_end"
        ),
        _scope(fs, timeframe, shard, day),
    ).all()


def _forget_steps(
    conn: sa.Connection, fs: FeatureSet, timeframe: str, shard: Shard, day: str, after: datetime | None = None
) -> None:
    """Drop the day's step rows (those ending after ``after``): what a recomputation replaces."""
    import sqlalchemy as sa

    conn.execute(
        sa.text(f"DELETE FROM intraday_steps WHERE {_SCOPE} AND step_end > :after"),
        {**_scope(fs, timeframe, shard, day), "after": after or datetime.min.replace(tzinfo=UTC)},
    )


def _flag_counts(vectors: pl.DataFrame) -> dict[str, int]:
    if vectors.is_empty():
        return {}
    counts = vectors.select(pl.col("quality_flags").explode().drop_nulls().value_counts()).unnest("quality_flags")
    return {str(flag): int(n) for flag, n in counts.iter_rows()}


def step(
    engine: sa.Engine,
    fs: FeatureSet,
    timeframe: str,
    *,
    now: datetime,
    shard: Shard = ALL,
    changed_from: datetime | None = None,
    gate: StepGate | None = None,
    run_id: str | None = None,
    day: str | None = None,
) -> StepOutcome:
    """Compute, gate and serve (or quarantine) what has closed of a trading day since its last step.

    ``day`` defaults to ``active_day(now)``: after a close, the day that closed, until the next open.
    ``changed_from``: the earliest bar (or event, less the vector lag) delivered for minutes a step
    already computed; the step then starts at the last boundary at or before it.
    """
    import sqlalchemy as sa

    from marketfs.store.bars import newest_bar
    from marketfs.store.feature_vectors import compute_stored, write_features

    if timeframe_spec(timeframe).per_session:
        raise ValueError(f"{timeframe} bars close with the session: the end-of-day run computes them")
    dataset = dataset_name(fs, timeframe)
    end = closed_end(timeframe, now)
    day = day or active_day(now)
    if day is None:
        raise ValueError(f"{now} is past the calendar's last session")
    day_start, day_end = active_sessions().trading_day_window(day)
    end = min(end, day_end)
    with engine.begin() as conn:
        # One step of a feature set, timeframe and shard at a time: the push path and the Dagster path
        # may both be stepping, and each must see where the other stopped.
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtext('intraday'), hashtext(:scope))"),
            {"scope": f"{fs.version}/{timeframe}/{shard.index}/{shard.count}"},
        )
        steps = _steps(conn, fs, timeframe, shard, day)
        boundaries = [day_start, *(s.step_end for s in steps)]
        start, note = max(boundaries), None
        if changed_from is not None and changed_from < start:
            if changed_from < day_start:
                note = (
                    f"a change at {changed_from} is before today's trading day; recompute that day: "
                    f"make recompute FROM={trading_day_of(changed_from)}"
                )
            reach = max(changed_from, day_start)
            start = max(b for b in boundaries if b <= reach)
        # Through the newest minute bar stored, not the newest that has closed: a step run before a minute's
        # bars came (an events push, a timer) would serve that minute as MISSING_OHLCV for every instrument,
        # and the bars' own push would then recompute it and the minutes before it back to a boundary, as a
        # correction (five minutes of three data sets, at every events push before a bar push).
        delivered = newest_bar(conn, start, end, shard)
        end = start if delivered is None else min(end, closed_end(timeframe, delivered + BAR_CLOSES_AFTER))
        if start >= end:
            return StepOutcome(dataset, shard, day, start, max(start, end), "nothing to do", note=note)
        computation = compute_stored(conn, fs, timeframe, start, end, shard)
        vectors = computation.vectors
        kept = [s for s in steps if s.step_end <= start]
        step_flags = _flag_counts(vectors)
        day_flags = dict(step_flags)
        for s in kept:
            for flag, n in (s.flag_counts or {}).items():
                day_flags[flag] = day_flags.get(flag, 0) + int(n)
        day_vectors = vectors.height + sum(int(s.vectors) for s in kept)
        verdict = (gate or default_gate())(
            vectors, dataset=dataset, day=day, day_vectors=day_vectors, day_flags=day_flags
        )
        batch_id = None
        if verdict.passed:
            write_features(
                conn,
                computation,
                feature_set=fs,
                timeframe=timeframe,
                start=start,
                end=end,
                run_id=run_id,
                shard=shard,
                protect=computation.holds,
            )
        else:
            batch_id = _quarantine(conn, fs, timeframe, shard, day, start, end, computation, verdict, run_id)
        _log(conn, dataset, day, shard, verdict, run_id, batch_id)
        _forget_steps(conn, fs, timeframe, shard, day, after=start)
        _record(
            conn,
            fs,
            timeframe,
            shard,
            day,
            start,
            end,
            "served" if verdict.passed else "quarantined",
            vectors.height,
            step_flags,
            batch_id,
            run_id,
        )
    return StepOutcome(
        dataset,
        shard,
        day,
        start,
        end,
        "served" if verdict.passed else "quarantined",
        vectors.height,
        batch_id,
        verdict,
        note,
    )


def _quarantine(
    conn: sa.Connection,
    fs: FeatureSet,
    timeframe: str,
    shard: Shard,
    day: str,
    start: datetime,
    end: datetime,
    computation: FeatureComputation,
    verdict: GateVerdict,
    run_id: str | None,
) -> int:
    """Keep the step's vectors under a batch, serve none of its range, and store its state for later steps."""
    from marketfs.store import quality
    from marketfs.store.feature_vectors import write_features

    reason = f"intraday gate {verdict.suite} {start:%H:%M}-{end:%H:%M} UTC: " + "; ".join(verdict.problems)
    batch_id = quality.open_batch(
        conn,
        run_id=run_id,
        asset=dataset_name(fs, timeframe),
        partition=shard.partition_key(day),
        start=start,
        end=end,
        reason=reason[:2000],
        shard=shard,
    )
    quality.quarantine_rows(conn, batch_id, "feature_vectors", computation.vectors)
    # The state is what the bars give, whatever the gate said of the vectors: later minutes continue from
    # it. A step that served this range before is retracted (its vectors go to the history).
    empty = pl.DataFrame(schema=vector_schema(fs, timeframe))
    write_features(
        conn,
        FeatureComputation(vectors=empty, state=computation.state),
        feature_set=fs,
        timeframe=timeframe,
        start=start,
        end=end,
        run_id=run_id,
        shard=shard,
    )
    return batch_id


def _log(
    conn: sa.Connection, dataset: str, day: str, shard: Shard, verdict: GateVerdict, run_id: str | None, batch_id
) -> None:
    from marketfs.store.quality import log_verdicts

    log_verdicts(
        conn,
        run_id=run_id,
        asset=dataset,
        partition=shard.partition_key(day),
        suite=verdict.suite,
        outcomes=verdict.outcomes,
        reference="intraday step",
        batch_id=batch_id,
    )


def _record(
    conn: sa.Connection,
    fs: FeatureSet,
    timeframe: str,
    shard: Shard,
    day: str,
    start: datetime,
    end: datetime,
    status: str,
    vectors: int,
    flags: dict[str, int],
    batch_id: int | None,
    run_id: str | None,
) -> None:
    import sqlalchemy as sa

    conn.execute(
        sa.text(
            "INSERT INTO intraday_steps (feature_set_version, timeframe, shard_index, shard_count, day, step_start, "
            "step_end, status, vectors, flag_counts, batch_id, run_id) VALUES (:v, :tf, :si, :sc, :day, :s, :e, "
            ":status, :n, CAST(:flags AS jsonb), :batch, :run) ON CONFLICT (feature_set_version, timeframe, "
            "shard_index, shard_count, day, step_end) DO UPDATE SET step_start = EXCLUDED.step_start, "
            "status = EXCLUDED.status, vectors = EXCLUDED.vectors, flag_counts = EXCLUDED.flag_counts, "
            "batch_id = EXCLUDED.batch_id, run_id = EXCLUDED.run_id, computed_at = now()"
        ),
        {
            **_scope(fs, timeframe, shard, day),
            "s": start,
            "e": end,
            "status": status,
            "n": vectors,
            "flags": json.dumps(flags),
            "batch": batch_id,
            "run": run_id,
        },
    )


def record_day_written(
    conn: sa.Connection,
    fs: FeatureSet,
    timeframe: str,
    shard: Shard,
    day: str,
    vectors: pl.DataFrame,
    run_id: str | None,
) -> None:
    """A daily run wrote ``day`` whole: it replaces the day's steps (its state replaced theirs). A day
    still in progress (today run by hand, or by a backfill) continues in steps from the bars that had
    closed when it ran: it computed those from the bars stored then, and a bar stored later for them is
    a correction, which a step recomputes."""

    if timeframe_spec(timeframe).per_session:
        return
    day_start, day_end = active_sessions().trading_day_window(day)
    through = max(day_start, min(day_end, closed_end(timeframe, datetime.now(UTC))))
    _forget_steps(conn, fs, timeframe, shard, day)
    _record(
        conn,
        fs,
        timeframe,
        shard,
        day,
        day_start,
        through,
        "reconciled",
        vectors.height,
        _flag_counts(vectors),
        None,
        run_id,
    )


def retract_day(
    conn: sa.Connection,
    fs: FeatureSet,
    timeframe: str,
    shard: Shard,
    day: str,
    instruments: list[str] | None = None,
) -> int:
    """The end-of-day run failed ``day`` (or, with ``instruments``, those instruments' day), which only
    intraday steps had served: nothing of it stays served (it goes to the history, where ``as_of`` still
    finds what a model saw). A day a daily run already wrote whole keeps what it wrote, as any re-run that
    breaches does. Returns the vectors retracted."""
    from marketfs.store.feature_vectors import upsert_window

    if timeframe_spec(timeframe).per_session or not any(
        s.status != "reconciled" for s in _steps(conn, fs, timeframe, shard, day)
    ):
        return 0
    start, end = active_sessions().trading_day_window(day)
    empty = pl.DataFrame(schema=vector_schema(fs, timeframe))
    stats = upsert_window(
        conn, empty, feature_set=fs, timeframe=timeframe, start=start, end=end, shard=shard, only=instruments
    )
    return int(stats.get("deleted_stale", 0))
