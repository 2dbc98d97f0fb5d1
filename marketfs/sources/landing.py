"""Bars and events from a landing folder of files, validated at the edge.

``<landing>/bars`` holds CSV or Parquet files of bars, ``<landing>/events`` CSV, Parquet or JSON
lines files of events. Timestamps are ISO 8601; one with an offset is converted to UTC, one
without is taken as UTC. A file that breaks the schema stops the load with a ``SourceFileError``
naming the file, the line and the fix, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl

from marketfs.features.events import EVENT_SCHEMA
from marketfs.sources.base import BAR_SCHEMA, SourceFileError

BAR_SUFFIXES = (".csv", ".parquet")
EVENT_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")


def landing_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` in delivery order (sorted by path), or an error saying how to configure it."""
    if not root.is_dir():
        raise SourceFileError(
            root, "the landing folder does not exist", "create it or set MARKETFS_LANDING_DIR to the folder"
        )
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


@dataclass(frozen=True)
class LandingFolderBars:
    root: Path

    def bars(self, start: datetime, end: datetime) -> pl.DataFrame:
        """Bars in ``[start, end)`` in delivery order (file by file, row by row), not deduplicated."""
        frames = [read_landing_file(p, BAR_SCHEMA, "ts") for p in landing_files(self.root, BAR_SUFFIXES)]
        if not frames:
            return pl.DataFrame(schema=BAR_SCHEMA)
        return pl.concat(frames).filter((pl.col("ts") >= start) & (pl.col("ts") < end))


@dataclass(frozen=True)
class LandingFolderEvents:
    root: Path

    def events(self, start: datetime, end: datetime) -> pl.DataFrame:
        frames = [read_landing_file(p, EVENT_SCHEMA, "published_at") for p in landing_files(self.root, EVENT_SUFFIXES)]
        if not frames:
            return pl.DataFrame(schema=EVENT_SCHEMA)
        return pl.concat(frames).filter((pl.col("published_at") >= start) & (pl.col("published_at") < end))


def _read_raw(path: Path) -> pl.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # Everything as text first, so a bad value is reported with its line instead of a parser error.
            return pl.read_csv(path, infer_schema=False)
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            return pl.read_ndjson(path, infer_schema_length=None)
    except (pl.exceptions.PolarsError, OSError) as exc:
        problem = f"cannot be read ({exc.__class__.__name__}: {str(exc).splitlines()[0]})"
        raise SourceFileError(path, problem, f"deliver a valid {suffix.lstrip('.')} file") from exc
    raise SourceFileError(path, f"unsupported file type {suffix!r}", "deliver .csv, .parquet or .jsonl files")


def read_landing_file(path: Path, schema: dict[str, pl.DataType], ts_column: str) -> pl.DataFrame:
    """One landing file in ``schema``, or a ``SourceFileError`` that says what to fix."""
    raw = _read_raw(path)
    missing = [c for c in schema if c not in raw.columns]
    if missing:
        raise SourceFileError(
            path,
            f"missing column(s) {', '.join(missing)} (found: {', '.join(raw.columns)})",
            f"the file needs columns {', '.join(schema)}",
        )
    raw = raw.select(list(schema)).with_row_index("_row")
    # CSV lines count the header as line 1; other formats report 1-based rows.
    line_offset = 2 if path.suffix.lower() == ".csv" else 1

    def fail(bad: pl.DataFrame, column: str, expected: str) -> None:
        if bad.height:
            row = bad.row(0, named=True)
            raise SourceFileError(
                path,
                f"column {column!r} has {row[column]!r}, not {expected} ({bad.height} such row(s))",
                "correct or remove that row and drop the file again",
                line=int(row["_row"]) + line_offset,
            )

    parsed = []
    for column, dtype in schema.items():
        if column == ts_column:
            values = _parse_ts(raw[column])
            fail(raw.filter(values.is_null()), column, "an ISO 8601 timestamp such as 2024-01-02T14:30:00Z")
            parsed.append(values.alias(column))
        elif dtype == pl.Float64:
            values = pl.col(column).cast(pl.Float64, strict=False)
            fail(raw.filter(values.is_null() & pl.col(column).is_not_null()), column, "a number")
            parsed.append(values)
        else:
            text = pl.col(column).cast(pl.String)
            fail(raw.filter(text.is_null() | (text.str.strip_chars() == "")), column, "a non-empty value")
            parsed.append(text)
    return raw.with_columns(parsed).select(list(schema)).cast(schema)


def _parse_ts(values: pl.Series) -> pl.Series:
    if isinstance(values.dtype, pl.Datetime):
        if values.dtype.time_zone is None:
            return values.dt.replace_time_zone("UTC").dt.cast_time_unit("us")
        return values.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    text = values.cast(pl.String).str.strip_chars().str.replace(r"Z$", "+00:00").str.replace(" ", "T")
    has_offset = text.str.contains(r"[+-]\d{2}:?\d{2}$")
    aware = text.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", strict=False, time_unit="us")
    naive = text.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="us")
    frame = pl.DataFrame({"o": has_offset, "a": aware.dt.convert_time_zone("UTC"), "n": naive})
    return frame.select(
        pl.when(pl.col("o")).then(pl.col("a")).otherwise(pl.col("n").dt.replace_time_zone("UTC")).alias("ts")
    ).to_series()
