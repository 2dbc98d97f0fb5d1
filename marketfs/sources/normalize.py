"""From bars as delivered to bars as stored: one row per (instrument_id, ts), with source flags."""

from __future__ import annotations

import polars as pl

from marketfs.features.flags import QualityFlag

MISMATCH = QualityFlag.TIMESTAMP_MISMATCH.value


def normalize_bars(delivered: pl.DataFrame) -> pl.DataFrame:
    """Sort and deduplicate bars given in delivery order; flag what the source got wrong.

    TIMESTAMP_MISMATCH goes on a bar whose ts is off the minute grid, or that was delivered more than
    once (the last delivery is kept; the landing source has already collapsed identical copies). The
    order of rows is not a fact about the bars: a file written newest-first holds the same bars as one
    written oldest-first.
    """
    indexed = delivered.with_row_index("_order")
    ts_us = pl.col("ts").dt.epoch("us")
    flagged = indexed.with_columns(
        ((ts_us % 60_000_000 != 0) | (pl.len().over("instrument_id", "ts") > 1)).alias("_mismatch")
    )
    kept = (
        flagged.with_columns(pl.col("_mismatch").any().over("instrument_id", "ts"))
        .sort("_order")
        .unique(subset=["instrument_id", "ts"], keep="last", maintain_order=True)
    )
    return (
        kept.with_columns(
            pl.when(pl.col("_mismatch"))
            .then(pl.lit([MISMATCH]))
            .otherwise(pl.lit([], pl.List(pl.String)))
            .alias("source_flags")
        )
        .drop("_order", "_mismatch")
        .sort("instrument_id", "ts")
    )


def normalize_events(delivered: pl.DataFrame) -> pl.DataFrame:
    """Events with each event_id kept once (its first delivery), sorted by publication time."""
    return delivered.unique(subset=["event_id"], keep="first", maintain_order=True).sort(
        "instrument_id", "published_at", "event_id"
    )
