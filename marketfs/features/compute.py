"""Feature vectors from bars and events: the one function every run path calls.

Pure: polars frames in, polars frames out. The caller supplies the window's bars plus warm-up
bars before it, the events of the window plus its look-back, and the recursion state stored at
the last bar before the window (see ``recursive.py``); it gets the vectors of the window and the
state at each day's last bar, to store for the next day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from marketfs.features import market, recursive
from marketfs.features.events import EVENT_SCHEMA, event_feature_names, event_features
from marketfs.features.flags import FlagConfig, QualityFlag, flag_if, load_flag_config
from marketfs.features.registry import DEFAULT_FEATURE_SET, EVENT_WINDOWS, FeatureSet

KEY_COLUMNS = ["instrument_id", "timeframe", "ts", "feature_set_version"]
PRICE_COLUMNS = ("open", "high", "low", "close")
STEP_US = {"1m": 60_000_000, "1d": 86_400_000_000}
# A daily bar is stamped with the last minute of its UTC day: it holds only minute bars <= its ts.
DAILY_STAMP_US = 86_340_000_000

# Warm-up bars to read before a window: the longest fixed window (21 for vol_20) and enough to
# hold the whole history of an instrument that has no recursion state yet.
WARMUP_BARS = max(21, recursive.SEED_BARS) + 6

MARKET_FAMILIES = {
    "returns": market.returns,
    "volatility": market.volatility,
    "bollinger": market.bollinger,
    "volume": market.volume_z,
}

STATE_SCHEMA: dict[str, pl.DataType] = {
    "instrument_id": pl.String(),
    "ts": pl.Datetime("us", "UTC"),
    "bars_seen": pl.Int64(),
    **recursive.STATE_COLUMNS,
}


class HistoryError(ValueError):
    """The history handed in cannot give exact values (missing or mismatched recursion state)."""


@dataclass(frozen=True)
class FeatureComputation:
    vectors: pl.DataFrame
    state: pl.DataFrame  # STATE_SCHEMA rows: the state at each instrument's last valid bar of each UTC day


def on_grid(timeframe: str) -> pl.Expr:
    epoch = pl.col("ts").dt.epoch("us")
    if timeframe == "1d":
        return (epoch % STEP_US["1d"]) == DAILY_STAMP_US
    return (epoch % STEP_US[timeframe]) == 0


def valid_bar() -> pl.Expr:
    prices_ok = pl.all_horizontal([pl.col(c).is_finite() & (pl.col(c) > 0) for c in PRICE_COLUMNS])
    return prices_ok & pl.col("volume").is_finite() & (pl.col("volume") >= 0) & (pl.col("high") >= pl.col("low"))


def _positions(valid: pl.DataFrame, state: pl.DataFrame | None, start: datetime | None, warmup_limit: int | None):
    """Attach ``_pos`` (position in the instrument's history) and the state to continue from."""
    counts = valid.group_by("instrument_id").agg(
        (pl.col("ts") < start).sum().alias("_n_warm") if start is not None else pl.lit(0, pl.UInt32).alias("_n_warm"),
        pl.col("ts").filter(pl.col("ts") < start).max().alias("_last_warm")
        if start is not None
        else pl.lit(None, pl.Datetime("us", "UTC")).alias("_last_warm"),
    )
    usable = pl.DataFrame(schema=STATE_SCHEMA) if state is None else state.select(list(STATE_SCHEMA))
    usable = usable.filter(pl.col("bars_seen") >= recursive.SEED_BARS)
    joined = counts.join(
        usable.rename({c: f"_state_{c}" for c in STATE_SCHEMA if c != "instrument_id"}), on="instrument_id", how="left"
    )
    mismatch = joined.filter(pl.col("_state_ts").is_not_null() & (pl.col("_state_ts") != pl.col("_last_warm")))
    if mismatch.height:
        row = mismatch.row(0, named=True)
        raise HistoryError(
            f"stored feature state of {row['instrument_id']} is at {row['_state_ts']}, but its last bar before "
            f"{start} is at {row['_last_warm']}: a feature partition in between was not materialised, or the "
            f"bars changed after it was. Fix: materialise the previous partition first, i.e. the feature "
            f"partitions from the day after {row['_state_ts']:%Y-%m-%d} on, in order (a backfill does that)."
        )
    if warmup_limit is not None:
        truncated = joined.filter(pl.col("_state_ts").is_null() & (pl.col("_n_warm") >= warmup_limit))
        if truncated.height:
            raise HistoryError(
                f"no feature state for {truncated['instrument_id'][0]} (and {truncated.height - 1} more) before "
                f"{start}, and their history is longer than the warm-up read. Fix: materialise the previous "
                "partition of this feature asset first (or backfill from the first day)."
            )
    joined = joined.with_columns(
        pl.when(pl.col("_state_ts").is_not_null())
        .then(pl.col("_state_bars_seen") - pl.col("_n_warm").cast(pl.Int64))
        .otherwise(0)
        .alias("_offset"),
        pl.when(pl.col("_state_ts").is_not_null()).then(pl.col("_state_bars_seen") - 1).alias("_state_pos"),
    )
    return valid.join(joined, on="instrument_id", how="left").with_columns(
        (pl.int_range(pl.len()).over("instrument_id") + pl.col("_offset")).alias("_pos")
    )


def _grid_keys(window_bars: pl.DataFrame, history: pl.DataFrame, timeframe: str, stale_after: timedelta):
    """(instrument_id, ts) pairs that get a vector: every bar, plus grid times an active instrument missed."""
    grid = window_bars.filter(on_grid(timeframe)).select("ts").unique().sort("ts")
    instruments = history.select("instrument_id").unique()
    candidates = instruments.join(grid, how="cross").sort("instrument_id", "ts")
    last_bar = history.select("instrument_id", pl.col("ts").alias("_last_bar")).sort("instrument_id", "_last_bar")
    active = (
        candidates.join_asof(
            last_bar,
            left_on="ts",
            right_on="_last_bar",
            by="instrument_id",
            strategy="backward",
            check_sortedness=False,
        )
        .filter(pl.col("_last_bar").is_not_null() & ((pl.col("ts") - pl.col("_last_bar")) < stale_after))
        .select("instrument_id", "ts")
    )
    return pl.concat([active, window_bars.select("instrument_id", "ts")]).unique().sort("instrument_id", "ts")


def compute_feature_vectors(
    bars: pl.DataFrame,
    timeframe: str,
    *,
    events: pl.DataFrame | None = None,
    state: pl.DataFrame | None = None,
    feature_set: FeatureSet = DEFAULT_FEATURE_SET,
    start: datetime | None = None,
    end: datetime | None = None,
    warmup_limit: int | None = None,
    config: FlagConfig | None = None,
) -> FeatureComputation:
    """Feature vectors of ``feature_set`` at ``timeframe`` for ``[start, end)``.

    ``bars`` holds the window's bars and up to ``warmup_limit`` bars before ``start`` per
    instrument (with ``warmup_limit=None`` the bars are the whole history). ``events`` must
    cover ``[start - event window, end)``. ``state`` is the stored recursion state at each
    instrument's last bar before ``start``.
    """
    config = config or load_flag_config()
    features = feature_set.for_timeframe(timeframe)
    names = [f.name for f in features]
    market_names = [f.name for f in features if f.family != "events"]
    if "source_flags" not in bars.columns:
        bars = bars.with_columns(pl.lit([], pl.List(pl.String)).alias("source_flags"))
    bars = bars.sort("instrument_id", "ts")
    in_window = pl.lit(True)
    if start is not None:
        in_window = in_window & (pl.col("ts") >= start)
    if end is not None:
        in_window = in_window & (pl.col("ts") < end)

    valid = _positions(bars.filter(valid_bar()), state, start, warmup_limit)
    families = {f.family for f in features}
    for family in sorted(families & MARKET_FAMILIES.keys()):
        valid = valid.with_columns(**MARKET_FAMILIES[family]())
    if "recursive" in families:
        valid = valid.with_columns(**{f"_s_{k}": v for k, v in recursive.state_exprs().items()})
        valid = valid.with_columns(recursive.signal_expr().alias("_s_macd_signal"))
        valid = valid.with_columns(**recursive.feature_exprs())
    lookback_short = pl.any_horizontal([pl.col("_pos") + 1 < f.lookback for f in features if f.lookback > 0])
    computed = valid.filter(in_window).select(
        "instrument_id", "ts", *market_names, lookback_short.alias("_short"), pl.lit(True).alias("_valid")
    )

    window_bars = bars.filter(in_window)
    keys = _grid_keys(window_bars, bars, timeframe, config.stale_after_for(timeframe))
    vectors = keys.join(computed, on=["instrument_id", "ts"], how="left").join(
        window_bars.select("instrument_id", "ts", "source_flags"), on=["instrument_id", "ts"], how="left"
    )

    event_names: list[str] = []
    if "events" in families:
        window, label = EVENT_WINDOWS[timeframe]
        event_frame = events if events is not None else pl.DataFrame(schema=EVENT_SCHEMA)
        vectors = event_features(vectors, event_frame, window, label)
        event_names = event_feature_names(label)

    non_finite = pl.any_horizontal([pl.col(n).is_nan() | pl.col(n).is_infinite() for n in names])
    flags = [
        flag_if(pl.col("_valid").is_null(), QualityFlag.MISSING_OHLCV),
        flag_if(pl.col("_short").fill_null(False), QualityFlag.INSUFFICIENT_OHLCV),
    ]
    if event_names:
        count = pl.col(event_names[0])
        flags += [
            flag_if(count == 0, QualityFlag.NO_EVENTS),
            flag_if((count > 0) & (count < config.low_event_count), QualityFlag.LOW_EVENT_COUNT),
            flag_if(
                (count > 0) & (pl.col(event_names[2]) < config.low_sentiment_confidence),
                QualityFlag.LOW_SENTIMENT_CONFIDENCE,
            ),
        ]
    flags += [
        flag_if(
            ~on_grid(timeframe)
            | pl.col("source_flags").fill_null([]).list.contains(QualityFlag.TIMESTAMP_MISMATCH.value),
            QualityFlag.TIMESTAMP_MISMATCH,
        ),
        flag_if(non_finite.fill_null(False), QualityFlag.COMPUTATION_ERROR),
    ]
    out = vectors.select(
        pl.col("instrument_id"),
        pl.lit(timeframe).alias("timeframe"),
        pl.col("ts"),
        pl.lit(feature_set.version).alias("feature_set_version"),
        *[
            pl.when(pl.col(n).is_nan() | pl.col(n).is_infinite()).then(None).otherwise(pl.col(n)).alias(n)
            for n in names
        ],
        pl.concat_list(flags).alias("quality_flags"),
    ).sort("instrument_id", "ts")

    new_state = pl.DataFrame(schema=STATE_SCHEMA)
    if "recursive" in families:
        new_state = (
            valid.filter(in_window)
            .with_columns(pl.col("ts").dt.truncate("1d").alias("_day"))
            .group_by("instrument_id", "_day")
            .agg(pl.all().sort_by("ts").last())
            .select(
                "instrument_id",
                "ts",
                (pl.col("_pos") + 1).cast(pl.Int64).alias("bars_seen"),
                *[pl.col(f"_s_{c}").alias(c) for c in recursive.STATE_COLUMNS],
            )
            .sort("instrument_id", "ts")
        )
    return FeatureComputation(vectors=out, state=new_state)
