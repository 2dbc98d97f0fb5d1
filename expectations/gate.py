"""Run an expectation suite from ``expectations/suites`` over a frame and summarise the verdict.

Great Expectations is imported inside these functions only: its import costs seconds, and the
Dagster code location must load without it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from marketfs.jsonsafe import finite_safe

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
    # Row scope: the instruments of every unexpected row (empty when the failure is the day's as a whole,
    # or a row names no instrument). What an instrument-day quarantine holds.
    instruments: tuple[str, ...] = ()

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
        elif isinstance(observed, dict) and self.partial_unexpected and "partial_unexpected" not in observed:
            # The rows themselves (instrument ts value), so the log names them as the run's failure did.
            observed = {**observed, "partial_unexpected": self.partial_unexpected}
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
    reference_table: Any = None  # a polars frame describing the reference (drift), shown as a table

    @property
    def blocking_failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.severity == "critical"]

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    @property
    def passed(self) -> bool:
        return not self.blocking_failures

    @property
    def breaching_instruments(self) -> tuple[str, ...] | None:
        """The instruments whose rows alone breach the suite, or None when the breach is the day's (a
        day-scope expectation, a failure no row names): what a quarantine may hold short of the whole day."""
        found: set[str] = set()
        for outcome in self.blocking_failures:
            if not outcome.instruments:
                return None
            found.update(outcome.instruments)
        return tuple(sorted(found)) if found else None


def suite_path(name: str) -> Path:
    """``$MARKETFS_SUITES_DIR/<name>.json`` when set (e.g. a reviewed copy), else the suites in this package."""
    return Path(os.environ.get("MARKETFS_SUITES_DIR", SUITES_DIR)) / f"{name}.json"


def suite_versions(name: str) -> dict[str, dict[str, str]]:
    """The version and file hash of a dataset's suites (``<name>.json``, ``<name>_drift.json``) as the gates
    read them (``MARKETFS_SUITES_DIR`` honoured): what a snapshot's manifest records."""
    versions = {}
    for suite in (name, f"{name}_drift"):
        path = suite_path(suite)
        if not path.exists():
            continue
        text = path.read_bytes()
        meta = json.loads(text).get("meta", {})
        versions[suite] = {
            "suite_version": str(meta.get("suite_version", "")),
            "sha256": hashlib.sha256(text).hexdigest()[:16],
        }
    return versions


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
    """Let Great Expectations parse every expectation; name the first one it rejects.

    Checked once per process for a given suite content: parsing costs ~0.2 s a suite, more than
    validating a day.
    """
    _check_expectations(str(path), json.dumps(data["expectations"], sort_keys=True, default=str))


@functools.lru_cache(maxsize=64)
def _check_expectations(path: str, expectations_json: str) -> None:
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    for index, expectation in enumerate(json.loads(expectations_json)):
        label = expectation.get("type", "<no type>") if isinstance(expectation, dict) else repr(expectation)
        try:
            ExpectationConfiguration(**expectation).to_domain_obj()
        except Exception as exc:  # GX raises several unrelated types (pydantic, its own, TypeError)
            raise SuiteFileError(
                f"{path}: expectation #{index + 1} ({label}) is invalid: {exc}. "
                "Fix: correct its type or kwargs (see the Great Expectations expectation gallery)"
            ) from exc


def _jsonable(value: Any) -> Any:
    """Plain JSON values for metadata and the quality log (GX hands back numpy and pandas scalars);
    non-finite numbers as "NaN", "Infinity", "-Infinity", which PostgreSQL's jsonb accepts."""
    return finite_safe(value)


def _bounds(kwargs: dict[str, Any]) -> str | None:
    if "min_value" in kwargs or "max_value" in kwargs:
        return f"[{kwargs.get('min_value')}, {kwargs.get('max_value')}]"
    if "threshold" in kwargs:
        return f"< {kwargs['threshold']}"
    if "value_set" in kwargs:
        return f"in {kwargs['value_set']}"
    return None


DAY = "day"
DAY_SCOPE = "day"


def split_scopes(data: dict[str, Any], path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The suite's row-scope and day-scope expectations.

    Row scope: every row of a day must meet the expectation, so a day's verdict is the same whatever
    else ran beside it. A share (``mostly``) is a property of a day, not of a run's rows: it must be
    declared on the day's profile (``meta.scope: day``, column ``share__<column>``), else a day's
    verdict would depend on how many days ran together.
    """
    rows, days = [], []
    for index, expectation in enumerate(data["expectations"]):
        scope = (expectation.get("meta") or {}).get("scope", "row")
        if scope == DAY_SCOPE:
            days.append(expectation)
        elif "mostly" in expectation.get("kwargs", {}):
            raise SuiteFileError(
                f"{path}: expectation #{index + 1} ({expectation.get('type')}) has `mostly` over rows, so its "
                "verdict would depend on how many days a run validates together. Fix: declare the share on the "
                'day profile: expect_column_values_to_be_between(column="share__<column>", max_value=<1 - mostly>) '
                'with "meta": {"scope": "day"}'
            )
        else:
            rows.append(expectation)
    return rows, days


def _gx_suite(name: str, data: dict[str, Any], expectations: list[dict[str, Any]]) -> Any:
    import great_expectations as gx

    fields = {k: v for k, v in data.items() if k not in ("id", "name", "expectations")}
    return gx.ExpectationSuite(**fields, expectations=expectations, name=name)


@functools.cache
def _ephemeral_context() -> Any:
    """One in-memory GX context per process: building one costs more than validating a day."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _columns_of(config: Any) -> str | None:
    columns = config.kwargs.get("column") or ",".join(
        config.kwargs.get("column_list")
        or [c for c in (config.kwargs.get("column_A"), config.kwargs.get("column_B")) if c]
    )
    return columns or None


def _severity(config: Any) -> str:
    return str(getattr(config, "severity", "critical") or "critical").split(".")[-1].lower()


def _example(row: dict[str, Any], examples: tuple[str, ...]) -> str:
    """``instrument ts value`` of one unexpected row, as a person would search for it."""
    parts = [str(row[c]) for c in examples if c in row and row[c] is not None]
    values = [f"{k}={_jsonable(v)}" for k, v in row.items() if k not in examples and k != DAY]
    return " ".join(parts + values)


def _validate_attributed(
    context: Any,
    frame: pl.DataFrame,
    suite_name: str,
    data: dict[str, Any],
    expectations: list[dict[str, Any]],
    index_columns: list[str],
) -> list[Any]:
    """Each expectation's result; the failing ones with every unexpected row's day (and instrument, ts).

    A first pass asks only pass or fail (half the cost of collecting unexpected rows, and the common
    case); a second pass over the failing expectations alone names their rows.
    """
    numbered = [{**e, "meta": {**(e.get("meta") or {}), "_position": i}} for i, e in enumerate(expectations)]
    batch = _batch(context, frame.to_pandas())
    # batch.validate, not ValidationDefinition.run: the latter crashes serialising numpy bools (GX 1.24).
    first = batch.validate(_gx_suite(suite_name, data, numbered), result_format="BOOLEAN_ONLY").results
    failing = [numbered[item.expectation_config.meta["_position"]] for item in first if not item.success]
    if not failing:
        return first
    second = batch.validate(
        _gx_suite(suite_name, data, failing),
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": index_columns,
            "return_unexpected_index_query": False,
            "partial_unexpected_count": 0,
        },
    ).results
    merged = {item.expectation_config.meta["_position"]: item for item in first if item.success}
    merged.update({item.expectation_config.meta["_position"]: item for item in second})
    return [merged[i] for i in sorted(merged)]


def _per_day_outcomes(
    results: list[Any], day_rows: dict[str, int], examples: tuple[str, ...], profile: pl.DataFrame | None
) -> dict[str, list[ExpectationOutcome]]:
    """Split one validation's results into one outcome per expectation and day.

    Row scope: a day fails an expectation when any of its rows is unexpected (GX names them through
    ``unexpected_index_column_names``). Day scope (``profile`` given, one row per day): the day's
    profile value is the observed value.
    """
    outcomes: dict[str, list[ExpectationOutcome]] = {day: [] for day in day_rows}
    for item in results:
        config = item.expectation_config
        details = item.result or {}
        label_columns = _columns_of(config)
        by_day: dict[str, list[dict[str, Any]]] = {}
        for row in details.get("unexpected_index_list") or []:
            by_day.setdefault(str(row[DAY]), []).append(row)
        if not item.success and not by_day and details.get("unexpected_count") is None:
            # An expectation that failed as a whole (e.g. a missing column): every day fails it.
            by_day = {day: [] for day in day_rows}
        observed_by_day: dict[str, Any] = {}
        if profile is not None and label_columns in profile.columns:
            observed_by_day = dict(zip(profile[DAY].to_list(), profile[label_columns].to_list(), strict=True))
        for day, rows in day_rows.items():
            unexpected = by_day.get(day)
            success = unexpected is None
            if profile is not None:
                observed = _jsonable(observed_by_day.get(day))
                count = None
            else:
                observed = None if success else {"unexpected_rows": len(unexpected)}
                count = 0 if success else len(unexpected)
            outcomes[day].append(
                ExpectationOutcome(
                    expectation=config.type,
                    column=label_columns,
                    severity=_severity(config),
                    success=success,
                    observed_value=observed,
                    unexpected_count=count,
                    element_count=rows,
                    partial_unexpected=[_example(r, examples) for r in (unexpected or [])[:10]],
                    bounds=_bounds(config.kwargs),
                    unexpected_percent=(100.0 * count / rows) if count is not None and rows else None,
                    instruments=_instruments_of(unexpected),
                )
            )
    return outcomes


def _instruments_of(unexpected: list[dict[str, Any]] | None) -> tuple[str, ...]:
    """The instruments of a day's unexpected rows; empty when any row names none (the day as a whole is
    then what failed)."""
    if not unexpected:
        return ()
    ids = [row.get("instrument_id") for row in unexpected]
    if any(not isinstance(i, str) or not i for i in ids):
        return ()
    return tuple(sorted(set(ids)))


def with_day_relative_prices(rows: pl.DataFrame, suite_name: str) -> pl.DataFrame:
    """Bars plus ``high_to_day_median`` and ``low_to_day_median`` (see the raw suite's ``derived_columns``).

    The median is of the instrument's finite, positive closes of the same day (column ``day``), so a
    bar is judged against its own day whatever else a run validates, and one absurd bar cannot move
    the median it is judged by. Non-finite or missing prices give a null ratio: other expectations
    refuse those.
    """
    needed = {"instrument_id", "high", "low", "close", DAY}
    if not suite_name.startswith("raw_ohlcv") or not needed <= set(rows.columns):
        return rows
    close = pl.col("close")
    median = pl.when(close.is_finite() & (close > 0)).then(close).median().over("instrument_id", DAY)
    finite = [pl.when(pl.col(c).is_finite()).then(pl.col(c)) for c in ("high", "low")]
    return rows.with_columns(
        (finite[0] / median).alias("high_to_day_median"), (finite[1] / median).alias("low_to_day_median")
    )


def day_profile(rows: pl.DataFrame, expectations: list[dict[str, Any]]) -> pl.DataFrame:
    """One row per day: ``rows`` and every ``share__<column>`` the day-scope expectations read."""
    columns = {e["kwargs"].get("column", "") for e in expectations}
    shares = sorted(c for c in columns if c.startswith("share__"))
    missing = [c for c in shares if c.removeprefix("share__") not in rows.columns]
    if missing:
        raise SuiteFileError(f"day-scope expectations read {missing}, but the validated rows have no such column")
    return (
        rows.group_by(DAY)
        .agg(
            pl.len().alias("rows"),
            *[pl.col(c.removeprefix("share__")).cast(pl.Float64).mean().alias(c) for c in shares],
        )
        .sort(DAY)
    )


def validate_days(
    frame: pl.DataFrame,
    suite_name: str,
    *,
    suite: dict[str, Any] | None = None,
    suite_file: Path | None = None,
    day_column: str = DAY,
    examples: tuple[str, ...] = ("instrument_id", "ts"),
) -> dict[str, GateResult]:
    """One verdict per day of ``frame`` (``day_column`` holds YYYY-MM-DD), from at most two GX validations.

    Row-scope expectations run once over every row; day-scope ones once over the day profile (one
    row per day). Each unexpected row is attributed to its day, so a day's verdict is the one it
    would get alone, and the cost does not grow with the number of days. ``suite`` (already loaded,
    e.g. a drift suite) overrides the file.
    """
    path = suite_file or suite_path(suite_name)
    data = suite if suite is not None else load_suite_json(path)
    check_expectations(path, data)
    row_expectations, day_expectations = split_scopes(data, path)
    from expectations.derived import for_validation

    rows = for_validation(frame, suite_name)
    if day_column != DAY:
        rows = rows.rename({day_column: DAY})
    rows = with_day_relative_prices(rows, suite_name)
    day_rows = {str(k): int(v) for k, v in rows.group_by(DAY).len().sort(DAY).iter_rows()}
    outcomes: dict[str, list[ExpectationOutcome]] = {day: [] for day in day_rows}
    if day_rows:
        context = _ephemeral_context()
        index_columns = [DAY, *[c for c in examples if c in rows.columns]]
        if row_expectations:
            results = _validate_attributed(context, rows, suite_name, data, row_expectations, index_columns)
            for day, found in _per_day_outcomes(results, day_rows, tuple(index_columns[1:]), None).items():
                outcomes[day].extend(found)
        if day_expectations:
            profile = day_profile(rows, day_expectations)
            results = _validate_attributed(context, profile, suite_name, data, day_expectations, [DAY])
            for day, found in _per_day_outcomes(results, day_rows, (), profile).items():
                outcomes[day].extend(found)
    version = str(data.get("meta", {}).get("suite_version", ""))
    return {
        day: GateResult(suite=suite_name, suite_file=path, suite_version=version, outcomes=found, label=day)
        for day, found in outcomes.items()
    }


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
    """Validate ``frame`` as one batch (one day); ``passed`` is False when any critical expectation fails.

    With ``docs`` (a ``DataDocs``) the validation is stored and its Data Docs page built.
    """
    label = batch_label or suite_name
    path = suite_file or suite_path(suite_name)
    data = suite if suite is not None else load_suite_json(path)
    results = validate_days(frame.with_columns(pl.lit(label).alias(DAY)), suite_name, suite=data, suite_file=path)
    result = results.get(label) or GateResult(
        suite=suite_name, suite_file=path, suite_version=str(data.get("meta", {}).get("suite_version", "")), outcomes=[]
    )
    docs_url = publish_day(frame, suite_name, data, docs=docs, label=label, run_name=run_name) if docs else None
    return dataclasses.replace(result, reference=reference, docs_url=docs_url, label=label)


def publish_day(
    frame: pl.DataFrame,
    suite_name: str,
    data: dict[str, Any],
    *,
    docs: Any,
    label: str,
    run_name: str | None,
) -> str | None:
    """Render one day's Data Docs page: its rows against the row scope, its profile against the day scope.

    Called for the days a person needs to read (breaches), after the verdict: the page is a report,
    not part of the gate, so a failure to render it is logged by the caller and never stops a run.
    """
    from expectations.derived import for_validation

    path = suite_path(suite_name)
    row_expectations, day_expectations = split_scopes(data, path)
    rows = for_validation(frame, suite_name).with_columns(pl.lit(label).alias(DAY))
    rows = with_day_relative_prices(rows, suite_name)
    context = docs.context()
    url = None
    for scope, expectations in (("rows", row_expectations), ("day", day_expectations)):
        if not expectations:
            continue
        batch_frame = rows if scope == "rows" else day_profile(rows, expectations)
        result = _batch(context, batch_frame.to_pandas()).validate(
            _gx_suite(suite_name, data, expectations), result_format="SUMMARY"
        )
        page = docs.publish(result, suite_name, f"{label}-{scope}", run_name)
        # The page a person should open first: the scope that failed.
        if url is None or not result.success:
            url = page
    return url


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
