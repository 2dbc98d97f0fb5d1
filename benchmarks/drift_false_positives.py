"""How often the drift gate trips on clean data, and which planted shifts it catches.

    python benchmarks/drift_false_positives.py [--instruments 10] [--write]

Workload: deterministic synthetic bars and events, 125 trading days from 2024-01-02. Every day
after the first 20 is validated against its trailing 20 days with the drift suite
``expectations/suites/feature_vectors_1m_drift.json``, exactly as the asset does (pure functions,
no database). Then the last day is replaced by planted shifts and validated again.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from expectations.drift import evaluate_drift  # noqa: E402
from expectations.gate import load_suite_json, suite_path  # noqa: E402
from marketfs.features.compute import compute_feature_vectors  # noqa: E402
from marketfs.sources import SyntheticBars, SyntheticEvents  # noqa: E402
from marketfs.sources.synthetic import trading_days  # noqa: E402

START = datetime(2024, 1, 2, tzinfo=UTC)


def day_bounds(day) -> tuple[datetime, datetime]:
    start = datetime.combine(day, datetime.min.time(), UTC)
    return start, start + timedelta(days=1)


def plant(bars: pl.DataFrame, events: pl.DataFrame, kind: str, instruments: tuple[str, ...], day):
    start, end = day_bounds(day)
    minute = ((pl.col("ts") - start).dt.total_minutes() - 870).cast(pl.Float64)
    if kind == "variance x2":
        bars = SyntheticBars(instruments=instruments, minute_vol=0.0016).bars(start, end)
    elif kind == "variance x1.2":
        bars = SyntheticBars(instruments=instruments, minute_vol=0.0008 * 1.2**0.5).bars(start, end)
    elif kind == "sentiment +0.1":
        events = events.with_columns((pl.col("sentiment") + 0.1).clip(-1, 1))
    elif kind == "return mean +0.5 sd":
        factor = (minute * 0.0004).exp()
        bars = bars.with_columns([(pl.col(c) * factor).alias(c) for c in ("open", "high", "low", "close")])
    elif kind == "stuck feed after 1h":
        frozen = pl.col("close").filter(minute <= 60).last().over("instrument_id")
        bars = bars.with_columns(
            [pl.when(minute > 60).then(frozen).otherwise(pl.col(c)).alias(c) for c in ("open", "high", "low", "close")]
        )
    elif kind == "sentiment +0.4":
        events = events.with_columns((pl.col("sentiment") + 0.4).clip(-1, 1))
    elif kind == "confidence x0.5":
        events = events.with_columns(pl.col("confidence") * 0.5)
    elif kind == "volume level x3":
        bars = bars.with_columns(pl.col("volume") * 3)
    return bars, events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--instruments", type=int, default=10)
    parser.add_argument("--days", type=int, default=125)
    parser.add_argument("--write", action="store_true", help="write docs/drift.md")
    args = parser.parse_args()

    instruments = tuple(f"SYN{i:03d}" for i in range(args.instruments))
    days = trading_days(START, START + timedelta(days=400))[: args.days]
    end = day_bounds(days[-1])[1]
    template = load_suite_json(suite_path("feature_vectors_1m_drift"))
    t0 = time.perf_counter()
    bars = SyntheticBars(instruments=instruments).bars(START, end)
    events = SyntheticEvents(instruments=instruments).events(START - timedelta(days=1), end)
    vectors = compute_feature_vectors(bars, "1m", events=events).vectors
    results = evaluate_drift(vectors, vectors.clear(), template, source="synthetic", asset="feature_vectors_1m")
    evaluated = [r for r in results if r.outcomes]
    tripped = [r for r in evaluated if not r.passed]
    checks = sum(len(r.outcomes) for r in evaluated)
    failed_checks = [(r.label, o.label, o.describe()) for r in tripped for o in r.blocking_failures]
    elapsed = time.perf_counter() - t0

    lines = [
        "# Drift gate: false positives and planted shifts",
        "",
        f"Command: `python benchmarks/drift_false_positives.py --instruments {args.instruments} --days {args.days}`"
        f" (run {datetime.now(UTC):%Y-%m-%d}, {elapsed:.0f} s).",
        f"Suite: `expectations/suites/feature_vectors_1m_drift.json` ({len(template['expectations'])} expectations, "
        "trailing 20-partition reference).",
        "",
        "## No planted drift",
        "",
        f"- partitions validated: {len(evaluated)} "
        f"(trading days {evaluated[0].label[-10:]}..{evaluated[-1].label[-10:]}; "
        f"the first {len(results) - len(evaluated)} days are the reference warm-up)",
        f"- partitions that tripped the gate: **{len(tripped)}** ({100 * len(tripped) / len(evaluated):.1f}%)",
        f"- expectations evaluated: {checks}, failed: {len(failed_checks)}",
        *[f"  - {day[-10:]}: `{label}` {detail}" for day, label, detail in failed_checks],
        "",
        "## Planted shifts on the last day",
        "",
        "| shift | caught | expectations that failed |",
        "|---|---|---|",
    ]
    last = days[-1]
    start, stop = day_bounds(last)
    history = vectors.filter(pl.col("ts") < start)
    clean_bars, clean_events = bars.filter(pl.col("ts") >= start), events.filter(pl.col("published_at") >= start)
    for kind in [
        "variance x2",
        "variance x1.2",
        "sentiment +0.1",
        "return mean +0.5 sd",
        "stuck feed after 1h",
        "sentiment +0.4",
        "confidence x0.5",
        "volume level x3",
    ]:
        new_bars, new_events = plant(clean_bars, clean_events, kind, instruments, last)
        all_bars = pl.concat([bars.filter(pl.col("ts") < start), new_bars.select(bars.columns)])
        all_events = pl.concat([events.filter(pl.col("published_at") < start), new_events])
        shifted = compute_feature_vectors(all_bars, "1m", events=all_events, start=start, end=stop).vectors
        [result] = evaluate_drift(shifted, history, template, source="synthetic", asset="feature_vectors_1m")
        failed = sorted({o.column for o in result.blocking_failures})
        lines.append(f"| {kind} | {'yes' if failed else 'no'} | {', '.join(failed) or '-'} |")
    lines += [
        "",
        "Thresholds were set on this synthetic workload (the KL threshold of the 1h event features was raised from "
        "0.1 to 0.25 after it tripped 12 of 120 clean partitions); real data needs its own calibration run.",
        "Price-level features (bb_upper, bb_lower, macd, macd_signal, macd_hist, atr_14) are not drift-gated: prices "
        "trend, so their level drifts by nature. `volume_z_20` is normalised by the trailing 20 bars; a volume level "
        "shift shows only in the first bars of the day, whose window still holds the previous day's volume.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        (ROOT / "docs" / "drift.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
