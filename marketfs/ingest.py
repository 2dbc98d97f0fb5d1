"""Pushing bars and events during the day: stored, computed for the minutes that have closed, gated, served.

    from marketfs.ingest import push_bars, push_events

    push_bars(frame)    # instrument_id, ts (the bar's open, UTC), open, high, low, close, volume
    push_events(frame)  # event_id, instrument_id, published_at, sentiment, confidence, source

When ``push_bars`` returns, the vectors of every closed minute it made computable are served
(``latest()`` returns them) or quarantined (``IntradayBreach`` is raised after everything else was
committed). A bar pushed for a minute already computed is a correction: its values replace the
stored bar, and the step recomputes from the last step boundary before it.

The pushed rows are also written as a file under the landing folder (``$MARKETFS_LANDING_DIR``, when
``MARKETFS_SOURCE=landing``), so the end-of-day run, and any later recompute, read what was pushed:
one source of truth per day. Files are named by the push's instant, so the last push of a bar wins,
as the landing source resolves re-delivered bars.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import cache, partial
from pathlib import Path

import polars as pl

from marketfs.features.events import EVENT_SCHEMA
from marketfs.features.timeframes import timeframe as timeframe_spec
from marketfs.intraday import IntradayBreach, StepGate, StepOutcome, active_day, intraday_timeframes, step, trading_days
from marketfs.shards import Shard, shard_count, shards
from marketfs.sources.base import BAR_SCHEMA
from marketfs.sources.normalize import normalize_bars, normalize_events
from marketfs.store.bars import upsert_bars
from marketfs.store.events import insert_new_events


class PushError(ValueError):
    """A pushed frame that cannot be stored as it is (columns, types, time zones, nulls, non-finite values)."""


def _frame(frame: object, schema: dict[str, pl.DataType], ts: str, what: str) -> pl.DataFrame:
    if type(frame).__module__.partition(".")[0] == "pandas":
        frame = pl.from_pandas(frame)  # type: ignore[arg-type]
    if not isinstance(frame, pl.DataFrame):
        raise PushError(f"{what} must be a polars or pandas DataFrame, not {type(frame).__name__}")
    missing = [c for c in schema if c not in frame.columns]
    if missing:
        raise PushError(f"{what} lacks column(s) {', '.join(missing)}; expected {', '.join(schema)}")
    dtype = frame.schema[ts]
    if not isinstance(dtype, pl.Datetime) or dtype.time_zone is None:
        raise PushError(
            f"{what}.{ts} must be timezone-aware timestamps, not {dtype}; e.g. .dt.replace_time_zone('UTC') in "
            "polars or .dt.tz_localize('UTC') in pandas"
        )
    try:
        out = frame.select(
            [pl.col(c).dt.convert_time_zone("UTC").dt.cast_time_unit("us") if c == ts else pl.col(c) for c in schema]
        ).cast(schema)
    except pl.exceptions.PolarsError as exc:
        raise PushError(f"{what} has columns of the wrong type ({exc}); expected {schema}") from None
    nulls = [c for c in (["instrument_id", ts] + (["event_id"] if "event_id" in schema else [])) if out[c].null_count()]
    if nulls:
        raise PushError(f"{what} has null {', '.join(nulls)}: every row needs them")
    numbers = [c for c, t in schema.items() if t == pl.Float64()]
    bad = out.with_row_index("row").filter(pl.any_horizontal([~pl.col(c).is_finite() for c in numbers]))
    if bad.height:
        row = bad.row(0, named=True)
        raise PushError(
            f"{what} row {row['row']} ({row['instrument_id']} {row[ts]}) holds a non-finite value "
            f"({', '.join(f'{c}={row[c]}' for c in numbers)}), and {bad.height - 1} more row(s) do; the served "
            "tables refuse NaN and infinities. Nothing was stored: fix or drop those rows and push again"
        )
    return out


@cache
def _migrated(dsn: str) -> None:
    from marketfs.store.migrations import migrate

    migrate(dsn)


def _engine(dsn: str | None):  # noqa: ANN202 - a SQLAlchemy engine
    """The store's engine, its schema brought up to date once per process."""
    from marketfs.db import engine_for, resolve_dsn

    dsn = dsn or resolve_dsn()
    _migrated(dsn)
    return engine_for(dsn)


def _changed_by_events(fresh: pl.DataFrame) -> pl.DataFrame:
    """The first vector each new event counts for. A vector stamped ts counts the events published before
    ts + lag (its bar's close), so an event published at p counts from the first minute stamp after p - lag.
    That stamp, not p - lag itself: an event of the minute after the last step would otherwise reach
    back before that step's end, and the step, finding no stored state there, would recompute the day."""
    lag = timeframe_spec("1m").available_after
    first = (pl.col("published_at") - lag).dt.truncate("1m") + timedelta(minutes=1)
    return fresh.select("instrument_id", first.alias("ts"))


def _land(frame: pl.DataFrame, kind: str, ts: str, landing_dir: Path | None, pushed_at: datetime) -> None:
    """The pushed rows as a landing file of each trading day they hold (see the module's docstring)."""
    if landing_dir is None:
        return
    days = frame.with_columns(trading_days(frame[ts]).alias("_day"))
    for (day,), rows in days.partition_by("_day", as_dict=True).items():
        folder = landing_dir / kind / "pushed" / str(day)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{pushed_at:%Y%m%dT%H%M%S%f}-{os.getpid()}.parquet"
        partial = folder / f".{name}.partial"  # the landing source ignores it until it is whole
        rows.drop("_day").write_parquet(partial)
        partial.replace(folder / name)


def _landing_dir(landing_dir: str | Path | None) -> Path | None:
    if landing_dir is not None:
        return Path(landing_dir)
    if os.environ.get("MARKETFS_SOURCE", "synthetic") == "landing":
        return Path(os.environ.get("MARKETFS_LANDING_DIR", "landing"))
    return None


# Steps at once per push: the machine's cores, at most 4 (each holds a database connection meanwhile).
STEP_THREADS = min(os.cpu_count() or 1, 4)


def _steps(
    engine,  # noqa: ANN001 - a SQLAlchemy engine
    changed: pl.DataFrame,
    now: datetime,
    gate: StepGate | None,
    every_shard: bool = False,
    run_id: str | None = None,
    only: list[Shard] | None = None,
) -> list[StepOutcome]:
    """A step of every intraday feature set and timeframe, for each shard ``changed`` touches (or every
    shard: the minutes that closed since the last step are computed even when nothing changed)."""
    from marketfs.features.registry import FEATURE_SETS

    outcomes: list[StepOutcome] = []
    today = active_day(now)
    for shard in only or shards(shard_count()):
        mine = shard.filter(changed)
        if mine.is_empty() and not every_shard:
            continue
        changed_from = mine["ts"].min() if mine.height else None
        # The days the rows fall in, up to today: a bar of a day that just closed finishes that day.
        days = set(trading_days(mine["ts"]).drop_nulls().unique().to_list())
        days = sorted(days | ({today} if every_shard and today else set()))
        datasets = [(fs, tf) for fs in FEATURE_SETS.values() for tf in intraday_timeframes(fs)]
        for day in [d for d in days if today is None or d <= today]:
            # The feature sets' steps are independent (each its own state, lock and transaction): side by
            # side, one's reads and polars work overlap another's gate (0.8 s -> 0.6 s a push here).
            with ThreadPoolExecutor(max_workers=min(len(datasets), STEP_THREADS)) as pool:
                one = partial(
                    step, engine, now=now, shard=shard, changed_from=changed_from, gate=gate, day=day, run_id=run_id
                )
                outcomes.extend(pool.map(one, *zip(*datasets, strict=True)))
    if any(o.status == "quarantined" for o in outcomes):
        raise IntradayBreach(outcomes)
    return outcomes


def push_bars(
    frame: object,
    *,
    now: datetime | None = None,
    dsn: str | None = None,
    landing_dir: str | Path | None = None,
    gate: StepGate | None = None,
) -> list[StepOutcome]:
    """Store minute bars (stamped at their open) and serve the vectors of every minute that has closed.

    ``now`` (default: the clock) says which minutes have closed: a bar stamped ``t`` closes at ``t + 1m``.
    Returns one outcome per feature set, timeframe and shard stepped; raises ``IntradayBreach`` when a
    step's gate failed (its minutes quarantined, the rest committed), ``PushError`` for a frame that
    cannot be stored (nothing stored).
    """
    now = now or datetime.now(UTC)
    bars = normalize_bars(_frame(frame, BAR_SCHEMA, "ts", "bars"))
    engine = _engine(dsn)
    _land(bars.drop("source_flags"), "bars", "ts", _landing_dir(landing_dir), now)
    with engine.begin() as conn:
        changed = upsert_bars(conn, bars)
    return _steps(engine, changed, now, gate)


def push_events(
    frame: object,
    *,
    now: datetime | None = None,
    dsn: str | None = None,
    landing_dir: str | Path | None = None,
    gate: StepGate | None = None,
) -> list[StepOutcome]:
    """Store news events and recompute the minutes whose event windows they fall in (as ``push_bars``).

    An event_id already stored is kept as it was (the first delivery wins, as in the landing source).
    """
    now = now or datetime.now(UTC)
    events = normalize_events(_frame(frame, EVENT_SCHEMA, "published_at", "events"))
    engine = _engine(dsn)
    _land(events, "events", "published_at", _landing_dir(landing_dir), now)
    with engine.begin() as conn:
        fresh = insert_new_events(conn, events)
    return _steps(engine, _changed_by_events(fresh), now, gate)


def push_corporate_actions(
    frame: object,
    *,
    dsn: str | None = None,
    landing_dir: str | Path | None = None,
    source: str = "push",
) -> dict[str, object]:
    """Store splits and cash dividends (columns instrument_id, ex_date, kind, ratio, known_at; see
    ``marketfs/sources/corporate_actions.py``), as a landing file of them would be.

    All or nothing: a row that fails a check raises ``PushError`` naming it and its problem, and nothing is
    stored. Returns the rows stored now (a row stored before is a no-op) and the restatements they opened:
    an action that arrives after its instrument's vectors across the ex-date were served is applied by
    ``python -m pipelines restate`` (``run`` does it itself), which recomputes that instrument alone.
    """
    from marketfs.features.registry import datasets
    from marketfs.sources.corporate_actions import check_store, describe, parse, problems
    from marketfs.store.corporate_actions import known_instruments, open_restatements, write_actions

    if type(frame).__module__.partition(".")[0] == "pandas":
        frame = pl.from_pandas(frame)  # type: ignore[arg-type]
    if not isinstance(frame, pl.DataFrame):
        raise PushError(f"corporate actions must be a polars or pandas DataFrame, not {type(frame).__name__}")
    missing = [c for c in ("instrument_id", "ex_date", "kind", "ratio", "known_at") if c not in frame.columns]
    if missing:
        raise PushError(f"corporate actions lack column(s) {', '.join(missing)}")
    delivered = parse(frame, source)
    engine = _engine(dsn)
    with engine.begin() as conn:
        ids = delivered["instrument_id"].drop_nulls().unique().to_list()
        checked = check_store(delivered, known_instruments(conn, ids))
        bad = problems(checked)
        if bad.height:
            rows = "; ".join(describe(r) for r in bad.head(3).iter_rows(named=True))
            raise PushError(
                f"{bad.height} corporate action row(s) fail their checks, e.g. {rows}. Nothing was stored: fix or "
                "drop those rows and push again"
            )
        stored = write_actions(conn, checked.select("instrument_id", "ex_date", "kind", "ratio", "known_at"), source)
        opened = open_restatements(conn, stored, sorted(datasets()))
    landing = _landing_dir(landing_dir)
    if landing is not None and stored.height:
        folder = landing / "corporate_actions" / "pushed"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{os.getpid()}.csv"
        partial = folder / f".{name}.partial"
        stored.with_columns(pl.col("known_at").dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ")).write_csv(partial)
        partial.replace(folder / name)
    return {"stored": stored, "restatements": opened}


def step_delivered(
    bars: pl.DataFrame,
    events: pl.DataFrame,
    *,
    now: datetime,
    dsn: str,
    gate: StepGate | None = None,
    run_id: str | None = None,
    only: list[Shard] | None = None,
) -> list[StepOutcome]:
    """What a source has delivered of today so far (as its own files hold it: no landing copy): stored
    like pushed rows, then one step of every shard (``only``: those), whatever changed."""
    engine = _engine(dsn)
    with engine.begin() as conn:
        changed = upsert_bars(conn, normalize_bars(_frame(bars, BAR_SCHEMA, "ts", "bars")))
        fresh = insert_new_events(conn, normalize_events(_frame(events, EVENT_SCHEMA, "published_at", "events")))
    changed = pl.concat([changed, _changed_by_events(fresh)])
    return _steps(engine, changed, now, gate, every_shard=True, run_id=run_id, only=only)


__all__ = ["IntradayBreach", "PushError", "push_bars", "push_corporate_actions", "push_events", "step_delivered"]
