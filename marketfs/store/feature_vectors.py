"""The served table ``feature_vectors`` and the recursion state beside it (``feature_state``).

Writes are idempotent per key (instrument_id, timeframe, ts, feature_set_version): COPY into a
temporary staging table, one upsert, and a delete of the keys in the window that are no longer
computed, together with the state of the same window, all in the caller's transaction. When
the window holds no rows yet (the common case: a new day, a first backfill), there is nothing to
update, and the rows are COPYed straight into the table.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import sqlalchemy as sa
from psycopg import sql

from marketfs.features.compute import KEY_COLUMNS, FeatureComputation, HistoryError, state_schema, vector_schema
from marketfs.features.registry import FeatureSet
from marketfs.holds import NO_HOLDS, Holds, drop_from
from marketfs.shards import ALL, Shard
from marketfs.store.copy import copy_frame_in, copy_query_out
from marketfs.store.reference_days import forget_reference_days
from marketfs.store.tables import replace_window, select_list, writable
from marketfs.store.timescale import lift_decompression_limit

STAGING = "feature_vectors_staging"


def write_features(
    conn: sa.Connection,
    computation: FeatureComputation,
    *,
    feature_set: FeatureSet,
    timeframe: str,
    start: datetime,
    end: datetime,
    run_id: str | None = None,
    shard: Shard = ALL,
    protect: Holds = NO_HOLDS,
    only: list[str] | None = None,
) -> dict[str, int]:
    """Vectors and state of ``[start, end)`` for the instruments of ``shard``, written together (in the
    caller's transaction). ``protect``: held instruments, whose served rows stay; ``only``: these
    instruments alone (see ``replace_window``)."""
    stats = upsert_window(
        conn,
        computation.vectors,
        feature_set=feature_set,
        timeframe=timeframe,
        start=start,
        end=end,
        run_id=run_id,
        shard=shard,
        protect=protect,
        only=only,
    )
    state = computation.state.with_columns(
        pl.lit(timeframe).alias("timeframe"), pl.lit(feature_set.version).alias("feature_set_version")
    )
    stats["state_rows"] = replace_window(
        conn,
        "feature_state",
        state,
        "ts",
        start,
        end,
        scope={"timeframe": timeframe, "feature_set_version": feature_set.version},
        shard=shard,
        protect=protect,
        only=only,
    )
    return stats


def upsert_window(
    conn: sa.Connection,
    vectors: pl.DataFrame,
    *,
    feature_set: FeatureSet,
    timeframe: str,
    start: datetime,
    end: datetime,
    run_id: str | None = None,
    shard: Shard = ALL,
    protect: Holds = NO_HOLDS,
    only: list[str] | None = None,
) -> dict[str, int]:
    """Make the table hold exactly ``vectors`` for this version, timeframe, ``[start, end)`` and the
    instruments of ``shard`` (other shards' vectors of the window are not touched; nor, with ``protect``,
    held instruments' from their hold on; with ``only``, any but those instruments')."""
    columns = list(vector_schema(feature_set, timeframe))
    stray = vectors.filter(
        (pl.col("ts") < start)
        | (pl.col("ts") >= end)
        | (pl.col("timeframe") != timeframe)
        | (pl.col("feature_set_version") != feature_set.version)
    )
    if stray.height:
        raise ValueError("vector(s) fall outside the window, version or shard being written")
    # Rows of the window a write may replace: the shard's, less held instruments', or only those named.
    mine, mine_params = writable(
        vectors, "feature_vectors", "ts", shard, protect, only, instrument=sql.Identifier("f", "instrument_id")
    )
    partial = bool(protect) or only is not None
    staged = vectors.select(columns).with_columns(pl.lit(run_id, pl.String).alias("run_id"))
    # Writers of one version, timeframe and shard take turns: overlapping windows (a backfill and a
    # scheduled run, or the same partition twice) then see each other's committed rows. Shards write
    # disjoint instruments, so their runs go on at once.
    conn.execute(
        sa.text("SELECT pg_advisory_xact_lock(hashtext('feature_vectors'), hashtext(:scope))"),
        {"scope": f"{feature_set.version}/{timeframe}/{shard.index}"},
    )
    lift_decompression_limit(conn)
    # The stored drift reference of these days no longer says what the table holds (the daily writer puts
    # back the days it writes whole).
    forget_reference_days(conn, feature_set=feature_set, timeframe=timeframe, start=start, end=end, shard=shard)
    # What ``as_of`` reads: the instant the write could first be seen. Stamped once the writers' lock is held,
    # not at the transaction's start (``now()``), which a write that waited for the lock would predate.
    stamp = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
    window_has_rows = conn.execute(
        sa.text(
            "SELECT EXISTS (SELECT 1 FROM feature_vectors WHERE feature_set_version = :v AND timeframe = :tf "
            f"AND ts >= :s AND ts < :e AND {shard.text_condition()})"
        ),
        {"v": feature_set.version, "tf": timeframe, "s": start, "e": end, **shard.params},
    ).scalar()
    if not window_has_rows:
        # First write of the window: nothing to update or delete, so COPY straight into the table.
        stamped = staged.with_columns(pl.lit(stamp.astimezone(UTC), pl.Datetime("us", "UTC")).alias("written_at"))
        return {"upserted": copy_frame_in(conn, "feature_vectors", stamped), "deleted_stale": 0}
    # A window that already holds exactly these vectors (the end-of-day run of a day the intraday steps
    # built, a re-run that changes nothing) is read back and compared rather than staged and upserted:
    # one COPY out instead of a COPY in, three joins and an anti-join (measured in benchmarks/intraday.py).
    # Not for a partial write: the window then holds rows it leaves alone, so it never equals the vectors.
    if not partial:
        stored = read_vectors(conn, feature_set=feature_set, timeframe=timeframe, start=start, end=end, shard=shard)
        if stored.height == vectors.height and stored.equals(vectors.select(columns).sort("instrument_id", "ts")):
            return {"upserted": 0, "deleted_stale": 0, "superseded": 0}

    conn.execute(
        sa.text(
            f"CREATE TEMP TABLE IF NOT EXISTS {STAGING} (LIKE feature_vectors INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
    )
    conn.execute(sa.text(f"TRUNCATE {STAGING}"))
    copy_frame_in(conn, STAGING, staged)
    # Temporary tables are never auto-analysed; without statistics the planner takes the staged rows
    # for a handful and runs the stale-key anti-join as a nested loop (minutes, not seconds, at 500k rows).
    conn.execute(sa.text(f"ANALYZE {STAGING}"))

    ident = sql.Identifier
    all_cols = [*columns, "run_id"]
    values = [c for c in columns if c not in KEY_COLUMNS]
    kept = sql.SQL(", ").join(map(ident, [*all_cols, "written_at"]))
    changed = sql.SQL("({}) IS DISTINCT FROM ({})").format(
        sql.SQL(", ").join(sql.Identifier("f", c) for c in values),
        sql.SQL(", ").join(sql.Identifier("s", c) for c in values),
    )
    key_match = sql.SQL(" AND ").join(sql.SQL("s.{0} = f.{0}").format(ident(c)) for c in KEY_COLUMNS)
    # The versions a re-run replaces with other values keep their place in the history; a vector
    # recomputed to the same values is the same version, with the time and run that first wrote it.
    supersede = sql.SQL(
        "INSERT INTO feature_vectors_history ({kept}, superseded_at) SELECT {f_kept}, %(stamp)s "
        "FROM feature_vectors f JOIN {staging} s ON {key_match} WHERE {changed}"
    ).format(
        kept=kept,
        f_kept=sql.SQL(", ").join(sql.Identifier("f", c) for c in [*all_cols, "written_at"]),
        staging=ident(STAGING),
        key_match=key_match,
        changed=changed,
    )
    upsert = sql.SQL(
        "INSERT INTO feature_vectors AS f ({cols}, written_at) SELECT {cols}, %(stamp)s FROM {staging} "
        "ON CONFLICT ({key}) DO UPDATE SET {sets}, written_at = %(stamp)s WHERE {changed_excluded}"
    ).format(
        cols=sql.SQL(", ").join(map(ident, all_cols)),
        staging=ident(STAGING),
        key=sql.SQL(", ").join(map(ident, KEY_COLUMNS)),
        sets=sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(ident(c)) for c in all_cols if c not in KEY_COLUMNS
        ),
        changed_excluded=sql.SQL("({}) IS DISTINCT FROM ({})").format(
            sql.SQL(", ").join(sql.Identifier("f", c) for c in values),
            sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(ident(c)) for c in values),
        ),
    )
    delete_stale = sql.SQL(
        "WITH gone AS (DELETE FROM feature_vectors f WHERE f.feature_set_version = %(version)s "
        "AND f.timeframe = %(timeframe)s AND f.ts >= %(start)s AND f.ts < %(end)s AND {mine} AND NOT EXISTS ("
        "SELECT 1 FROM {staging} s WHERE s.instrument_id = f.instrument_id AND s.ts = f.ts) RETURNING {kept}) "
        "INSERT INTO feature_vectors_history ({kept}, superseded_at) SELECT {kept}, %(stamp)s FROM gone"
    ).format(staging=ident(STAGING), kept=kept, mine=mine)
    with conn.connection.driver_connection.cursor() as cur:
        cur.execute(supersede, {"stamp": stamp})
        superseded = cur.rowcount
        cur.execute(upsert, {"stamp": stamp})
        upserted = cur.rowcount
        # Right after a bulk load the table's statistics are stale, and the planner may take the window
        # for a few rows and run this anti-join as a nested loop over the staged rows: minutes at 600k.
        # A hash anti-join is the only sane plan here, so ask for it for this statement.
        cur.execute("SET LOCAL enable_nestloop = off")
        cur.execute(
            delete_stale,
            {
                "version": feature_set.version,
                "timeframe": timeframe,
                "start": start,
                "end": end,
                "stamp": stamp,
                **mine_params,
            },
        )
        deleted = cur.rowcount
        cur.execute("SET LOCAL enable_nestloop = on")
    return {"upserted": upserted, "deleted_stale": deleted, "superseded": superseded}


def read_vectors(
    conn: sa.Connection,
    *,
    feature_set: FeatureSet,
    timeframe: str,
    start: datetime,
    end: datetime,
    instruments: list[str] | None = None,
    columns: list[str] | None = None,
    shard: Shard = ALL,
) -> pl.DataFrame:
    """Stored vectors of one version and timeframe in ``[start, end)``, sorted by instrument and ts.

    ``columns`` limits the read (``instrument_id`` and ``ts`` always come along); ``shard`` to its instruments.
    """
    schema = vector_schema(feature_set, timeframe)
    if columns is not None:
        wanted = {"instrument_id", "ts", *columns}
        schema = {name: dtype for name, dtype in schema.items() if name in wanted}
    where = "feature_set_version = %(version)s AND timeframe = %(timeframe)s AND ts >= %(start)s AND ts < %(end)s"
    params: dict = {"version": feature_set.version, "timeframe": timeframe, "start": start, "end": end}
    if instruments is not None:
        where += " AND instrument_id = ANY(%(instruments)s)"
        params["instruments"] = instruments
    params.update(shard.params)
    query = sql.SQL("SELECT {} FROM feature_vectors WHERE " + where + " AND {} ORDER BY instrument_id, ts").format(
        select_list(schema), shard.condition()
    )
    return copy_query_out(conn, query, params, schema)


def read_state_before(
    conn: sa.Connection, *, feature_set: FeatureSet, timeframe: str, start: datetime, shard: Shard = ALL
) -> pl.DataFrame:
    """The latest stored recursion state per instrument (of ``shard``) strictly before ``start``."""
    schema = state_schema(feature_set, timeframe)
    query = sql.SQL(
        "SELECT DISTINCT ON (instrument_id) {} FROM feature_state "
        "WHERE timeframe = %(timeframe)s AND feature_set_version = %(version)s AND ts < %(start)s AND {} "
        "ORDER BY instrument_id, ts DESC"
    ).format(select_list(schema), shard.condition())
    params = {"timeframe": timeframe, "version": feature_set.version, "start": start, **shard.params}
    return copy_query_out(conn, query, params, schema)


def recent_partitions_start(
    conn: sa.Connection, *, feature_set: FeatureSet, timeframe: str, before: datetime, partitions: int, shard: Shard
) -> datetime | None:
    """Where (about) the last ``partitions`` trading days that have vectors before ``before`` start; None
    when there are none.

    The days are counted as UTC dates in SQL (an index range, no calendar on the server), and the window
    starts where the earliest one's trading day starts, so that day is whole (its after-hours part too).
    """
    query = (
        "SELECT min(day), count(*) FROM (SELECT DISTINCT date_trunc('day', ts) AS day FROM feature_vectors "
        "WHERE feature_set_version = :v AND timeframe = :tf AND ts < :before AND ts >= :floor "
        f"AND {shard.text_condition()} ORDER BY 1 DESC LIMIT :n) recent"
    )
    params = {"v": feature_set.version, "tf": timeframe, "before": before, "n": partitions, **shard.params}
    # The recent weeks first (a time range the BRIN index or the chunks narrow down): when they hold all
    # ``partitions`` days, those are the answer. Otherwise every earlier vector is looked at, as it must be.
    first_day, found = conn.execute(
        sa.text(query), {**params, "floor": before - timedelta(days=2 * partitions + 14)}
    ).one()
    if found < partitions:
        first_day = conn.execute(sa.text(query), {**params, "floor": datetime.min.replace(tzinfo=UTC)}).one()[0]
    if first_day is None:
        return None
    from marketfs.universe import active_sessions

    sessions = active_sessions()
    first = first_day if first_day.tzinfo else first_day.replace(tzinfo=UTC)
    session = sessions.trading_day(pl.Series([first])).item()
    return sessions.trading_day_window(session)[0] if session is not None else first


def compute_stored(
    conn: sa.Connection,
    feature_set: FeatureSet,
    timeframe: str,
    start: datetime,
    end: datetime,
    shard: Shard = ALL,
    holds: Holds | None = None,
    instruments: list[str] | None = None,
) -> FeatureComputation:
    """The vectors of ``[start, end)`` from the stored bars (with their warm-up), events and recursion state:
    what a daily run and an intraday step both compute. Raises ``HistoryError`` when the state is missing.

    The instruments are those with bars in the window or earlier in its trading day within
    ``stale_after``: a step of one minute still gives an instrument whose bar of that minute is missing
    its MISSING_OHLCV vector, as the day computed at once does (for a whole day the two are the same).

    Instruments held by a quarantined instrument-day (``holds``; by default the open holds of the
    dataset's bars, events and its own vectors) are computed only up to their hold: their bars from it on
    are not read, so nothing continues from a day that is missing, and the result says who was left out.
    So are instruments waiting for a restatement (a corporate action that arrived after their vectors across
    its ex-date were served): their state is on the scale before it. ``instruments``: these alone (a
    restatement), computed whatever restatement they wait for.

    The corporate actions in effect now put each instrument's bars on one scale (``corporate_actions.py``).
    """
    from marketfs.features.registry import dataset_name
    from marketfs.features.timeframes import timeframe as timeframe_spec
    from marketfs.store.corporate_actions import adjustments_for, pending_holds
    from marketfs.store.coverage import hole_before
    from marketfs.store.gaps import drop_inside_gaps, read_gaps
    from marketfs.store.holds import feature_holds, read_holds
    from marketfs.universe import active_sessions, active_universe

    if holds is None:
        dataset = dataset_name(feature_set, timeframe)
        upstream = tuple(a for a in feature_holds(dataset, timeframe) if a != dataset)
        # The dataset's own holds from a day of this window on are what this computation judges again (a
        # recompute after the fix): only those of earlier days keep their instruments out.
        holds = read_holds(conn, upstream, end, shard).merged(read_holds(conn, (dataset,), start, shard))
    pending = pending_holds(conn, dataset_name(feature_set, timeframe), shard)
    if instruments is not None:  # a restatement computes the instruments it restates
        pending = Holds({i: h for i, h in pending.held.items() if i not in instruments})
    holds = holds.merged(pending)
    adjustments = adjustments_for(
        conn, total_return=feature_set.total_return, bar_table="1d" if timeframe_spec(timeframe).per_session else "1m"
    )
    sessions = active_sessions()
    day = sessions.trading_day(pl.Series([start], dtype=pl.Datetime("us", "UTC"))).item()
    day_start = sessions.trading_day_window(day)[0] if day is not None else start
    if day is not None:
        # Warm-up bars are read by count: across sessions never delivered they would be read as adjacent.
        hole = hole_before(conn, day, "1d" if timeframe_spec(timeframe).per_session else "1m", shard)
        if hole is not None:
            raise HistoryError(hole.describe())
    dataset = dataset_name(feature_set, timeframe)
    gaps = read_gaps(conn, dataset, end, shard)
    restarts = gaps.select("instrument_id", "restart_at").filter(pl.col("restart_at") < end)
    stored_state = _only(
        holds.filter(read_state_before(conn, feature_set=feature_set, timeframe=timeframe, start=start, shard=shard)),
        instruments,
    )
    # A declared gap inside the window splits it: each piece continues the state the piece before computed,
    # and the instruments the gap covers start again after it.
    cuts = sorted({r for r in restarts["restart_at"].to_list() if start < r < end})
    bounds = [start, *cuts, end]
    vectors, states, jumps, carried = [], [], [], stored_state
    for piece_start, piece_end in zip(bounds, bounds[1:], strict=False):
        piece = _compute_piece(
            conn,
            feature_set,
            timeframe,
            piece_start,
            piece_end,
            shard,
            holds,
            restarts,
            carried,
            day_start,
            adjustments,
            instruments,
        )
        vectors.append(piece.vectors)
        states.append(piece.state)
        jumps.append(piece.jumps)
        carried = pl.concat([carried, piece.state]) if piece.state.height else carried
    # Nothing is stamped inside a declared gap of its instrument: the sessions are missing for good.
    computed = FeatureComputation(
        vectors=drop_inside_gaps(pl.concat(vectors), gaps), state=drop_inside_gaps(pl.concat(states), gaps)
    )
    # A delisted instrument's last vector stays served; nothing is invented after its last session (no
    # MISSING_OHLCV vector for a bar it can no longer have).
    delisted = active_universe().delisted_at()
    return FeatureComputation(
        vectors=drop_from(holds.filter(computed.vectors), delisted),
        state=drop_from(holds.filter(computed.state), delisted),
        holds=holds,
        jumps=pl.concat(jumps),
    )


def _compute_piece(
    conn: sa.Connection,
    feature_set: FeatureSet,
    timeframe: str,
    start: datetime,
    end: datetime,
    shard: Shard,
    holds: Holds,
    restarts: pl.DataFrame,
    state: pl.DataFrame,
    day_start: datetime,
    adjustments: pl.DataFrame,
    instruments: list[str] | None,
) -> FeatureComputation:
    """``compute_stored`` for a window no declared gap cuts: its bars with their warm-up, less what each
    instrument had before its latest restart; the state each instrument last reached before ``start``."""
    from marketfs.features.compute import compute_feature_vectors
    from marketfs.features.flags import load_flag_config
    from marketfs.store.bars import read_bars_for
    from marketfs.store.events import read_events
    from marketfs.store.gaps import drop_before_restart, restarts_at

    since = max(day_start, start - load_flag_config().stale_after_for(timeframe))
    warmup = feature_set.warmup_bars(timeframe)
    bars = _only(
        holds.filter(read_bars_for(conn, timeframe, start, end, warmup_bars=warmup, shard=shard, active_since=since)),
        instruments,
    )
    events = _only(read_events(conn, start - feature_set.event_lookback(timeframe), end, shard=shard), instruments)
    latest = state.filter(pl.col("ts") < start).sort("ts").group_by("instrument_id", maintain_order=True).last()
    restart = restarts_at(restarts, bars["instrument_id"], start)
    return compute_feature_vectors(
        drop_before_restart(bars, restart),
        timeframe,
        events=events,
        state=drop_before_restart(latest, restart),
        feature_set=feature_set,
        start=start,
        end=end,
        warmup_limit=warmup,
        restarts=restart,
        adjustments=adjustments,
    )


def _only(frame: pl.DataFrame, instruments: list[str] | None) -> pl.DataFrame:
    return frame if instruments is None else frame.filter(pl.col("instrument_id").is_in(instruments))


HISTORY_RETENTION_ENV = "MARKETFS_HISTORY_RETENTION"


def prune_history(conn: sa.Connection) -> int:
    """Drop superseded versions replaced longer ago than ``$MARKETFS_HISTORY_RETENTION`` (e.g. ``90 days``);
    unset keeps them all. Reads ``as_of`` an instant before the horizon then see the values served next."""
    import os

    retention = os.environ.get(HISTORY_RETENTION_ENV, "").strip()
    if not retention:
        return 0
    with conn.begin_nested() as savepoint:
        try:
            return conn.execute(
                sa.text("DELETE FROM feature_vectors_history WHERE superseded_at < now() - CAST(:r AS interval)"),
                {"r": retention},
            ).rowcount
        except sa.exc.DataError as exc:
            savepoint.rollback()
            raise ValueError(
                f"{HISTORY_RETENTION_ENV}={retention!r} is not an interval. Fix: a PostgreSQL interval such as "
                "'90 days' or '1 year', or unset it to keep every superseded version"
            ) from exc
