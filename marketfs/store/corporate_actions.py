"""Stored corporate actions (every version, as delivered) and the restatements a late one calls for.

An action is keyed by (instrument, ex-date, kind, known_at); a redelivery of the same row is a no-op, a
correction is a new row known later. What a computation applies is ``in_effect`` at the instant it reads
(``marketfs/corporate_actions.py``); the served vectors' history (``feature_vectors_history``) keeps what
was served before, so ``training_frame(as_of=...)`` before a late action returns the unadjusted values.

An action that arrives after vectors of its instrument across its ex-date were served opens a restatement per
feature dataset: that instrument's vectors are recomputed from the ex-date (``python -m pipelines restate``),
and until then no run extends them from a state on the old scale (``pending_holds``).
"""

from __future__ import annotations

from datetime import date, datetime

import polars as pl
import sqlalchemy as sa

from marketfs.corporate_actions import ACTION_SCHEMA, CASH_DIVIDEND, CLOSE_SCHEMA, FACTOR_SCHEMA, factors, in_effect
from marketfs.holds import HeldInstrument, Holds
from marketfs.shards import ALL, Shard
from marketfs.store.copy import copy_frame_in, copy_query_out
from marketfs.store.tables import select_list

RESTATE_ASSET = "corporate_actions"  # the name restatement holds are recorded under


def write_actions(conn: sa.Connection, actions: pl.DataFrame, source: str | None = None) -> pl.DataFrame:
    """Store validated ``actions`` (``ACTION_SCHEMA``, with a ``source`` column or ``source`` for all); returns
    the rows that were new (a redelivery of a stored row is a no-op). The database refuses a ratio that is
    not a positive number and an unknown kind."""
    if actions.is_empty():
        return actions.select(list(ACTION_SCHEMA))
    conn.execute(
        sa.text(
            "CREATE TEMP TABLE IF NOT EXISTS actions_staging (LIKE corporate_actions INCLUDING DEFAULTS) ON COMMIT DROP"
        )
    )
    conn.execute(sa.text("TRUNCATE actions_staging"))
    sources = pl.col("source") if source is None else pl.lit(source)
    copy_frame_in(conn, "actions_staging", actions.select(*ACTION_SCHEMA, sources.alias("source")))
    rows = conn.execute(
        sa.text(
            "INSERT INTO corporate_actions (instrument_id, ex_date, kind, ratio, known_at, source) "
            "SELECT instrument_id, ex_date, kind, ratio, known_at, source FROM actions_staging "
            "ON CONFLICT (instrument_id, ex_date, kind, known_at) DO NOTHING "
            "RETURNING instrument_id, ex_date, kind, ratio, known_at"
        )
    ).all()
    return pl.DataFrame([tuple(r) for r in rows], schema=ACTION_SCHEMA, orient="row")


def read_actions(conn: sa.Connection, instruments: list[str] | None = None) -> pl.DataFrame:
    """Every stored version of the actions (of ``instruments``), in ``ACTION_SCHEMA``."""
    where = "" if instruments is None else "WHERE instrument_id = ANY(%(ids)s)"
    query = f"SELECT {{}} FROM corporate_actions {where} ORDER BY instrument_id, ex_date, kind, known_at"
    from psycopg import sql

    return copy_query_out(conn, sql.SQL(query).format(select_list(ACTION_SCHEMA)), {"ids": instruments}, ACTION_SCHEMA)


def _dividend_closes(conn: sa.Connection, bar_table: str, dividends: pl.DataFrame, sessions) -> pl.DataFrame:
    """The last valid close of each dividend's instrument before its ex-date's trading day."""
    if dividends.is_empty():
        return pl.DataFrame(schema=CLOSE_SCHEMA)
    from marketfs.features.compute import VALID_BAR_SQL

    table = {"1m": "ohlcv_1m", "1d": "ohlcv_1d"}[bar_table]
    wanted = dividends.select("instrument_id", "ex_date").unique()
    starts = [sessions.trading_day_window(d)[0] for d in wanted["ex_date"].to_list()]
    # One statement: each dividend's newest valid bar before its trading day, by the (instrument_id, ts) index.
    rows = conn.execute(
        sa.text(
            f"SELECT d.i, d.day, b.close FROM unnest(CAST(:ids AS text[]), CAST(:days AS date[]), "
            f"CAST(:starts AS timestamptz[])) AS d(i, day, t) CROSS JOIN LATERAL (SELECT close FROM {table} "
            f"WHERE instrument_id = d.i AND ts < d.t AND {VALID_BAR_SQL} ORDER BY ts DESC LIMIT 1) b"
        ),
        {"ids": wanted["instrument_id"].to_list(), "days": wanted["ex_date"].to_list(), "starts": starts},
    ).all()
    return pl.DataFrame([tuple(r) for r in rows], schema=CLOSE_SCHEMA, orient="row")


def adjustments_for(conn: sa.Connection, *, total_return: bool, bar_table: str, at: datetime | None = None):
    """The factors (``FACTOR_SCHEMA``) of every stored action in effect (at ``at``; None: every one stored).

    Computations apply what is stored, whatever its ``known_at``: a vendor's clock ahead of ours must not leave
    vectors computed before that instant on one scale and those after it on another (their state would not
    continue); ``known_at`` orders corrections, and the vectors' history is what ``as_of`` reads."""
    from marketfs.universe import active_sessions

    stored = read_actions(conn)
    if stored.is_empty():
        return pl.DataFrame(schema=FACTOR_SCHEMA)
    actions = in_effect(stored, at)
    sessions = active_sessions()
    closes = None
    if total_return:
        closes = _dividend_closes(conn, bar_table, actions.filter(pl.col("kind") == CASH_DIVIDEND), sessions)
    return factors(actions, sessions, total_return=total_return, closes=closes)


def known_instruments(conn: sa.Connection, instruments: list[str]) -> set[str]:
    """Those of ``instruments`` with a bar in the store (minute or daily)."""
    if not instruments:
        return set()
    return set(
        conn.execute(
            sa.text(
                "SELECT i FROM unnest(CAST(:ids AS text[])) AS i WHERE EXISTS (SELECT 1 FROM ohlcv_1m WHERE "
                "instrument_id = i) OR EXISTS (SELECT 1 FROM ohlcv_1d WHERE instrument_id = i)"
            ),
            {"ids": instruments},
        ).scalars()
    )


def open_restatements(conn: sa.Connection, new_actions: pl.DataFrame, datasets: list[str]) -> list[dict]:
    """For each new action, the datasets that served its instrument at or after its ex-date's trading day start:
    a restatement from the ex-date each (returned as rows: instrument_id, dataset, from_date)."""
    from marketfs.universe import active_sessions

    sessions = active_sessions()
    opened: list[dict] = []
    for row in new_actions.iter_rows(named=True):
        ex_ts = sessions.trading_day_window(row["ex_date"])[0]
        served = conn.execute(
            sa.text(
                "SELECT DISTINCT 'feature_vectors_' || feature_set_version || '_' || timeframe FROM feature_vectors "
                "WHERE instrument_id = :i AND ts >= :t"
            ),
            {"i": row["instrument_id"], "t": ex_ts},
        ).scalars()
        for dataset in sorted(set(served) & set(datasets)):
            reason = (
                f"{row['kind']} {row['ratio']:g} of {row['instrument_id']} ex {row['ex_date']} (known at "
                f"{row['known_at']:%Y-%m-%d %H:%M} UTC) arrived after vectors across its ex-date were served"
            )
            conn.execute(
                sa.text(
                    "INSERT INTO corporate_action_restatements (instrument_id, dataset, from_date, reason) "
                    "VALUES (:i, :d, :f, :r)"
                ),
                {"i": row["instrument_id"], "d": dataset, "f": row["ex_date"], "r": reason},
            )
            opened.append({"instrument_id": row["instrument_id"], "dataset": dataset, "from_date": row["ex_date"]})
    return opened


def pending_restatements(conn: sa.Connection, dataset: str | None = None) -> pl.DataFrame:
    """Open restatements, one row per (instrument, dataset), from their earliest ex-date."""
    rows = conn.execute(
        sa.text(
            "SELECT instrument_id, dataset, min(from_date) AS from_date FROM corporate_action_restatements "
            "WHERE done_at IS NULL AND (CAST(:d AS text) IS NULL OR dataset = :d) GROUP BY 1, 2 ORDER BY 3, 1, 2"
        ),
        {"d": dataset},
    ).all()
    schema = {"instrument_id": pl.String(), "dataset": pl.String(), "from_date": pl.Date()}
    return pl.DataFrame([tuple(r) for r in rows], schema=schema, orient="row")


def pending_holds(conn: sa.Connection, dataset: str, shard: Shard = ALL) -> Holds:
    """Instruments (of ``shard``) a run must not extend until they are restated: their state is on the scale
    before the action."""
    from marketfs.universe import active_sessions

    sessions = active_sessions()
    return Holds(
        {
            r["instrument_id"]: HeldInstrument(
                r["instrument_id"],
                sessions.trading_day_window(r["from_date"])[0],
                r["from_date"].isoformat(),
                RESTATE_ASSET,
                0,
            )
            for r in pending_restatements(conn, dataset).iter_rows(named=True)
            if shard.holds(r["instrument_id"])
        }
    )


def close_restatements(conn: sa.Connection, dataset: str, instruments: list[str], through: date, run_id: str) -> int:
    """Mark the restatements of ``instruments`` in ``dataset`` from days up to ``through`` done by ``run_id``."""
    return conn.execute(
        sa.text(
            "UPDATE corporate_action_restatements SET done_at = clock_timestamp(), run_id = :r "
            "WHERE done_at IS NULL AND dataset = :d AND instrument_id = ANY(:i) AND from_date <= :t"
        ),
        {"r": run_id, "d": dataset, "i": instruments, "t": through},
    ).rowcount


QUARANTINE_COLUMNS = ("instrument_id", "ex_date", "kind", "ratio", "known_at", "source")


def _as_text(bad: pl.DataFrame) -> pl.DataFrame:
    """Bad rows as ``quarantine_corporate_actions`` keeps them: every value as text (it may not parse)."""
    return bad.select(*[pl.col(c).cast(pl.String) for c in QUARANTINE_COLUMNS], pl.col("problem"))


def _quarantined_rows(conn: sa.Connection, *, held_only: bool) -> pl.DataFrame:
    """The rows of the corporate_actions batches (the held ones alone, or those a person also decided on), with
    their batch."""
    rows = conn.execute(
        sa.text(
            "SELECT b.batch_id, q.instrument_id, q.ex_date, q.kind, q.ratio, q.known_at, q.source "
            "FROM quarantine_batches b JOIN quarantine_corporate_actions q USING (batch_id) "
            "WHERE b.asset = 'corporate_actions' AND "
            "(b.status = 'held' OR (NOT :held_only AND b.status IN ('released', 'discarded')))"
        ),
        {"held_only": held_only},
    ).all()
    schema = {"batch_id": pl.Int64(), **dict.fromkeys(QUARANTINE_COLUMNS, pl.String())}
    return pl.DataFrame([tuple(r) for r in rows], schema=schema, orient="row")


def quarantine_actions(
    conn: sa.Connection,
    bad: pl.DataFrame,
    *,
    run_id: str | None,
    verdict,  # noqa: ANN001 - expectations.gate.GateResult | None (the core does not import expectations)
    fallback: tuple[str, datetime, datetime],
) -> list[str]:
    """Set aside the bad rows not set aside before (a batch per instrument, holding it from the ex-date's trading
    day, or from ``fallback`` (day, start, end) when the ex-date is no session); one line per new batch."""
    from marketfs.sources.corporate_actions import describe
    from marketfs.store.quality import log_verdicts, open_batch, quarantine_rows
    from marketfs.universe import active_sessions

    if bad.is_empty():
        return []
    sessions = active_sessions()
    # Rows a batch already keeps, or a person decided on, are not set aside again (every run reads the whole
    # folder, and a discarded row may stay in its file).
    keys = list(QUARANTINE_COLUMNS)
    unseen = (
        _as_text(bad)
        .with_row_index("_row")
        .join(_quarantined_rows(conn, held_only=False).select(keys), on=keys, how="anti", nulls_equal=True)["_row"]
    )
    lines = []
    fresh_rows = bad.with_row_index("_row").filter(pl.col("_row").is_in(unseen.implode())).drop("_row")
    for (instrument,), fresh in fresh_rows.group_by("instrument_id", maintain_order=True):
        ex_dates = [d for d in fresh["ex_date"].to_list() if d is not None and sessions.is_session(d)]
        if ex_dates:
            day = min(ex_dates)
            start, end = sessions.trading_day_window(day)
            day = day.isoformat()
        else:
            day, start, end = fallback
        examples = [describe(r) for r in fresh.head(3).iter_rows(named=True)]
        reason = f"corporate action row(s) with problems: {' | '.join(examples)}"
        batch = open_batch(
            conn,
            run_id=run_id,
            asset="corporate_actions",
            partition=day,
            start=start,
            end=end,
            reason=reason,
            instruments=[instrument] if instrument is not None else None,
        )
        quarantine_rows(conn, batch, "corporate_actions", _as_text(fresh))
        if verdict is not None:
            log_verdicts(
                conn,
                run_id=run_id,
                asset="corporate_actions",
                partition=day,
                suite="corporate_actions",
                outcomes=[o.as_log_row() for o in verdict.outcomes],
                batch_id=batch,
            )
        held = f"holds {instrument} from {day}" if instrument is not None else "holds no instrument (no readable id)"
        lines.append(
            f"corporate_actions: quarantine batch {batch} {held}: {'; '.join(examples)}. Fix: correct the row in its "
            "file (the next run resolves the batch and serves the instrument), or discard the batch "
            f"(marketfs quarantine discard {batch} --by NAME --note WHY) to compute the instrument without it"
        )
    return lines


def resolve_fixed_actions(conn: sa.Connection, bad: pl.DataFrame, run_id: str | None) -> list[int]:
    """Close the held batches whose rows are no longer delivered as they were (the file was corrected)."""
    keys = list(QUARANTINE_COLUMNS)
    held = _quarantined_rows(conn, held_only=True)
    # A batch stays held while any of its rows is still delivered as it was.
    still = held.join(_as_text(bad).select(keys), on=keys, how="semi", nulls_equal=True)["batch_id"]
    gone = sorted(set(held["batch_id"]) - set(still))
    if gone:
        conn.execute(
            sa.text(
                "UPDATE quarantine_batches SET status = 'resolved', decided_at = clock_timestamp(), "
                "decided_by = 'pipeline', note = :n WHERE batch_id = ANY(:ids)"
            ),
            {"ids": gone, "n": f"the bad corporate action rows are no longer delivered (run {run_id})"},
        )
    return gone
