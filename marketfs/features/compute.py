"""Feature vectors from bars and events: the one function every run path calls.

Pure: polars frames in, polars frames out. The caller supplies the window's bars plus warm-up
bars before it, the events of the window plus its look-back, and the recursion state stored at
the last bar before the window (see ``recursive.py``); it gets the vectors of the window and the
state at each day's last bar, to store for the next day. What is computed comes from the feature
set's declaration: each feature's family and parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from marketfs.corporate_actions import ADJ, FACTOR_SCHEMA, PRICE_COLUMNS, adjust
from marketfs.features import recursive
from marketfs.features.events import EVENT_SCHEMA, event_feature_names, event_features
from marketfs.features.flags import FlagConfig, QualityFlag, flag_if, load_flag_config
from marketfs.features.registry import DEFAULT_FEATURE_SET, FeatureSet, parse_window
from marketfs.features.timeframes import timeframe as timeframe_spec
from marketfs.features.windows import lag, with_helpers
from marketfs.holds import NO_HOLDS, Holds

KEY_COLUMNS = ["instrument_id", "timeframe", "ts", "feature_set_version"]


def state_schema(feature_set: FeatureSet, timeframe: str) -> dict[str, pl.DataType]:
    """The stored recursion state of a feature set's timeframe: one column per recursion it carries."""
    return {
        "instrument_id": pl.String(),
        "ts": pl.Datetime("us", "UTC"),
        "bars_seen": pl.Int64(),
        **{key: pl.Float64() for key in feature_set.state_columns(timeframe)},
    }


def vector_schema(feature_set: FeatureSet, timeframe: str) -> dict[str, pl.DataType]:
    """The feature vectors of a feature set's timeframe, as computed and as stored."""
    return {
        "instrument_id": pl.String(),
        "timeframe": pl.String(),
        "ts": pl.Datetime("us", "UTC"),
        "feature_set_version": pl.String(),
        **{name: pl.Float64() for name in feature_set.names(timeframe)},
        "quality_flags": pl.List(pl.String()),
    }


class HistoryError(ValueError):
    """The history handed in cannot give exact values (missing or mismatched recursion state)."""


JUMP_SCHEMA: dict[str, pl.DataType] = {
    "instrument_id": pl.String(),
    "ts": pl.Datetime("us", "UTC"),
    "open": pl.Float64(),
    "previous_close": pl.Float64(),
}


@dataclass(frozen=True)
class FeatureComputation:
    vectors: pl.DataFrame
    state: pl.DataFrame  # state_schema rows: the state at each instrument's last valid bar of each UTC day
    # Instruments left out from a held instrument-day on (their rows are in neither frame).
    holds: Holds = NO_HOLDS
    # Overnight jumps no known corporate action explains, in the window (JUMP_SCHEMA, on the scale of the
    # jump's own bar): what a person needs to tell a split from a crash.
    jumps: pl.DataFrame = dataclasses.field(default_factory=lambda: pl.DataFrame(schema=JUMP_SCHEMA))


def available_after(timeframe: str) -> timedelta:
    """How long after its stamp a vector of ``timeframe`` became known (see ``timeframes.py``)."""
    return timeframe_spec(timeframe).available_after


def on_grid(timeframe: str) -> pl.Expr:
    """Whether a bar's ts is where the timeframe stamps its bars: a grid time, or a session's last minute."""
    spec = timeframe_spec(timeframe)
    if spec.per_session:
        from marketfs.universe import active_sessions

        return (pl.col("ts") + timedelta(minutes=1)).is_in(active_sessions().closes.implode())
    return (pl.col("ts").dt.epoch("us") % spec.step_us) == spec.stamp_offset_us


def valid_bar() -> pl.Expr:
    """A bar the features are computed from; the others are skipped (and their vectors flagged MISSING_OHLCV).

    ``VALID_BAR_SQL`` is the same rule for a database read; a test holds them to each other.
    """
    prices_ok = pl.all_horizontal([pl.col(c).is_finite() & (pl.col(c) > 0) for c in PRICE_COLUMNS])
    return prices_ok & pl.col("volume").is_finite() & (pl.col("volume") >= 0) & (pl.col("high") >= pl.col("low"))


# PostgreSQL sorts NaN above every number and 'Infinity' compares as a number, so finiteness is spelt out.
VALID_BAR_SQL = " AND ".join(
    [f"{c} > 0 AND {c} < 'Infinity'::float8" for c in PRICE_COLUMNS]
    + ["volume >= 0 AND volume < 'Infinity'::float8", "high >= low"]
)


def _positions(
    valid: pl.DataFrame,
    state: pl.DataFrame | None,
    start: datetime | None,
    warmup_limit: int | None,
    schema: dict[str, pl.DataType],
    seed_bars: int,
):
    """Attach ``_pos`` (position in the instrument's history), ``_row`` (in ``valid``) and the state to
    continue from."""
    counts = valid.group_by("instrument_id").agg(
        (pl.col("ts") < start).sum().alias("_n_warm") if start is not None else pl.lit(0, pl.UInt32).alias("_n_warm"),
        pl.col("ts").filter(pl.col("ts") < start).max().alias("_last_warm")
        if start is not None
        else pl.lit(None, pl.Datetime("us", "UTC")).alias("_last_warm"),
    )
    usable = pl.DataFrame(schema=schema) if state is None else state.select(list(schema))
    usable = usable.filter(pl.col("bars_seen") >= seed_bars)
    joined = counts.join(
        usable.rename({c: f"_state_{c}" for c in schema if c != "instrument_id"}), on="instrument_id", how="left"
    )
    mismatch = joined.filter(pl.col("_state_ts").is_not_null() & (pl.col("_state_ts") != pl.col("_last_warm")))
    if mismatch.height:
        row = mismatch.row(0, named=True)
        raise HistoryError(
            f"stored feature state of {row['instrument_id']} is at {row['_state_ts']:%Y-%m-%d %H:%M} UTC, but its last "
            f"bar before the window (which starts at {start:%Y-%m-%d %H:%M} UTC, the previous session's close) is at "
            f"{row['_last_warm']:%Y-%m-%d %H:%M} UTC: a feature partition in between was not materialised, or the "
            f"bars changed after it was. Fix: materialise the previous partition first, i.e. the feature "
            f"partitions from the day after {row['_state_ts']:%Y-%m-%d} on, in order (a backfill does that)."
        )
    if warmup_limit is not None:
        truncated = joined.filter(pl.col("_state_ts").is_null() & (pl.col("_n_warm") >= warmup_limit))
        if truncated.height:
            raise HistoryError(
                f"no feature state for {truncated['instrument_id'][0]} (and {truncated.height - 1} more) before the "
                f"window (which starts at {start:%Y-%m-%d %H:%M} UTC, the previous session's close), and their "
                "history is longer than the warm-up read. Fix: materialise the previous partition of this feature "
                "asset first (or backfill from the first day)."
            )
    joined = joined.with_columns(
        pl.when(pl.col("_state_ts").is_not_null())
        .then(pl.col("_state_bars_seen") - pl.col("_n_warm").cast(pl.Int64))
        .otherwise(0)
        .alias("_offset"),
        pl.when(pl.col("_state_ts").is_not_null()).then(pl.col("_state_bars_seen") - 1).alias("_state_pos"),
    )
    return (
        # In the bars' order, (instrument_id, ts): positions, recursions and windows.lag read it.
        valid.join(joined, on="instrument_id", how="left", maintain_order="left")
        .with_columns(pl.int_range(pl.len()).over("instrument_id").alias("_row"))  # see windows.lag
        .with_columns((pl.col("_row") + pl.col("_offset")).alias("_pos"))
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
    restarts: pl.DataFrame | None = None,
    adjustments: pl.DataFrame | None = None,
) -> FeatureComputation:
    """Feature vectors of ``feature_set`` at ``timeframe`` for ``[start, end)``.

    ``bars`` holds the window's bars of ``timeframe`` and up to ``warmup_limit`` bars before
    ``start`` per instrument (with ``warmup_limit=None`` the bars are the whole history).
    ``events`` must cover ``[start - feature_set.event_lookback(timeframe), end)``. ``state`` is the
    stored recursion state at each instrument's last bar before ``start``. ``restarts`` (instrument_id,
    restart_at): instruments whose history restarts after a declared gap (the caller has left out their bars
    and state from before it); their vectors are flagged GAP until every window is warm again.
    ``adjustments`` (``corporate_actions.FACTOR_SCHEMA``): the corporate actions in effect, every one of the
    instruments' (not only the window's): the bars are put on one scale (``corporate_actions.adjust``), the
    state is on that scale, and features in price units come out in the units of their own bar.
    """
    config = config or load_flag_config()
    features = feature_set.for_timeframe(timeframe)
    names = [f.name for f in features]
    market = [f for f in features if not f.is_event]
    if "source_flags" not in bars.columns:
        bars = bars.with_columns(pl.lit([], pl.List(pl.String)).alias("source_flags"))
    bars = bars.sort("instrument_id", "ts")
    if adjustments is None:
        adjustments = pl.DataFrame(schema=FACTOR_SCHEMA)
    adjustments = adjustments.filter(pl.col("instrument_id").is_in(bars["instrument_id"].unique().implode()))
    bars = adjust(bars, adjustments)
    in_window = pl.lit(True)
    if start is not None:
        in_window = in_window & (pl.col("ts") >= start)
    if end is not None:
        in_window = in_window & (pl.col("ts") < end)
    if bars.filter(in_window).is_empty():
        # No bar in the window, no vector (vectors are keyed on its bars and their grid times) and no
        # state to carry. Planning the feature expressions costs ~0.5 s whatever the rows: a daily-only
        # history would pay it for every empty minute chunk.
        empty_state = pl.DataFrame(schema=state_schema(feature_set, timeframe))
        return FeatureComputation(vectors=pl.DataFrame(schema=vector_schema(feature_set, timeframe)), state=empty_state)

    schema = state_schema(feature_set, timeframe)
    recursions = feature_set.recursions(timeframe)
    valid = _positions(bars.filter(valid_bar()), state, start, warmup_limit, schema, recursive.seed_bars(recursions))
    valid = recursive.apply(valid, recursions)
    exprs = {f.name: f.spec.expr(f.p) for f in market}
    # Features in price units are put back on their own bar's scale (1 where no action applies: unchanged).
    exprs |= {f.name: exprs[f.name] / pl.col(ADJ) for f in market if f.price_units and adjustments.height}
    valid = with_helpers(valid, list(exprs.values())).with_columns(**exprs)
    lookback_short = pl.any_horizontal([pl.col("_pos") + 1 < f.lookback for f in features if f.lookback > 0])
    longest = max((f.lookback for f in market), default=0)
    valid = _with_jumps(valid, config.unexplained_jump, longest)
    computed = valid.filter(in_window).select(
        "instrument_id",
        "ts",
        *[f.name for f in market],
        lookback_short.alias("_short"),
        pl.lit(True).alias("_valid"),
        "_jumped",
    )
    jumps = (
        valid.filter(in_window & pl.col("_jump"))
        .select(
            "instrument_id",
            "ts",
            (pl.col("open") / pl.col(ADJ)).alias("open"),
            (pl.col("_previous_close") / pl.col(ADJ)).alias("previous_close"),
        )
        .cast(JUMP_SCHEMA)
    )

    window_bars = bars.filter(in_window)
    keys = _grid_keys(window_bars, bars, timeframe, config.stale_after_for(timeframe))
    vectors = keys.join(computed, on=["instrument_id", "ts"], how="left").join(
        window_bars.select("instrument_id", "ts", "source_flags"), on=["instrument_id", "ts"], how="left"
    )

    windows = feature_set.event_windows(timeframe)
    event_frame = events if events is not None else pl.DataFrame(schema=EVENT_SCHEMA)
    if windows:
        # Events count up to the instant the vector became known (its bar's close), not its stamp.
        known = vectors.with_columns(pl.col("ts").alias("_stamp"), pl.col("ts") + available_after(timeframe))
        for label in windows:
            known = event_features(known, event_frame, parse_window(label), label)
        vectors = known.with_columns(pl.col("_stamp").alias("ts")).drop("_stamp")

    if restarts is not None and restarts.height:
        restart = pl.col("restart_at")
        vectors = (
            vectors.join(restarts.select("instrument_id", "restart_at"), on="instrument_id", how="left")
            .with_columns(
                (restart.is_not_null() & (pl.col("ts") >= restart) & pl.col("_short").fill_null(False)).alias("_gap")
            )
            .drop("restart_at")
        )
    else:
        vectors = vectors.with_columns(pl.lit(False).alias("_gap"))
    vectors = vectors.with_columns(_flags(vectors, names, windows, timeframe, config).alias("quality_flags"))
    out = vectors.select(
        pl.col("instrument_id"),
        pl.lit(timeframe).alias("timeframe"),
        pl.col("ts"),
        pl.lit(feature_set.version).alias("feature_set_version"),
        *[
            pl.when(pl.col(n).is_nan() | pl.col(n).is_infinite()).then(None).otherwise(pl.col(n)).alias(n)
            for n in names
        ],
        pl.col("quality_flags"),
    ).sort("instrument_id", "ts")

    new_state = pl.DataFrame(schema=schema)
    if recursions:
        new_state = (
            valid.filter(in_window)
            .with_columns(pl.col("ts").dt.truncate("1d").alias("_day"))
            .group_by("instrument_id", "_day")
            .agg(pl.all().sort_by("ts").last())
            .select(
                "instrument_id",
                "ts",
                (pl.col("_pos") + 1).cast(pl.Int64).alias("bars_seen"),
                *[recursive.smoothed(r.key).alias(r.key) for r in recursions],
            )
            .sort("instrument_id", "ts")
        )
    return FeatureComputation(vectors=out, state=new_state, jumps=jumps)


def _with_jumps(valid: pl.DataFrame, threshold: float, longest: int) -> pl.DataFrame:
    """``_jump``: a bar that opens a trading day beyond ``threshold`` of the last close before it (both on one
    scale, so a split with its action known is no jump); ``_jumped``: a bar whose longest window still holds
    such a jump. Held only where no corporate action explains the move: a split delivered without its action,
    a bad print at the open, or a real crash a person must look at (UNEXPLAINED_JUMP)."""
    from marketfs.universe import active_sessions

    session = active_sessions().session_index(valid["ts"]).alias("_session")
    previous_close = lag(pl.col("close"), 1)
    move = pl.col("open") / previous_close
    opens_day = pl.col("_session") != lag(pl.col("_session"), 1)
    jump = (opens_day & ((move > 1 + threshold) | (move < 1 / (1 + threshold)))).fill_null(False)
    last_jump = pl.when(pl.col("_jump")).then(pl.col("_pos")).forward_fill().over("instrument_id")
    jump_session = pl.when(pl.col("_jump")).then(pl.col("_session")).forward_fill().over("instrument_id")
    # Within the jump's own trading day only: that instrument-day is what the gate holds, and a day a person
    # released (the move was real) must not hold the days after it for the weeks its windows still span.
    jumped = (pl.col("_session") == jump_session) & ((pl.col("_pos") - last_jump) < max(longest - 1, 1))
    return (
        valid.with_columns(session)
        .with_columns(jump.alias("_jump"), previous_close.alias("_previous_close"))
        .with_columns(jumped.fill_null(False).alias("_jumped"))
    )


def _flags(vectors: pl.DataFrame, names: list[str], windows: list[str], timeframe: str, config: FlagConfig) -> pl.Expr:
    """Each vector's quality flags; the event flags follow the timeframe's first event window."""
    non_finite = pl.any_horizontal([pl.col(n).is_nan() | pl.col(n).is_infinite() for n in names])
    flags = [
        flag_if(pl.col("_valid").is_null(), QualityFlag.MISSING_OHLCV),
        flag_if(pl.col("_short").fill_null(False), QualityFlag.INSUFFICIENT_OHLCV),
    ]
    if windows:
        stats = event_feature_names(windows[0])
        count, confidence = pl.col(stats[0]), pl.col(stats[2])
        flags += [
            flag_if(count == 0, QualityFlag.NO_EVENTS),
            flag_if((count > 0) & (count < config.low_event_count), QualityFlag.LOW_EVENT_COUNT),
            flag_if((count > 0) & (confidence < config.low_sentiment_confidence), QualityFlag.LOW_SENTIMENT_CONFIDENCE),
        ]
    flags += [
        flag_if(
            ~on_grid(timeframe)
            | pl.col("source_flags").fill_null([]).list.contains(QualityFlag.TIMESTAMP_MISMATCH.value),
            QualityFlag.TIMESTAMP_MISMATCH,
        ),
        # A daily bar of a partly covered session (resample.session_bars): its vector says so too.
        flag_if(
            pl.col("source_flags").fill_null([]).list.contains(QualityFlag.PARTIAL_SESSION.value),
            QualityFlag.PARTIAL_SESSION,
        ),
        # The history restarts after a declared gap and is not warm yet: no value reached across the gap.
        flag_if(pl.col("_gap"), QualityFlag.GAP),
        # A window spans an overnight move no known corporate action explains (``_with_jumps``).
        flag_if(pl.col("_jumped").fill_null(False), QualityFlag.UNEXPLAINED_JUMP),
        flag_if(non_finite.fill_null(False), QualityFlag.COMPUTATION_ERROR),
    ]
    return pl.concat_list(flags)
