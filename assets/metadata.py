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


def gate_metadata(gates: list[GateResult]) -> dict[str, dg.MetadataValue]:
    """What the check shows in the UI: each failed expectation with its observed value, the reference, Data Docs."""
    meta: dict[str, dg.MetadataValue] = {
        "suite": dg.MetadataValue.text(", ".join(sorted({g.suite for g in gates})) or "-"),
        "suite_file": dg.MetadataValue.path(str(gates[0].suite_file)) if gates else dg.MetadataValue.text("-"),
        "evaluated_expectations": dg.MetadataValue.int(sum(len(g.outcomes) for g in gates)),
        "failed_expectations": dg.MetadataValue.int(sum(len(g.failures) for g in gates)),
    }
    references = sorted({g.reference for g in gates if g.reference})
    if references:
        meta["reference"] = dg.MetadataValue.text("; ".join(references)[:2000])
    failures = [(g, o) for g in gates for o in g.failures]
    for gate, outcome in failures[:40]:
        key = f"FAILED {outcome.label}" if len(gates) == 1 else f"FAILED {outcome.label} @ {gate.label}"
        meta[key] = dg.MetadataValue.text(f"[{outcome.severity}] {outcome.describe()}")
    if failures:
        rows = "\n".join(
            f"| `{o.label}` | {o.severity} | {o.describe().replace('|', '/')} |" for _, o in failures[:200]
        )
        meta["failures"] = dg.MetadataValue.md("| expectation | severity | observed |\n|---|---|---|\n" + rows)
    failed_pages = [g.docs_url for g in gates if g.docs_url and g.failures]
    pages = failed_pages or [g.docs_url for g in gates if g.docs_url]
    if pages:
        meta["data_docs"] = dg.MetadataValue.url(pages[0])
    return meta


def _markdown_table(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = [
        "| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in frame.iter_rows()
    ]
    return "\n".join([header, rule, *body])
