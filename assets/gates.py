"""Gates between computed data and the tables that serve it, as Dagster sees them.

Every verdict goes to ``quality_log`` and Data Docs; a critical breach quarantines the rows,
reports the failed check and raises before anything reaches the served table.
"""

from collections.abc import Iterator

import dagster as dg
import polars as pl

from assets.metadata import gate_metadata
from expectations.gate import GateResult
from marketfs.store.quality import log_verdicts, open_batch, quarantine_rows
from pipelines.resources import FeatureStore


def partition_label(context: dg.AssetExecutionContext) -> str:
    keys = context.partition_key_range
    return keys.start if keys.start == keys.end else f"{keys.start}..{keys.end}"


def record_and_enforce(
    context: dg.AssetExecutionContext,
    store: FeatureStore,
    *,
    checks: dict[str, list[GateResult]],
    rows: dict[str, pl.DataFrame],
) -> Iterator[dg.AssetCheckResult]:
    """Log every verdict, yield one check result per check, and on a breach quarantine ``rows`` and fail.

    ``checks`` maps a check name to its gate results (one per suite or per partition of a range);
    ``rows`` maps a served table to the rows that would have been written to it.
    """
    asset = context.asset_key.to_user_string()
    partition = partition_label(context)
    start, end = context.partition_time_window
    failed = {name: [g for g in gates if not g.passed] for name, gates in checks.items()}
    breached = [name for name, gates in failed.items() if gates]
    with store.engine().begin() as conn:
        batch_id = None
        if breached:
            reasons = "; ".join(
                f"{g.suite}: {', '.join(o.label for o in g.blocking_failures)}" for n in breached for g in failed[n]
            )
            batch_id = open_batch(
                conn, run_id=context.run_id, asset=asset, partition=partition, start=start, end=end, reason=reasons
            )
            for table, frame in rows.items():
                quarantine_rows(conn, batch_id, table, frame)
        for gates in checks.values():
            for gate in gates:
                log_verdicts(
                    conn,
                    run_id=context.run_id,
                    asset=asset,
                    partition=partition,
                    suite=gate.suite,
                    outcomes=[o.as_log_row() for o in gate.outcomes],
                    reference=gate.reference,
                    docs_url=gate.docs_url,
                    batch_id=batch_id,
                )
    for name, gates in checks.items():
        metadata = gate_metadata(gates)
        if batch_id is not None:
            metadata["quarantine_batch"] = dg.MetadataValue.int(batch_id)
        yield dg.AssetCheckResult(
            check_name=name, passed=not failed[name], severity=dg.AssetCheckSeverity.ERROR, metadata=metadata
        )
    if breached:
        detail = "; ".join(
            f"{g.suite}{f' [{g.reference}]' if g.reference else ''}: "
            + ", ".join(f"{o.label} {o.describe()}" for o in g.blocking_failures)
            for n in breached
            for g in failed[n]
        )
        raise dg.Failure(
            description=(
                f"{asset} {partition}: {', '.join(breached)} failed; nothing was written to the served table. "
                f"The rows are in quarantine batch {batch_id} (marketfs quarantine show {batch_id}; release with "
                f"marketfs quarantine release {batch_id} --by NAME --note WHY). {detail}"
            )[:4000],
            metadata={"quarantine_batch": dg.MetadataValue.int(batch_id)},
            allow_retries=False,  # the same rows would breach the same gate again
        )
