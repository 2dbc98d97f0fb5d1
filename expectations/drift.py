"""Drift gates: a partition's feature distributions against a reference, with GX distributional expectations.

The drift suite file (``expectations/suites/<asset>_drift.json``) lists, per feature, which
distributional expectations to run and their parameters (``meta.drift``); its ``meta.reference``
says what to compare with: the trailing N partitions already in the store (default), or a pinned
window. At run time the bounds are computed from the reference and the filled-in suite is what
Great Expectations validates, stores and renders.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

PARTITION = "_partition"


@dataclass(frozen=True)
class ReferenceSpec:
    kind: str  # "trailing", "window" or "snapshot"
    partitions: int = 20
    min_partitions: int = 5
    start: str | None = None
    end: str | None = None
    snapshot: str | None = None

    @classmethod
    def from_suite(cls, suite: dict[str, Any]) -> ReferenceSpec:
        raw = dict(suite.get("meta", {}).get("reference", {"kind": "trailing"}))
        try:
            spec = cls(**raw)
        except TypeError:
            spec = None
        if (
            spec is None
            or spec.kind not in ("trailing", "window", "snapshot")
            or (spec.kind == "window" and not (spec.start and spec.end))
            or (spec.kind == "snapshot" and not spec.snapshot)
        ):
            raise ValueError(
                f"drift suite {suite.get('name')}: meta.reference {raw} is invalid. Fix: use "
                '{"kind": "trailing", "partitions": 20}, '
                '{"kind": "window", "start": "2024-01-02", "end": "2024-02-01"} or '
                '{"kind": "snapshot", "snapshot": "<snapshot id>"}'
            )
        return spec


def render_drift_suite(template: dict[str, Any], reference: pl.DataFrame) -> dict[str, Any]:
    """The suite with bounds from ``reference`` (feature columns plus ``_partition``, one value per partition)."""
    suite = copy.deepcopy(template)
    for expectation in suite["expectations"]:
        params = expectation.get("meta", {}).get("drift", {})
        column = expectation["kwargs"]["column"]
        values = reference.select(PARTITION, column).drop_nulls(column)
        kind = expectation["type"]
        if kind in ("expect_column_mean_to_be_between", "expect_column_stdev_to_be_between"):
            stat = pl.col(column).mean() if kind.endswith("mean_to_be_between") else pl.col(column).std()
            per_partition = values.group_by(PARTITION).agg(stat.alias("v"))["v"].drop_nulls()
            center = float(per_partition.mean()) if per_partition.len() else 0.0
            spread = float(per_partition.std()) if per_partition.len() > 1 else 0.0
            # A floor keeps a constant reference from giving a zero-width band.
            spread = max(spread, 1e-9 * abs(center), 1e-12)
            k = float(params.get("k", 6))
            expectation["kwargs"].update(min_value=center - k * spread, max_value=center + k * spread)
        elif kind == "expect_column_kl_divergence_to_be_less_than":
            pooled = values[column].to_numpy()
            bins = int(params.get("bins", 10))
            edges = np.unique(np.quantile(pooled, np.linspace(0, 1, bins + 1))) if pooled.size else np.array([])
            if edges.size < 2:
                edges = np.array([pooled.min() - 0.5, pooled.max() + 0.5]) if pooled.size else np.array([0.0, 1.0])
            counts, _ = np.histogram(pooled, bins=edges)
            weights = counts / max(counts.sum(), 1)
            expectation["kwargs"]["partition_object"] = {
                "bins": [float(x) for x in edges],
                "weights": [float(w) for w in weights],
            }
        expectation.setdefault("meta", {})["reference_rows"] = int(values.height)
    return suite


def trailing_reference(by_partition: dict[str, pl.DataFrame], partition: str, spec: ReferenceSpec) -> pl.DataFrame:
    """The ``spec.partitions`` partitions before ``partition`` (keys sort as dates), from frames split by partition."""
    keys = sorted(k for k in by_partition if k < partition)[-spec.partitions :]
    if not keys:
        return next(iter(by_partition.values())).clear()
    return pl.concat([by_partition[k] for k in keys])


def describe_reference(reference: pl.DataFrame, spec: ReferenceSpec, source: str) -> str:
    keys = sorted(reference[PARTITION].unique().to_list())
    if not keys:
        return f"{spec.kind} reference: no partitions"
    what = {
        "trailing": f"trailing {len(keys)} partitions",
        "window": f"pinned window {spec.start}..{spec.end}",
        "snapshot": f"pinned snapshot {spec.snapshot}",
    }[spec.kind]
    return f"{what} {keys[0]}..{keys[-1]} of {source} ({reference.height} vectors)"


def with_partition(vectors: pl.DataFrame) -> pl.DataFrame:
    return vectors.with_columns(pl.col("ts").dt.strftime("%Y-%m-%d").alias(PARTITION))


def drift_columns(template: dict[str, Any]) -> list[str]:
    return sorted({e["kwargs"]["column"] for e in template["expectations"]})


def evaluate_drift(
    vectors: pl.DataFrame,
    history: pl.DataFrame,
    template: dict[str, Any],
    *,
    source: str,
    asset: str,
    docs: Any = None,
    run_name: str | None = None,
) -> list[Any]:
    """One GateResult per partition (UTC day) of ``vectors``.

    ``history`` holds the stored vectors the reference may draw on: the trailing partitions before
    the first day of ``vectors`` (for a trailing reference; later days of a range also draw on the
    earlier days of the same range) or the pinned window.
    """
    from expectations.gate import GateResult, suite_path, validate_frame

    spec = ReferenceSpec.from_suite(template)
    columns = [PARTITION, *drift_columns(template)]
    current = with_partition(vectors).select(columns)
    stored = with_partition(history).select(columns)
    # Split once: a backfill of a year would otherwise rescan the whole pool for every day.
    by_partition = {
        key: frame for (key,), frame in pl.concat([stored, current]).partition_by(PARTITION, as_dict=True).items()
    }
    results = []
    days = sorted(current[PARTITION].unique().to_list())
    last_day = days[-1] if days else None
    for day in days:
        reference = trailing_reference(by_partition, day, spec) if spec.kind == "trailing" else stored
        found = reference[PARTITION].n_unique()
        if found < spec.min_partitions:
            results.append(
                GateResult(
                    suite=template["name"],
                    suite_file=suite_path(template["name"]),
                    suite_version=str(template.get("meta", {}).get("suite_version", "")),
                    outcomes=[],
                    reference=f"not evaluated: {found} reference partition(s), {spec.min_partitions} needed",
                    label=f"{asset}-{day}",
                )
            )
            continue
        frame = current.filter(pl.col(PARTITION) == day).drop(PARTITION)
        kwargs = {
            "suite": render_drift_suite(template, reference),
            "reference": describe_reference(reference, spec, source),
            "batch_label": f"{asset}-{day}",
        }
        result = validate_frame(frame, template["name"], **kwargs)
        if docs is not None and (not result.passed or day == last_day):
            # Pages for the days a person needs: breaches, and the newest day. Every verdict is in the
            # quality log either way; rendering one page per day of a long backfill costs more than
            # validating it.
            result = validate_frame(frame, template["name"], docs=docs, run_name=run_name, **kwargs)
        results.append(result)
    return results
