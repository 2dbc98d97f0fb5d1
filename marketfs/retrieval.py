"""Reading features back: point-in-time correct for training, newest for inference. No Dagster needed.

    from marketfs.retrieval import training_frame, latest

    frame = training_frame(entities, ["ret_1", "rsi_14"], tolerance=timedelta(minutes=5))
    row = latest(["SYN001"], ["ret_1", "rsi_14"])

Semantics follow Feast's point-in-time join (``get_historical_features``), on the instant a vector
became known: for each entity row (instrument_id, ts) the vector with the greatest known_at <= ts
and ts - known_at <= tolerance (Feast's ``ttl``), where known_at = vector.ts + 1 minute, the close of
the bar it is stamped with (``marketfs/features/timeframes.py``); rows without such a vector keep
nulls; entity rows keep their order, and duplicates stay duplicates. The join runs inside
PostgreSQL (entities are COPYed into a temporary table and each looks up one index entry), so
memory grows with the result, not with the table. It talks to the server through psycopg alone:
SQLAlchemy's import (0.19 s) is not paid by a training script or a model server.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, Literal

import polars as pl
import psycopg
from psycopg import sql

from marketfs.db import CONNECT_ARGS, resolve_dsn
from marketfs.features import registry
from marketfs.features.registry import DEFAULT_FEATURE_SET, feature_set
from marketfs.features.timeframes import TIMEFRAMES
from marketfs.store.copy import EPOCH_US, copy_frame_in, copy_query_out

if TYPE_CHECKING:  # pandas is imported only by callers who use it: an inference server need not load it
    import pandas as pd

Output = Literal["polars", "pandas"]


class RetrievalError(ValueError):
    """A request the caller can fix: unknown feature, timeframe, feature set or snapshot, a malformed
    feature reference, naive timestamps, empty entities, a negative tolerance, NUL bytes in text."""


def _text(value: object, what: str) -> str:
    """A string argument PostgreSQL can hold: text columns cannot contain NUL bytes."""
    if not isinstance(value, str):
        raise RetrievalError(f"{what} must be a string, not {type(value).__name__} ({value!r})")
    if "\x00" in value:
        raise RetrievalError(f"{what} {value!r} contains a NUL byte; remove it")
    return value


def _features(names: Sequence[str], version: str, timeframe: str, references: Sequence[str] | None = None) -> list[str]:
    """``names`` checked against ``version``'s ``timeframe``; ``references`` (as the caller wrote them,
    beside each name) are what an unknown name is reported as."""
    try:
        fs = feature_set(_text(version, "feature_set_version"))
        known = fs.names(_text(timeframe, "timeframe"))
    except KeyError as exc:
        raise RetrievalError(exc.args[0]) from None
    if isinstance(names, str):
        names = [names]
    names = [_text(n, "feature name") for n in names]
    written = references or names
    unknown = [r for n, r in zip(names, written, strict=True) if n not in known]
    if unknown:
        raise RetrievalError(
            f"unknown feature(s) {', '.join(unknown)} for {version} {timeframe}; known: {', '.join(known)}"
        )
    if not names:
        raise RetrievalError("ask for at least one feature")
    return list(dict.fromkeys(names))


def _entities(entities: pl.DataFrame | pd.DataFrame) -> pl.DataFrame:
    if isinstance(entities, pl.DataFrame):
        frame = entities
    elif type(entities).__module__.partition(".")[0] == "pandas":
        frame = pl.from_pandas(entities)
    else:
        raise RetrievalError(f"entities must be a polars or pandas DataFrame, not {type(entities).__name__}")
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
    # Only these two columns: the entities may have a column of any name, "row" included.
    with_nul = frame.select(pl.int_range(pl.len()).alias("row"), ids).filter(ids.str.contains("\x00", literal=True))
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
    tolerance: timedelta | None,
    snapshot: str | None = None,
    *,
    timeframe: str = "1m",
    feature_set: str | None = None,
    feature_set_version: str | None = None,
    include_feature_ts: bool = False,
    include_flags: bool = False,
    full_feature_names: bool = False,
    as_of: datetime | Literal["entity"] | None = None,
    output: Output = "polars",
    dsn: str | None = None,
) -> pl.DataFrame | pd.DataFrame:
    """Entity rows with, for each, the features of the newest vector already known at its ts.

    A vector stamped ``ts`` is known from ``ts + 1 minute`` on (its bar's close; see
    ``marketfs/features/timeframes.py``), and matches an entity row at ``t`` when it became known at
    or before ``t`` and at most ``tolerance`` before it (``None``: no bound; a tolerance reaching back
    before PostgreSQL's first instant, 4714 BC, such as ``timedelta.max``, is no bound either).

    ``features`` are names of ``timeframe``'s vectors, ``"<timeframe>:<name>"`` (``"1d:rsi_14"``) for
    another timeframe of the same feature set, or ``"<feature set>:<timeframe>:<name>"``
    (``"fs_v2:1m:rsi_7"``, as Feast's ``view:feature``) for another feature set; each (feature set,
    timeframe) is joined against its own vectors by the same rules. With ``snapshot`` the vectors
    come from that frozen snapshot (its version and timeframe only), else from the live table of
    ``feature_set`` (default fs_v1; ``feature_set_version`` is its older name).
    ``include_feature_ts`` adds the matched vector's stamp and the instant it became known
    (``feature_ts``, ``feature_known_at``), ``include_flags`` its ``quality_flags``; with several
    timeframes these are suffixed ``_<timeframe>`` (``_<feature set>_<timeframe>`` across feature
    sets). ``full_feature_names`` names every added column ``<feature set>_<timeframe>__<name>`` (as
    Feast's ``full_feature_names``); without it, an added column that an entity column or another
    request already has is refused.

    ``as_of`` reads the vectors as they were served at an instant: each row gets the newest vector
    that was point-in-time valid for it *and* already written, and not yet replaced, at ``as_of`` (a
    timezone-aware datetime, or ``"entity"`` for each row's own ts: what a live model would have
    seen). Replaced versions come from ``feature_vectors_history``. Without it, the current values.
    """
    version = _version(feature_set, feature_set_version)
    if tolerance is not None and not isinstance(tolerance, timedelta):
        raise RetrievalError(f"tolerance must be a timedelta, e.g. timedelta(minutes=5), or None, not {tolerance!r}")
    if tolerance is not None and tolerance < timedelta(0):
        raise RetrievalError(f"tolerance must be >= 0, not {tolerance}")
    if snapshot is not None:
        _text(snapshot, "snapshot")
    _check_as_of(as_of, snapshot)
    frame = _entities(entities)
    dsn = dsn or resolve_dsn()
    if snapshot is not None:
        from marketfs.db import engine_for
        from marketfs.snapshots import SnapshotError, describe_snapshot

        with engine_for(dsn).connect() as conn:
            try:
                manifest = describe_snapshot(conn, snapshot)
            except SnapshotError as exc:
                raise RetrievalError(str(exc)) from None
        version, timeframe = manifest["feature_set_version"], manifest["timeframe"]
    groups = _requests(features, version, timeframe, snapshot)
    columns = _output_columns(frame, groups, include_feature_ts, include_flags, full_feature_names)
    tolerance = _unbounded_if_beyond(tolerance, frame)
    keyed = frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("row_no"), "instrument_id", "ts")

    def match(part: pl.DataFrame) -> dict[tuple[str, str], pl.DataFrame]:
        # One transaction per part (committed when the block ends): the temporary table lives in it.
        with _connect(dsn) as conn:
            conn.execute(
                "CREATE TEMP TABLE pit_entities (row_no bigint, instrument_id text, ts timestamptz) ON COMMIT DROP"
            )
            # Sorted as the index is: each lookup then lands next to the previous one.
            copy_frame_in(conn, "pit_entities", part.sort("instrument_id", "ts"))
            conn.execute("ANALYZE pit_entities")
            # Each (feature set, timeframe) is its own point-in-time join against its own vectors.
            return {
                (v, tf): _point_in_time(conn, names, v, tf, tolerance, snapshot, include_flags, as_of)
                for (v, tf), names in groups.items()
            }

    parts = _parts(keyed)
    if len(parts) == 1:
        matches = [match(parts[0])]
    else:
        # Each lookup is an index probe on one core of the server: instruments split over a few
        # connections use a few cores (2 here: 0.80 s -> 0.45 s for 100,000 rows).
        with ThreadPoolExecutor(len(parts)) as pool:
            matches = list(pool.map(match, parts))
    return _assemble(frame, matches, columns, output)


def _assemble(
    frame: pl.DataFrame,
    matches: list[dict[tuple[str, str], pl.DataFrame]],
    columns: dict[tuple[str, str], dict[str, str]],
    output: Output,
) -> pl.DataFrame | pd.DataFrame:
    """The entity rows, in their order, with each request's matched columns beside them."""
    row = _free_name(frame.columns, "_marketfs_row")  # the entities may have any column, row_no included
    result = frame.with_row_index(row).with_columns(pl.col(row).cast(pl.Int64))
    for key, mapping in columns.items():
        matched = pl.concat([m[key] for m in matches])
        result = result.join(
            matched.select(pl.col("row_no").alias(row), *[pl.col(k).alias(v) for k, v in mapping.items()]),
            on=row,
            how="left",
        )
    result = result.sort(row).drop(row)
    return result.to_pandas() if output == "pandas" else result


def _free_name(taken: Sequence[str], base: str) -> str:
    """``base``, with underscores before it until no column in ``taken`` has that name."""
    name = base
    while name in taken:
        name = f"_{name}"
    return name


# PostgreSQL's first instant: no vector is older, so a window reaching before it bounds nothing.
_FIRST_INSTANT = sql.SQL("'4714-11-24 00:00:00+00 BC'::timestamptz")
_FIRST_INSTANT_US = -210_866_803_200_000_000  # the same, in microseconds since 1970
_US = timedelta(microseconds=1)


def _unbounded_if_beyond(tolerance: timedelta | None, entities: pl.DataFrame) -> timedelta | None:
    """``None`` for a tolerance reaching before PostgreSQL's first instant from every entity row
    (``timedelta.max``, say): it bounds nothing, and the server could not compute where it starts."""
    if tolerance is None:
        return None
    latest_us = entities["ts"].dt.epoch("us").max()
    return None if tolerance // _US >= latest_us - _FIRST_INSTANT_US else tolerance


def _window_start(ts: sql.Composable) -> sql.Composed:
    """``ts - lag - tolerance`` (params ``lag``, ``tolerance``), at PostgreSQL's first instant for a row whose
    window reaches before it: the subtraction never leaves the timestamps the server can hold."""
    return sql.SQL("GREATEST({ts}, {first} + %(lag)s + %(tolerance)s) - %(lag)s - %(tolerance)s").format(
        ts=ts, first=_FIRST_INSTANT
    )


def _connect(dsn: str) -> psycopg.Connection:
    """A connection for one bulk read, in UTC, with no server-side prepares (as ``engine_for``'s)."""
    return psycopg.connect(dsn, **CONNECT_ARGS)


# Entity rows below which one connection does it all (a connection and a temp table cost ~5 ms).
PARALLEL_FROM_ROWS = 20_000


def _parts(keyed: pl.DataFrame) -> list[pl.DataFrame]:
    """Entity rows split by instrument over ``$MARKETFS_RETRIEVAL_CONNECTIONS`` (default: the CPUs here, at most 4)."""
    workers = int(os.environ.get("MARKETFS_RETRIEVAL_CONNECTIONS", "0")) or min(os.cpu_count() or 1, 4)
    if workers <= 1 or keyed.height < PARALLEL_FROM_ROWS:
        return [keyed]
    # Instruments to connections by rows, largest first onto the lightest: the parts finish together.
    loads = [0] * workers
    part_of: dict[str, int] = {}
    counts = keyed.group_by("instrument_id").len().sort(["len", "instrument_id"], descending=[True, False])
    for instrument, rows in counts.iter_rows():
        lightest = loads.index(min(loads))
        part_of[instrument] = lightest
        loads[lightest] += rows
    bucket = pl.col("instrument_id").replace_strict(part_of, return_dtype=pl.Int64)
    return [p for p in keyed.with_columns(bucket.alias("_part")).partition_by("_part", include_key=False) if p.height]


@lru_cache(maxsize=256)
def _known_features(features: tuple[str, ...], version: str, timeframe: str) -> tuple[str, ...]:
    """``_features`` for the online path, remembered: the declarations do not change under a running process."""
    return tuple(_features(list(features), version, timeframe))


# Rows a lookup that lands in a columnstore chunk decompresses: its instrument's batch there (up to 1,000 rows).
COLUMNSTORE_BATCH_ROWS = 1000


def _merge_wanted(conn: psycopg.Connection, tolerance: timedelta | None, lag: timedelta, timeframe: str) -> bool:
    """Whether the merge reads fewer rows than the lookups would (or ``MARKETFS_PIT_METHOD`` says which).

    A lookup per entity row decompresses the batch it lands in, again for every row of that batch:
    4.2x slower than in the rowstore (docs/benchmarks.md); the merge reads each entity instrument's
    vectors over the whole range once (with ``tolerance=None`` its whole history). So: lookups landing in
    columnstore chunks cost a batch each and the others a row; the merge costs its instruments' rows over
    the range, at the timeframe's rows per day. Sparse entities over a long history (200 rows on the
    newest day over 60 days: lookups 0.042 s, the merge 0.228 s) are looked up; dense ones are merged.
    """
    method = os.environ.get("MARKETFS_PIT_METHOD", "auto").strip().lower()
    if method in ("merge", "lookup"):
        return method == "merge"
    if not conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'").fetchone()[0]:
        return False
    chunks = sql.SQL(
        "FROM timescaledb_information.chunks WHERE hypertable_name = 'feature_vectors' "
        "AND hypertable_schema = current_schema()"
    )
    held = sql.SQL("(SELECT min(range_start) {chunks})").format(chunks=chunks)
    start = (
        held
        if tolerance is None
        else sql.SQL("GREATEST({window}, {held})").format(
            window=_window_start(sql.SQL("(SELECT min(ts) FROM pit_entities)")), held=held
        )
    )
    query = sql.SQL(
        "WITH converted AS (SELECT range_agg(tstzrange(range_start, range_end)) AS ranges {chunks} AND is_compressed) "
        "SELECT (SELECT count(*) FROM pit_entities e, converted c WHERE c.ranges @> (e.ts - %(lag)s)), "
        "(SELECT count(*) FROM pit_entities), (SELECT count(DISTINCT instrument_id) FROM pit_entities), "
        "extract(epoch FROM (SELECT max(ts) FROM pit_entities) - {start}) / 86400.0"
    ).format(chunks=chunks, start=start)
    in_columnstore, rows, instruments, days = conn.execute(query, {"lag": lag, "tolerance": tolerance}).fetchone()
    if not in_columnstore:
        return False  # every lookup is an index probe in the rowstore
    per_day = timedelta(days=1) / TIMEFRAMES[timeframe].step
    merge_rows = instruments * max(float(days or 0), 0.0) * per_day
    lookup_rows = in_columnstore * COLUMNSTORE_BATCH_ROWS + (rows - in_columnstore)
    return merge_rows < lookup_rows


def _merge_point_in_time(
    conn: psycopg.Connection,
    names: list[str],
    version: str,
    timeframe: str,
    tolerance: timedelta | None,
    lag: timedelta,
    schema: dict[str, pl.DataType],
) -> pl.DataFrame:
    """The same match as the lookup, by a merge: the entities' instruments' vectors over their range,
    read once, joined as of the instant each became known (polars ``join_asof``)."""
    entities = copy_query_out(
        conn,
        sql.SQL("SELECT row_no, instrument_id, {ts} FROM pit_entities").format(
            ts=sql.SQL(EPOCH_US).format(col=sql.Identifier("ts"))
        ),
        {},
        {"row_no": pl.Int64(), "instrument_id": pl.String(), "ts": pl.Datetime("us", "UTC")},
    )
    earliest = sql.SQL("(SELECT min(ts) FROM pit_entities)")
    lower = sql.SQL(" AND v.ts >= {start}").format(start=_window_start(earliest)) if tolerance else sql.SQL("")
    flags = [sql.SQL("array_to_string(v.quality_flags, ',') AS quality_flags")] if "quality_flags" in schema else []
    query = sql.SQL(
        "SELECT {ts}, v.instrument_id, {cols} FROM feature_vectors v "
        "WHERE v.instrument_id IN (SELECT DISTINCT instrument_id FROM pit_entities) "
        "AND v.feature_set_version = %(version)s AND v.timeframe = %(tf)s "
        "AND v.ts <= (SELECT max(ts) FROM pit_entities) - %(lag)s{lower}"
    ).format(
        ts=sql.SQL(EPOCH_US).format(col=sql.Identifier("v", "ts")),
        cols=sql.SQL(", ").join([*(sql.Identifier("v", n) for n in names), *flags]),
        lower=lower,
    )
    vector_schema = {"feature_ts": pl.Datetime("us", "UTC"), "instrument_id": pl.String()} | {
        k: v for k, v in schema.items() if k not in ("row_no", "feature_ts")
    }
    params = {"version": version, "tf": timeframe, "lag": lag, "tolerance": tolerance}
    vectors = copy_query_out(conn, query, params, vector_schema).with_columns(
        (pl.col("feature_ts") + lag).alias("_known_at")
    )
    matched = entities.sort("ts").join_asof(
        vectors.sort("_known_at"),
        left_on="ts",
        right_on="_known_at",
        by="instrument_id",
        strategy="backward",
        tolerance=tolerance,
        check_sortedness=False,  # both sorted just above; polars cannot check it per group
    )
    return matched.select(list(schema))


def _check_as_of(as_of: object, snapshot: str | None) -> None:
    if as_of is None:
        return
    if snapshot is not None:
        raise RetrievalError("as_of reads the live table's history; a snapshot is already frozen: give one of them")
    if as_of == "entity":
        return
    if not isinstance(as_of, datetime) or as_of.tzinfo is None:
        raise RetrievalError(
            f"as_of must be a timezone-aware datetime (e.g. datetime(2024, 1, 5, tzinfo=UTC)) or 'entity', "
            f"not {as_of!r}"
        )


REFERENCE_FORMS = "<feature>, <timeframe>:<feature> (1d:rsi_14) or <feature set>:<timeframe>:<feature> (fs_v2:1m:rsi_7)"


def _reference(text: str, version: str, timeframe: str) -> tuple[str, str, str]:
    """(feature set, timeframe, feature) of a reference; the call's set and timeframe fill what it leaves out."""
    parts = text.split(":")
    if len(parts) > 3 or not all(parts):
        raise RetrievalError(f"feature reference {text!r} is not {REFERENCE_FORMS}")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 1:
        return version, timeframe, text
    first, name = parts
    sets = registry.FEATURE_SETS
    if first in sets and first not in TIMEFRAMES:  # Feast's view:feature; here a view is a set *and* a timeframe
        raise RetrievalError(
            f"feature reference {text!r} names feature set {first} but no timeframe; write "
            f"{first}:<timeframe>:{name}, e.g. {first}:{sets[first].timeframes[0]}:{name}"
        )
    return version, first, name


def _requests(
    features: Sequence[str], version: str, timeframe: str, snapshot: str | None
) -> dict[tuple[str, str], list[str]]:
    """Requested names by (feature set, timeframe), each checked; see ``_reference`` for the forms."""
    if isinstance(features, str):
        features = [features]
    wanted: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for item in features:
        text = _text(item, "feature name")
        fs, tf, name = _reference(text, version, timeframe)
        wanted.setdefault((fs, tf), []).append((name, text))
    if not wanted:
        raise RetrievalError("ask for at least one feature")
    if snapshot is not None:
        _only_the_snapshots(wanted, snapshot, version, timeframe)
    return {key: _checked(key, refs) for key, refs in wanted.items()}


def _only_the_snapshots(
    wanted: dict[tuple[str, str], list[tuple[str, str]]], snapshot: str, version: str, timeframe: str
) -> None:
    for (fs, tf), refs in wanted.items():
        if (fs, tf) != (version, timeframe):
            cited = ", ".join(repr(r) for _, r in refs)
            raise RetrievalError(
                f"snapshot {snapshot} holds {version} {timeframe} vectors only, and {cited} asks for {fs} {tf}; "
                f"ask for the snapshot's features by name alone, or read {fs} {tf} from the live table (no snapshot)"
            )


def _checked(key: tuple[str, str], refs: list[tuple[str, str]]) -> list[str]:
    """``_features`` for one (feature set, timeframe); an unknown set or timeframe names the references that
    wrote it (one from the call's arguments needs no such pointer)."""
    version, timeframe = key
    try:
        feature_set(_text(version, "feature_set_version")).for_timeframe(_text(timeframe, "timeframe"))
    except KeyError as exc:
        colons = 2 if version not in registry.FEATURE_SETS else 1
        cited = [repr(r) for _, r in refs if r.count(":") >= colons]
        where = f" (in feature reference {', '.join(cited)}; the forms are {REFERENCE_FORMS})" if cited else ""
        raise RetrievalError(exc.args[0] + where) from None
    return _features([n for n, _ in refs], version, timeframe, [r for _, r in refs])


def _output_columns(
    entities: pl.DataFrame,
    groups: dict[tuple[str, str], list[str]],
    include_feature_ts: bool,
    include_flags: bool,
    full: bool,
) -> dict[tuple[str, str], dict[str, str]]:
    """Per (feature set, timeframe): the joined frame's column -> the output column; collisions refused with the fix.

    With several requests, the matched vector's own columns (feature_ts, quality_flags, ...) are suffixed with
    what tells the requests apart: ``_<timeframe>``, or ``_<feature set>_<timeframe>`` across feature sets.
    """
    several = len(groups) > 1
    several_sets = len({version for version, _ in groups}) > 1
    out: dict[tuple[str, str], dict[str, str]] = {}
    seen: dict[str, str] = {c: "the entities" for c in entities.columns}
    meta = (["feature_ts", "feature_known_at"] if include_feature_ts else []) + (
        ["quality_flags"] if include_flags else []
    )
    for (version, tf), names in groups.items():
        label, suffix = (f"{version} {tf}", f"{version}_{tf}") if several_sets else (tf, tf)
        mapping = {}
        for name in [*names, *meta]:
            suffixed = f"{name}_{suffix}" if several and name in meta else name
            target = f"{version}_{tf}__{name}" if full else suffixed
            if target in seen:
                raise RetrievalError(
                    f"column {target!r} ({label} {name}) is already in {seen[target]}; rename that column, or pass "
                    f"full_feature_names=True (marketfs frame --full-feature-names) to get {version}_{tf}__{name}"
                )
            seen[target] = f"the {label} request"
            mapping[name] = target
        out[(version, tf)] = mapping
    return out


def _point_in_time(
    conn: psycopg.Connection,
    names: list[str],
    version: str,
    timeframe: str,
    tolerance: timedelta | None,
    snapshot: str | None,
    include_flags: bool,
    as_of: datetime | str | None = None,
) -> pl.DataFrame:
    """For each entity row of ``pit_entities``: the newest vector known at its ts (row_no, stamp, values)."""
    scope = sql.SQL("v.feature_set_version = %(version)s AND v.timeframe = %(tf)s")
    if snapshot is not None:
        source, scope = sql.Identifier("feature_snapshot_rows"), sql.SQL("v.snapshot_id = %(snapshot)s")
    elif as_of is None:
        source = sql.Identifier("feature_vectors")
    else:
        # Every version, served or superseded, with the interval it was served; the lookup keeps those
        # served at the instant asked for (PostgreSQL pushes the filters into both branches' indexes).
        needed = sql.SQL(", ").join(
            map(
                sql.Identifier,
                ["instrument_id", "timeframe", "ts", "feature_set_version", "quality_flags", "written_at", *names],
            )
        )
        source = sql.SQL(
            "(SELECT {needed}, NULL::timestamptz AS superseded_at FROM feature_vectors "
            "UNION ALL SELECT {needed}, superseded_at FROM feature_vectors_history)"
        ).format(needed=needed)
        instant = sql.SQL("e.ts") if as_of == "entity" else sql.SQL("%(as_of)s")
        scope += sql.SQL(" AND v.written_at <= {i} AND (v.superseded_at IS NULL OR v.superseded_at > {i})").format(
            i=instant
        )
    lag = _lag(timeframe)
    schema = {
        "row_no": pl.Int64(),
        "feature_ts": pl.Datetime("us", "UTC"),
        **{n: pl.Float64() for n in names},
        **({"quality_flags": pl.String()} if include_flags else {}),
    }
    if snapshot is None and as_of is None and _merge_wanted(conn, tolerance, lag, timeframe):
        return _finish(
            _merge_point_in_time(conn, names, version, timeframe, tolerance, lag, schema), lag, include_flags
        )
    # A vector stamped v.ts is known at v.ts + lag: known at or before e.ts, and within the tolerance.
    window = sql.SQL("v.ts <= e.ts - %(lag)s")
    if tolerance is not None:
        window += sql.SQL(" AND v.ts >= {start}").format(start=_window_start(sql.SQL("e.ts")))
    flags = [sql.SQL("array_to_string(m.quality_flags, ',')")] if include_flags else []
    query = sql.SQL(
        "SELECT e.row_no, {feature_ts}, {cols} FROM pit_entities e LEFT JOIN LATERAL ("
        "SELECT v.ts, v.quality_flags, {inner} FROM {source} v WHERE v.instrument_id = e.instrument_id AND {scope} "
        "AND {window} ORDER BY v.ts DESC LIMIT 1) m ON true"
    ).format(
        feature_ts=sql.SQL(EPOCH_US).format(col=sql.Identifier("m", "ts")),
        cols=sql.SQL(", ").join([*(sql.Identifier("m", n) for n in names), *flags]),
        inner=sql.SQL(", ").join(sql.Identifier("v", n) for n in names),
        source=source,
        scope=scope,
        window=window,
    )
    params = {
        "snapshot": snapshot,
        "version": version,
        "tf": timeframe,
        "tolerance": tolerance,
        "lag": lag,
        "as_of": None if as_of in (None, "entity") else as_of,
    }
    return _finish(copy_query_out(conn, query, params, schema), lag, include_flags)


def _finish(matched: pl.DataFrame, lag: timedelta, include_flags: bool) -> pl.DataFrame:
    matched = matched.with_columns((pl.col("feature_ts") + lag).alias("feature_known_at"))
    if include_flags:
        flags_list = (
            pl.when(pl.col("feature_ts").is_null())
            .then(None)
            .otherwise(
                pl.col("quality_flags").fill_null("").str.split(",").list.eval(pl.element().filter(pl.element() != ""))
            )
        )
        matched = matched.with_columns(flags_list.alias("quality_flags"))
    return matched


@cache
def _lag(timeframe: str) -> timedelta:
    from marketfs.features.compute import available_after

    return available_after(timeframe)


class OnlineReader:
    """One open connection and a prepared statement: what a model server keeps per worker."""

    def __init__(self, dsn: str | None = None) -> None:
        self._dsn = dsn or resolve_dsn()
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()
        self._queries: dict[tuple[bool, tuple[str, ...]], bytes] = {}
        self._cursor: psycopg.Cursor | None = None

    def _query(self, single: bool, names: tuple[str, ...]) -> bytes:
        """The statement for these features, composed once: a request then costs one prepared execution."""
        key = (single, names)
        if key not in self._queries:
            cols = sql.SQL(", ").join(sql.Identifier("v", n) for n in names)
            if single:  # one instrument, the common inference call: one index probe, nothing around it
                query = sql.SQL(
                    "SELECT v.ts, v.quality_flags, {cols} FROM feature_vectors v WHERE v.instrument_id = %s "
                    "AND v.feature_set_version = %s AND v.timeframe = %s ORDER BY v.ts DESC LIMIT 1"
                ).format(cols=cols)
            else:
                query = sql.SQL(
                    "SELECT i.instrument_id, m.ts, m.quality_flags, {mcols} FROM unnest(%s::text[]) "
                    "WITH ORDINALITY i(instrument_id, n) LEFT JOIN LATERAL (SELECT v.ts, v.quality_flags, {cols} "
                    "FROM feature_vectors v WHERE v.instrument_id = i.instrument_id "
                    "AND v.feature_set_version = %s AND v.timeframe = %s ORDER BY v.ts DESC LIMIT 1) m ON true "
                    "ORDER BY i.n"
                ).format(cols=cols, mcols=sql.SQL(", ").join(sql.Identifier("m", n) for n in names))
            self._queries[key] = query.as_bytes(self._connection())
        return self._queries[key]

    def _fetch(self, instruments: list[str], names: tuple[str, ...], version: str, timeframe: str) -> list[tuple]:
        query = self._query(len(instruments) == 1, names)
        cursor = self._cursor_of()
        if len(instruments) == 1:
            row = cursor.execute(query, (instruments[0], version, timeframe)).fetchone()
            return [(instruments[0], *(row or (None,) * (len(names) + 2)))]
        return cursor.execute(query, (list(instruments), version, timeframe)).fetchall()

    def _cursor_of(self) -> psycopg.Cursor:
        # One cursor kept with the connection: a request then allocates nothing on the client side.
        if self._cursor is None or self._cursor.closed or self._cursor.connection is not self._connection():
            self._cursor = self._connection().cursor()
        return self._cursor

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
        names = _known_features(
            tuple(features) if not isinstance(features, str) else (features,), feature_set_version, timeframe
        )
        with self._lock:
            try:
                rows = self._fetch(instruments, names, feature_set_version, timeframe)
            except psycopg.OperationalError:
                # A dropped connection (server restart, idle timeout): reconnect once, then give up loudly.
                self._conn = None
                self._queries.clear()
                rows = self._fetch(instruments, names, feature_set_version, timeframe)
        columns = ["instrument_id", "ts", "quality_flags", *names]
        lag = _lag(timeframe)
        if output == "records":
            return [
                {**dict(zip(columns, row, strict=True)), "known_at": None if row[1] is None else row[1] + lag}
                for row in rows
            ]
        frame = _latest_frame(rows, names, lag)
        return frame.to_pandas() if output == "pandas" else frame

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


_UTC_US = pl.Datetime("us", "UTC")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@lru_cache(maxsize=256)
def _latest_schema(names: tuple[str, ...]) -> pl.Schema:
    """latest()'s frame, timestamps as microseconds since 1970 (cast once the frame is built)."""
    return pl.Schema(
        {
            "instrument_id": pl.String(),
            "ts": pl.Int64(),
            "quality_flags": pl.List(pl.String()),
            **{n: pl.Float64() for n in names},
            "known_at": pl.Int64(),
        }
    )


def _latest_frame(rows: list[tuple], names: tuple[str, ...], lag: timedelta) -> pl.DataFrame:
    """latest()'s rows as a polars frame, built in one pass.

    Where the time went (docs/benchmarks.md): polars converts timezone-aware datetimes one value at
    a time, and ``with_columns`` for ``known_at`` ran a query plan, more than the rest of the call.
    Microseconds computed here and two Series casts cost a fraction of that.
    """
    lag_us = lag // _US
    built = []
    for instrument, ts, flags, *values in rows:
        us = None if ts is None else (ts - _EPOCH) // _US
        built.append((instrument, us, flags, *values, None if us is None else us + lag_us))
    frame = pl.DataFrame(built, schema=_latest_schema(names), orient="row")
    for i in (1, frame.width - 1):  # ts and known_at
        frame.replace_column(i, frame.to_series(i).cast(_UTC_US))
    return frame


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
