"""Feature vectors, one asset per feature set and timeframe, made by a factory from the declarations.

Each asset computes its set's vectors from stored bars and events, gates them day by day, then
writes them. The gate runs inside the writing asset, before the write, because a blocking Dagster
check only stops downstream assets: the asset it checks would already have been written. Days form
a chain (recursions continue from the previous day's state), so a run writes the days before the
first breaching day, quarantines that day, and holds back the days after it.
"""

import dataclasses
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl

from assets.data_versions import InputProvenance, content_version
from assets.gates import DRIFT_CHECK, GATE_CHECK, Judgement, judge_days, report_run
from assets.metadata import flag_counts, frame_summary, vector_preview
from assets.partitions import (
    DAY,
    SESSIONS,
    DayChunks,
    RunScope,
    daily_asset,
    day_dependency,
    day_window,
    run_scopes,
    split_key,
    with_day,
)
from assets.resources import FeatureStore, translate_database_errors
from expectations.gate import GateResult, suite_path
from marketfs.catalog import catalog_table
from marketfs.db import retry_on_conflict
from marketfs.features.code_version import code_version
from marketfs.features.compute import FeatureComputation, HistoryError
from marketfs.features.registry import FEATURE_SETS, FeatureSet, dataset_name
from marketfs.features.timeframes import timeframe as timeframe_spec
from marketfs.holds import Holds
from marketfs.intraday import record_day_written, retract_day
from marketfs.reference_days import ReferenceDays
from marketfs.shards import Shard
from marketfs.store.corporate_actions import close_restatements
from marketfs.store.feature_vectors import (
    compute_stored,
    read_vectors,
    vector_schema,
    write_features,
)
from marketfs.store.holds import batch_evidence, feature_holds, read_holds, resolve_superseded
from marketfs.store.reference_days import read_trailing_reference, write_reference_days
from marketfs.store.timescale import settle_write

if TYPE_CHECKING:
    from expectations.drift import DriftProfile

# A run tagged with instruments recomputes those alone (a restatement after a late corporate action): the
# others' served vectors are not touched, and nothing of them is computed.
RESTATE_TAG = "marketfs/restate"

# The asset that materialises a timeframe's bar table: its bars are what the vectors read.
BARS_ASSET = {"ohlcv_1m": "raw_ohlcv", "ohlcv_1d": "bars_1d"}


def has_drift_gate(fs: FeatureSet, timeframe: str) -> bool:
    """From the declaration and the policy, as the generated suites are: not from files found at import."""
    from expectations.generate import drift_suite, load_policy

    return drift_suite(fs, timeframe, load_policy()) is not None


def feature_assets(fs: FeatureSet) -> list[dg.AssetsDefinition]:
    """One asset per timeframe of a feature set."""
    return [_feature_vectors_asset(fs, timeframe) for timeframe in fs.timeframes]


def _column_schema(fs: FeatureSet, timeframe: str) -> dg.TableSchema:
    formulas = {f.name: f.formula for f in fs.for_timeframe(timeframe)}
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name, str(dtype), description=formulas.get(name, ""))
            for name, dtype in vector_schema(fs, timeframe).items()
        ]
    )


def _feature_vectors_asset(fs: FeatureSet, timeframe: str) -> dg.AssetsDefinition:
    name = dataset_name(fs, timeframe)
    spec = timeframe_spec(timeframe)
    drift = has_drift_gate(fs, timeframe)
    checks = {
        GATE_CHECK: f"Great Expectations suite expectations/suites/{name}.json, one verdict per day; "
        "a breaching day is quarantined and the days after it are held back."
    }
    if drift:
        checks[DRIFT_CHECK] = (
            f"Drift suite expectations/suites/{name}_drift.json against its reference, one verdict per day; "
            "a breach blocks the write."
        )
    windows = ", ".join(fs.event_windows(timeframe)) or "none"

    @daily_asset(
        name,
        group_name=f"features_{fs.version}",
        # Follows the declaration and the source of the functions that compute it (code_version.py).
        code_version=code_version(fs, timeframe),
        deps=[
            # Warm-up bars are read by count; the lineage covers the days they can come from (same shard).
            day_dependency(BARS_ASSET[spec.bar_table], -spec.lookback_days),
            # Events of the look-back window reach into the previous day.
            day_dependency("raw_events", -1),
            # Each instrument's history is put on one scale by the corporate actions known.
            day_dependency("corporate_actions", 0),
            # Recursions continue from the state stored at the shard's previous day's last bar.
            day_dependency(name, -1, -1),
        ],
        checks=checks,
        description=f"Feature vectors {fs.version}, timeframe {timeframe} (event windows: {windows}), in table "
        f"feature_vectors. {fs.description}",
        owners=[f"team:{fs.owner}"],
        metadata={
            "feature_set": dg.MetadataValue.text(fs.version),
            "timeframe": dg.MetadataValue.text(timeframe),
            "feature_catalog": dg.MetadataValue.md(catalog_table(fs, timeframe)),
            "dagster/column_schema": _column_schema(fs, timeframe),
            "declaration": dg.MetadataValue.path(f"marketfs/feature_sets/{fs.version}.py"),
        },
    )
    @translate_database_errors
    def _asset(context: dg.AssetExecutionContext, store: FeatureStore) -> Iterator:
        yield from _materialise(context, store, fs, timeframe, drift)

    return _asset


def _materialise(
    context: dg.AssetExecutionContext, store: FeatureStore, fs: FeatureSet, timeframe: str, drift: bool
) -> Iterator:
    """Compute, gate and write the run's days in chunks, shard by shard, then report each day."""
    from expectations.docs import DataDocs
    from expectations.gate import load_suite_json

    name = dataset_name(fs, timeframe)
    provenance = InputProvenance.capture(context)
    restating = restated_instruments(context)
    # One instrument's day against the universe's reference would be a shift by construction; the day was judged
    # for drift with the universe, and a restatement changes only the scale it is computed on.
    drift = drift and restating is None
    quality_suite = load_suite_json(suite_path(name))
    drift_template = load_suite_json(suite_path(f"{name}_drift")) if drift else None
    gate = _DayGate(context, name, quality_suite, drift_template, DataDocs.default())
    materializations: list[tuple] = []
    judgement = Judgement()
    failure = None
    try:
        for scope in run_scopes(context.partition_keys):
            breached = _materialise_shard(
                store, context, gate, scope, fs, timeframe, drift_template, judgement, materializations, restating
            )
            if breached:
                break
        if restating is not None and judgement.accepted:
            with store.engine().begin() as conn:
                through = date.fromisoformat(max(judgement.accepted))
                closed = close_restatements(conn, name, restating, through, context.run_id)
            context.log.info(f"{name}: {', '.join(restating)} restated through {through} ({closed} restatement(s))")
    except dg.Failure as exc:  # a bad file or missing history in a later chunk: written days are recorded
        failure = exc
    if failure is None and not judgement.breaches:
        failure = _held_upstream_failure(store, context, fs, timeframe, judgement)
    yield from report_run(context, provenance, materializations, judgement, chained=True, failure=failure)


def _held_upstream_failure(
    store: FeatureStore, context: dg.AssetExecutionContext, fs: FeatureSet, timeframe: str, judgement: Judgement
) -> dg.Failure | None:
    """The run's failure when a step before this one held instruments (a bad print of theirs): the other
    instruments' vectors are written, and the run still fails, so a breach is never green."""
    name = dataset_name(fs, timeframe)
    upstream = tuple(a for a in feature_holds(name, timeframe) if a != name)
    days = [split_key(k)[0] for k in context.partition_keys]
    if not days:
        return None
    held = Holds()
    with store.engine().connect() as conn:
        for scope in run_scopes(context.partition_keys):
            held = held.merged(read_holds(conn, upstream, day_window(max(days))[1], scope.shard, context.run_id))
        if not held:
            return None
        batches = sorted({h.batch_id for h in held.held.values()})
        evidence = batch_evidence(conn, batches)
    first = min(h.day for h in held.held.values())
    why = " ".join(f"Batch {b}: {evidence[b]}." for b in batches if b in evidence)
    written = f" Written without them: {judgement.accepted[0]}..{judgement.accepted[-1]}." if judgement.accepted else ""
    return dg.Failure(
        description=(
            f"{name}: {len(held)} instrument(s) held since {first}, by the gates of this run: {held.describe()}. "
            f"{why} Their vectors from that day on are not computed; the other instruments' are served.{written} "
            f"Fix the held day (re-deliver its file, or release or discard the batch: marketfs quarantine list), "
            f"then recompute from {first}: make recompute FROM={first}."
        ),
        metadata={"held_instruments": dg.MetadataValue.text(held.describe(50))},
        allow_retries=False,
    )


def _materialise_shard(
    store: FeatureStore,
    context: dg.AssetExecutionContext,
    gate: "_DayGate",
    scope: RunScope,
    fs: FeatureSet,
    timeframe: str,
    drift_template: dict | None,
    judgement: Judgement,
    materializations: list[tuple],
    restating: list[str] | None = None,
) -> bool:
    """One shard's days in order, in chunks; whether a whole day breached (the days after it are held back).

    An instrument-day that breaches holds that instrument from that day on (its later days in the chunk
    continue its state, so they go too); the other instruments' days are written.
    """
    plan = DayChunks(scope.days)
    history = None  # the drift reference, read once and carried from chunk to chunk (its last N days alone)
    for days in plan:
        # A chunk's frames are the chunk function's locals: gone before the next chunk is computed (held by the
        # loop, they were a second chunk's worth of memory at every chunk's peak but the first).
        breached, history = _materialise_chunk(
            store, context, gate, scope, plan, days, fs, timeframe, drift_template, judgement, materializations,
            restating, history,
        )  # fmt: skip
        if breached:
            return True  # later days continue the breaching day's state: they are held back
    return False


def _materialise_chunk(
    store: FeatureStore,
    context: dg.AssetExecutionContext,
    gate: "_DayGate",
    scope: RunScope,
    plan: DayChunks,
    days: list[str],
    fs: FeatureSet,
    timeframe: str,
    drift_template: dict | None,
    judgement: Judgement,
    materializations: list[tuple],
    restating: list[str] | None,
    history: ReferenceDays | None,
) -> tuple[bool, ReferenceDays | None]:
    """One chunk of a shard's days: computed, gated, its accepted days written; whether a whole day breached,
    and the drift reference for the next chunk."""
    name = dataset_name(fs, timeframe)
    shard = scope.shard
    start, end = day_window(days[0])[0], day_window(days[-1])[1]
    computation = _compute(store, fs, timeframe, start, end, shard, days[0], restating)
    vectors = with_day(computation.vectors)
    # A day's rows are taken when needed: a copy of the chunk split into days, held through the gates
    # and the write, was a second copy of every vector at the chunk's peak.
    by_day = _DayRows(vectors)
    plan.saw(vectors.height, by_day.count)
    if drift_template is not None and history is None:
        history = _drift_history(store, fs, drift_template, timeframe, start, shard)
    chunk = gate.judge(store, scope, days, computation, vectors, by_day, history, fs, timeframe)
    chunk.notes.extend(_unexplained_jumps(chunk, computation))
    judgement.extend(chunk)
    for breach in chunk.breaches:
        if breach.instruments is not None:  # before the write records the day as reconciled
            _retract_intraday(store, context, fs, timeframe, shard, [breach.day], list(breach.instruments))
    if chunk.accepted:
        held_here = chunk.holds(name)
        held = computation.holds.merged(held_here)
        kept = FeatureComputation(
            vectors=held_here.filter(computation.vectors), state=held_here.filter(computation.state), holds=held
        )
        written_days = _write_accepted(
            store, context, fs, timeframe, kept, chunk.accepted, shard, restating, drift_template
        )
        for day in chunk.accepted:
            rows = held_here.filter(by_day[day])
            metadata = _day_metadata(rows)
            on_day = held.at(day_window(day)[1])
            if on_day:
                metadata["held_instruments"] = dg.MetadataValue.text(on_day.describe())
            materializations.append((context.asset_key, scope.key(day), metadata, content_version(rows)))
        if computation.holds:
            context.log.warning(
                f"{name} {days[0]}..{days[-1]}{'' if shard.is_all else f' ({shard})'}: "
                f"{len(computation.holds)} instrument(s) held, not computed: {computation.holds.describe()} "
                "(marketfs quarantine list)"
            )
        if history is not None and written_days is not None:
            history = _roll(history, written_days, drift_template)
    if history is not None:
        plan.hold(history.nbytes)
    if chunk.day_breaches:
        _retract_intraday(store, context, fs, timeframe, shard, [b.day for b in chunk.day_breaches])
        return True, history
    return False, history


class _DayRows:
    """A chunk's vectors of one day (without the day column; none for a day without vectors), filtered out
    when asked for."""

    def __init__(self, vectors: pl.DataFrame) -> None:
        self._vectors = vectors
        self.count = vectors[DAY].n_unique()

    def __getitem__(self, day: str) -> pl.DataFrame:
        return self._vectors.filter(pl.col(DAY) == day).drop(DAY)


def _unexplained_jumps(chunk: Judgement, computation: FeatureComputation) -> list[str]:
    """For each held instrument-day that opened with a jump no corporate action explains: the prices, and the fix."""
    if computation.jumps.is_empty():
        return []
    from marketfs.corporate_actions import observed_ratio

    jumps = with_day(computation.jumps)
    notes = []
    for breach in chunk.breaches:
        held = jumps.filter(pl.col(DAY) == breach.day)
        if breach.instruments is not None:
            held = held.filter(pl.col("instrument_id").is_in(list(breach.instruments)))
        for row in held.iter_rows(named=True):
            ratio = row["previous_close"] / row["open"]
            notes.append(
                f"{row['instrument_id']} {breach.day}: opened {observed_ratio(row['open'], row['previous_close'])} and "
                "no corporate action explains it (UNEXPLAINED_JUMP). If it is a split or a dividend, deliver the "
                f"action: the line {row['instrument_id']},{breach.day},split,{ratio:.6g},<known_at, ISO 8601> (or "
                "cash_dividend,<amount>) in <landing>/corporate_actions/actions.csv, or "
                "marketfs.ingest.push_corporate_actions; then recompute from that day (below). If the move is real, "
                f"release the batch instead (marketfs quarantine release {breach.batch_id} --by NAME --note WHY)."
            )
    return notes


@dataclasses.dataclass
class _DayGate:
    """The quality and drift verdicts of a chunk's days, logged, quarantined and published."""

    context: dg.AssetExecutionContext
    name: str
    quality_suite: dict
    drift_template: dict | None
    docs: object

    def judge(self, store, scope, days, computation, vectors, by_day, history, fs, timeframe) -> Judgement:
        from expectations.gate import publish_day, validate_days

        checks_by_day = {GATE_CHECK: validate_days(vectors, self.name, suite=self.quality_suite)}
        profile = None
        if self.drift_template is not None:
            # An instrument-day the quality gate holds is no part of its day's distribution: one split delivered
            # without its action must not hold the universe's day as drift.
            drifting = _less_held(vectors, checks_by_day[GATE_CHECK])
            checks_by_day[DRIFT_CHECK], profile = _drift(drifting, history, self.drift_template, fs, timeframe)

        def rows_of_day(day: str) -> dict[str, pl.DataFrame]:
            day_start, day_end = day_window(day)
            return {
                "feature_vectors": _in_window(computation.vectors, day_start, day_end),
                "feature_state": _in_window(computation.state, day_start, day_end).with_columns(
                    pl.lit(timeframe).alias("timeframe"), pl.lit(fs.version).alias("feature_set_version")
                ),
            }

        def publish(check: str, day: str, gate: GateResult) -> str | None:
            label = f"{self.name}-{day}" if scope.shard.is_all else f"{self.name}-{day}-shard{scope.shard.index}"
            run = self.context.run_id
            if check == DRIFT_CHECK:
                row = profile.frame.filter(pl.col(DAY) == day).drop(DAY)
                return publish_day(row, gate.suite, profile.suite, docs=self.docs, label=label, run_name=run)
            return publish_day(by_day[day], self.name, self.quality_suite, docs=self.docs, label=label, run_name=run)

        return judge_days(
            self.context,
            store,
            days=days,
            checks=checks_by_day,
            rows_of_day=rows_of_day,
            chained=True,
            scope=scope,
            publish=publish,
        )


def _less_held(vectors: pl.DataFrame, verdicts: dict[str, GateResult]) -> pl.DataFrame:
    """``vectors`` without the rows of the instruments whose day the verdicts hold alone."""
    held = [
        (day, instrument)
        for day, gate in verdicts.items()
        if not gate.passed and gate.breaching_instruments is not None
        for instrument in gate.breaching_instruments
    ]
    if not held:
        return vectors
    pairs = pl.DataFrame(held, schema={DAY: pl.String(), "instrument_id": pl.String()}, orient="row")
    return vectors.join(pairs, on=[DAY, "instrument_id"], how="anti", maintain_order="left")


def _write_accepted(
    store: FeatureStore,
    context: dg.AssetExecutionContext,
    fs: FeatureSet,
    timeframe: str,
    computation: FeatureComputation,
    days: list[str],
    shard: Shard,
    restating: list[str] | None = None,
    drift_template: dict | None = None,
) -> ReferenceDays | None:
    """Write the days before the first breach, with their state, in one transaction (the shard's instruments,
    or those ``restating`` alone); with a drift gate, return the written days' drift columns as reference days.

    Those days are stored with the vectors (``drift_reference_days``) when the write leaves the table holding
    exactly them: not for a restatement, nor while held instruments keep rows the write does not touch."""
    start, end = day_window(days[0])[0], day_window(days[-1])[1]
    accepted = FeatureComputation(
        vectors=_in_window(computation.vectors, start, end),
        state=_in_window(computation.state, start, end),
        holds=computation.holds,
    )
    name = dataset_name(fs, timeframe)
    written_days = None
    if drift_template is not None:
        from expectations.drift import ReferenceSpec, drift_columns

        written_days = ReferenceDays.from_frame(accepted.vectors, drift_columns(drift_template), SESSIONS.trading_day)
        keep_days = 3 * ReferenceSpec.from_suite(drift_template).partitions + 7
    stores_reference = written_days is not None and restating is None and not accepted.holds

    def write() -> None:
        with store.engine().begin() as conn:
            write_features(
                conn,
                accepted,
                feature_set=fs,
                timeframe=timeframe,
                start=start,
                end=end,
                run_id=context.run_id,
                shard=shard,
                protect=accepted.holds,
                only=restating,
            )
            if restating is not None:
                return  # a few instruments' vectors: the day as a whole is what its own run recorded
            if stores_reference:
                write_reference_days(
                    conn,
                    written_days,
                    feature_set=fs,
                    timeframe=timeframe,
                    windows={day: day_window(day) for day in written_days.labels},
                    utc_dates=_utc_dates(accepted.vectors),
                    shard=shard,
                    keep_days=keep_days,
                    run_id=context.run_id,
                )
            # The day is now what this run computed whole: its intraday steps are replaced by it.
            for day in days:
                day_vectors = _in_window(accepted.vectors, *day_window(day))
                record_day_written(conn, fs, timeframe, shard, day, day_vectors, context.run_id)
                resolve_superseded(conn, asset=name, partition=shard.partition_key(day), run_id=context.run_id)

    retry_on_conflict(write, f"writing {dataset_name(fs, timeframe)} {days[0]}..{days[-1]}")
    # After the commit: what the write moved out of the columnstore goes back, and the rollup follows.
    for done in settle_write(store.engine(), "feature_vectors", start, end):
        context.log.debug(done)
    return written_days


def _utc_dates(vectors: pl.DataFrame) -> dict[str, list[date]]:
    """The UTC dates each trading day's vectors fall on (what the trailing reference counts days by)."""
    pairs = pl.DataFrame({DAY: with_day(vectors)[DAY], "date": vectors["ts"].dt.date()}).unique()
    return {day: dates for day, dates in pairs.group_by(DAY).agg(pl.col("date").sort()).iter_rows()}


def _retract_intraday(
    store: FeatureStore,
    context: dg.AssetExecutionContext,
    fs: FeatureSet,
    timeframe: str,
    shard: Shard,
    days,
    instruments: list[str] | None = None,
) -> None:
    """A breached day (or instrument-day) is served by none of its vectors, including those intraday steps
    served before the end-of-day judgement (they stay in the history, where ``as_of`` finds what a model saw)."""
    with store.engine().begin() as conn:
        for day in days:
            retracted = retract_day(conn, fs, timeframe, shard, day, instruments)
            if retracted:
                context.log.warning(
                    f"{dataset_name(fs, timeframe)} {day}: the end-of-day gate failed a day that intraday steps had "
                    f"served; {retracted} served vector(s) retracted (kept in feature_vectors_history)"
                )


def restated_instruments(context: dg.AssetExecutionContext) -> list[str] | None:
    tag = context.run.tags.get(RESTATE_TAG)
    return sorted(tag.split(",")) if tag else None


def _compute(
    store: FeatureStore,
    fs: FeatureSet,
    timeframe: str,
    start: datetime,
    end: datetime,
    shard: Shard,
    first_day: str,
    restating: list[str] | None = None,
) -> FeatureComputation:
    try:
        with store.engine().connect() as conn:
            return compute_stored(conn, fs, timeframe, start, end, shard, instruments=restating)
    except HistoryError as exc:
        # Named by the partition (the session), not by the window's start, which is the close before it.
        name = dataset_name(fs, timeframe)
        raise dg.Failure(description=f"{name} {first_day}: {exc}", allow_retries=False) from exc


def _in_window(frame: pl.DataFrame, start: datetime, end: datetime) -> pl.DataFrame:
    return frame.filter((pl.col("ts") >= start) & (pl.col("ts") < end))


def _day_metadata(vectors: pl.DataFrame) -> dict[str, dg.MetadataValue]:
    """What the UI shows for one written day: rows, range, flags, each instrument's last vector."""
    metadata = frame_summary(vectors, preview=vector_preview(vectors) if vectors.height else None)
    metadata.update({f"flag_{k}": dg.MetadataValue.int(v) for k, v in flag_counts(vectors).items()})
    return metadata


def _drift_history(
    store: FeatureStore, fs: FeatureSet, template: dict, timeframe: str, start: datetime, shard: Shard
) -> ReferenceDays:
    """The stored vectors a run's drift reference draws on, as days: the trailing days before ``start``
    (stored with their vectors, read from the vectors where not), or the pinned window or snapshot. Only
    the columns drift compares (the reference spans weeks).

    Of the shard's own instruments: a day is compared with what its instruments did before, never with
    other shards' days, which a run going on at the same time may be writing (the verdict would then
    depend on timing). A shard is a hash sample of the universe, so its reference is the universe's
    in distribution, from fewer rows."""
    from expectations.drift import ReferenceSpec, drift_columns

    spec = ReferenceSpec.from_suite(template)
    columns = drift_columns(template)
    with store.engine().connect() as conn:
        if spec.kind == "trailing":
            return read_trailing_reference(
                conn,
                feature_set=fs,
                timeframe=timeframe,
                before=start,
                partitions=spec.partitions,
                columns=columns,
                shard=shard,
                day_of=SESSIONS.trading_day,
            )
        if spec.kind == "snapshot":
            from marketfs.snapshots import read_snapshot

            history = shard.filter(read_snapshot(conn, spec.snapshot))
        else:
            history = read_vectors(
                conn,
                feature_set=fs,
                timeframe=timeframe,
                start=datetime.fromisoformat(spec.start).replace(tzinfo=UTC),
                end=datetime.fromisoformat(spec.end).replace(tzinfo=UTC),
                columns=columns,
                shard=shard,
            )
    return ReferenceDays.from_frame(history, columns, SESSIONS.trading_day)


def _roll(history: ReferenceDays, written: ReferenceDays, template: dict) -> ReferenceDays:
    """The reference for the next chunk: a trailing one takes in the days just written and keeps its
    last N days (whole trading days), as a fresh read would; a pinned one stays as it is. Bounded: a run
    over a year holds N days of the drift columns, never the range."""
    from expectations.drift import ReferenceSpec

    spec = ReferenceSpec.from_suite(template)
    if spec.kind != "trailing":
        return history
    return history.merged(written).last(spec.partitions)


def _drift(
    vectors: pl.DataFrame, history: ReferenceDays, template: dict, fs: FeatureSet, timeframe: str
) -> tuple[dict[str, GateResult], "DriftProfile"]:
    """One drift verdict per day (the day profile against its reference, one GX validation), and the profile."""
    from expectations.drift import drift_profile
    from expectations.gate import validate_days

    profile = drift_profile(
        vectors.drop(DAY),
        history,
        template,
        source=f"feature_vectors ({fs.version}, {timeframe})",
        day_of=SESSIONS.trading_day,
    )
    name = template["name"]
    results = validate_days(profile.frame, name, suite=profile.suite, examples=()) if profile.frame.height else {}
    verdicts: dict[str, GateResult] = {}
    for day, gate in results.items():
        table = profile.references.get(day)
        verdicts[day] = dataclasses.replace(
            gate,
            reference=_describe(table),
            reference_table=None if table is None else table.drop("reference", "reference_days", strict=False),
        )
    for day, reason in profile.not_evaluated.items():
        verdicts[day] = GateResult(
            suite=name,
            suite_file=suite_path(name),
            suite_version=str(template.get("meta", {}).get("suite_version", "")),
            outcomes=[],
            reference=f"not evaluated: {reason}",
            label=day,
        )
    return verdicts, profile


def _describe(table: pl.DataFrame | None) -> str | None:
    """What a day was compared with, once (the table repeats it on every row)."""
    if table is None or table.is_empty() or "reference" not in table.columns:
        return None
    return str(table["reference"][0])


FEATURE_ASSETS: list[dg.AssetsDefinition] = [a for fs in FEATURE_SETS.values() for a in feature_assets(fs)]
