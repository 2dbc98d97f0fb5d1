"""News-event features over the window [t - W, t) before the instant t a vector became known.

For each vector the events of its window are gathered explicitly and aggregated in a fixed order
(instrument, published_at, event_id), so a value never depends on how many other events were
loaded alongside it.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "instrument_id": pl.String(),
    "published_at": pl.Datetime("us", "UTC"),
    "sentiment": pl.Float64(),
    "confidence": pl.Float64(),
    "source": pl.String(),
}

EVENT_STATS = ("event_count", "sentiment_mean", "sentiment_conf_mean", "sentiment_weighted", "sentiment_std")


def event_feature_names(suffix: str) -> list[str]:
    return [f"{stat}_{suffix}" for stat in EVENT_STATS]


def _spans(keys: pl.DataFrame, ordered: pl.DataFrame, window_us: int) -> pl.DataFrame:
    """For each key row ``_k``: the rows ``[_lo, _hi)`` of ``ordered`` (events sorted by instrument and
    time) of its instrument published in ``[ts - window, ts)``.

    One binary search over all instruments at once, on (instrument rank, microseconds) packed into one
    sorted int64: the same indices a search per instrument finds (that loop cost 0.2 s for one minute of
    500 instruments). Ranges too wide to pack fall back to the loop."""
    instruments = pl.concat([keys["instrument_id"], ordered["instrument_id"]]).unique().sort()
    rank = {name: i for i, name in enumerate(instruments.to_list())}
    times = ordered["published_at"].dt.epoch("us").to_numpy()
    ts = keys["ts"].dt.epoch("us").to_numpy()
    lowest = min([int(ts.min()) - window_us, *([int(times.min())] if times.size else [])])
    highest = max([int(ts.max()), *([int(times.max())] if times.size else [])])
    bits = 42  # ~50 days of microseconds per instrument; 2**21 instruments
    if highest - lowest < 2**bits and len(rank) < 2**21:
        e_rank = ordered["instrument_id"].replace_strict(rank, return_dtype=pl.Int64).to_numpy()
        k_rank = keys["instrument_id"].replace_strict(rank, return_dtype=pl.Int64).to_numpy()
        packed = (e_rank << bits) | (times - lowest)
        hi = np.searchsorted(packed, (k_rank << bits) | (ts - lowest), side="left")
        lo = np.searchsorted(packed, (k_rank << bits) | (ts - window_us - lowest), side="left")
        return pl.DataFrame({"_k": keys["_k"], "_lo": lo.astype(np.uint32), "_hi": hi.astype(np.uint32)})
    by_instrument = {key: frame for (key,), frame in ordered.partition_by("instrument_id", as_dict=True).items()}
    pieces = []
    for (instrument,), group in keys.group_by("instrument_id", maintain_order=True):
        mine = by_instrument.get(instrument, ordered.clear())
        mine_times = mine["published_at"].dt.epoch("us").to_numpy()
        group_ts = group["ts"].dt.epoch("us").to_numpy()
        first = mine["_e"][0] if mine.height else 0
        hi = np.searchsorted(mine_times, group_ts, side="left") + first
        lo = np.searchsorted(mine_times, group_ts - window_us, side="left") + first
        pieces.append(pl.DataFrame({"_k": group["_k"], "_lo": lo, "_hi": hi}))
    return pl.concat(pieces).with_columns(pl.col("_lo").cast(pl.UInt32), pl.col("_hi").cast(pl.UInt32))


def event_features(keys: pl.DataFrame, events: pl.DataFrame, window: timedelta, suffix: str) -> pl.DataFrame:
    """``keys`` (instrument_id, ts) with the five event statistics of each window appended.

    Here ``ts`` is the instant the vector became known (its bar's close, see ``timeframes.py``).
    Windows are [ts - window, ts): an event published before that instant counts, one published
    exactly at it does not (it belongs with the next bar, and with the next day's partition when
    the bar is the day's last); one published exactly ``window`` earlier counts.
    """
    names = event_feature_names(suffix)
    ordered = events.sort("instrument_id", "published_at", "event_id").with_row_index("_e")
    window_us = int(window / timedelta(microseconds=1))
    if keys.is_empty():
        return keys.with_columns([pl.lit(None, pl.Float64).alias(n) for n in names])
    spans = _spans(keys.with_row_index("_k"), ordered, window_us)
    members = (
        spans.with_columns(pl.int_ranges("_lo", "_hi", dtype=pl.UInt32).alias("_e"))
        .explode("_e")
        .drop_nulls("_e")
        .join(ordered.select("_e", "sentiment", "confidence"), on="_e", how="inner")
        .sort("_k", "_e")
    )
    s, c = pl.col("sentiment"), pl.col("confidence")
    stats = members.group_by("_k", maintain_order=True).agg(
        pl.len().alias(names[0]),
        s.mean().alias(names[1]),
        c.mean().alias(names[2]),
        pl.when(c.sum() > 0).then((s * c).sum() / c.sum()).alias(names[3]),
        s.std(ddof=1).alias(names[4]),
    )
    out = keys.with_row_index("_k").join(stats, on="_k", how="left").sort("_k").drop("_k")
    return out.with_columns(pl.col(names[0]).fill_null(0).cast(pl.Float64))
