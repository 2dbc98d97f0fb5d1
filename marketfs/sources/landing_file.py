"""One landing file read as facts: its valid rows, the trading days it holds, what is wrong with it, per day.

A bad row spoils the day it falls on, not the whole folder: a row whose value cannot be read is
the error of the trading day of its ``ts`` (``marketfs/calendars.py``: the session that closes
next; every day of the file when its ``ts`` itself cannot be read). A file that cannot say which
days it holds at all (unreadable, no timestamp column, no readable timestamp) carries one error of
its own.

Instrument ids are trimmed of surrounding whitespace and must then match ``INSTRUMENT_ID``: 1 to
64 characters, none of them whitespace, control (NUL included) or invisible format characters.
Such an id cannot be told apart from a valid one in a listing, or cannot be stored at all (NUL),
so it is refused with the file, the line and the value rather than kept as a second instrument.

Duplicates within one file: identical rows collapse silently; two rows with the same
``conflict_key`` (for bars (instrument_id, ts)) and different values are the file's error for
that day, since the file itself does not say which one is true.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import polars as pl

from marketfs.calendars import Sessions
from marketfs.sources.base import SourceFileError
from marketfs.universe import active_sessions

INSTRUMENT_ID = r"^[^\s\p{C}]{1,64}$"
INSTRUMENT_ID_RULE = "1 to 64 characters, no whitespace, control or invisible characters"
ROW_FIX = "correct or remove that row and drop the file again"
ID_FIX = "write the id as 1 to 64 visible characters, no inner spaces, and drop the file again"
MINUTE = timedelta(minutes=1)
_LINE = "_line"
_DAY = "_day"


@dataclass(frozen=True)
class LandingKind:
    """What a folder of landing files holds: its schema, its time column, its file types."""

    name: str
    schema: dict[str, pl.DataType]
    ts_column: str
    suffixes: tuple[str, ...]
    conflict_key: tuple[str, ...] = ()
    # Added to every parsed timestamp: a source that stamps bars at their close is shifted to the
    # project's convention (stamped at the open) before anything else, days included, reads them.
    ts_shift: timedelta = timedelta(0)
    # Daily bars: each row is one session's bar, its ts (a date, or an instant of the session's trading
    # day) restamped to the session's last minute, so that it is known at the session's close.
    session_bars: bool = False


@dataclass
class FileScan:
    """What one landing file says: valid rows of its sound days, every day it holds, and its errors."""

    path: Path
    rows: pl.DataFrame
    days: list[str] = field(default_factory=list)
    day_errors: dict[str, SourceFileError] = field(default_factory=dict)
    error: SourceFileError | None = None  # the file cannot say which days it holds
    # Bars stamped on a day the calendar is closed: set aside (never served), reported by every run that reads them.
    closed_day: SourceFileError | None = None


def scan_landing_file(path: Path, kind: LandingKind) -> FileScan:
    """Read ``path`` as ``kind``: rows of the days without errors, and a ``SourceFileError`` per bad day."""
    schema, ts_column = kind.schema, kind.ts_column
    empty = pl.DataFrame(schema=schema)
    try:
        raw = _read_raw(path)
    except SourceFileError as exc:
        return FileScan(path, empty, error=exc)
    missing = [c for c in schema if c not in raw.columns]
    missing_error = (
        SourceFileError(
            path,
            f"missing column(s) {', '.join(missing)} (found: {', '.join(raw.columns)})",
            f"the file needs columns {', '.join(schema)}",
        )
        if missing
        else None
    )
    if ts_column in missing:
        return FileScan(path, empty, error=missing_error)
    # CSV lines count the header as line 1; other formats report 1-based rows.
    line_offset = 2 if path.suffix.lower() == ".csv" else 1
    raw = raw.select([c for c in schema if c in raw.columns]).with_row_index(_LINE, offset=line_offset)
    sessions = active_sessions()
    if kind.session_bars:
        ts, day = _session_stamp(raw[ts_column], sessions)
        expected_ts = f"a session date of the {sessions.name} calendar such as 2024-01-02 (or an instant of its day)"
    else:
        ts = _parse_ts(raw[ts_column]) + kind.ts_shift
        day = sessions.trading_day(ts)
        expected_ts = "an ISO 8601 timestamp such as 2024-01-02T14:30:00Z"
    closed_day = None
    if kind.conflict_key and not kind.session_bars:  # minute bars: a closed day's bars were never traded
        closed = sessions.on_closed_day(ts)
        if closed.any():
            closed_day = _closed_day(path, raw.filter(closed), ts.filter(closed), sessions)
            raw, ts, day = raw.filter(~closed), ts.filter(~closed), day.filter(~closed)
    raw = raw.with_columns(day.dt.strftime("%Y-%m-%d").alias(_DAY))
    days = sorted(d for d in raw[_DAY].unique().to_list() if d is not None)
    bad_ts = raw.filter(ts.is_null())
    ts_problem = _problem(bad_ts, ts_column, expected_ts)
    if not days:
        error = ts_problem(path) if bad_ts.height else closed_day
        return FileScan(path, empty, error=error)
    if missing_error is not None:
        return FileScan(path, empty, days=days, day_errors=dict.fromkeys(days, missing_error))

    errors: dict[str, SourceFileError] = {}
    if bad_ts.height:  # a row of no known day: every day of the file is in doubt
        errors = dict.fromkeys(days, ts_problem(path))
    parsed, checks = _parsed_columns(raw, kind, ts)
    for column, bad, expected, fix in checks:  # offenders from the raw frame: the message quotes the value as delivered
        for day, offenders in raw.filter(bad & pl.col(_DAY).is_not_null()).group_by(_DAY, maintain_order=True):
            errors.setdefault(day[0], _problem(offenders, column, expected, fix)(path))
    rows = (
        raw.with_columns(parsed)
        .filter(pl.col(_DAY).is_not_null() & ~pl.col(_DAY).is_in(list(errors)))
        .unique(subset=list(schema), keep="first", maintain_order=True)
    )
    if kind.conflict_key:
        conflicts = rows.filter(pl.len().over(kind.conflict_key) > 1).sort(_LINE)
        for day, offenders in conflicts.group_by(_DAY, maintain_order=True):
            errors.setdefault(day[0], _conflict(path, offenders, kind.conflict_key))
        rows = rows.filter(~pl.col(_DAY).is_in(list(errors)))
    return FileScan(path, rows.select(list(schema)).cast(schema), days=days, day_errors=errors, closed_day=closed_day)


def _closed_day(path: Path, rows: pl.DataFrame, ts: pl.Series, sessions) -> SourceFileError:
    """The verdict on a file's bars stamped on closed days: how many, the first line, and which day."""
    first = rows.row(0, named=True)
    local = ts.dt.convert_time_zone(sessions.tz).dt.date()
    days = sorted(set(local.to_list()))
    named = ", ".join(f"{d} ({sessions.closed_reason(d)})" for d in days[:5])
    return SourceFileError(
        path,
        f"{rows.height} bar(s) stamped on a day the {sessions.name} calendar is closed: {named} "
        f"(first: {first.get('instrument_id')} {ts[0]}); they are set aside, not ingested or served",
        "correct their timestamps if they are another session's bars, or remove them from the file "
        f"(the universe's calendar is {sessions.name}: MARKETFS_UNIVERSE)",
        line=int(first[_LINE]),
    )


def read_landing_file(path: Path, schema: dict[str, pl.DataType], ts_column: str) -> pl.DataFrame:
    """Every row of one landing file in ``schema``, or the file's first ``SourceFileError``."""
    scan = scan_landing_file(path, LandingKind(path.parent.name, schema, ts_column, (path.suffix.lower(),)))
    if scan.error is not None:
        raise scan.error
    if scan.day_errors:
        raise min(scan.day_errors.values(), key=lambda e: e.line or 0)
    return scan.rows


def _parsed_columns(raw: pl.DataFrame, kind: LandingKind, ts: pl.Series) -> tuple[list, list]:
    """The typed columns, and per column the rows that cannot be read, with what was expected instead."""
    parsed: list[pl.Expr | pl.Series] = [ts.alias(kind.ts_column)]
    checks: list[tuple[str, pl.Expr, str, str]] = []
    for column, dtype in kind.schema.items():
        if column == kind.ts_column:
            continue
        source = pl.col(column)
        if dtype == pl.Float64:
            text = source.str.strip_chars() if raw.schema[column] == pl.String else source
            values = text.cast(pl.Float64, strict=False)
            checks.append((column, values.is_null() & source.is_not_null(), "a number", ROW_FIX))
            parsed.append(values.alias(column))
            continue
        text = source.cast(pl.String).str.strip_chars()
        if column == "instrument_id":
            bad = text.is_null() | ~text.str.contains(INSTRUMENT_ID)
            checks.append((column, bad, f"an instrument id ({INSTRUMENT_ID_RULE})", ID_FIX))
        else:
            checks.append((column, text.is_null() | (text == ""), "a non-empty value", ROW_FIX))
        parsed.append(text.alias(column))
    return parsed, checks


def _problem(offenders: pl.DataFrame, column: str, expected: str, fix: str = ROW_FIX):
    """A function of the path giving the error of the first offending row."""

    def error(path: Path) -> SourceFileError:
        row = offenders.row(0, named=True)
        return SourceFileError(
            path,
            f"column {column!r} has {row[column]!r}, not {expected} ({offenders.height} such row(s))",
            fix,
            line=int(row[_LINE]),
        )

    return error


def _conflict(path: Path, offenders: pl.DataFrame, key: tuple[str, ...]) -> SourceFileError:
    first = offenders.row(0, named=True)
    same = offenders.filter(pl.all_horizontal(pl.col(c) == first[c] for c in key))
    lines = ", ".join(str(n) for n in same[_LINE].to_list())
    where = " ".join(str(first[c]) for c in key)
    return SourceFileError(
        path,
        f"{where} appears on lines {lines} with different values ({offenders.height} such row(s))",
        "keep one row per " + ", ".join(key) + " in the file and drop it again",
        line=int(first[_LINE]),
    )


MAX_BYTES_ENV = "MARKETFS_LANDING_MAX_BYTES"
DEFAULT_MAX_BYTES = 512 * 1024**2


def max_file_bytes() -> int:
    """The largest landing file read (``$MARKETFS_LANDING_MAX_BYTES``, default 512 MiB)."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    try:
        return int(raw) if raw else DEFAULT_MAX_BYTES
    except ValueError:
        raise SourceFileError(
            Path(raw), f"{MAX_BYTES_ENV}={raw!r} is not a number of bytes", "give a whole number, e.g. 536870912"
        ) from None


def _read_raw(path: Path) -> pl.DataFrame:
    suffix = path.suffix.lower()
    # A file is read whole, as text first: its memory is several times its size. One over the limit (a
    # year in one file, a truncated or junk file) is refused before it is opened, and blocks no day.
    try:
        size, limit = path.stat().st_size, max_file_bytes()
    except OSError as exc:
        raise SourceFileError(path, f"cannot be read ({exc})", "deliver a readable file") from exc
    if size > limit:
        raise SourceFileError(
            path,
            f"is {size / 1024**2:,.0f} MiB, over the {limit / 1024**2:,.0f} MiB a landing file may hold "
            f"({MAX_BYTES_ENV}); not read",
            "split it into files of a day or a few days each (or remove it if it is not a delivery), "
            f"or raise {MAX_BYTES_ENV} if this machine has the memory (about 10 times the file's size)",
        )
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


def _session_stamp(values: pl.Series, sessions: Sessions) -> tuple[pl.Series, pl.Series]:
    """(ts, session) of daily bars: a date-only value names its session (null when it is none, e.g. a
    holiday), an instant the session of its trading day; ts is that session's last minute."""
    text = values.cast(pl.String).str.strip_chars()
    dated = text.str.to_date("%Y-%m-%d", strict=False)
    date_only = dated.is_not_null() & (text.str.len_chars() == 10)
    session = pl.select(
        pl.when(date_only)
        .then(pl.when(dated.is_in(sessions.days.implode())).then(dated))
        .otherwise(sessions.trading_day(_parse_ts(values)))
    ).to_series()
    closes = pl.DataFrame({"session": sessions.days, "_close": sessions.closes})
    stamped = pl.DataFrame({"session": session}).join(closes, on="session", how="left", maintain_order="left")
    return (stamped["_close"] - MINUTE).alias("ts"), session


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
