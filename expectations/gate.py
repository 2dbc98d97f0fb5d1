"""Run an expectation suite from ``expectations/suites`` over a frame and summarise the verdict.

Great Expectations is imported inside these functions only: its import costs seconds, and the
Dagster code location must load without it.
"""

from __future__ import annotations

import json
import math
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

    @property
    def label(self) -> str:
        target = self.column or ""
        return f"{self.expectation}({target})" if target else self.expectation

    def describe(self) -> str:
        parts = []
        if self.observed_value is not None:
            parts.append(f"observed {self.observed_value!r}")
        if self.unexpected_count is not None:
            parts.append(f"{self.unexpected_count} of {self.element_count} rows unexpected")
        if self.partial_unexpected:
            parts.append(f"e.g. {self.partial_unexpected[:5]!r}")
        return "; ".join(parts) or "failed"


@dataclass(frozen=True)
class GateResult:
    suite: str
    suite_file: Path
    suite_version: str
    outcomes: list[ExpectationOutcome]
    raw: dict[str, Any] = field(repr=False)

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
    return SUITES_DIR / f"{name}.json"


def load_suite_json(path: Path) -> dict[str, Any]:
    """The suite file as a dict, with every expectation checked by Great Expectations."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SuiteFileError(f"{path}: suite file not found. Fix: add it under expectations/suites/") from None
    except json.JSONDecodeError as exc:
        raise SuiteFileError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise SuiteFileError(f"{path}: a suite needs a top-level object with an 'expectations' list")
    for index, expectation in enumerate(data["expectations"]):
        label = expectation.get("type", "<no type>") if isinstance(expectation, dict) else repr(expectation)
        try:
            ExpectationConfiguration(**expectation).to_domain_obj()
        except Exception as exc:  # GX raises several unrelated types (pydantic, its own, TypeError)
            raise SuiteFileError(
                f"{path}: expectation #{index + 1} ({label}) is invalid: {exc}. "
                "Fix: correct its type or kwargs (see the Great Expectations gallery)"
            ) from exc
    return data


def _for_validation(frame: pl.DataFrame) -> pl.DataFrame:
    # GX's pandas engine cannot hash list cells; flags are validated as a comma-joined string.
    return frame.with_columns([pl.col(n).list.join(",") for n, t in frame.schema.items() if isinstance(t, pl.List)])


def _jsonable(value: Any) -> Any:
    """Plain JSON values for metadata and the quality log (GX hands back numpy and pandas scalars)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def validate_frame(frame: pl.DataFrame, suite_name: str, suite_file: Path | None = None) -> GateResult:
    """Validate ``frame`` against a suite file; ``passed`` is False when any critical expectation fails."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    path = suite_file or suite_path(suite_name)
    data = load_suite_json(path)
    suite = gx.ExpectationSuite(**{k: v for k, v in data.items() if k != "id"})
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas(f"{suite_name}_source")
        .add_dataframe_asset(suite_name)
        .add_batch_definition_whole_dataframe("whole")
        .get_batch(batch_parameters={"dataframe": _for_validation(frame).to_pandas()})
    )
    # batch.validate, not ValidationDefinition.run: the latter crashes serialising numpy bools (GX 1.24).
    result = batch.validate(suite, result_format="SUMMARY")
    outcomes = []
    for item in result.results:
        config = item.expectation_config
        details = item.result or {}
        outcomes.append(
            ExpectationOutcome(
                expectation=config.type,
                column=config.kwargs.get("column") or ",".join(config.kwargs.get("column_list", []) or []) or None,
                severity=str(getattr(config, "severity", "critical") or "critical").split(".")[-1].lower(),
                success=bool(item.success),
                observed_value=_jsonable(details.get("observed_value")),
                unexpected_count=details.get("unexpected_count"),
                element_count=details.get("element_count"),
                partial_unexpected=[_jsonable(v) for v in details.get("partial_unexpected_list", []) or []][:10],
            )
        )
    return GateResult(
        suite=suite_name,
        suite_file=path,
        suite_version=str(data.get("meta", {}).get("suite_version", "")),
        outcomes=outcomes,
        raw=result.to_json_dict(),
    )
