"""``python -m pipelines run --today``: one intraday step over what has been delivered of today so far.

It reads today's bars and events from the configured source (the landing folder's files as they
are now, or the synthetic source up to the last closed minute), stores what is new or changed,
steps every intraday feature set and timeframe of every shard (``marketfs/intraday.py``), and
records each step in Dagster as an observation of today's partition of the feature asset, with
the minutes it covered, how far today is filled, and its verdict. Observations, not
materialisations: the partition turns materialised when the end-of-day run has judged the whole day.
No Dagster run is made per step (a run costs ~7.5 s and a row in the Runs list; a step is a second):
the step is its own process, started by an operator, a test, or a scheduler (cron, systemd timer),
and ``push_bars`` callers step in their own process.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime

from pipelines.environment import prepare_environment


def _delivered(now: datetime):  # noqa: ANN202 - (bars, events) frames
    """Today's bars and events so far, from the configured source."""
    from assets.resources import MARKET_DATA_ENV, MarketData
    from marketfs.intraday import closed_end, trading_day_of
    from marketfs.universe import active_sessions

    config = {field: os.environ.get(var, default) for field, (var, default) in MARKET_DATA_ENV.items()}
    source = MarketData(**config)
    day = trading_day_of(closed_end("1m", now))
    start, _ = active_sessions().trading_day_window(day)
    end = closed_end("1m", now)
    bars = source.bar_source().bars(start, end)
    events = source.event_source().events(start, now)
    return bars, events


def run_today(now: datetime | None = None, shard: int | None = None) -> int:
    prepare_environment()
    import dagster as dg

    from assets.partitions import SHARD_COUNT, partition_key
    from marketfs.db import resolve_dsn
    from marketfs.ingest import step_delivered
    from marketfs.intraday import IntradayBreach
    from marketfs.shards import Shard
    from marketfs.sources import SourceFileError

    now = now or datetime.now(UTC)
    try:
        bars, events = _delivered(now)
    except SourceFileError as exc:
        print(f"today's delivery cannot be read: {exc}", file=sys.stderr)
        return 1
    only = None if shard is None else [Shard(shard, SHARD_COUNT)]
    breach = None
    try:
        outcomes = step_delivered(bars, events, now=now, dsn=resolve_dsn(), only=only)
    except IntradayBreach as exc:
        outcomes, breach = exc.outcomes, exc
    instance = dg.DagsterInstance.get()
    for outcome in outcomes:
        print(outcome.describe())
        if outcome.status == "nothing to do":
            continue
        instance.report_runless_asset_event(
            dg.AssetObservation(
                asset_key=outcome.dataset,
                partition=partition_key(outcome.day, outcome.shard),
                description=f"intraday step {outcome.start:%H:%M}-{outcome.end:%H:%M} UTC: {outcome.status}",
                metadata={
                    "step_start": dg.MetadataValue.timestamp(outcome.start),
                    "step_end": dg.MetadataValue.timestamp(outcome.end),
                    "filled_through": dg.MetadataValue.text(f"{outcome.end:%Y-%m-%d %H:%M} UTC"),
                    "status": dg.MetadataValue.text(outcome.status),
                    "vectors": dg.MetadataValue.int(outcome.vectors),
                    **({"quarantine_batch": dg.MetadataValue.int(outcome.batch_id)} if outcome.batch_id else {}),
                },
            )
        )
    if breach is not None:
        print(str(breach), file=sys.stderr)
        return 1
    return 0
