"""``python -m pipelines run --today``: one intraday step over what has been delivered of today so far.

It reads today's bars and events from the configured source (the landing folder's files as they
are now, or the synthetic source up to the last closed minute), stores what is new or changed,
steps every intraday feature set and timeframe of every shard (``marketfs/intraday.py``), and
records each step in Dagster as an observation of today's partition of the feature asset, with
the minutes it covered, how far today is filled, and its verdict. Observations, not
materialisations: the partition turns materialised when the end-of-day run has judged the whole day.
``run --today`` makes no Dagster run (a run costs ~7.5 s of start-up and a row in the Runs list;
a step is a second or two): it is its own short process, for an operator, a test, or a timer (cron,
systemd), and ``push_bars`` callers step in their own process.

In the UI, ``intraday_sensor`` (turn it on under *Automation*; ``make ui`` runs the daemon) does the
same continuously: every ``MARKETFS_INTRADAY_INTERVAL`` seconds (30) during a session it launches a
run of ``intraday_step`` per shard when a minute has closed since the last one, unless one is still
queued or running (the next covers its minutes). The runs carry the shard's state-chain tag, so they
never overlap that shard's daily runs, and a breach fails the run. That is one run per shard and
closed minute (about 390 a session each), visible and filterable (tag ``marketfs/intraday``).
"""

import os
import sys
from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.resources import FeatureStore, MarketData, pooled_instance
from pipelines.environment import prepare_environment

INTRADAY_TAG = "marketfs/intraday"
INTERVAL_SECONDS = int(os.environ.get("MARKETFS_INTRADAY_INTERVAL", "30"))
# Steps go on this long after a close: the session's last minutes, and bars the feed delivers late.
AFTER_CLOSE = timedelta(minutes=10)


def _delivered(now: datetime, source=None):  # noqa: ANN001, ANN202 - a MarketData; (bars, events) frames
    """Today's bars and events so far, from the configured source."""
    from assets.resources import MARKET_DATA_ENV
    from marketfs.intraday import active_day, closed_end
    from marketfs.universe import active_sessions

    if source is None:
        config = {field: os.environ.get(var, default) for field, (var, default) in MARKET_DATA_ENV.items()}
        source = MarketData(**config)
    day = active_day(now)
    start, _ = active_sessions().trading_day_window(day)
    end = closed_end("1m", now)
    bars = source.bar_source().bars(start, end)
    events = source.event_source().events(start, now)
    return bars, events


def step_events(outcome) -> list:  # noqa: ANN001 - a StepOutcome
    """What Dagster records of a step: an observation of today's partition (its minutes, how far the
    day is filled, the verdict). Observations, not materialisations: the end-of-day run materialises."""
    from assets.partitions import partition_key

    if outcome.status == "nothing to do":
        return []
    return [
        dg.AssetObservation(
            asset_key=outcome.dataset,
            partition=partition_key(outcome.day, outcome.shard),
            description=f"intraday step {outcome.describe()}",
            metadata={
                "step_start": dg.MetadataValue.timestamp(outcome.start),
                "step_end": dg.MetadataValue.timestamp(outcome.end),
                "filled_through": dg.MetadataValue.text(f"{outcome.end:%Y-%m-%d %H:%M} UTC"),
                "status": dg.MetadataValue.text(outcome.status),
                "vectors": dg.MetadataValue.int(outcome.vectors),
                **({"quarantine_batch": dg.MetadataValue.int(outcome.batch_id)} if outcome.batch_id else {}),
            },
        )
    ]


def _step_today(now: datetime, source: MarketData | None, dsn: str, shard: int | None, run_id: str | None = None):  # noqa: ANN202
    """Today's delivery so far, stepped (every shard, or ``shard``): the outcomes, and the breach if a gate failed."""
    from assets.partitions import SHARD_COUNT
    from marketfs.ingest import step_delivered
    from marketfs.intraday import IntradayBreach
    from marketfs.shards import Shard

    bars, events = _delivered(now, source)
    only = None if shard is None else [Shard(shard, SHARD_COUNT)]
    try:
        return step_delivered(bars, events, now=now, dsn=dsn, only=only, run_id=run_id), None
    except IntradayBreach as exc:
        return exc.outcomes, exc


def run_today(now: datetime | None = None, shard: int | None = None) -> int:
    prepare_environment(check=True)
    from marketfs.db import resolve_dsn
    from marketfs.features.compute import HistoryError
    from marketfs.sources import SourceFileError

    try:
        outcomes, breach = _step_today(now or datetime.now(UTC), None, resolve_dsn(), shard)
    except SourceFileError as exc:
        print(f"today's delivery cannot be read: {exc}", file=sys.stderr)
        return 1
    except HistoryError as exc:  # a hole before today, or state that does not continue: nothing was computed
        print(f"refused, nothing of today computed: {exc}", file=sys.stderr)
        return 1
    instance = pooled_instance()
    for outcome in outcomes:
        print(outcome.describe())
        for event in step_events(outcome):
            instance.report_runless_asset_event(event)
    if breach is not None:
        print(str(breach), file=sys.stderr)
        return 1
    return 0


class IntradayStepConfig(dg.Config):
    shard: int = 0
    now: str = ""  # the instant taken for the clock (ISO 8601 with an offset): replays and tests; empty: the clock


@dg.op(name="step_today", description="One intraday step of every feature set and timeframe of a shard.")
def intraday_step_op(
    context: dg.OpExecutionContext, config: IntradayStepConfig, store: FeatureStore, market_data: MarketData
):  # noqa: ANN201 - yields Dagster events
    from marketfs.db import resolve_dsn
    from marketfs.features.compute import HistoryError

    now = datetime.fromisoformat(config.now) if config.now else datetime.now(UTC)
    try:
        outcomes, breach = _step_today(now, market_data, store.dsn or resolve_dsn(), config.shard, context.run_id)
    except HistoryError as exc:
        raise dg.Failure(description=f"refused, nothing of today computed: {exc}", allow_retries=False) from exc
    for outcome in outcomes:
        context.log.info(outcome.describe())
        yield from step_events(outcome)
    if breach is not None:
        raise dg.Failure(description=str(breach), allow_retries=False)
    yield dg.Output(None)


@dg.job(
    name="intraday_step",
    executor_def=dg.in_process_executor,
    tags={INTRADAY_TAG: "step"},
    description="One intraday step: today's delivery so far, computed, gated and served (see pipelines/intraday.py).",
)
def intraday_job() -> None:
    intraday_step_op()


@dg.sensor(
    job_name="intraday_step",
    minimum_interval_seconds=INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="During a session, a run of intraday_step per shard for each minute that closed since the last one.",
)
def intraday_sensor(context: dg.SensorEvaluationContext):  # noqa: ANN201
    return intraday_requests(context.instance, datetime.now(UTC))


def intraday_requests(instance: dg.DagsterInstance, now: datetime) -> list[dg.RunRequest] | dg.SkipReason:
    """The sensor's decision at ``now``: a run per shard whose previous step has finished, once per closed minute."""
    from assets.partitions import SHARD_COUNT
    from marketfs.intraday import active_day, closed_end
    from marketfs.shards import shards
    from marketfs.universe import active_sessions
    from pipelines.sensors import chain_tags

    end = closed_end("1m", now)
    day = active_day(now)
    if day is None:
        return dg.SkipReason("before the calendar's first session")
    sessions = active_sessions()
    i = sessions.position(day)
    opens, closes = sessions.opens[i], sessions.closes[i]
    if end <= opens:
        return dg.SkipReason(f"no minute of {day}'s session has closed yet (it opens at {opens:%H:%M} UTC)")
    if end > closes + AFTER_CLOSE:
        return dg.SkipReason(f"{day}'s session closed at {closes:%H:%M} UTC: its end-of-day run reconciles it")
    requests = []
    for shard in shards(SHARD_COUNT):
        tags = {**chain_tags(shard), INTRADAY_TAG: "step"}
        active = instance.get_runs(
            filters=dg.RunsFilter(
                job_name="intraday_step",
                tags=tags,
                statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
            ),
            limit=1,
        )
        if active:
            continue  # the next run covers this minute too
        requests.append(
            dg.RunRequest(
                run_key=f"{day}-{end:%H%M}-shard{shard.index}",
                run_config={"ops": {"step_today": {"config": {"shard": shard.index, "now": now.isoformat()}}}},
                tags=tags,
            )
        )
    return requests or dg.SkipReason("every shard's previous step is still queued or running")
