"""The feature catalog, generated from the registry and the flag definitions.

python -m marketfs.catalog            print it
python -m marketfs.catalog --write    update docs/features.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from marketfs.features.compute import DAILY_STAMP_US, WARMUP_BARS
from marketfs.features.flags import FLAG_MEANINGS, load_flag_config
from marketfs.features.registry import EVENT_WINDOWS, FEATURE_SETS, FeatureSet

CATALOG_PATH = Path(__file__).resolve().parents[1] / "docs" / "features.md"


def catalog_table(fs: FeatureSet, timeframe: str) -> str:
    """The markdown table of one feature set and timeframe (also shown on the asset in the Dagster UI)."""
    window = EVENT_WINDOWS[timeframe][1]
    lines = ["| name | formula | lookback | inputs | version | owner |", "|---|---|---|---|---|---|"]
    for f in fs.for_timeframe(timeframe):
        lookback = f"{f.lookback} bars" if f.lookback else f"events in (ts - {window}, ts]"
        lines.append(f"| `{f.name}` | {f.formula} | {lookback} | {', '.join(f.inputs)} | {f.version} | {f.owner} |")
    return "\n".join(lines)


def render_catalog() -> str:
    config = load_flag_config()
    stamp = f"{DAILY_STAMP_US // 3_600_000_000:02d}:{DAILY_STAMP_US // 60_000_000 % 60:02d}"
    lines = [
        "# Feature catalog",
        "",
        "Generated from `marketfs/features/registry.py` by `python -m marketfs.catalog --write`; do not edit.",
        "",
        "Conventions: a vector at `ts` uses only bars with time <= ts and events published <= ts. "
        "Minute bars are stamped as delivered; daily bars are resampled from the day's valid minute bars "
        f"and stamped {stamp} UTC. Lookback counts valid bars of history, this bar included "
        "(TA-Lib's lookback + 1); a feature is null, and the vector flagged INSUFFICIENT_OHLCV, until it is met. "
        f"Each run reads {WARMUP_BARS} warm-up bars per instrument and continues RSI, MACD and ATR from the state "
        "stored at the previous day's last bar, so values are identical however partitions are run.",
        "",
    ]
    for version, fs in FEATURE_SETS.items():
        lines += [f"## {version}", ""]
        for timeframe in fs.timeframes:
            window = EVENT_WINDOWS[timeframe][1]
            lines += [f"### timeframe `{timeframe}` (event window {window})", "", catalog_table(fs, timeframe), ""]
    lines += [
        "## Quality flags",
        "",
        "Every vector carries `quality_flags text[]`; query with e.g. "
        "`WHERE quality_flags @> ARRAY['NO_EVENTS']` or `WHERE cardinality(quality_flags) = 0`.",
        f"Thresholds (`marketfs/config/quality_flags.toml`): low_event_count = {config.low_event_count}, "
        f"low_sentiment_confidence = {config.low_sentiment_confidence}, stale_after = "
        f"{ {tf: str(config.stale_after_for(tf)) for tf in ('1m', '1d')} }.",
        "",
        "| flag | meaning |",
        "|---|---|",
        *[f"| `{flag.value}` | {meaning} |" for flag, meaning in FLAG_MEANINGS.items()],
        "",
        "## Deliberate differences from TA-Lib",
        "",
        "- `volume_z_20` and `vol_20` are not TA-Lib functions; both use the sample standard deviation (ddof=1).",
        "- `bb_pct_b` (%b) is not a TA-Lib output; it is null (COMPUTATION_ERROR) when the bands have zero width.",
        "- TA-Lib computes RSI, MACD and ATR over the array it is given; here that array is the instrument's whole "
        "history, from its first valid bar (bars with non-finite or non-positive prices are skipped and flagged "
        "MISSING_OHLCV), continued day by day from stored state.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    text = render_catalog()
    if "--write" in (argv if argv is not None else sys.argv[1:]):
        CATALOG_PATH.parent.mkdir(parents=True, exist_ok=True)
        CATALOG_PATH.write_text(text)
        print(f"wrote {CATALOG_PATH}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
