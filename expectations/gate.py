"""Run an expectation suite from ``expectations/suites`` over a frame and summarise the verdict.

Great Expectations is imported inside these functions only: its import costs seconds, and the
Dagster code location must load without it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

SUITES_DIR = Path(__file__).parent / "suites"


class SuiteFileError(ValueError):
    """A suite file that is not valid JSON or holds an expectation Great Expectations rejects."""


@dataclass(frozen=True)
class ExpectationOutcome:
    expectation: str
    column: str | None
    severity: str
    success: bool
    observed_value: Any
    unexpected_count: int | None
    element_count: int | None
    partial_unexpected: list[Any] = field(default_factory=list)
    bounds: str | None = None
    unexpected_percent: float | None = None

    @property
    def label(self) -> str:
        return f"{self.expectation}({self.column})" if self.column else self.expectation

    def describe(self) -> str:
        parts = []
        if self.observed_value is not None:
            parts.append(f"observed {self.observed_value!r}")
        if self.bounds:
            parts.append(f"expected {self.bounds}")
        if self.unexpected_count is not None:
            parts.append(f"{self.unexpected_count} of {self.element_count} rows unexpected")
        if self.partial_unexpected:
            parts.append(f"e.g. {self.partial_unexpected[:5]!r}")
        return "; ".join(parts) or "failed"

    def as_log_row(self) -> dict[str, Any]:
        observed = self.observed_value
        if observed is None and self.unexpected_count is not None:
            observed = {"unexpected_percent": self.unexpected_percent, "partial_unexpected": self.partial_unexpected}
        return {
            "expectation": self.expectation,
            "column": self.column,
            "severity": self.severity,
            "success": self.success,
            "observed_value": observed,
            "unexpected_count": self.unexpected_count,
            "element_count": self.element_count,
        }


@dataclass(frozen=True)
class GateResult:
    suite: str
    suite_file: Path
    suite_version: str
    outcomes: list[ExpectationOutcome]
    reference: str | None = None
    docs_url: str | None = None
    label: str | None = None  # what was validated, e.g. the partition

    @property
    def blocking_failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.severity == "critical"]

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    @property
    def passed(self) -> bool:
        return not self.blocking_failures


def suite_path(name: str) -> Path:
    """``$MARKETFS_SUITES_DIR/<name>.json`` when set (e.g. a reviewed copy), else the suites in this package."""
    return Path(os.environ.get("MARKETFS_SUITES_DIR", SUITES_DIR)) / f"{name}.json"


def load_suite_json(path: Path) -> dict[str, Any]:
    """The suite file as a dict, with every expectation checked by Great Expectations."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SuiteFileError(f"{path}: suite file not found. Fix: add it under expectations/suites/") from None
    except json.JSONDecodeError as exc:
        raise SuiteFileError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise SuiteFileError(f"{path}: a suite needs a top-level object with an 'expectations' list")
    return data


def check_expectations(path: Path, data: dict[str, Any]) -> None:
    """Let Great Expectations parse every expectation; name the first one it rejects."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    for index, expectation in enumerate(data["expectations"]):
        label = expectation.get("type", "<no type>") if isinstance(expectation, dict) else repr(expectation)
        try:
            ExpectationConfiguration(**expectation).to_domain_obj()
        except Exception as exc:  # GX raises several unrelated types (pydantic, its own, TypeError)
            raise SuiteFileError(
                f"{path}: expectation #{index + 1} ({label}) is invalid: {exc}. "
                "Fix: correct its type or kwargs (see the Great Expectations expectation gallery)"
            ) from exc


def _jsonable(value: Any) -> Any:
    """Plain JSON values for metadata and the quality log (GX hands back numpy and pandas scalars)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _bounds(kwargs: dict[str, Any]) -> str | None:
    if "min_value" in kwargs or "max_value" in kwargs:
        return f"[{kwargs.get('min_value')}, {kwargs.get('max_value')}]"
    if "threshold" in kwargs:
        return f"< {kwargs['threshold']}"
    if "value_set" in kwargs:
        return f"in {kwargs['value_set']}"
    return None


def validate_frame(
    frame: pl.DataFrame,
    suite_name: str,
    *,
    suite: dict[str, Any] | None = None,
    suite_file: Path | None = None,
    reference: str | None = None,
    docs: Any = None,
    batch_label: str | None = None,
    run_name: str | None = None,
) -> GateResult:
    """Validate ``frame`` against a suite; ``passed`` is False when any critical expectation fails.

    ``suite`` (already loaded, e.g. a drift suite with its bounds filled in) overrides the file.
    With ``docs`` (a ``DataDocs``) the result is stored and its Data Docs page built.
    """
    import great_expectations as gx

    from expectations.derived import for_validation

    path = suite_file or suite_path(suite_name)
    data = suite if suite is not None else load_suite_json(path)
    check_expectations(path, data)
    gx_suite = gx.ExpectationSuite(**{k: v for k, v in data.items() if k not in ("id", "name")}, name=suite_name)
    if docs is not None:
        context = docs.context()
    else:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = _batch(context, for_validation(frame, suite_name).to_pandas())
    # batch.validate, not ValidationDefinition.run: the latter crashes serialising numpy bools (GX 1.24).
    result = batch.validate(gx_suite, result_format="SUMMARY")
    outcomes = []
    for item in result.results:
        config = item.expectation_config
        details = item.result or {}
        columns = config.kwargs.get("column") or ",".join(
            config.kwargs.get("column_list")
            or [c for c in (config.kwargs.get("column_A"), config.kwargs.get("column_B")) if c]
        )
        outcomes.append(
            ExpectationOutcome(
                expectation=config.type,
                column=columns or None,
                severity=str(getattr(config, "severity", "critical") or "critical").split(".")[-1].lower(),
                success=bool(item.success),
                observed_value=_jsonable(details.get("observed_value")),
                unexpected_count=details.get("unexpected_count"),
                element_count=details.get("element_count"),
                partial_unexpected=[_jsonable(v) for v in details.get("partial_unexpected_list", []) or []][:10],
                bounds=_bounds(config.kwargs),
                unexpected_percent=_jsonable(details.get("unexpected_percent")),
            )
        )
    docs_url = docs.publish(result, suite_name, batch_label or suite_name, run_name) if docs is not None else None
    return GateResult(
        suite=suite_name,
        suite_file=path,
        suite_version=str(data.get("meta", {}).get("suite_version", "")),
        outcomes=outcomes,
        reference=reference,
        docs_url=docs_url,
        label=batch_label,
    )


def _batch(context: Any, frame: Any) -> Any:
    source_name, asset_name, definition = "marketfs_frames", "frame", "whole"
    try:
        source = context.data_sources.get(source_name)
    except (KeyError, ValueError, LookupError):
        source = context.data_sources.add_pandas(source_name)
    try:
        asset = source.get_asset(asset_name)
    except (KeyError, ValueError, LookupError):
        asset = source.add_dataframe_asset(asset_name)
    try:
        batch_definition = asset.get_batch_definition(definition)
    except (KeyError, ValueError, LookupError):
        batch_definition = asset.add_batch_definition_whole_dataframe(definition)
    return batch_definition.get_batch(batch_parameters={"dataframe": frame})
