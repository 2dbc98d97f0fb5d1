"""The feature suites, generated from the feature set declarations and ``expectations/policy.toml``.

python -m expectations.generate            write every feature suite under expectations/suites/
python -m expectations.generate --check    exit 1 naming each suite that differs from what it should be

Value bounds, the pair invariants of a family and which flags explain a null come from the
declarations (``marketfs/feature_sets/``); flag-share ceilings and drift settings from the policy
file. ``suite_version`` is a hash of a suite's expectations, so it changes exactly when they do.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tomllib
from pathlib import Path
from statistics import NormalDist
from typing import Any

from marketfs.features.flags import QualityFlag
from marketfs.features.registry import FeatureSet, dataset_name, datasets

SUITES_DIR = Path(__file__).parent / "suites"
POLICY_PATH = Path(__file__).parent / "policy.toml"
EVENT_FLAGS = (QualityFlag.NO_EVENTS, QualityFlag.LOW_EVENT_COUNT, QualityFlag.LOW_SENTIMENT_CONFIDENCE)
DRIFT_STATISTICS = ("mean", "stdev", "kl")

QUALITY_DESCRIPTION = (
    "Gate between computed {version} {timeframe} vectors and feature_vectors. Critical breaches block the write "
    "and quarantine the vectors; warnings are logged."
)
DRIFT_DESCRIPTION = (
    "Drift gate, validated over the drift profile (expectations/drift.py, drift_profile): one row per day, one "
    "column per gate, so an unexpected row is a day that drifted. Each score puts the day's statistic against the "
    "reference days' own values of it (for KL: each reference day's divergence from the other reference days), as "
    "the standard normal quantile of its Student's t prediction tail (at most meta.tail_df degrees of freedom: "
    "days have heavier tails than normal); the bounds are therefore constants, the same "
    "for any universe size and reference length. See docs/drift.md."
)
DERIVED_COLUMNS = {
    "flag_<FLAG>": "true when the vector carries FLAG",
    "unexplained_nulls": "null features with no flag that explains them",
    "share__<column>": "day scope: the share of the day's rows where <column> is true",
}
SCOPES = {
    "row": "expectations without meta.scope: every row of a day must meet them; a failing row fails its day",
    "day": "meta.scope = day: one value per day (the day's profile), whatever range the run covers",
}


class PolicyError(ValueError):
    """expectations/policy.toml cannot be applied as written."""


def load_policy(path: Path = POLICY_PATH) -> dict[str, Any]:
    try:
        policy = tomllib.loads(path.read_text())
        shares = policy["flag_share"]
        for scope, entries in shares.items():
            for flag, entry in entries.items():
                QualityFlag(flag)
                if entry["severity"] not in ("critical", "warning") or not 0 <= float(entry["max"]) <= 1:
                    raise ValueError(f"flag_share.{scope}.{flag}: severity critical|warning and 0 <= max <= 1")
        if policy["unexplained_jump"]["severity"] not in ("critical", "warning"):
            raise ValueError(
                "unexplained_jump.severity: critical (hold the instrument-day) or warning (serve, flagged)"
            )
        str(policy["unexplained_jump"]["why"])
        drift = policy["drift"]
        float(drift["trip_rate_target"]), int(drift["kl_bins"]), dict(drift["reference"]), list(drift["timeframes"])
        if not 0 <= float(drift["min_day_share"]) <= 1:
            raise ValueError("drift.min_day_share: a share between 0 and 1")
        if int(drift["tail_df"]) < 1:
            raise ValueError("drift.tail_df: at least 1 degree of freedom")
    except (OSError, tomllib.TOMLDecodeError, KeyError, ValueError, TypeError) as exc:
        raise PolicyError(f"{path}: {exc.__class__.__name__}: {exc}. Fix: see the comments in that file") from exc
    return policy


def _number(value: float) -> float | int:
    return int(value) if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15 else value


def _between(column: str, low: float | None, high: float | None, meta: dict | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"column": column}
    if low is not None:
        kwargs["min_value"] = low
    if high is not None:
        kwargs["max_value"] = high
    expectation: dict[str, Any] = {"type": "expect_column_values_to_be_between", "kwargs": kwargs}
    expectation["severity"] = "critical"
    if meta:
        expectation["meta"] = meta
    return expectation


def _with_version(suite: dict[str, Any]) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(suite["expectations"], sort_keys=True).encode()).hexdigest()[:12]
    suite["meta"] = {"suite_version": digest, **suite["meta"]}
    return suite


def quality_suite(fs: FeatureSet, timeframe: str, policy: dict[str, Any]) -> dict[str, Any]:
    features = fs.for_timeframe(timeframe)
    expectations: list[dict[str, Any]] = [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": c}, "severity": "critical"}
        for c in ("instrument_id", "timeframe", "ts", "feature_set_version")
    ]
    expectations.append(
        {
            "type": "expect_compound_columns_to_be_unique",
            "kwargs": {"column_list": ["instrument_id", "timeframe", "ts", "feature_set_version"]},
            "severity": "critical",
        }
    )
    for f in features:
        low, high, why = f.gate_bounds(timeframe)
        if low is not None or high is not None:
            expectations.append(_between(f.name, low, high, {"why": why} if why else None))
    # A family's invariant between its outputs: the upper Bollinger band is never below the lower one.
    bands: dict[tuple, dict[str, str]] = {}
    for f in features:
        if f.family == "bollinger":
            bands.setdefault((f.p["n"], f.p["k"]), {})[f.p["output"]] = f.name
    for outputs in bands.values():
        if {"upper", "lower"} <= outputs.keys():
            expectations.append(
                {
                    "type": "expect_column_pair_values_a_to_be_greater_than_b",
                    "kwargs": {
                        "column_A": outputs["upper"],
                        "column_B": outputs["lower"],
                        "or_equal": True,
                        "ignore_row_if": "either_value_is_missing",
                    },
                    "severity": "critical",
                }
            )
    expectations.append(
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "unexplained_nulls", "value_set": [0]},
            "severity": "critical",
            "meta": {"why": "a null feature must be explained by a quality flag"},
        }
    )
    jump = policy["unexplained_jump"]
    expectations.append(
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": f"flag_{QualityFlag.UNEXPLAINED_JUMP.value}", "value_set": [False]},
            "severity": jump["severity"],
            "meta": {"why": jump["why"]},
        }
    )
    shares = {**policy["flag_share"].get("default", {}), **policy["flag_share"].get(timeframe, {})}
    has_events = bool(fs.event_windows(timeframe))
    for flag in QualityFlag:
        entry = shares.get(flag.value)
        if entry is None or (flag in EVENT_FLAGS and not has_events):
            continue
        ceiling = _number(entry["max"])
        expectation = _between(
            f"share__flag_{flag.value}",
            0,
            ceiling,
            {
                "why": entry["why"],
                "scope": "day",
                "notes": f"share of the day's vectors carrying {flag.value} at most {ceiling}",
            },
        )
        expectation["severity"] = entry["severity"]
        expectations.append(expectation)
    return _with_version(
        {
            "name": dataset_name(fs, timeframe),
            "meta": {
                "generated_from": f"marketfs/feature_sets/{fs.version}.py and expectations/policy.toml "
                "by python -m expectations.generate; do not edit",
                "feature_set": fs.version,
                "timeframe": timeframe,
                "description": QUALITY_DESCRIPTION.format(version=fs.version, timeframe=timeframe),
                "derived_columns": DERIVED_COLUMNS,
                "scopes": SCOPES,
            },
            "expectations": expectations,
        }
    )


def _ceil2(value: float) -> float:
    return math.ceil(value * 100) / 100


def drift_suite(fs: FeatureSet, timeframe: str, policy: dict[str, Any]) -> dict[str, Any] | None:
    """The drift suite of a timeframe, or None when it has no drift feature or policy leaves it out."""
    drift = policy["drift"]
    features = fs.drift_features(timeframe)
    if not features or timeframe not in drift["timeframes"]:
        return None
    target = float(drift["trip_rate_target"])
    gates = len(DRIFT_STATISTICS) * len(features)
    two_sided = NormalDist().inv_cdf(1 - target / gates / 2)
    one_sided = NormalDist().inv_cdf(1 - target / gates)
    z, kl = _ceil2(two_sided), _ceil2(one_sided)
    texts = {
        "mean": "the day's mean of {f} against the reference days' means",
        "stdev": "the day's standard deviation of {f} against the reference days' standard deviations",
        "kl": "KL divergence of the day's histogram of {f} from the pooled reference's (reference deciles), "
        "against each reference day's divergence from the other reference days (log scale)",
    }
    expectations = []
    for name in features:
        for statistic in DRIFT_STATISTICS:
            meta = {"feature": name, "statistic": statistic, "gates": texts[statistic].format(f=name)}
            if statistic == "kl":
                expectations.append(_between(f"kl_score__{name}", None, kl, meta))
            else:
                expectations.append(_between(f"{statistic}_z__{name}", -z, z, meta))
    return _with_version(
        {
            "name": f"{dataset_name(fs, timeframe)}_drift",
            "meta": {
                "generated_from": f"marketfs/feature_sets/{fs.version}.py (drift = true) and expectations/policy.toml "
                "by python -m expectations.generate; do not edit",
                "feature_set": fs.version,
                "timeframe": timeframe,
                "description": DRIFT_DESCRIPTION,
                "reference": dict(drift["reference"]),
                "trip_rate_target": target,
                "bounds": f"The trip-rate target split evenly over the {gates} critical gates (Bonferroni), rounded "
                f"up: mean and stdev two-sided, norm.isf({target:g} / {gates} / 2) = {two_sided:.4f} -> {z}; KL "
                f"one-sided, norm.isf({target:g} / {gates}) = {one_sided:.4f} -> {kl}. A low target, because a "
                "backfill is a chain of days and every clean day that trips holds back the days after it.",
                "kl_bins": int(drift["kl_bins"]),
                "tail_df": int(drift["tail_df"]),
                "min_day_share": float(drift["min_day_share"]),
            },
            "expectations": expectations,
        }
    )


def render_suites(policy: dict[str, Any] | None = None) -> dict[str, str]:
    """Every generated suite file's name and text."""
    policy = policy or load_policy()
    files: dict[str, str] = {}
    for fs, timeframe in datasets().values():
        for suite in (quality_suite(fs, timeframe, policy), drift_suite(fs, timeframe, policy)):
            if suite is not None:
                files[f"{suite['name']}.json"] = json.dumps(suite, indent=2) + "\n"
    return files


def stale_suites(directory: Path = SUITES_DIR) -> list[str]:
    """Suite files that differ from what the declarations give, are missing, or are no longer declared."""
    due = render_suites()
    stale = [
        name for name, text in due.items() if not (directory / name).exists() or (directory / name).read_text() != text
    ]
    stale += [p.name for p in directory.glob("feature_vectors_*.json") if p.name not in due]
    return sorted(stale)


def write_suites(directory: Path = SUITES_DIR) -> list[str]:
    due = render_suites()
    for path in directory.glob("feature_vectors_*.json"):
        if path.name not in due:
            path.unlink()
    for name, text in due.items():
        (directory / name).write_text(text)
    return sorted(due)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--check" in args:
        stale = stale_suites()
        if stale:
            print(
                f"generated suites out of date: {', '.join(stale)}. Fix: make docs (python -m expectations.generate), "
                "then commit expectations/suites/",
                file=sys.stderr,
            )
            return 1
        print("generated suites match the declarations")
        return 0
    for name in write_suites():
        print(f"wrote {SUITES_DIR / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
