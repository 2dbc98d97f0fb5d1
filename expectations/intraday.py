"""The intraday gate: the feature suites, judged on one step's vectors and on the day so far.

Row-scope expectations judge every vector of the step, exactly as a daily run judges the day's.
Day-scope expectations (the flag shares) are judged on the day so far, with each share's bound
widened by its sampling error at the vectors seen so far: with ``n`` vectors, a day whose true share
is the bound ``m`` shows up to ``m + z * sqrt(m (1 - m) / n)`` (``z`` from ``[intraday]`` in
``policy.toml``), so ten minutes into a session one flagged instrument does not fail the day, and
by the close the bound is the daily one again. The end-of-day run judges the complete day with the
daily bounds and the drift suites (a morning's distribution is not a day's: drift waits for it).

Registered as the entry point ``marketfs.gates:intraday``, which ``marketfs.intraday`` loads.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import polars as pl

from expectations.gate import (
    DAY,
    _ephemeral_context,
    _per_day_outcomes,
    _validate_attributed,
    check_expectations,
    load_suite_json,
    split_scopes,
    suite_path,
)
from marketfs.intraday import GateVerdict


def share_z() -> float:
    from expectations.generate import load_policy

    return float(load_policy().get("intraday", {}).get("share_z", 3.0))


def widened(expectation: dict[str, Any], n: int, z: float) -> dict[str, Any]:
    """A day-scope share bound as it applies to a day of ``n`` vectors so far."""
    kwargs = dict(expectation["kwargs"])
    high = kwargs.get("max_value")
    if high is None or not str(kwargs.get("column", "")).startswith("share__") or n <= 0:
        return expectation
    allowance = z * math.sqrt(max(high * (1 - high), 0.0) / n)
    kwargs["max_value"] = min(1.0, high + allowance)
    return {**expectation, "kwargs": kwargs}


# One validation at a time per process: the GX context of the process (its data sources) is shared, and
# not safe to change from two threads; steps of several feature sets run side by side up to their gate.
_GX_LOCK = threading.Lock()


def gate(vectors: pl.DataFrame, *, dataset: str, day: str, day_vectors: int, day_flags: dict[str, int]) -> GateVerdict:
    with _GX_LOCK:
        return _judge(vectors, dataset=dataset, day=day, day_vectors=day_vectors, day_flags=day_flags)


def _judge(
    vectors: pl.DataFrame, *, dataset: str, day: str, day_vectors: int, day_flags: dict[str, int]
) -> GateVerdict:
    from expectations.derived import for_validation

    path = suite_path(dataset)
    data = load_suite_json(path)
    check_expectations(path, data)
    row_expectations, day_expectations = split_scopes(data, path)
    context = _ephemeral_context()
    outcomes = []
    rows = for_validation(vectors, dataset).with_columns(pl.lit(day).alias(DAY))
    if rows.height and row_expectations:
        index = [DAY, "instrument_id", "ts"]
        results = _validate_attributed(context, rows, dataset, data, row_expectations, index)
        outcomes += _per_day_outcomes(results, {day: rows.height}, ("instrument_id", "ts"), None).get(day, [])
    if day_vectors and day_expectations:
        z = share_z()
        adjusted = [widened(e, day_vectors, z) for e in day_expectations]
        profile = pl.DataFrame(
            {
                DAY: [day],
                "rows": [day_vectors],
                **{
                    c: [day_flags.get(c.removeprefix("share__flag_"), 0) / day_vectors]
                    for c in {e["kwargs"].get("column", "") for e in adjusted}
                    if c.startswith("share__flag_")
                },
            }
        )
        results = _validate_attributed(context, profile, dataset, data, adjusted, [DAY])
        outcomes += _per_day_outcomes(results, {day: day_vectors}, (), profile).get(day, [])
    failed = [o for o in outcomes if not o.success and o.severity == "critical"]
    return GateVerdict(
        passed=not failed,
        suite=dataset,
        outcomes=[o.as_log_row() for o in outcomes],
        problems=[f"{o.label}: {o.describe()}" for o in failed],
    )
