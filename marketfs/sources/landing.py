"""Bars from a landing folder of CSV or Parquet files, validated at the edge.

Every file must hold the columns of ``BAR_SCHEMA``. Timestamps are ISO 8601; one with an offset
is converted to UTC, one without is taken as UTC. A file that breaks these rules stops the load
with a ``SourceFileError`` naming the file, the line and the fix, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl

from marketfs.sources.base import BAR_SCHEMA, SourceFileError

SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class LandingFolderBars:
    root: Path

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            raise SourceFileError(
                self.root, "the landing folder does not exist", "create it or set MARKETFS_LANDING_DIR to the folder"
            )
        return sorted(p for p in self.root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())

    def bars(self, start: datetime, end: datetime) -> pl.DataFrame:
        frames = [read_bar_file(path) for path in self.files()]
        if not frames:
            return pl.DataFrame(schema=BAR_SCHEMA)
        return pl.concat(frames).filter((pl.col("ts") >= start) & (pl.col("ts") < end)).sort("instrument_id", "ts")


def read_bar_file(path: Path) -> pl.DataFrame:
    """One landing file as bars in ``BAR_SCHEMA``, or a ``SourceFileError`` that says what to fix."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # Everything as text first, so a bad value is reported with its line instead of a parser error.
            raw = pl.read_csv(path, infer_schema=False)
        elif suffix == ".parquet":
            raw = pl.read_parquet(path)
        else:
            raise SourceFileError(path, f"unsupported file type {suffix!r}", "deliver .csv or .parquet files")
    except (pl.exceptions.ComputeError, OSError) as exc:
        raise SourceFileError(
            path, f"cannot be read ({exc.__class__.__name__}: {exc})", "deliver a valid file"
        ) from exc

    missing = [c for c in BAR_SCHEMA if c not in raw.columns]
    if missing:
        raise SourceFileError(
            path,
            f"missing column(s) {', '.join(missing)} (found: {', '.join(raw.columns)})",
            f"the file needs a header with {', '.join(BAR_SCHEMA)}",
        )
    raw = raw.select(list(BAR_SCHEMA)).with_row_index("_row")
    # CSV lines count the header as line 1; Parquet rows are reported 1-based.
    line_offset = 2 if suffix == ".csv" else 1

    def fail(bad: pl.DataFrame, column: str, expected: str) -> None:
        if bad.height:
            row = bad.row(0, named=True)
            raise SourceFileError(
                path,
                f"column {column!r} has {row[column]!r}, not {expected} ({bad.height} such row(s))",
                "correct or remove that row and drop the file again",
                line=int(row["_row"]) + line_offset,
            )

    casts = [pl.col("instrument_id").cast(pl.String)]
    for column in ("open", "high", "low", "close", "volume"):
        parsed = pl.col(column).cast(pl.Float64, strict=False)
        fail(raw.filter(parsed.is_null() & pl.col(column).is_not_null()), column, "a number")
        casts.append(parsed)
    fail(
        raw.filter(pl.col("instrument_id").is_null() | (pl.col("instrument_id").cast(pl.String) == "")),
        "instrument_id",
        "a non-empty instrument id",
    )

    ts = _parse_ts(raw["ts"])
    fail(raw.filter(ts.is_null()), "ts", "an ISO 8601 timestamp such as 2024-01-02T14:30:00Z")
    return raw.with_columns(*casts, ts.alias("ts")).select(list(BAR_SCHEMA)).cast(BAR_SCHEMA)


def _parse_ts(values: pl.Series) -> pl.Series:
    if isinstance(values.dtype, pl.Datetime):
        if values.dtype.time_zone is None:
            return values.dt.replace_time_zone("UTC").dt.cast_time_unit("us")
        return values.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    text = values.cast(pl.String).str.strip_chars().str.replace(r"Z$", "+00:00")
    has_offset = text.str.contains(r"[+-]\d{2}:?\d{2}$")
    aware = text.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", strict=False, time_unit="us").dt.convert_time_zone("UTC")
    aware_space = text.str.to_datetime("%Y-%m-%d %H:%M:%S%.f%:z", strict=False, time_unit="us").dt.convert_time_zone(
        "UTC"
    )
    naive = text.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="us").dt.replace_time_zone("UTC")
    naive_space = text.str.to_datetime("%Y-%m-%d %H:%M:%S%.f", strict=False, time_unit="us").dt.replace_time_zone("UTC")
    frame = pl.DataFrame({"o": has_offset, "a": aware, "b": aware_space, "c": naive, "d": naive_space})
    return frame.select(
        pl.when(pl.col("o")).then(pl.coalesce("a", "b")).otherwise(pl.coalesce("c", "d")).alias("ts")
    ).to_series()
