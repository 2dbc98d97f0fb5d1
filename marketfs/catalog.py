"""The feature catalog, generated from the feature set declarations and the flag definitions.

python -m marketfs.catalog            print it
python -m marketfs.catalog --write    update docs/features.md
python -m marketfs.catalog --check    exit 1 when docs/features.md differs from the declarations
"""

from __future__ import annotations

import sys
from pathlib import Path

from marketfs.features.flags import FLAG_MEANINGS, load_flag_config
from marketfs.features.registry import FEATURE_SETS, FeatureSet, dataset_name
from marketfs.features.timeframes import TIMEFRAMES

CATALOG_PATH = Path(__file__).resolve().parents[1] / "docs" / "features.md"


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _bounds(low: float | None, high: float | None) -> str:
    if low is None and high is None:
        return ""
    return f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"


def _units(f) -> str:  # noqa: ANN001 - a registry Feature
    if f.is_event:
        return "events"
    return "price (its bar's)" if f.price_units else "scale-free"


RETURNS = {
    "price": "price return: cash dividends adjust nothing (the ex-date's drop is in the returns); splits always adjust",
    "total": "total return: each cash dividend scales the earlier prices by close / (close - amount), as a split "
    "does; splits always adjust",
}


def catalog_table(fs: FeatureSet, timeframe: str) -> str:
    """The markdown table of one feature set and timeframe (also shown on the asset in the Dagster UI)."""
    lines = [
        "| name | family | formula | lookback | units | gate bounds | drift | owner | description |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in fs.for_timeframe(timeframe):
        lookback = f"{f.lookback} bars" if f.lookback else f"events in [known_at - {f.p['window']}, known_at)"
        low, high, _ = f.gate_bounds(timeframe)
        lines.append(
            f"| `{f.name}` | {f.family}({_params(f.p)}) | {f.formula} | {lookback} | {_units(f)} | "
            f"{_bounds(low, high)} | "
            f"{'yes' if f.drift else ''} | {fs.owner_of(f)} | {f.description} |"
        )
    return "\n".join(lines)


def render_catalog() -> str:
    config = load_flag_config()
    lines = [
        "# Feature catalog",
        "",
        "Generated from the declarations in `marketfs/feature_sets/` by `make docs`; do not edit.",
        "",
        "Conventions: **a bar is stamped at the open of its (last) minute, and a vector stamped `ts` became "
        "known at `ts + 1 minute`** (`known_at`, the close of that minute): it uses only bars stamped <= ts "
        "and events published before `known_at`, and a point-in-time join matches it from `known_at` on. "
        "Minute bars are stamped at their open (landed files stamped at the close are shifted on read, "
        "MARKETFS_BAR_STAMP=close); bars of longer timeframes are resampled from the valid minute "
        "bars of their interval and stamped with its last minute (5m: 09:34 for 09:30-09:34; 1d: the session's "
        "last minute, 20:59 UTC for a 21:00 NYSE close). "
        "Lookback counts valid bars of history, this bar included (TA-Lib's lookback + 1); a feature is null, "
        "and the vector flagged INSUFFICIENT_OHLCV, until it is met. Each run reads warm-up bars per instrument "
        "(the longest lookback, plus slack) and continues the recursions (RSI, MACD, ATR, EMA) from the state "
        "stored at the previous day's last bar, so values are identical however partitions are run. "
        "Corporate actions (docs/corporate_actions.md): each instrument's bars are put on one scale by the splits "
        "(and, for a total-return set, the cash dividends) known when the vector is computed, so a scale-free "
        "feature is the same across a split; a feature in price units is in the units of its own bar. "
        "Gate bounds are those of the generated quality suite `expectations/suites/<dataset>.json`.",
        "",
    ]
    for version, fs in FEATURE_SETS.items():
        lines += [
            f"## {version}",
            "",
            fs.description,
            "",
            f'Owner: {fs.owner}. Returns (`returns = "{fs.returns}"`): {RETURNS[fs.returns]}.',
            "",
        ]
        for timeframe in fs.timeframes:
            windows = ", ".join(fs.event_windows(timeframe)) or "none"
            lines += [
                f"### timeframe `{timeframe}` (dataset `{dataset_name(fs, timeframe)}`, event windows: {windows}, "
                f"warm-up {fs.warmup_bars(timeframe)} bars)",
                "",
                catalog_table(fs, timeframe),
                "",
            ]
    lines += [
        "## Quality flags",
        "",
        "Every vector carries `quality_flags text[]`; query with e.g. "
        "`WHERE quality_flags @> ARRAY['NO_EVENTS']` or `WHERE cardinality(quality_flags) = 0`.",
        f"Thresholds (`marketfs/config/quality_flags.toml`): low_event_count = {config.low_event_count}, "
        f"low_sentiment_confidence = {config.low_sentiment_confidence}, "
        f"unexplained_jump = {config.unexplained_jump}, stale_after = "
        f"{ {tf: str(config.stale_after_for(tf)) for tf in TIMEFRAMES} }.",
        "",
        "| flag | meaning |",
        "|---|---|",
        *[f"| `{flag.value}` | {meaning} |" for flag, meaning in FLAG_MEANINGS.items()],
        "",
        "## Deliberate differences from TA-Lib",
        "",
        "- `volume_z_20` and `vol_20` are not TA-Lib functions; both use the sample standard deviation (ddof=1).",
        "- `bb_pct_b` (%b) is not a TA-Lib output; it is null (COMPUTATION_ERROR) when the bands have zero width. "
        "A window whose values are all equal has a standard deviation of exactly 0, as in TA-Lib and pandas, so "
        "flat prices give bands of zero width and flat volume a null `volume_z_20` (COMPUTATION_ERROR).",
        "- TA-Lib computes RSI, MACD and ATR over the array it is given; here that array is the instrument's whole "
        "history, from its first valid bar (bars with non-finite or non-positive prices are skipped and flagged "
        "MISSING_OHLCV), continued day by day from stored state.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    text = render_catalog()
    if "--check" in args:
        if not CATALOG_PATH.exists() or CATALOG_PATH.read_text() != text:
            print(f"{CATALOG_PATH} is out of date. Fix: make docs, then commit it", file=sys.stderr)
            return 1
        print(f"{CATALOG_PATH} matches the declarations")
        return 0
    if "--write" in args:
        CATALOG_PATH.parent.mkdir(parents=True, exist_ok=True)
        CATALOG_PATH.write_text(text)
        print(f"wrote {CATALOG_PATH}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
