"""Gates between computed data and the tables that serve it, judged and reported one day at a time.

Every verdict goes to ``quality_log`` under its day; a day with a critical breach has its rows
quarantined under a batch of its own, a Data Docs page rendered, and a failed check result on its
partition. What the caller writes afterwards is decided here: every passing day (independent
days, as raw deliveries), or only the days before the first breach (a state chain, as features
whose day D+1 continues day D's recursion state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import dagster as dg
import polars as pl

from assets.data_versions import InputProvenance, day_materializations
from assets.metadata import gate_metadata
from assets.partitions import RunScope, day_window, split_key
from assets.resources import FeatureStore
from expectations.gate import GateResult
from marketfs.holds import HeldInstrument, Holds
from marketfs.store.quality import log_verdicts, open_batch, quarantine_rows

# The check names every gated asset reports per day.
GATE_CHECK = "quality_gate"
DRIFT_CHECK = "drift_gate"


@dataclass
class Breach:
    day: str
    batch_id: int
    failed: dict[str, GateResult] = field(default_factory=dict)  # check name -> its failed verdict
    scope: RunScope | None = None
    # The instruments whose day is held (row-level breaches of theirs alone); None: the whole day is held.
    instruments: tuple[str, ...] | None = None

    @property
    def where(self) -> str:
        """The day (and its instruments when only they are held), and its shard when there are several."""
        day = self.day if self.scope is None or self.scope.shard.is_all else f"{self.day} ({self.scope.shard})"
        return day if self.instruments is None else f"{day} of {_listed(self.instruments)}"

    @property
    def whole_day(self) -> bool:
        return self.instruments is None

    def describe(self) -> str:
        """The failed expectations with their day, instruments and an example row each."""
        parts = []
        for check, gate in self.failed.items():
            for outcome in gate.blocking_failures:
                parts.append(f"{check} {outcome.label}: {outcome.describe()}")
        return "; ".join(parts)


@dataclass(frozen=True)
class DayCheck:
    """One check's verdict on one day, reported once the day's materialisation is recorded."""

    check: str
    day: str  # the partition key: the day, or day|shard
    passed: bool
    metadata: dict[str, dg.MetadataValue]
    # A day that failed only warning expectations is written and shows as a failed WARN check.
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR


@dataclass
class Judgement:
    accepted: list[str] = field(default_factory=list)  # days that may be (and are) written, in order
    breaches: list[Breach] = field(default_factory=list)
    checks: list[DayCheck] = field(default_factory=list)
    # What the run found beside the verdicts that tells a person what to do (an unexplained jump's prices).
    notes: list[str] = field(default_factory=list)

    def extend(self, other: Judgement) -> None:
        self.accepted.extend(other.accepted)
        self.breaches.extend(other.breaches)
        self.checks.extend(other.checks)
        self.notes.extend(other.notes)

    @property
    def day_breaches(self) -> list[Breach]:
        return [b for b in self.breaches if b.whole_day]

    def holds(self, asset: str, day: str | None = None) -> Holds:
        """The instruments this judgement held (on ``day``, or on any day, each from its first), held from the
        start of their day: what a write leaves alone and a computation leaves out."""
        held = Holds()
        for b in self.breaches:
            if b.instruments and day in (None, b.day):
                since = day_window(b.day)[0]
                held = held.merged(
                    Holds({i: HeldInstrument(i, since, b.day, asset, b.batch_id) for i in b.instruments})
                )
        return held


def features_in_run(context: dg.AssetExecutionContext, suffix: str = "") -> bool:
    """Whether this run materialises a feature asset (whose name ends with ``suffix``: ``_1d`` for what reads
    daily bars): it then fails for the instruments a raw step held, after serving the others (``report_run``)."""
    selection = context.dagster_run.asset_selection
    if not selection:  # None or empty: the job's every asset
        return True
    return any(
        key.to_user_string().startswith("feature_vectors_") and key.to_user_string().endswith(suffix)
        for key in selection
    )


def judge_days(
    context: dg.AssetExecutionContext,
    store: FeatureStore,
    *,
    days: list[str],
    checks: dict[str, dict[str, GateResult]],
    rows_of_day: Callable[[str], dict[str, pl.DataFrame]],
    chained: bool,
    scope: RunScope,
    publish: Callable[[str, str, GateResult], str | None] | None = None,
) -> Judgement:
    """Log and quarantine each day's verdicts; return which days may be written, and the check results.

    ``checks`` maps a check name to its verdict per day (days without rows have none);
    ``rows_of_day(day)`` gives the rows the day would write, per served table, for quarantine;
    ``publish(check, day, gate)`` renders a Data Docs page for a failed verdict and returns its URL.
    ``chained``: days after the first whole-day breach are not judged (they would continue its state).
    ``scope``: the shard the days belong to; verdicts, batches and checks are recorded under its keys.

    A day whose every blocking failure is row-level and names its instruments holds only those
    instruments' rows (a batch of that instrument-day): the day is accepted, to be written without them.
    """
    asset = context.asset_key.to_user_string()
    judgement = Judgement()
    with store.engine().begin() as conn:
        for day in days:
            if chained and judgement.day_breaches:
                break
            verdicts = {name: by_day[day] for name, by_day in checks.items() if day in by_day}
            failed = {name: gate for name, gate in verdicts.items() if not gate.passed}
            batch_id = None
            if failed:
                if publish is not None:
                    failed = {name: _with_page(publish, context, name, day, gate) for name, gate in failed.items()}
                    verdicts.update(failed)
                start, end = day_window(day)
                instruments = _breaching_instruments(failed)
                if instruments is not None and chained and _every_instrument(rows_of_day(day), instruments):
                    # Every instrument of a feature day breaching is the day's breach (a suite, a systematic
                    # defect): the day is held whole and the days after it wait, as a day-scope breach does.
                    instruments = None
                reason = "; ".join(
                    f"{g.suite}: {', '.join(o.label for o in g.blocking_failures)}" for g in failed.values()
                )
                if instruments is not None:
                    reason = f"{_listed(instruments)}: {reason}"
                batch_id = open_batch(
                    conn,
                    run_id=context.run_id,
                    asset=asset,
                    partition=scope.key(day),
                    start=start,
                    end=end,
                    reason=reason,
                    shard=scope.shard,
                    instruments=list(instruments) if instruments is not None else None,
                )
                for table, frame in rows_of_day(day).items():
                    if instruments is not None:
                        frame = frame.filter(pl.col("instrument_id").is_in(list(instruments)))
                    quarantine_rows(conn, batch_id, table, frame)
                judgement.breaches.append(
                    Breach(day=day, batch_id=batch_id, failed=failed, scope=scope, instruments=instruments)
                )
                if instruments is not None:
                    judgement.accepted.append(day)
            else:
                judgement.accepted.append(day)
            for name, gate in verdicts.items():
                log_verdicts(
                    conn,
                    run_id=context.run_id,
                    asset=asset,
                    partition=scope.key(day),
                    suite=gate.suite,
                    outcomes=[o.as_log_row() for o in gate.outcomes],
                    reference=gate.reference,
                    docs_url=gate.docs_url,
                    batch_id=batch_id,
                )
                metadata = gate_metadata(gate)
                if batch_id is not None:
                    metadata["quarantine_batch"] = dg.MetadataValue.int(batch_id)
                    held = judgement.breaches[-1].instruments
                    metadata["held"] = dg.MetadataValue.text(
                        "the whole day" if held is None else f"instruments {', '.join(held)}; the others are served"
                    )
                severity = dg.AssetCheckSeverity.WARN if gate.passed else dg.AssetCheckSeverity.ERROR
                judgement.checks.append(
                    DayCheck(
                        check=name, day=scope.key(day), passed=not gate.failures, metadata=metadata, severity=severity
                    )
                )
    return judgement


def report_run(
    context: dg.AssetExecutionContext,
    provenance: InputProvenance,
    materializations: list[tuple],
    judgement: Judgement,
    *,
    chained: bool,
    failure: dg.Failure | None = None,
    held_fails_later: bool = False,
) -> Iterator:
    """Everything a run records, in the order Dagster needs it; then the run's failure, if any.

    A run that wrote every day first yields its own ``MaterializeResult`` (Dagster records one
    materialisation per partition of the range and runs the downstream steps), then each written
    day's materialisation, which is then the latest of its partition, then the check results, which
    target those. A run that stopped (``failure``: a bad file or missing history in a later chunk)
    or had a breach records the days it wrote and fails.

    ``held_fails_later``: a step of this run downstream fails for the instruments held here, so breaches
    that held instruments alone (their days were written without them) let the downstream steps run,
    which serve the other instruments; the run fails there, never green.
    """
    deferred = held_fails_later and not judgement.day_breaches
    if failure is None and (not judgement.breaches or deferred):
        yield dg.MaterializeResult(
            asset_key=context.asset_key, metadata={"days_written": dg.MetadataValue.int(len(judgement.accepted))}
        )
    yield from day_materializations(provenance, materializations)
    yield from check_results(context, judgement.checks)
    if failure is not None:
        raise failure
    if judgement.breaches and deferred:
        context.log.error(breach_failure(context, judgement, chained=chained).description)
    elif judgement.breaches:
        raise breach_failure(context, judgement, chained=chained)


def check_results(context: dg.AssetExecutionContext, checks: list[DayCheck]) -> Iterator[dg.AssetCheckEvaluation]:
    """The check results, each pointing at the latest materialisation of its partition.

    Dagster shows a partition's check result as current only when it targets the partition's
    latest materialisation (else "missing"), so they are yielded after the day's materialisations.
    """
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )
    from dagster._core.storage.event_log.base import AssetRecordsFilter

    days = sorted({c.day for c in checks})
    latest: dict[str, AssetCheckEvaluationTargetMaterializationData] = {}
    if days:
        records = context.instance.fetch_materializations(
            AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=days), limit=4 * len(days)
        ).records
        for record in records:  # newest first
            if record.partition_key not in latest:
                latest[record.partition_key] = AssetCheckEvaluationTargetMaterializationData(
                    storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
                )
    for c in checks:
        yield dg.AssetCheckEvaluation(
            asset_key=context.asset_key,
            check_name=c.check,
            passed=c.passed,
            partition=c.day,
            metadata=c.metadata,
            severity=c.severity,
            target_materialization_data=latest.get(c.day),
        )


def _with_page(publish, context: dg.AssetExecutionContext, check: str, day: str, gate: GateResult) -> GateResult:
    """The verdict with its Data Docs page; a page that cannot be rendered (disk full, ...) never stops the gate."""
    try:
        return replace(gate, docs_url=publish(check, day, gate))
    except Exception as exc:  # a report, not the gate: any failure to render is logged and the verdict stands
        context.log.warning(f"Data Docs page for {gate.suite} {day} not rendered: {exc}")
        return gate


def breach_failure(context: dg.AssetExecutionContext, judgement: Judgement, *, chained: bool) -> dg.Failure:
    """The run's failure: which days (or instrument-days) breached, with instrument and ts; what was
    written; the one command that fixes it."""
    asset = context.asset_key.to_user_string()
    lines = []
    for breach in judgement.breaches:
        if breach.whole_day:
            lines.append(
                f"{asset} {breach.where} breached its gate; nothing of {breach.where} was written. The rows are in "
                f"quarantine batch {breach.batch_id} (marketfs quarantine show {breach.batch_id}). {breach.describe()}"
            )
        else:
            lines.append(
                f"{asset} {breach.where} breached its gate: those rows are held in quarantine batch "
                f"{breach.batch_id} (marketfs quarantine show {breach.batch_id}), the other instruments of "
                f"{breach.day} were written, and the held instruments' later days wait for this one. "
                f"{breach.describe()}"
            )
    lines.extend(judgement.notes)
    first = judgement.breaches[0]
    if judgement.accepted:
        lines.append(f"Written: {_days(judgement.accepted)}.")
    shard = first.scope.shard if first.scope is not None else None
    day_breaches = judgement.day_breaches
    held_back = []
    if chained and day_breaches:
        for key in context.partition_keys:
            day, of = split_key(key)
            if day > day_breaches[0].day and (shard is None or of == shard):
                held_back.append(day)
    if held_back:
        stop = day_breaches[0]
        lines.append(
            f"Not written: {_days(held_back)}, which continue {stop.day}'s feature state. Fix {stop.day} "
            f"first (re-deliver its data, or release or discard batch {stop.batch_id}), then "
            f"recompute from {first.day}: make recompute FROM={first.day}."
        )
    else:
        lines.append(
            f"Fix {first.day} first (re-deliver its data, or release or discard batch {first.batch_id}), then "
            f"recompute from {first.day}: make recompute FROM={first.day}."
        )
    return dg.Failure(
        description="\n".join(lines)[:6000],
        metadata={
            "breached_days": dg.MetadataValue.text(", ".join(b.day for b in judgement.breaches)),
            "quarantine_batches": dg.MetadataValue.text(", ".join(str(b.batch_id) for b in judgement.breaches)),
        },
        allow_retries=False,  # the same rows would breach the same gate again
    )


def _every_instrument(tables: dict[str, pl.DataFrame], instruments: tuple[str, ...]) -> bool:
    present = set()
    for frame in tables.values():
        if "instrument_id" in frame.columns:
            present.update(frame["instrument_id"].unique().to_list())
    return present <= set(instruments)


def _breaching_instruments(failed: dict[str, GateResult]) -> tuple[str, ...] | None:
    """The instruments that alone breach every failed verdict of a day, or None when any breach is the day's."""
    found: set[str] = set()
    for gate in failed.values():
        instruments = gate.breaching_instruments
        if instruments is None:
            return None
        found.update(instruments)
    return tuple(sorted(found)) if found else None


def _listed(instruments: tuple[str, ...] | list[str], limit: int = 10) -> str:
    shown = ", ".join(instruments[:limit])
    more = f" and {len(instruments) - limit} more" if len(instruments) > limit else ""
    return f"instrument{'s' if len(instruments) > 1 else ''} {shown}{more}"


def _days(days: list[str]) -> str:
    return days[0] if len(days) == 1 else f"{days[0]}..{days[-1]} ({len(days)} days)"
