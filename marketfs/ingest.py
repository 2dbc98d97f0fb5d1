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
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import polars as pl

from marketfs.features.events import EVENT_SCHEMA
from marketfs.features.timeframes import timeframe as timeframe_spec
from marketfs.intraday import (
    IntradayBreach,
    StepGate,
    StepOutcome,
    active_day,
    intraday_timeframes,
    step,
    trading_day_of,
)
from marketfs.shards import Shard, shard_count, shards
from marketfs.sources.base import BAR_SCHEMA
from marketfs.sources.normalize import normalize_bars, normalize_events


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


def _land(frame: pl.DataFrame, kind: str, ts: str, landing_dir: Path | None, pushed_at: datetime) -> None:
    """The pushed rows as a landing file of each trading day they hold (see the module's docstring)."""
    if landing_dir is None:
        return
    from marketfs.intraday import trading_day_of

    days = frame.with_columns(
        pl.col(ts)
        .map_batches(
            lambda s: pl.Series([trading_day_of(t) for t in s.to_list()], dtype=pl.String), return_dtype=pl.String
        )
        .alias("_day")
    )
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
        mine = shard.filter(changed) if not shard.is_all else changed
        if mine.is_empty() and not every_shard:
            continue
        changed_from = mine["ts"].min() if mine.height else None
        # The days the rows fall in, up to today: a bar of a day that just closed finishes that day.
        days = {d for d in (trading_day_of(t) for t in mine["ts"].unique().to_list()) if d is not None}
        days = sorted(days | ({today} if every_shard and today else set()))
        for day in [d for d in days if today is None or d <= today]:
            datasets = [(fs, tf) for fs in FEATURE_SETS.values() for tf in intraday_timeframes(fs)]

            def one(dataset: tuple, day: str = day, shard: Shard = shard, changed_from=changed_from) -> StepOutcome:  # noqa: ANN001
                fs, tf = dataset
                return step(
                    engine, fs, tf, now=now, shard=shard, changed_from=changed_from, gate=gate, day=day, run_id=run_id
                )

            # The feature sets' steps are independent (each its own state, lock and transaction): side by
            # side, one's reads and polars work overlap another's gate (0.8 s -> 0.6 s a push here).
            with ThreadPoolExecutor(max_workers=min(len(datasets), STEP_THREADS)) as pool:
                outcomes.extend(pool.map(one, datasets))
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
    from marketfs.db import engine_for, resolve_dsn

    now = now or datetime.now(UTC)
    bars = normalize_bars(_frame(frame, BAR_SCHEMA, "ts", "bars"))
    dsn = dsn or resolve_dsn()
    _migrated(dsn)
    engine = engine_for(dsn)
    _land(bars.drop("source_flags"), "bars", "ts", _landing_dir(landing_dir), now)
    with engine.begin() as conn:
        changed = _upsert_bars(conn, bars)
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
    from marketfs.db import engine_for, resolve_dsn

    now = now or datetime.now(UTC)
    events = normalize_events(_frame(frame, EVENT_SCHEMA, "published_at", "events"))
    dsn = dsn or resolve_dsn()
    _migrated(dsn)
    engine = engine_for(dsn)
    _land(events, "events", "published_at", _landing_dir(landing_dir), now)
    with engine.begin() as conn:
        fresh = _insert_events(conn, events)
    # An event published at p counts for the vectors known after it, the first stamped p - lag.
    lag = timeframe_spec("1m").available_after
    changed = fresh.select("instrument_id", (pl.col("published_at") - lag).alias("ts"))
    return _steps(engine, changed, now, gate)


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
    from marketfs.db import engine_for

    _migrated(dsn)
    engine = engine_for(dsn)
    lag = timeframe_spec("1m").available_after
    with engine.begin() as conn:
        changed = _upsert_bars(conn, normalize_bars(_frame(bars, BAR_SCHEMA, "ts", "bars"))) if bars.height else None
        fresh = _insert_events(conn, normalize_events(_frame(events, EVENT_SCHEMA, "published_at", "events")))
    moved = fresh.select("instrument_id", (pl.col("published_at") - lag).alias("ts"))
    everything = pl.concat([c for c in (changed, moved) if c is not None])
    return _steps(engine, everything, now, gate, every_shard=True, run_id=run_id, only=only)


def _upsert_bars(conn, bars: pl.DataFrame) -> pl.DataFrame:  # noqa: ANN001 - a SQLAlchemy connection
    """Insert new bars and replace changed ones; returns (instrument_id, ts) of the rows that changed."""
    from psycopg import sql

    from marketfs.store.bars import STORED_BAR_SCHEMA
    from marketfs.store.copy import copy_frame_in, raw_connection

    columns = list(STORED_BAR_SCHEMA)
    values = [c for c in columns if c not in ("instrument_id", "ts")]
    raw = raw_connection(conn)
    raw.execute("CREATE TEMP TABLE IF NOT EXISTS pushed_bars (LIKE ohlcv_1m INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
    copy_frame_in(conn, "pushed_bars", bars.select(columns))
    ident = sql.Identifier
    statement = sql.SQL(
        "INSERT INTO ohlcv_1m AS b ({cols}) SELECT {cols} FROM pushed_bars ON CONFLICT (instrument_id, ts) DO UPDATE "
        "SET {sets}, ingested_at = now() WHERE ({old}) IS DISTINCT FROM ({new}) RETURNING b.instrument_id, "
        "(extract(epoch from b.ts) * 1000000)::bigint"
    ).format(
        cols=sql.SQL(", ").join(map(ident, columns)),
        sets=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(ident(c)) for c in values),
        old=sql.SQL(", ").join(sql.Identifier("b", c) for c in values),
        new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(ident(c)) for c in values),
    )
    rows = raw.execute(statement).fetchall()
    changed = pl.DataFrame(rows, schema={"instrument_id": pl.String, "ts": pl.Int64}, orient="row")
    return changed.with_columns(pl.col("ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))


def _insert_events(conn, events: pl.DataFrame) -> pl.DataFrame:  # noqa: ANN001 - a SQLAlchemy connection
    """Store the events whose event_id is new; returns them."""
    from marketfs.store.copy import copy_frame_in, raw_connection

    ids = events["event_id"].to_list()
    known = "SELECT event_id FROM news_event_ids WHERE event_id = ANY(%s::text[])"
    stored = {r[0] for r in raw_connection(conn).execute(known, (ids,))}
    fresh = events.filter(~pl.col("event_id").is_in(list(stored)))
    copy_frame_in(conn, "news_events", fresh.select(list(EVENT_SCHEMA)))
    copy_frame_in(
        conn,
        "news_event_ids",
        fresh.group_by("event_id").agg(pl.col("published_at").min()).select("event_id", "published_at"),
    )
    return fresh


__all__ = ["IntradayBreach", "PushError", "Shard", "push_bars", "push_events"]
