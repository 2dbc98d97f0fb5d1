"""What a person reads in the UI about one day: counts, time range, flags, a preview, a verdict."""

from __future__ import annotations

import dagster as dg
import polars as pl

from expectations.gate import GateResult


def frame_summary(frame: pl.DataFrame, *, preview: pl.DataFrame | None = None) -> dict[str, dg.MetadataValue]:
    """Rows, instruments, time range and a preview (``preview`` or the frame's first rows)."""
    meta: dict[str, dg.MetadataValue] = {
        "rows": dg.MetadataValue.int(frame.height),
        "dagster/row_count": dg.MetadataValue.int(frame.height),
        "instruments": dg.MetadataValue.int(frame["instrument_id"].n_unique() if frame.height else 0),
    }
    if frame.height:
        meta["ts_min"] = dg.MetadataValue.text(str(frame["ts"].min()))
        meta["ts_max"] = dg.MetadataValue.text(str(frame["ts"].max()))
        shown = (preview if preview is not None else frame).head(5)
        shown = shown.with_columns(
            [pl.col(n).list.join(",") for n, t in shown.schema.items() if isinstance(t, pl.List)]
        )
        meta["preview"] = dg.MetadataValue.md(markdown_table(shown))
    return meta


def vector_preview(vectors: pl.DataFrame) -> pl.DataFrame:
    """Each instrument's last vector of the day: warmed up, unlike the first bars of a history."""
    return vectors.sort("instrument_id", "ts").group_by("instrument_id", maintain_order=True).last()


def flag_counts(vectors: pl.DataFrame) -> dict[str, int]:
    if vectors.is_empty():
        return {}
    counts = vectors.select(pl.col("quality_flags").explode().drop_nulls().value_counts(sort=True)).unnest(
        "quality_flags"
    )
    return {row["quality_flags"]: int(row["count"]) for row in counts.iter_rows(named=True)}


def gate_metadata(gate: GateResult) -> dict[str, dg.MetadataValue]:
    """One day's verdict as the check shows it: each failed expectation with instruments, ts and bounds."""
    meta: dict[str, dg.MetadataValue] = {
        "suite": dg.MetadataValue.text(gate.suite),
        "suite_file": dg.MetadataValue.path(str(gate.suite_file)),
        "evaluated_expectations": dg.MetadataValue.int(len(gate.outcomes)),
        "failed_expectations": dg.MetadataValue.int(len(gate.failures)),
    }
    rows = next((o.element_count for o in gate.outcomes if o.element_count is not None), None)
    if rows is not None:
        meta["rows"] = dg.MetadataValue.int(rows)
    if gate.reference:
        meta["reference"] = dg.MetadataValue.text(gate.reference[:2000])
    if gate.reference_table is not None and gate.reference_table.height:
        meta["reference_table"] = dg.MetadataValue.md(markdown_table(gate.reference_table))
    for outcome in gate.failures[:40]:
        meta[f"FAILED {outcome.label}"] = dg.MetadataValue.text(f"[{outcome.severity}] {outcome.describe()}")
    if gate.failures:
        lines = "\n".join(
            f"| `{o.label}` | {o.severity} | {o.describe().replace('|', '/')} |" for o in gate.failures[:200]
        )
        meta["failures"] = dg.MetadataValue.md("| expectation | severity | observed |\n|---|---|---|\n" + lines)
    if gate.docs_url:
        meta["data_docs"] = dg.MetadataValue.url(gate.docs_url)
    return meta


def markdown_table(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = [
        "| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in frame.iter_rows()
    ]
    return "\n".join([header, rule, *body])
