"""Reading features back: point-in-time correct for training, newest for inference. No Dagster needed.

    from marketfs.retrieval import training_frame, latest

    frame = training_frame(entities, ["ret_1", "rsi_14"], tolerance=timedelta(minutes=5))
    row = latest(["SYN001"], ["ret_1", "rsi_14"])

Semantics follow Feast's point-in-time join (``get_historical_features``): for each entity row
(instrument_id, ts) the vector with the greatest vector.ts <= ts and ts - vector.ts <= tolerance
(Feast's ``ttl``); rows without such a vector keep nulls; entity rows keep their order, and
duplicates stay duplicates. The join runs inside PostgreSQL (entities are COPYed into a temporary
table and each looks up one index entry), so memory grows with the result, not with the table.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import timedelta
from functools import lru_cache
from typing import Any, Literal

import pandas as pd
import polars as pl
import psycopg
import sqlalchemy as sa
from psycopg import sql

from marketfs.db import engine_for, resolve_dsn
from marketfs.features.registry import DEFAULT_FEATURE_SET, feature_set
from marketfs.store.copy import EPOCH_US, copy_frame_in, copy_query_out

Output = Literal["polars", "pandas"]


class RetrievalError(ValueError):
    """A request the caller can fix: unknown feature, timeframe or snapshot, naive timestamps, empty
    entities, a negative tolerance, NUL bytes in text."""


def _text(value: object, what: str) -> str:
    """A string argument PostgreSQL can hold: text columns cannot contain NUL bytes."""
    if not isinstance(value, str):
        raise RetrievalError(f"{what} must be a string, not {type(value).__name__} ({value!r})")
    if "\x00" in value:
        raise RetrievalError(f"{what} {value!r} contains a NUL byte; remove it")
    return value


def _features(names: Sequence[str], version: str, timeframe: str) -> list[str]:
    try:
        fs = feature_set(_text(version, "feature_set_version"))
        known = fs.names(_text(timeframe, "timeframe"))
    except KeyError as exc:
        raise RetrievalError(exc.args[0]) from None
    if isinstance(names, str):
        names = [names]
    names = [_text(n, "feature name") for n in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RetrievalError(
            f"unknown feature(s) {', '.join(unknown)} for {version} {timeframe}; known: {', '.join(known)}"
        )
    if not names:
        raise RetrievalError("ask for at least one feature")
    return list(dict.fromkeys(names))


def _entities(entities: pl.DataFrame | pd.DataFrame) -> pl.DataFrame:
    frame = pl.from_pandas(entities) if isinstance(entities, pd.DataFrame) else entities
    missing = {"instrument_id", "ts"} - set(frame.columns)
    if missing:
        raise RetrievalError(f"entities need columns instrument_id and ts; missing {', '.join(sorted(missing))}")
    if frame.is_empty():
        raise RetrievalError("entities is empty: pass at least one (instrument_id, ts) row")
    dtype = frame.schema["ts"]
    if not isinstance(dtype, pl.Datetime):
        raise RetrievalError(f"entities.ts must be timestamps, not {dtype}")
    if dtype.time_zone is None:
        raise RetrievalError(
            "entities.ts is timezone-naive; make it explicit, e.g. df['ts'].dt.tz_localize('UTC') in pandas or "
            ".dt.replace_time_zone('UTC') in polars"
        )
    if frame["ts"].null_count() or frame["instrument_id"].null_count():
        raise RetrievalError("entities has null instrument_id or ts values")
    if frame.schema["instrument_id"] not in (pl.String, pl.Categorical, pl.Enum):
        raise RetrievalError(f"entities.instrument_id must be text, not {frame.schema['instrument_id']}")
    ids = frame["instrument_id"].cast(pl.String)
    with_nul = frame.with_row_index("row").filter(ids.str.contains("\x00", literal=True))
    if with_nul.height:
        row = with_nul.row(0, named=True)
        raise RetrievalError(
            f"entities row {row['row']} has instrument_id {row['instrument_id']!r} with a NUL byte "
            f"({with_nul.height} such row(s)); remove the NUL bytes"
        )
    return frame


def _version(feature_set: str | None, feature_set_version: str | None) -> str:
    """The feature set asked for, by either name of the argument (``feature_set_version`` is the older one)."""
    if feature_set is not None and feature_set_version is not None and feature_set != feature_set_version:
        raise RetrievalError(
            f"feature_set={feature_set!r} and feature_set_version={feature_set_version!r} disagree; give one"
        )
    return feature_set or feature_set_version or DEFAULT_FEATURE_SET.version


def training_frame(
    entities: pl.DataFrame | pd.DataFrame,
    features: Sequence[str],
    tolerance: timedelta,
    snapshot: str | None = None,
    *,
    timeframe: str = "1m",
    feature_set: str | None = None,
    feature_set_version: str | None = None,
    include_feature_ts: bool = False,
    output: Output = "polars",
    dsn: str | None = None,
) -> pl.DataFrame | pd.DataFrame:
    """Entity rows with, for each, the features of the latest vector at or before its ts (within ``tolerance``).

    With ``snapshot`` the vectors come from that frozen snapshot (its version and timeframe), else
    from the live table of ``feature_set`` (a declared version, default fs_v1; ``feature_set_version``
    is its older name). ``include_feature_ts`` adds the matched vector's ts as ``feature_ts``.
    """
    feature_set_version = _version(feature_set, feature_set_version)
    if not isinstance(tolerance, timedelta):
        raise RetrievalError(f"tolerance must be a timedelta, e.g. timedelta(minutes=5), not {tolerance!r}")
    if tolerance < timedelta(0):
        raise RetrievalError(f"tolerance must be >= 0, not {tolerance}")
    if snapshot is not None:
        _text(snapshot, "snapshot")
    frame = _entities(entities)
    engine = engine_for(dsn or resolve_dsn())
    with engine.begin() as conn:
        if snapshot is not None:
            from marketfs.snapshots import SnapshotError, describe_snapshot

            try:
                manifest = describe_snapshot(conn, snapshot)
            except SnapshotError as exc:
                raise RetrievalError(str(exc)) from None
            feature_set_version, timeframe = manifest["feature_set_version"], manifest["timeframe"]
        names = _features(features, feature_set_version, timeframe)
        conn.execute(
            sa.text("CREATE TEMP TABLE pit_entities (row_no bigint, instrument_id text, ts timestamptz) ON COMMIT DROP")
        )
        keyed = frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("row_no"), "instrument_id", "ts")
        copy_frame_in(conn, "pit_entities", keyed)
        conn.execute(sa.text("ANALYZE pit_entities"))
        source, scope = (
            (sql.Identifier("feature_snapshot_rows"), sql.SQL("v.snapshot_id = %(snapshot)s"))
            if snapshot is not None
            else (
                sql.Identifier("feature_vectors"),
                sql.SQL("v.feature_set_version = %(version)s AND v.timeframe = %(tf)s"),
            )
        )
        query = sql.SQL(
            "SELECT e.row_no, {feature_ts}, {cols} FROM pit_entities e LEFT JOIN LATERAL ("
            "SELECT v.ts, {inner} FROM {source} v WHERE v.instrument_id = e.instrument_id AND {scope} "
            "AND v.ts <= e.ts AND v.ts >= e.ts - %(tolerance)s ORDER BY v.ts DESC LIMIT 1) m ON true"
        ).format(
            feature_ts=sql.SQL(EPOCH_US).format(col=sql.Identifier("m", "ts")),
            cols=sql.SQL(", ").join(sql.Identifier("m", n) for n in names),
            inner=sql.SQL(", ").join(sql.Identifier("v", n) for n in names),
            source=source,
            scope=scope,
        )
        params = {"snapshot": snapshot, "version": feature_set_version, "tf": timeframe, "tolerance": tolerance}
        schema = {"row_no": pl.Int64(), "feature_ts": pl.Datetime("us", "UTC"), **{n: pl.Float64() for n in names}}
        matched = copy_query_out(conn, query, params, schema)
    result = frame.with_row_index("row_no").with_columns(pl.col("row_no").cast(pl.Int64))
    result = result.join(matched, on="row_no", how="left").sort("row_no").drop("row_no")
    if not include_feature_ts:
        result = result.drop("feature_ts")
    return result.to_pandas() if output == "pandas" else result


class OnlineReader:
    """One open connection and a prepared statement: what a model server keeps per worker."""

    def __init__(self, dsn: str | None = None) -> None:
        self._dsn = dsn or resolve_dsn()
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True, prepare_threshold=0, options="-c timezone=UTC")
        return self._conn

    def latest(
        self,
        instruments: Sequence[str],
        features: Sequence[str],
        timeframe: str = "1m",
        *,
        feature_set: str | None = None,
        feature_set_version: str | None = None,
        output: Literal["polars", "pandas", "records"] = "polars",
    ) -> Any:
        """The newest vector per instrument (instruments without one get nulls), with its ts and flags."""
        feature_set_version = _version(feature_set, feature_set_version)
        if isinstance(instruments, str):
            instruments = [instruments]
        if not instruments:
            raise RetrievalError("ask for at least one instrument")
        instruments = [_text(i, "instrument") for i in instruments]
        names = _features(features, feature_set_version, timeframe)
        query = sql.SQL(
            "SELECT i.instrument_id, m.ts, m.quality_flags, {cols} FROM unnest(%s::text[]) WITH ORDINALITY "
            "i(instrument_id, n) LEFT JOIN LATERAL (SELECT v.ts, v.quality_flags, {inner} FROM feature_vectors v "
            "WHERE v.instrument_id = i.instrument_id AND v.feature_set_version = %s AND v.timeframe = %s "
            "ORDER BY v.ts DESC LIMIT 1) m ON true ORDER BY i.n"
        ).format(
            cols=sql.SQL(", ").join(sql.Identifier("m", n) for n in names),
            inner=sql.SQL(", ").join(sql.Identifier("v", n) for n in names),
        )
        with self._lock:
            try:
                rows = self._connection().execute(query, (list(instruments), feature_set_version, timeframe)).fetchall()
            except psycopg.OperationalError:
                # A dropped connection (server restart, idle timeout): reconnect once, then give up loudly.
                self._conn = None
                rows = self._connection().execute(query, (list(instruments), feature_set_version, timeframe)).fetchall()
        columns = ["instrument_id", "ts", "quality_flags", *names]
        if output == "records":
            return [dict(zip(columns, row, strict=True)) for row in rows]
        frame = pl.DataFrame(
            rows,
            schema={
                "instrument_id": pl.String,
                "ts": pl.Datetime("us", "UTC"),
                "quality_flags": pl.List(pl.String),
                **{n: pl.Float64 for n in names},
            },
            orient="row",
        )
        return frame.to_pandas() if output == "pandas" else frame

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


_readers: dict[str, OnlineReader] = {}


@lru_cache(maxsize=1)
def _default_dsn() -> str:
    # Resolved once per process: starting or probing the embedded server costs milliseconds.
    return resolve_dsn()


def latest(
    instruments: Sequence[str],
    features: Sequence[str],
    timeframe: str = "1m",
    *,
    feature_set: str | None = None,
    feature_set_version: str | None = None,
    output: Literal["polars", "pandas", "records"] = "polars",
    dsn: str | None = None,
) -> Any:
    """The newest vector per instrument, for inference; reuses one connection per DSN and process."""
    key = dsn or _default_dsn()
    reader = _readers.get(key)
    if reader is None:
        reader = _readers[key] = OnlineReader(key)
    version = _version(feature_set, feature_set_version)
    return reader.latest(instruments, features, timeframe, feature_set=version, output=output)


__all__ = ["OnlineReader", "RetrievalError", "latest", "training_frame"]
