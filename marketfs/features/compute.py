"""Feature vectors from bars: the one function every run path calls."""

from __future__ import annotations

from datetime import datetime

import polars as pl

from marketfs.features.flags import QualityFlag
from marketfs.features.registry import DEFAULT_FEATURE_SET, FeatureSet

KEY_COLUMNS = ["instrument_id", "timeframe", "ts", "feature_set_version"]


def compute_feature_vectors(
    bars: pl.DataFrame,
    timeframe: str,
    *,
    feature_set: FeatureSet = DEFAULT_FEATURE_SET,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pl.DataFrame:
    """Feature vectors for every bar in ``[start, end)``.

    ``bars`` may (and for correct warm-up should) hold up to ``feature_set.max_lookback - 1``
    earlier bars per instrument; those feed the lookback but get no vector of their own.
    Output columns: the key, one column per feature (null where undefined) and ``quality_flags``.
    """
    frame = bars.sort("instrument_id", "ts").with_columns(
        pl.int_range(1, pl.len() + 1).over("instrument_id").alias("_bars_seen")
    )
    frame = frame.with_columns([f.expr().alias(f.name) for f in feature_set.features])
    if start is not None:
        frame = frame.filter(pl.col("ts") >= start)
    if end is not None:
        frame = frame.filter(pl.col("ts") < end)

    names = feature_set.names
    non_finite = pl.any_horizontal([pl.col(n).is_nan() | pl.col(n).is_infinite() for n in names])
    short_history = pl.lit(False)
    for feature in feature_set.features:
        short_history = short_history | (pl.col("_bars_seen") < feature.lookback)
    flags = pl.concat_list(
        [
            pl.when(short_history)
            .then(pl.lit([QualityFlag.INSUFFICIENT_OHLCV.value]))
            .otherwise(pl.lit([], pl.List(pl.String))),
            pl.when(non_finite)
            .then(pl.lit([QualityFlag.COMPUTATION_ERROR.value]))
            .otherwise(pl.lit([], pl.List(pl.String))),
        ]
    )
    return frame.select(
        pl.col("instrument_id"),
        pl.lit(timeframe).alias("timeframe"),
        pl.col("ts"),
        pl.lit(feature_set.version).alias("feature_set_version"),
        *[
            pl.when(pl.col(n).is_nan() | pl.col(n).is_infinite()).then(None).otherwise(pl.col(n)).alias(n)
            for n in names
        ],
        flags.alias("quality_flags"),
    )
