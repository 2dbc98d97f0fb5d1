"""The quality log and the quarantine: every verdict kept, rejected data kept until a person decides.

A gate that fails writes its rows to ``quarantine_<table>`` under a batch in ``quarantine_batches``
and its verdict to ``quality_log``. ``release`` moves a batch into the served tables (through the
same writers a passing run uses) and ``discard`` drops it; both record who decided and why in
``quality_log``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import polars as pl
import sqlalchemy as sa
from psycopg import sql

from marketfs import jsonsafe
from marketfs.features.compute import FeatureComputation, state_schema
from marketfs.features.events import EVENT_SCHEMA
from marketfs.features.registry import FeatureSet
from marketfs.shards import ALL, Shard
from marketfs.sources.base import BAR_SCHEMA
from marketfs.store.copy import copy_frame_in, copy_query_out
from marketfs.store.tables import select_list


class QuarantineError(ValueError):
    """A release or discard that cannot be done (unknown batch, already decided)."""


def log_verdicts(
    conn: sa.Connection,
    *,
    run_id: str | None,
    asset: str,
    partition: str,
    suite: str,
    outcomes: Iterable[dict[str, Any]],
    reference: str | None = None,
    docs_url: str | None = None,
    batch_id: int | None = None,
) -> int:
    """One ``quality_log`` row per expectation outcome (keys as in ``ExpectationOutcome.as_log_row``)."""
    rows = [
        {
            "run_id": run_id,
            "asset": asset,
            "partition": partition,
            "suite": suite,
            "expectation": o["expectation"],
            "column_name": o.get("column"),
            "severity": o.get("severity"),
            "success": bool(o["success"]),
            # Finite-safe: a verdict about a NaN or inf bar must be logged, not crash on its own value.
            "observed_value": jsonsafe.dumps(o.get("observed_value")),
            "unexpected_count": o.get("unexpected_count"),
            "element_count": o.get("element_count"),
            "reference": reference,
            "docs_url": docs_url,
            "batch_id": batch_id,
        }
        for o in outcomes
    ]
    if rows:
        conn.execute(
            sa.text(
                "INSERT INTO quality_log (run_id, asset, partition, suite, expectation, column_name, severity, "
                "success, observed_value, unexpected_count, element_count, reference, docs_url, batch_id) VALUES "
                "(:run_id, :asset, :partition, :suite, :expectation, :column_name, :severity, :success, "
                "CAST(:observed_value AS jsonb), :unexpected_count, :element_count, :reference, :docs_url, :batch_id)"
            ),
            rows,
        )
    return len(rows)


def open_batch(
    conn: sa.Connection,
    *,
    run_id: str | None,
    asset: str,
    partition: str,
    start: datetime,
    end: datetime,
    reason: str,
    shard: Shard = ALL,
    instruments: list[str] | None = None,
) -> int:
    """A new held batch: the whole day of ``shard`` (``instruments`` None), or those instruments' rows of it."""
    return int(
        conn.execute(
            sa.text(
                "INSERT INTO quarantine_batches (run_id, asset, partition, window_start, window_end, reason, "
                "shard_index, shard_count, instruments) VALUES (:r, :a, :p, :s, :e, :why, :si, :sc, :inst) "
                "RETURNING batch_id"
            ),
            {
                "r": run_id,
                "a": asset,
                "p": partition,
                "s": start,
                "e": end,
                "why": reason,
                "si": shard.index,
                "sc": shard.count,
                "inst": sorted(instruments) if instruments is not None else None,
            },
        ).scalar_one()
    )


def quarantine_rows(conn: sa.Connection, batch_id: int, table: str, frame: pl.DataFrame) -> int:
    """Keep ``frame`` (in its given order) under ``batch_id`` in ``quarantine_<table>``."""
    rows = frame.with_row_index("delivery_order").with_columns(pl.lit(batch_id, pl.Int64).alias("batch_id"))
    return copy_frame_in(conn, f"quarantine_{table}", rows)


def read_quarantined(conn: sa.Connection, batch_id: int, table: str, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    query = sql.SQL("SELECT {} FROM {} WHERE batch_id = %(b)s ORDER BY delivery_order").format(
        select_list(schema), sql.Identifier(f"quarantine_{table}")
    )
    return copy_query_out(conn, query, {"b": batch_id}, schema)


def list_batches(conn: sa.Connection, status: str | None = None) -> list[dict[str, Any]]:
    query = "SELECT * FROM quarantine_batches"
    params: dict = {}
    if status:
        query += " WHERE status = :status"
        params["status"] = status
    return [dict(row._mapping) for row in conn.execute(sa.text(query + " ORDER BY batch_id"), params)]


def _decided_batch(
    conn: sa.Connection, batch_id: int, shard_count: int | None = None, action: str = "decide"
) -> dict[str, Any]:
    """The held batch, locked; refused when already decided, or held under another shard count than the
    caller's (its partition and what to recompute exist only under that count)."""
    row = conn.execute(
        sa.text("SELECT * FROM quarantine_batches WHERE batch_id = :b FOR UPDATE"), {"b": batch_id}
    ).first()
    if row is None:
        raise QuarantineError(f"no quarantine batch {batch_id}; list them with `marketfs quarantine list`")
    batch = dict(row._mapping)
    if batch["status"] != "held":
        raise QuarantineError(
            f"batch {batch_id} was already {batch['status']} by {batch['decided_by']} at {batch['decided_at']}"
        )
    if shard_count is not None and batch["shard_count"] != shard_count:
        raise QuarantineError(
            f"batch {batch_id} was held with MARKETFS_SHARDS={batch['shard_count']}, this deployment runs "
            f"{shard_count}: {action} it with MARKETFS_SHARDS={batch['shard_count']} (its partition and the days "
            "to recompute after it exist under that count)"
        )
    return batch


def _record_decision(conn: sa.Connection, batch: dict[str, Any], status: str, actor: str, note: str) -> None:
    conn.execute(
        sa.text(
            "UPDATE quarantine_batches SET status = :s, decided_at = now(), decided_by = :a, note = :n "
            "WHERE batch_id = :b"
        ),
        {"s": status, "a": actor, "n": note, "b": batch["batch_id"]},
    )
    conn.execute(
        sa.text(
            "INSERT INTO quality_log (asset, partition, suite, kind, expectation, success, batch_id, actor, note) "
            "VALUES (:asset, :p, '(human review)', :kind, :exp, true, :b, :a, :n)"
        ),
        {
            "asset": batch["asset"],
            "p": batch["partition"],
            "kind": {"released": "release", "discarded": "discard"}[status],
            "exp": f"{status} quarantine batch {batch['batch_id']} ({batch['reason']})",
            "b": batch["batch_id"],
            "a": actor,
            "n": note,
        },
    )


def _feature_dataset(asset: str) -> tuple[FeatureSet, str] | None:
    """The feature set and timeframe an asset's batches hold, or None for a raw asset."""
    from marketfs.features.registry import datasets

    return datasets().get(asset)


def _refuse_non_finite(batch_id: int, bars: pl.DataFrame) -> None:
    """A person may release a price the gate found absurd, never one that is not a number: no served
    table can hold NaN or an infinity (the database refuses them)."""
    values = ("open", "high", "low", "close", "volume")
    bad = bars.filter(pl.any_horizontal([~pl.col(c).is_finite().fill_null(False) for c in values]))
    if bad.height:
        row = bad.row(0, named=True)
        spoiled = ", ".join(f"{c}={row[c]}" for c in values if row[c] is None or not math.isfinite(row[c]))
        raise QuarantineError(
            f"batch {batch_id} holds {bad.height} bar(s) with missing, NaN or infinite values "
            f"(e.g. {row['instrument_id']} {row['ts']} {spoiled}), which can never be served. "
            "Fix: discard the batch and have the day re-delivered"
        )


def release(
    conn: sa.Connection, batch_id: int, *, actor: str, note: str, shard_count: int | None = None
) -> dict[str, Any]:
    """Write a held batch into its served tables, as a passing run would have, and log who released it.

    ``shard_count``: the caller's MARKETFS_SHARDS; a batch held under another count is refused before
    anything is written (its partition and what to recompute exist only under that count).
    """
    from marketfs.sources.normalize import normalize_bars, normalize_events
    from marketfs.store.bars import STORED_BAR_SCHEMA, replace_bars
    from marketfs.store.events import replace_events
    from marketfs.store.feature_vectors import vector_schema, write_features

    if not actor.strip() or not note.strip():
        raise QuarantineError("a release needs the name of the person who reviewed it and a note saying why")
    batch = _decided_batch(conn, batch_id, shard_count, "release")
    start, end, asset = batch["window_start"], batch["window_end"], batch["asset"]
    shard = Shard(batch["shard_index"], batch["shard_count"])
    # An instrument-day batch replaces its instruments' rows of the day alone; the others were served.
    only = batch.get("instruments")
    if asset == "raw_ohlcv":
        bars = read_quarantined(conn, batch_id, "ohlcv_1m", BAR_SCHEMA)
        _refuse_non_finite(batch_id, bars)
        written = replace_bars(conn, normalize_bars(bars), start, end, shard=shard, only=only)
    elif asset == "bars_1d":
        bars = read_quarantined(conn, batch_id, "ohlcv_1d", STORED_BAR_SCHEMA)
        _refuse_non_finite(batch_id, bars)
        written = replace_bars(conn, bars, start, end, timeframe="1d", shard=shard, only=only)
    elif asset == "raw_events":
        events = normalize_events(read_quarantined(conn, batch_id, "news_events", EVENT_SCHEMA))
        written = replace_events(conn, events, start, end, shard=shard, only=only)
    elif asset == "corporate_actions":
        # A bad action row can never be applied (no ratio to scale by): releasing it ends the hold, and the
        # instrument is computed without the action (a jump it would have explained is flagged, and gated).
        written = 0
    elif (dataset := _feature_dataset(asset)) is not None:
        feature_set, timeframe = dataset
        vectors = read_quarantined(conn, batch_id, "feature_vectors", vector_schema(feature_set, timeframe))
        state = read_quarantined(conn, batch_id, "feature_state", state_schema(feature_set, timeframe))
        stats = write_features(
            conn,
            FeatureComputation(vectors=vectors, state=state),
            feature_set=feature_set,
            timeframe=timeframe,
            start=start,
            end=end,
            run_id=batch["run_id"],
            shard=shard,
            only=only,
        )
        written = stats["upserted"]
    else:
        raise QuarantineError(f"batch {batch_id} belongs to {asset!r}, which has no release path")
    _record_decision(conn, batch, "released", actor, note)
    return {**batch, "rows_written": written}


def discard(
    conn: sa.Connection, batch_id: int, *, actor: str, note: str, shard_count: int | None = None
) -> dict[str, Any]:
    """Drop a held batch's rows (the batch row and the log entries stay, for the audit trail); its day becomes
    a gap for what it held. ``shard_count``: as for ``release``."""
    if not actor.strip() or not note.strip():
        raise QuarantineError("a discard needs the name of the person who decided it and a note saying why")
    batch = _decided_batch(conn, batch_id, shard_count, "discard")
    # A discarded corporate action row is kept: it is the record of what was refused, and what tells the next run,
    # which reads the file again, that a person has decided on it already.
    for table in ("ohlcv_1m", "ohlcv_1d", "news_events", "feature_vectors", "feature_state"):
        conn.execute(sa.text(f"DELETE FROM quarantine_{table} WHERE batch_id = :b"), {"b": batch_id})
    _record_decision(conn, batch, "discarded", actor, note)
    gaps = _declare_discarded_day(conn, batch, actor, note)
    return {**batch, "gaps": gaps}


def _declare_discarded_day(conn: sa.Connection, batch: dict[str, Any], actor: str, note: str) -> list[int]:
    """A discarded day of bars (or of a dataset's vectors and state) is missing for good: declared a gap, so
    that what follows restarts after it instead of reading across it (events carry no state: no gap)."""
    from marketfs.store.gaps import declare_gap

    asset = batch["asset"]
    if asset in ("raw_ohlcv", "bars_1d"):
        dataset = None
    elif _feature_dataset(asset) is not None:
        dataset = asset
    else:
        return []
    day = batch["partition"].split("|")[0]
    reason = f"quarantine batch {batch['batch_id']} ({asset} {batch['partition']}) discarded by {actor}: {note}"
    return [
        declare_gap(conn, day, day, reason=reason, by=actor, instrument_id=instrument, dataset=dataset)
        for instrument in (batch.get("instruments") or [None])
    ]
