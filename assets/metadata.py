"""What a person reads in the UI about a materialisation: counts, ranges and a small preview."""

from __future__ import annotations

import dagster as dg
import polars as pl

from expectations.gate import GateResult


def frame_summary(frame: pl.DataFrame, *, preview_rows: int = 5) -> dict[str, dg.MetadataValue]:
    meta: dict[str, dg.MetadataValue] = {
        "rows": dg.MetadataValue.int(frame.height),
        "instruments": dg.MetadataValue.int(frame["instrument_id"].n_unique() if frame.height else 0),
    }
    if frame.height:
        meta["ts_min"] = dg.MetadataValue.text(str(frame["ts"].min()))
        meta["ts_max"] = dg.MetadataValue.text(str(frame["ts"].max()))
        preview = frame.head(preview_rows).with_columns(
            [pl.col(n).list.join(",") for n, t in frame.schema.items() if isinstance(t, pl.List)]
        )
        meta["preview"] = dg.MetadataValue.md(_markdown_table(preview))
    return meta


def flag_counts(vectors: pl.DataFrame) -> dict[str, int]:
    if vectors.is_empty():
        return {}
    counts = vectors.select(pl.col("quality_flags").explode().drop_nulls().value_counts(sort=True)).unnest(
        "quality_flags"
    )
    return {row["quality_flags"]: int(row["count"]) for row in counts.iter_rows(named=True)}


def gate_metadata(gate: GateResult) -> dict[str, dg.MetadataValue]:
    meta: dict[str, dg.MetadataValue] = {
        "suite": dg.MetadataValue.text(gate.suite),
        "suite_file": dg.MetadataValue.path(str(gate.suite_file)),
        "evaluated_expectations": dg.MetadataValue.int(len(gate.outcomes)),
        "failed_expectations": dg.MetadataValue.int(len(gate.failures)),
    }
    for outcome in gate.failures:
        meta[f"FAILED {outcome.label}"] = dg.MetadataValue.text(f"[{outcome.severity}] {outcome.describe()}")
    if gate.failures:
        rows = "\n".join(f"| `{o.label}` | {o.severity} | {o.describe().replace('|', '/')} |" for o in gate.failures)
        meta["failures"] = dg.MetadataValue.md("| expectation | severity | observed |\n|---|---|---|\n" + rows)
    return meta


def _markdown_table(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = [
        "| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in frame.iter_rows()
    ]
    return "\n".join([header, rule, *body])
