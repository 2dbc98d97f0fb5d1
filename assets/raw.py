"""Raw inputs as they arrived, and what is derived from them alone: minute bars, news events, daily bars.

Raw days are independent of each other: a delivery that breaches its gate on one day is
quarantined for that day alone, and every other day of the run is written.
"""

import dataclasses
from collections.abc import Callable, Iterator
from datetime import datetime

import dagster as dg
import polars as pl

from assets.data_versions import InputProvenance, content_version
from assets.expected_data import EXPECTED_CHECK, expected_instruments, session_verdicts
from assets.gates import (
    GATE_CHECK,
    DayCheck,
    Judgement,
    breach_failure,
    features_in_run,
    judge_days,
    report_run,
)
from assets.metadata import frame_summary
from assets.partitions import (
    DAY,
    SESSIONS,
    DayChunks,
    RunScope,
    daily_asset,
    day_window,
    run_scopes,
    split_key,
    with_day,
)
from assets.resources import FeatureStore, MarketData, translate_database_errors
from marketfs.db import retry_on_conflict
from marketfs.features.flags import QualityFlag
from marketfs.features.resample import daily_bars
from marketfs.holds import Holds
from marketfs.sources import SourceFileError
from marketfs.sources.base import Delivery
from marketfs.sources.normalize import normalize_bars, normalize_events
from marketfs.store.bars import read_bars, replace_bars
from marketfs.store.coverage import holes_before
from marketfs.store.events import replace_events
from marketfs.store.gaps import declared_instrument_days
from marketfs.store.holds import held_instrument_days, resolve_superseded
from marketfs.store.timescale import settle_write
from marketfs.universe import active_universe


def _gate_checks(asset: str) -> dict[str, str]:
    return {
        GATE_CHECK: f"Great Expectations suite expectations/suites/{asset}.json on the delivered rows, one verdict "
        "per day; a breaching day is quarantined and not written."
    }


def _delivery_of(source: object, method: str) -> Callable[[datetime, datetime], Delivery]:
    """The source's day-by-day delivery (landing files), or its rows as one delivery (synthetic)."""
    if hasattr(source, "delivery"):
        return source.delivery
    fetch = getattr(source, method)
    return lambda start, end: Delivery(rows=fetch(start, end))


def _delivered(deliver: Callable[[datetime, datetime], Delivery], start: datetime, end: datetime) -> Delivery:
    """What the source delivers for the window; a source that cannot be read at all fails the run."""
    try:
        return deliver(start, end)
    except SourceFileError as exc:
        raise dg.Failure(
            description=str(exc), metadata={"file": dg.MetadataValue.path(str(exc.path))}, allow_retries=False
        ) from exc


def _file_failure(
    context: dg.AssetExecutionContext, bad_days: dict[str, SourceFileError], judged: Judgement
) -> dg.Failure:
    """The run's failure when files spoiled some days: each day with its file, line and fix; what was written."""
    asset = context.asset_key.to_user_string()
    lines = [f"{asset} {day} was not ingested (nothing of it written): {error}" for day, error in bad_days.items()]
    if judged.breaches:
        lines.append(breach_failure(context, judged, chained=False).description)
    elif judged.accepted:
        lines.append(f"Written: {', '.join(judged.accepted)}.")
    first = split_key(min(bad_days))[0]
    lines.append(
        f"Correct the file(s) and drop them again (the landing sensor re-runs the days they hold), "
        f"or re-run from {first}: make recompute FROM={first}."
    )
    files = sorted({str(e.path) for e in bad_days.values()})
    return dg.Failure(
        description="\n".join(lines)[:6000],
        metadata={
            "failed_days": dg.MetadataValue.text(", ".join(bad_days)),
            "files": dg.MetadataValue.text(", ".join(files)),
        },
        allow_retries=False,  # the same file would fail the same way
    )


def refuse_holes(context: dg.AssetExecutionContext, store: FeatureStore, timeframe: str) -> None:
    """Refuse, before anything is written, a run whose first day follows sessions the store holds no bar of:
    its windows would read across them. Names the sessions and the command that fills them."""
    asset = context.asset_key.to_user_string()
    last = max(split_key(k)[0] for k in context.partition_keys)
    with store.engine().connect() as conn:
        holes = [
            hole
            for scope in run_scopes(context.partition_keys)
            for hole in holes_before(conn, scope.days[0], [scope.shard], (timeframe,)).values()
        ]
    for hole in holes[:1]:
        raise dg.Failure(
            description=f"{asset}: refused, nothing of this run was written. {hole.describe(end=last)}",
            metadata={"missing_sessions": dg.MetadataValue.text(", ".join(map(str, hole.missing)))},
            allow_retries=False,
        )


def _file_check(day: str, error: SourceFileError) -> DayCheck:
    """A failed gate result for a day whose delivery could not be read: the gate could not pass it."""
    metadata = {
        "file": dg.MetadataValue.path(str(error.path)),
        "error": dg.MetadataValue.text(str(error)),
    }
    if error.line is not None:
        metadata["line"] = dg.MetadataValue.int(error.line)
    return DayCheck(check=GATE_CHECK, day=day, passed=False, metadata=metadata)


def _write_days(
    context: dg.AssetExecutionContext,
    store: FeatureStore,
    scope: RunScope,
    days: list[str],
    table: str,
    write_day: Callable[[object, str], tuple[dict, pl.DataFrame]],
) -> list[tuple]:
    """The accepted days in one transaction (retried when it loses a deadlock), then the table's upkeep.

    ``write_day(conn, day)`` writes one day (of the scope's shard) and returns its metadata and the rows
    stored; the result is one (asset key, partition key, metadata, data version) per day, for ``report_run``.
    """
    if not days:
        return []
    asset = context.asset_key.to_user_string()

    def write_all() -> list[tuple]:
        written = []
        with store.engine().begin() as conn:
            for day in days:
                metadata, stored = write_day(conn, day)
                # This run's verdict on the day replaces the batches earlier runs held it in.
                resolved = resolve_superseded(conn, asset=asset, partition=scope.key(day), run_id=context.run_id)
                if resolved:
                    metadata["resolved_batches"] = dg.MetadataValue.text(", ".join(map(str, resolved)))
                written.append((context.asset_key, scope.key(day), metadata, content_version(stored)))
        return written

    written = retry_on_conflict(write_all, f"writing {asset} {days[0]}..{days[-1]}")
    # After the commit: what the write moved out of the columnstore goes back, and the rollup follows.
    for done in settle_write(store.engine(), table, day_window(days[0])[0], day_window(days[-1])[1]):
        context.log.debug(done)
    return written


def _held_metadata(metadata: dict[str, dg.MetadataValue], held: Holds) -> dict[str, dg.MetadataValue]:
    """A written day's metadata, naming the instruments whose rows of it are held in quarantine."""
    if held:
        metadata["held_instruments"] = dg.MetadataValue.text(held.describe())
    return metadata


@dataclasses.dataclass
class _Ingestion:
    """What a raw asset's run keeps across its chunks of days: the verdicts, the days files spoiled, the
    materialisations written, and how it ends."""

    context: dg.AssetExecutionContext
    judged: Judgement = dataclasses.field(default_factory=Judgement)
    bad_days: dict[str, SourceFileError] = dataclasses.field(default_factory=dict)
    materializations: list[tuple] = dataclasses.field(default_factory=list)
    failure: dg.Failure | None = None
    _warned: set[str] = dataclasses.field(default_factory=set)

    def chunks(
        self, deliver: Callable[[datetime, datetime], Delivery]
    ) -> Iterator[tuple[RunScope, DayChunks, Delivery, list[str]]]:
        """Each chunk's scope (shard), plan, delivery of the shard's instruments and its sound days; a day a
        file spoils gets a failed check and is left out.

        A file that cannot say which days it holds is warned of once per run and blocks no day. A bad
        row spoils its day in every shard: which instrument it belongs to may be what is wrong with it.
        """
        for scope in run_scopes(self.context.partition_keys):
            plan = DayChunks(scope.days)
            for days in plan:
                delivery = _delivered(deliver, day_window(days[0])[0], day_window(days[-1])[1])
                for error in map(str, delivery.unplaced):
                    if error not in self._warned:
                        self._warned.add(error)
                        self.context.log.warning(f"landing file skipped, no day of it is ingested: {error}")
                for error in map(str, delivery.set_aside):
                    if error not in self._warned:
                        self._warned.add(error)
                        self.context.log.warning(f"landing file rows set aside: {error}")
                spoiled = {day: delivery.day_errors[day] for day in days if day in delivery.day_errors}
                self.bad_days.update({scope.key(day): error for day, error in spoiled.items()})
                self.judged.checks.extend(_file_check(scope.key(day), error) for day, error in spoiled.items())
                mine = dataclasses.replace(delivery, rows=scope.shard.filter(delivery.rows))
                yield scope, plan, mine, [day for day in days if day not in spoiled]

    def report(self, provenance: InputProvenance, reads: str = "") -> Iterator:
        """Everything the run records, then its failure: a stopped chunk, or the days files spoiled.
        ``reads``: the suffix of the feature assets that read this asset (``_1d`` for daily bars)."""
        failure = self.failure
        if failure is None and self.bad_days:
            failure = _file_failure(self.context, self.bad_days, self.judged)
        yield from report_run(
            self.context,
            provenance,
            self.materializations,
            self.judged,
            chained=False,
            failure=failure,
            held_fails_later=features_in_run(self.context, reads),
        )


def _ingest(
    context: dg.AssetExecutionContext,
    store: FeatureStore,
    *,
    deliver: Callable[[datetime, datetime], Delivery],
    ts_column: str,
    table: str,
    write: Callable,
    summarise: Callable[[pl.DataFrame, pl.DataFrame], dict[str, dg.MetadataValue]],
    hole_timeframe: str | None = None,
) -> Iterator:
    """Fetch, gate per day, write the passing days; one materialisation per written day.

    A day that a landing file spoils (a bad row on it) is neither judged nor written, and the step
    fails naming the file and line after the other days are written; a file that cannot say which
    days it holds is a warning of every run, and blocks no day.
    """
    from expectations.docs import DataDocs
    from expectations.gate import load_suite_json, publish_day, suite_path, validate_days

    asset = context.asset_key.to_user_string()
    if hole_timeframe is not None:
        refuse_holes(context, store, hole_timeframe)
    provenance = InputProvenance.capture(context)
    suite = load_suite_json(suite_path(asset))
    docs = DataDocs.default()
    run = _Ingestion(context)
    try:
        for scope, plan, delivery, sound in run.chunks(deliver):
            if not sound:
                continue
            # A row without a timestamp belongs to no day: it is judged (and held) with the first one.
            delivered = with_day(delivery.rows, ts_column).with_columns(pl.col(DAY).fill_null(sound[0]))
            by_day = {key: rows.drop(DAY) for (key,), rows in delivered.partition_by(DAY, as_dict=True).items()}
            plan.saw(delivered.height, len(by_day))
            empty = delivered.clear().drop(DAY)

            def publish(check: str, day: str, gate, by_day: dict = by_day, scope=scope) -> str | None:
                label = f"{asset}-{scope.key(day)}".replace("|", "-shard")
                return publish_day(by_day[day], asset, suite, docs=docs, label=label, run_name=context.run_id)

            judgement = judge_days(
                context,
                store,
                days=sound,
                checks={GATE_CHECK: validate_days(delivered, asset, suite=suite)},
                rows_of_day=lambda day, by_day=by_day: {table: by_day[day]},
                chained=False,
                scope=scope,
                publish=publish,
            )
            run.judged.extend(judgement)

            def write_day(
                conn, day: str, by_day: dict = by_day, empty=empty, scope=scope, judgement=judgement
            ) -> tuple[dict, pl.DataFrame]:
                held = judgement.holds(asset, day)
                rows = held.filter(by_day.get(day, empty), ts_column)
                stored = write(conn, rows, *day_window(day), scope.shard, held)
                return _held_metadata(summarise(rows, stored), held), stored

            run.materializations += _write_days(context, store, scope, judgement.accepted, table, write_day)
    except dg.Failure as exc:  # a folder that cannot be read in a later chunk: the days already written are recorded
        run.failure = exc
    yield from run.report(provenance)


@daily_asset(
    "raw_ohlcv",
    group_name="raw",
    code_version="3",
    description="One-minute OHLCV bars (instrument_id, ts UTC = the bar's open, open, high, low, close, volume) "
    "in table ohlcv_1m.",
    checks=_gate_checks("raw_ohlcv"),
)
@translate_database_errors
def raw_ohlcv(context: dg.AssetExecutionContext, store: FeatureStore, market_data: MarketData):
    def write(conn, delivered: pl.DataFrame, start: datetime, end: datetime, shard, held: Holds) -> pl.DataFrame:
        bars = normalize_bars(delivered)
        replace_bars(conn, bars, start, end, shard=shard, protect=held)
        return bars

    def summarise(delivered: pl.DataFrame, bars: pl.DataFrame) -> dict[str, dg.MetadataValue]:
        metadata = frame_summary(bars.drop("source_flags"))
        metadata["delivered_rows"] = dg.MetadataValue.int(delivered.height)
        metadata["flag_TIMESTAMP_MISMATCH"] = dg.MetadataValue.int(int(bars["source_flags"].list.len().gt(0).sum()))
        return metadata

    yield from _ingest(
        context,
        store,
        deliver=_delivery_of(market_data.bar_source(), "bars"),
        ts_column="ts",
        table="ohlcv_1m",
        write=write,
        summarise=summarise,
        hole_timeframe="1m",
    )


@daily_asset(
    "raw_events",
    group_name="raw",
    code_version="2",
    description="News events (event_id, instrument_id, published_at UTC, sentiment, confidence, source) "
    "in table news_events, partitioned by publication day; each event_id kept once.",
    checks=_gate_checks("raw_events"),
)
@translate_database_errors
def raw_events(context: dg.AssetExecutionContext, store: FeatureStore, market_data: MarketData):
    def write(conn, delivered: pl.DataFrame, start: datetime, end: datetime, shard, held: Holds) -> pl.DataFrame:
        events = normalize_events(delivered)
        replace_events(conn, events, start, end, shard=shard, protect=held)
        return events

    def summarise(delivered: pl.DataFrame, events: pl.DataFrame) -> dict[str, dg.MetadataValue]:
        metadata = frame_summary(events.rename({"published_at": "ts"}))
        metadata["delivered_rows"] = dg.MetadataValue.int(delivered.height)
        metadata["duplicates_dropped"] = dg.MetadataValue.int(delivered.height - events.height)
        return metadata

    yield from _ingest(
        context,
        store,
        deliver=_delivery_of(market_data.event_source(), "events"),
        ts_column="published_at",
        table="news_events",
        write=write,
        summarise=summarise,
    )


def _daily_checks() -> dict[str, str]:
    return {
        GATE_CHECK: "Great Expectations suite expectations/suites/raw_ohlcv.json (the raw gate) on each session's "
        "daily bars, delivered or built from minute bars; a breaching session is quarantined and not written.",
        EXPECTED_CHECK: "Each session of the universe's calendar holds daily bars of at least min_instrument_share of "
        "the expected instruments (marketfs/config/universes.toml); an empty session fails.",
    }


def _combined_daily(built: pl.DataFrame, delivered: pl.DataFrame) -> pl.DataFrame:
    """Delivered daily bars prevail over bars built from minutes of the same (instrument, session): a vendor's
    daily bar carries the official auction prices, which a minute feed may not."""
    if delivered.is_empty():
        return built
    delivered = delivered.with_columns(pl.lit([], pl.List(pl.String)).alias("source_flags"))
    kept = built.join(delivered.select("instrument_id", "ts"), on=["instrument_id", "ts"], how="anti")
    return pl.concat([kept, delivered.select(built.columns)]).sort("instrument_id", "ts")


@daily_asset(
    "bars_1d",
    group_name="raw",
    code_version="3",
    deps=["raw_ohlcv"],
    description="Daily bars, one per instrument and session of the universe's calendar, in table ohlcv_1d: "
    "delivered in bars_1d/ files, or built from the session's minute bars (open first, high max, low min, close "
    "last, volume sum; prints outside the session excluded), stamped at the session's last minute (known at its "
    "close); PARTIAL_SESSION where the minutes cover too little of the session.",
    checks=_daily_checks(),
)
@translate_database_errors
def bars_1d(context: dg.AssetExecutionContext, store: FeatureStore, market_data: MarketData) -> Iterator:
    from expectations.docs import DataDocs
    from expectations.gate import load_suite_json, publish_day, suite_path, validate_days

    universe = active_universe()
    refuse_holes(context, store, "1d")
    provenance = InputProvenance.capture(context)
    suite = load_suite_json(suite_path("raw_ohlcv"))
    docs = DataDocs.default()
    deliver = _delivery_of(market_data.daily_bar_source(), "daily")
    run = _Ingestion(context)
    try:
        for scope, plan, delivery, sound in run.chunks(deliver):
            if not sound:
                continue
            start, end = day_window(sound[0])[0], day_window(sound[-1])[1]
            with store.engine().connect() as conn:
                minute = read_bars(conn, start, end, shard=scope.shard)
                # The chunk is sized by the minute bars it reads (390 a day per instrument), not by the daily
                # bars they make: sized by those, one chunk read a whole month of minute bars at once.
                minute_rows = minute.height
                built = daily_bars(minute)
                del minute
                expected, source = expected_instruments(
                    conn, universe, market_data.declared_instruments(), start, shard=scope.shard
                )
                # An instrument whose minute bars of a session are held has no daily bar of it until they are
                # fixed: it is neither built from what is left nor counted as missing from the delivery.
                minute_held = held_instrument_days(conn, "raw_ohlcv", start, end, scope.shard)
                missing_for_good = declared_instrument_days(conn, start, end)
            daily = with_day(_combined_daily(built, delivery.rows))
            if minute_held:
                held_rows = pl.DataFrame(
                    [(d, i) for d, held in minute_held.items() for i in held.held],
                    schema={DAY: daily.schema[DAY], "instrument_id": pl.String},
                    orient="row",
                )
                daily = daily.join(held_rows, on=[DAY, "instrument_id"], how="anti", maintain_order="left")
            by_day = {key: rows.drop(DAY) for (key,), rows in daily.partition_by(DAY, as_dict=True).items()}
            plan.saw(max(daily.height, minute_rows), len(by_day))
            empty = daily.clear().drop(DAY)

            def publish(check: str, day: str, gate, by_day: dict = by_day, scope=scope) -> str | None:
                if check != GATE_CHECK:
                    return None
                label = f"bars_1d-{scope.key(day)}".replace("|", "-shard")
                return publish_day(by_day[day], "raw_ohlcv", suite, docs=docs, label=label, run_name=context.run_id)

            judgement = judge_days(
                context,
                store,
                days=sound,
                checks={
                    GATE_CHECK: validate_days(daily.drop("source_flags"), "raw_ohlcv", suite=suite),
                    EXPECTED_CHECK: session_verdicts(
                        by_day,
                        sound,
                        universe,
                        expected,
                        source,
                        learnt=not market_data.declared_instruments() and not universe.instruments,
                        held={
                            d: set(minute_held.get(d, Holds()).held) | missing_for_good.get(d, set())
                            for d in {*minute_held, *missing_for_good}
                        },
                    ),
                },
                rows_of_day=lambda day, by_day=by_day, empty=empty: {"ohlcv_1d": by_day.get(day, empty)},
                chained=False,
                scope=scope,
                publish=publish,
            )
            run.judged.extend(judgement)

            def write_day(
                conn,
                day: str,
                by_day: dict = by_day,
                empty=empty,
                scope=scope,
                judgement=judgement,
                minute_held=minute_held,
            ) -> tuple[dict, pl.DataFrame]:
                held = judgement.holds("bars_1d", day).merged(minute_held.get(day, Holds()))
                rows = held.filter(by_day.get(day, empty))
                replace_bars(conn, rows, *day_window(day), timeframe="1d", shard=scope.shard, protect=held)
                return _held_metadata(_daily_summary(day, rows), held), rows

            run.materializations += _write_days(context, store, scope, judgement.accepted, "ohlcv_1d", write_day)
    except dg.Failure as exc:
        run.failure = exc
    yield from run.report(provenance, reads="_1d")


def _daily_summary(day: str, bars: pl.DataFrame) -> dict[str, dg.MetadataValue]:
    session_open, session_close = SESSIONS.bounds(day)
    metadata = frame_summary(bars.drop("source_flags"))
    metadata["session"] = dg.MetadataValue.text(
        f"{SESSIONS.name} {day}: open {session_open:%Y-%m-%d %H:%M}, close {session_close:%Y-%m-%d %H:%M} UTC"
    )
    partial = int(bars["source_flags"].list.contains(QualityFlag.PARTIAL_SESSION.value).sum()) if bars.height else 0
    metadata["flag_PARTIAL_SESSION"] = dg.MetadataValue.int(partial)
    return metadata
