"""Helper columns some expectations read: properties of a row that no built-in expectation tests.

The suites refer to these by name (see each suite's ``meta.derived_columns``).
"""

from __future__ import annotations

import polars as pl

from marketfs.features.flags import QualityFlag, unexplained_nulls
from marketfs.features.registry import datasets


def for_validation(frame: pl.DataFrame, suite_name: str) -> pl.DataFrame:
    """``frame`` plus the derived columns of its suite; list columns become comma-joined strings."""
    if suite_name.startswith("raw_ohlcv") and "ts" in frame.columns:
        frame = frame.with_columns((pl.col("ts").dt.epoch("us") % 60_000_000).alias("ts_offgrid_us"))
    dataset = datasets().get(suite_name)
    if dataset is not None and "quality_flags" in frame.columns:
        feature_set, timeframe = dataset
        features = [(f.name, f.null_reasons()) for f in feature_set.for_timeframe(timeframe) if f.name in frame.columns]
        flags = pl.col("quality_flags")
        frame = frame.with_columns(
            *[flags.list.contains(flag.value).alias(f"flag_{flag.value}") for flag in QualityFlag],
            unexplained_nulls(features).alias("unexplained_nulls"),
        ).with_columns(
            # A window warming up again after a declared gap is not history that went missing: the
            # INSUFFICIENT_OHLCV share gate counts the vectors short for any other reason.
            (
                pl.col(f"flag_{QualityFlag.INSUFFICIENT_OHLCV.value}") & ~flags.list.contains(QualityFlag.GAP.value)
            ).alias(f"flag_{QualityFlag.INSUFFICIENT_OHLCV.value}")
        )
    # GX's pandas engine cannot hash list cells.
    return frame.with_columns([pl.col(n).list.join(",") for n, t in frame.schema.items() if isinstance(t, pl.List)])
