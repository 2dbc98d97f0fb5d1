"""Immutable snapshots of feature vectors, for reproducible training sets.

A snapshot copies the vectors of one feature set version and timeframe, for a set of instruments
and a time range, into ``feature_snapshot_rows`` and describes them in a manifest (content hash,
row count, schema, feature definitions, suite versions, upstream partitions). The rows cannot be
updated (a trigger refuses it), so a snapshot reads back byte for byte the same, however the live
table is recomputed later. Deleting is explicit and logged in ``snapshot_log``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import polars as pl
import sqlalchemy as sa
from psycopg import sql

from marketfs.features.registry import FeatureSet, feature_set
from marketfs.store.copy import copy_frame_in, copy_query_out, csv_ready
from marketfs.store.feature_vectors import vector_schema
from marketfs.store.tables import select_list


class SnapshotError(ValueError):
    """An unknown snapshot, or one that cannot be made or read as asked."""


@dataclass(frozen=True)
class Snapshot:
    snapshot_id: str
    content_hash: str
    row_count: int
    manifest: dict[str, Any]


def content_hash(frame: pl.DataFrame) -> str:
    """SHA-256 of the rows sorted by key, serialised as CSV in column order: the bytes a reader gets back."""
    ordered = frame.sort("instrument_id", "timeframe", "ts", "feature_set_version")
    buffer = io.BytesIO()
    csv_ready(ordered).write_csv(buffer, include_header=True, null_value="")
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def _upstream_partitions(rows: pl.DataFrame) -> dict[str, list[str]]:
    """Per UTC day in the snapshot, the Dagster runs that wrote its vectors (from the rows themselves)."""
    by_day = (
        rows.group_by(pl.col("ts").dt.strftime("%Y-%m-%d").alias("day"))
        .agg(pl.col("run_id").drop_nulls().unique().sort())
        .sort("day")
    )
    return {row["day"]: row["run_id"] for row in by_day.iter_rows(named=True)}


def create_snapshot(
    conn: sa.Connection,
    *,
    feature_set_version: str,
    timeframe: str,
    start: datetime,
    end: datetime,
    instruments: list[str] | None = None,
    run_id: str | None = None,
    extra_manifest: dict[str, Any] | None = None,
) -> Snapshot:
    """Freeze the live vectors matching the arguments; the same content gives back the same snapshot."""
    fs = feature_set(feature_set_version)
    rows = _live_rows(conn, fs, timeframe, start, end, instruments)
    if rows.is_empty():
        raise SnapshotError(
            f"no {feature_set_version} {timeframe} vectors in [{start}, {end})"
            + (f" for {instruments}" if instruments else "")
            + ": materialise the feature partitions first"
        )
    digest = content_hash(rows.drop("run_id"))
    snapshot_id = f"{feature_set_version}-{timeframe}-{start:%Y%m%d}-{end:%Y%m%d}-{digest[:12]}"
    existing = conn.execute(
        sa.text("SELECT manifest FROM feature_snapshots WHERE snapshot_id = :id"), {"id": snapshot_id}
    ).scalar()
    if existing is not None:
        _log(conn, snapshot_id, "reuse", None, f"run {run_id} asked for identical content", None)
        return Snapshot(snapshot_id, digest, rows.height, existing)
    schema = vector_schema(fs, timeframe)
    manifest = {
        "snapshot_id": snapshot_id,
        "content_hash": f"sha256:{digest}",
        "row_count": rows.height,
        "feature_set_version": feature_set_version,
        "timeframe": timeframe,
        "instruments": sorted(rows["instrument_id"].unique().to_list()),
        "window": [start.isoformat(), end.isoformat()],
        "schema": [[name, str(dtype)] for name, dtype in schema.items()],  # a list: jsonb reorders keys
        "feature_definitions": {
            f.name: {"version": f.version, "formula": f.formula, "lookback": f.lookback, "inputs": list(f.inputs)}
            for f in fs.for_timeframe(timeframe)
        },
        "upstream_partitions": _upstream_partitions(rows),
        # The corporate actions the vectors were computed with: the series a model was trained on.
        "returns": fs.returns,
        "corporate_actions": _actions_of(conn, sorted(rows["instrument_id"].unique().to_list())),
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(),
        **(extra_manifest or {}),
    }
    conn.execute(
        sa.text(
            "INSERT INTO feature_snapshots (snapshot_id, feature_set_version, timeframe, instruments, window_start, "
            "window_end, row_count, content_hash, manifest, run_id) VALUES (:id, :v, :tf, :inst, :s, :e, :n, :h, "
            "CAST(:m AS jsonb), :run)"
        ),
        {
            "id": snapshot_id,
            "v": feature_set_version,
            "tf": timeframe,
            "inst": manifest["instruments"],
            "s": start,
            "e": end,
            "n": rows.height,
            "h": manifest["content_hash"],
            "m": json.dumps(manifest),
            "run": run_id,
        },
    )
    copy_frame_in(conn, "feature_snapshot_rows", rows.with_columns(pl.lit(snapshot_id).alias("snapshot_id")))
    _log(conn, snapshot_id, "create", None, None, manifest)
    return Snapshot(snapshot_id, digest, rows.height, manifest)


def _actions_of(conn: sa.Connection, instruments: list[str]) -> list[dict[str, Any]]:
    from marketfs.corporate_actions import in_effect
    from marketfs.store.corporate_actions import read_actions

    actions = in_effect(read_actions(conn, instruments))
    return [
        {**row, "ex_date": row["ex_date"].isoformat(), "known_at": row["known_at"].isoformat()}
        for row in actions.iter_rows(named=True)
    ]


def _live_rows(conn, fs: FeatureSet, timeframe, start, end, instruments) -> pl.DataFrame:
    schema = {**vector_schema(fs, timeframe), "run_id": pl.String()}
    where = "feature_set_version = %(v)s AND timeframe = %(tf)s AND ts >= %(s)s AND ts < %(e)s"
    params: dict = {"v": fs.version, "tf": timeframe, "s": start, "e": end}
    if instruments:
        where += " AND instrument_id = ANY(%(i)s)"
        params["i"] = list(instruments)
    query = sql.SQL("SELECT {} FROM feature_vectors WHERE " + where).format(select_list(schema))
    return copy_query_out(conn, query, params, schema).sort("instrument_id", "timeframe", "ts")


def describe_snapshot(conn: sa.Connection, snapshot_id: str) -> dict[str, Any]:
    manifest = conn.execute(
        sa.text("SELECT manifest FROM feature_snapshots WHERE snapshot_id = :id"), {"id": snapshot_id}
    ).scalar()
    if manifest is None:
        known = [s["snapshot_id"] for s in list_snapshots(conn)][-5:]
        raise SnapshotError(f"unknown snapshot {snapshot_id!r}; recent ones: {', '.join(known) or 'none'}")
    return manifest


def read_snapshot(conn: sa.Connection, snapshot_id: str, *, verify: bool = True) -> pl.DataFrame:
    """The snapshot's rows, sorted by key; with ``verify`` their hash must equal the manifest's."""
    manifest = describe_snapshot(conn, snapshot_id)
    fs = feature_set(manifest["feature_set_version"])
    schema = vector_schema(fs, manifest["timeframe"])
    query = sql.SQL("SELECT {} FROM feature_snapshot_rows WHERE snapshot_id = %(id)s").format(select_list(schema))
    rows = copy_query_out(conn, query, {"id": snapshot_id}, schema).sort("instrument_id", "timeframe", "ts")
    if verify and f"sha256:{content_hash(rows)}" != manifest["content_hash"]:
        raise SnapshotError(f"snapshot {snapshot_id} does not match its content hash: its rows were altered")
    return rows


def list_snapshots(conn: sa.Connection) -> list[dict[str, Any]]:
    result = conn.execute(
        sa.text(
            "SELECT snapshot_id, created_at, feature_set_version, timeframe, window_start, window_end, row_count, "
            "content_hash, cardinality(instruments) AS instruments FROM feature_snapshots ORDER BY created_at"
        )
    )
    return [dict(r._mapping) for r in result]


def delete_snapshot(conn: sa.Connection, snapshot_id: str, *, actor: str, note: str) -> dict[str, Any]:
    """Delete a snapshot and its rows; who and why go to ``snapshot_log`` with the manifest."""
    if not actor.strip() or not note.strip():
        raise SnapshotError("deleting a snapshot needs the name of who deletes it and a note saying why")
    manifest = describe_snapshot(conn, snapshot_id)
    _log(conn, snapshot_id, "delete", actor, note, manifest)
    conn.execute(sa.text("DELETE FROM feature_snapshots WHERE snapshot_id = :id"), {"id": snapshot_id})
    return manifest


def _log(conn, snapshot_id: str, action: str, actor, note, manifest) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO snapshot_log (snapshot_id, action, actor, note, manifest) "
            "VALUES (:id, :a, :who, :note, CAST(:m AS jsonb))"
        ),
        {
            "id": snapshot_id,
            "a": action,
            "who": actor,
            "note": note,
            "m": json.dumps(manifest) if manifest is not None else None,
        },
    )
