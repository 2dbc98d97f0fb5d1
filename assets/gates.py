"""Gates between computed data and the tables that serve it, judged and reported one day at a time.

Every verdict goes to ``quality_log`` under its day; a day with a critical breach has its rows
quarantined under a batch of its own, a Data Docs page rendered, and a failed check result on its
partition. What the caller writes afterwards is decided here: every passing day (independent
days, as raw deliveries), or only the days before the first breach (a state chain, as features
whose day D+1 continues day D's recursion state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dagster as dg
import polars as pl

from assets.metadata import gate_metadata
from assets.partitions import day_window
from expectations.gate import GateResult
from marketfs.store.quality import log_verdicts, open_batch, quarantine_rows
from pipelines.resources import FeatureStore


@dataclass
class Breach:
    day: str
    batch_id: int
    failed: dict[str, GateResult] = field(default_factory=dict)  # check name -> its failed verdict

    def describe(self) -> str:
        """The failed expectations with their day, instruments and an example row each."""
        parts = []
        for check, gate in self.failed.items():
            for outcome in gate.blocking_failures:
                parts.append(f"{check} {outcome.label}: {outcome.describe()}")
        return "; ".join(parts)


@dataclass
class Judgement:
    accepted: list[str] = field(default_factory=list)  # days that may be written, in order
    breaches: list[Breach] = field(default_factory=list)
    held_back: list[str] = field(default_factory=list)  # days after a breach in a state chain: not written, not judged
    evaluations: list[dg.AssetCheckEvaluation] = field(default_factory=list)  # to report after the writes

    def extend(self, other: Judgement) -> None:
        self.accepted.extend(other.accepted)
        self.breaches.extend(other.breaches)
        self.held_back.extend(other.held_back)
        self.evaluations.extend(other.evaluations)


def judge_days(
    context: dg.AssetExecutionContext,
    store: FeatureStore,
    *,
    days: list[str],
    checks: dict[str, dict[str, GateResult]],
    rows_of_day: Callable[[str], dict[str, pl.DataFrame]],
    chained: bool,
    publish: Callable[[str, str, GateResult], str | None] | None = None,
) -> Judgement:
    """Log and quarantine each day's verdicts; return which days may be written, and the check results.

    ``checks`` maps a check name to its verdict per day (days without rows have none);
    ``rows_of_day(day)`` gives the rows the day would write, per served table, for quarantine;
    ``publish(check, day, gate)`` renders a Data Docs page for a failed verdict and returns its URL.
    """
    asset = context.asset_key.to_user_string()
    judgement = Judgement()
    with store.engine().begin() as conn:
        for day in days:
            if chained and judgement.breaches:
                judgement.held_back.append(day)
                continue
            verdicts = {name: by_day[day] for name, by_day in checks.items() if day in by_day}
            failed = {name: gate for name, gate in verdicts.items() if not gate.passed}
            batch_id = None
            if failed:
                if publish is not None:
                    failed = {name: _with_page(publish, context, name, day, gate) for name, gate in failed.items()}
                    verdicts.update(failed)
                start, end = day_window(day)
                reason = "; ".join(
                    f"{g.suite}: {', '.join(o.label for o in g.blocking_failures)}" for g in failed.values()
                )
                batch_id = open_batch(
                    conn, run_id=context.run_id, asset=asset, partition=day, start=start, end=end, reason=reason
                )
                for table, frame in rows_of_day(day).items():
                    quarantine_rows(conn, batch_id, table, frame)
                judgement.breaches.append(Breach(day=day, batch_id=batch_id, failed=failed))
            else:
                judgement.accepted.append(day)
            for name, gate in verdicts.items():
                log_verdicts(
                    conn,
                    run_id=context.run_id,
                    asset=asset,
                    partition=day,
                    suite=gate.suite,
                    outcomes=[o.as_log_row() for o in gate.outcomes],
                    reference=gate.reference,
                    docs_url=gate.docs_url,
                    batch_id=batch_id,
                )
                metadata = gate_metadata(gate)
                if batch_id is not None:
                    metadata["quarantine_batch"] = dg.MetadataValue.int(batch_id)
                judgement.evaluations.append(
                    dg.AssetCheckEvaluation(
                        asset_key=context.asset_key,
                        check_name=name,
                        passed=gate.passed,
                        partition=day,
                        metadata=metadata,
                        severity=dg.AssetCheckSeverity.ERROR,
                    )
                )
    return judgement


def reported(context: dg.AssetExecutionContext, evaluations: list[dg.AssetCheckEvaluation]) -> Iterator:
    """The check results, each pointing at the latest materialisation of its partition.

    Yield them after the day's materialisations: Dagster shows a partition's check result as
    current only when it targets the partition's latest materialisation (else "missing").
    """
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )
    from dagster._core.storage.event_log.base import AssetRecordsFilter

    days = sorted({e.partition for e in evaluations if e.partition})
    latest: dict[str, AssetCheckEvaluationTargetMaterializationData] = {}
    if days:
        records = context.instance.fetch_materializations(
            AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=days), limit=4 * len(days)
        ).records
        for record in records:  # newest first
            partition = record.partition_key
            if partition not in latest:
                latest[partition] = AssetCheckEvaluationTargetMaterializationData(
                    storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
                )
    for e in evaluations:
        yield dg.AssetCheckEvaluation(
            asset_key=e.asset_key,
            check_name=e.check_name,
            passed=e.passed,
            partition=e.partition,
            metadata=e.metadata,
            severity=e.severity,
            target_materialization_data=latest.get(e.partition),
        )


def _with_page(publish, context: dg.AssetExecutionContext, check: str, day: str, gate: GateResult) -> GateResult:
    """The verdict with its Data Docs page; a page that cannot be rendered (disk full, ...) never stops the gate."""
    from dataclasses import replace

    try:
        return replace(gate, docs_url=publish(check, day, gate))
    except Exception as exc:  # a report, not the gate: any failure to render is logged and the verdict stands
        context.log.warning(f"Data Docs page for {gate.suite} {day} not rendered: {exc}")
        return gate


def breach_failure(asset: str, judgement: Judgement, *, written: list[str], first_of_chain_fix: bool) -> dg.Failure:
    """The run's failure: which days breached (with instrument and ts), which were written, what to do."""
    lines = []
    for breach in judgement.breaches:
        lines.append(
            f"{asset} {breach.day} breached its gate; nothing of {breach.day} was written. The rows are in "
            f"quarantine batch {breach.batch_id} (marketfs quarantine show {breach.batch_id}). {breach.describe()}"
        )
    first = judgement.breaches[0].day
    if written:
        lines.append(f"Written: {_days(written)}.")
    if judgement.held_back:
        lines.append(
            f"Not written: {_days(judgement.held_back)}, which continue {first}'s feature state. Fix {first} "
            f"first (re-deliver its data, or release or discard batch {judgement.breaches[0].batch_id}), then "
            f"recompute from {first}: make recompute FROM={first}."
        )
    elif first_of_chain_fix:
        lines.append(f"Fix {first} first, then recompute from {first}: make recompute FROM={first}.")
    return dg.Failure(
        description="\n".join(lines)[:6000],
        metadata={
            "breached_days": dg.MetadataValue.text(", ".join(b.day for b in judgement.breaches)),
            "quarantine_batches": dg.MetadataValue.text(", ".join(str(b.batch_id) for b in judgement.breaches)),
        },
        allow_retries=False,  # the same rows would breach the same gate again
    )


def _days(days: list[str]) -> str:
    return days[0] if len(days) == 1 else f"{days[0]}..{days[-1]} ({len(days)} days)"
