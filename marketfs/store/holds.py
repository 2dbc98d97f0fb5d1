"""Held instruments: the instrument-days a gate quarantined, and every later day of those instruments.

A row-level breach (an impossible bar, a value out of range) belongs to one instrument's day: its batch in
``quarantine_batches`` names the instruments (column ``instruments``), the other instruments of the day
are served, and the held ones stay out of every computation from that day on, because their recursions
and windows would continue from what is missing. A hold ends when the batch is released or discarded by a
person, or resolved by a later delivery of the day that passes its gate (``resolve_superseded``).

Which assets hold an instrument's features: its bars (minute and daily), its events and the feature
dataset itself (``feature_holds``). Nothing here imports Dagster; the asset names are the strings the
batches are recorded under.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from marketfs.holds import HeldInstrument, Holds
from marketfs.shards import ALL, Shard

RAW_ASSETS = ("raw_ohlcv", "raw_events")


def feature_holds(dataset: str, timeframe: str) -> tuple[str, ...]:
    """The assets whose holds keep an instrument out of a feature dataset's days."""
    bars = ("raw_ohlcv", "bars_1d") if timeframe == "1d" else ("raw_ohlcv",)
    # A bad corporate action row holds its instrument: the jump it was to explain must not be served unexplained.
    return (*bars, "raw_events", "corporate_actions", dataset)


def read_holds(
    conn: sa.Connection, assets: tuple[str, ...], before: datetime, shard: Shard = ALL, run_id: str | None = None
) -> Holds:
    """The instruments (of ``shard``) held by an open instrument-day batch of ``assets`` that starts before
    ``before``; ``run_id``: only the batches that run opened."""
    rows = conn.execute(
        sa.text(
            "SELECT DISTINCT ON (i) i, window_start, partition, asset, batch_id FROM ("
            "  SELECT unnest(instruments) AS i, window_start, partition, asset, batch_id FROM quarantine_batches"
            "  WHERE status = 'held' AND instruments IS NOT NULL AND asset = ANY(:assets) AND window_start < :before"
            "  AND (CAST(:run AS text) IS NULL OR run_id = :run)"
            ") b ORDER BY i, window_start, batch_id"
        ),
        {"assets": list(assets), "before": before, "run": run_id},
    ).all()
    return Holds(
        {
            r.i: HeldInstrument(r.i, r.window_start, r.partition.split("|")[0], r.asset, r.batch_id)
            for r in rows
            if shard.holds(r.i)
        }
    )


def resolve_superseded(conn: sa.Connection, *, asset: str, partition: str, run_id: str | None) -> list[int]:
    """Close the held batches of ``asset``'s ``partition`` that other runs opened: this run's verdict on the
    day, being written in the same transaction, replaces theirs (the day as now delivered is served, and
    whatever of it still breaches is held again by a batch of this run). Returns the closed batch ids."""
    note = f"resolved by redelivery: {asset} {partition} was judged again and written by run {run_id}"
    rows = conn.execute(
        sa.text(
            "UPDATE quarantine_batches SET status = 'resolved', decided_at = clock_timestamp(), "
            "decided_by = 'pipeline', note = :note "
            "WHERE asset = :asset AND partition = :partition AND status = 'held' AND run_id IS DISTINCT FROM :run "
            "RETURNING batch_id, reason"
        ),
        {"asset": asset, "partition": partition, "run": run_id, "note": note},
    ).all()
    if rows:
        conn.execute(
            sa.text(
                "INSERT INTO quality_log (asset, partition, suite, kind, expectation, success, batch_id, actor, note, "
                "run_id) SELECT :asset, :partition, '(redelivery)', 'resolve', "
                "'resolved quarantine batch ' || b || ' (' || r || ')', true, b, 'pipeline', :note, :run "
                "FROM unnest(CAST(:ids AS bigint[]), CAST(:reasons AS text[])) AS t(b, r)"
            ),
            {
                "asset": asset,
                "partition": partition,
                "run": run_id,
                "ids": [r.batch_id for r in rows],
                "reasons": [r.reason for r in rows],
                "note": note,
            },
        )
    return [r.batch_id for r in rows]


def held_instrument_days(
    conn: sa.Connection, asset: str, start: datetime, end: datetime, shard: Shard = ALL
) -> dict[str, Holds]:
    """Per day (partition day) of ``[start, end)``, the instruments (of ``shard``) an open batch of ``asset``
    holds that day, from the day's start: what a product of that day alone (a daily bar) leaves out."""
    rows = conn.execute(
        sa.text(
            "SELECT split_part(partition, '|', 1) AS day, unnest(instruments) AS i, window_start, batch_id "
            "FROM quarantine_batches WHERE status = 'held' AND instruments IS NOT NULL AND asset = :asset "
            "AND window_start >= :s AND window_start < :e"
        ),
        {"asset": asset, "s": start, "e": end},
    ).all()
    held: dict[str, Holds] = {}
    for r in rows:
        if shard.holds(r.i):
            day = Holds({r.i: HeldInstrument(r.i, r.window_start, r.day, asset, r.batch_id)})
            held[r.day] = held.get(r.day, Holds()).merged(day)
    return held


def batch_evidence(conn: sa.Connection, batch_ids: list[int], examples: int = 3) -> dict[int, str]:
    """Per batch, its failed expectations with a few of their unexpected rows (instrument, ts, value), as the
    quality log kept them: what a failure names when the gate that held the rows ran in another step."""
    rows = conn.execute(
        sa.text(
            "SELECT batch_id, expectation, column_name, observed_value -> 'partial_unexpected' AS rows "
            "FROM quality_log WHERE batch_id = ANY(:ids) AND NOT success AND severity = 'critical' ORDER BY id"
        ),
        {"ids": batch_ids},
    ).all()
    evidence: dict[int, list[str]] = {}
    for r in rows:
        label = f"{r.expectation}({r.column_name})" if r.column_name else r.expectation
        shown = f": e.g. {list(r.rows)[:examples]}" if isinstance(r.rows, list) and r.rows else ""
        evidence.setdefault(r.batch_id, []).append(label + shown)
    return {batch: "; ".join(parts) for batch, parts in evidence.items()}
