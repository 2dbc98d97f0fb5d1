"""Dagster resources: the feature store database and the market data source, configured from the environment."""

from __future__ import annotations

import functools
import inspect
from datetime import date
from pathlib import Path

import dagster as dg
import psycopg
import sqlalchemy as sa
from pydantic import PrivateAttr

from marketfs.db import (
    connection_lost,
    engine_for,
    outage_seconds,
    resolve_dsn,
    unreachable_message,
    wait_until_reachable,
    write_conflict,
)
from marketfs.sources import (
    BarSource,
    EventSource,
    LandingFolderBars,
    LandingFolderDailyBars,
    LandingFolderEvents,
    SyntheticBars,
    SyntheticEvents,
)


class FeatureStore(dg.ConfigurableResource):
    """The PostgreSQL/TimescaleDB database that holds bars and feature vectors.

    ``dsn`` empty means ``$MARKETFS_DSN``, else the embedded default server. The schema is
    migrated once per run, before the first asset touches it.
    """

    dsn: str = ""
    _dsn: str = PrivateAttr(default="")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        from marketfs.store.migrations import migrate

        self._dsn = self.dsn or resolve_dsn()
        if context.instance is not None:
            pool_instance_connections(context.instance)
        try:
            # What a changed setting changed (and a server known not to work) goes to the run's event log.
            applied = migrate(self._dsn, report=context.log.log if context.log else None)
        except sa.exc.OperationalError as exc:
            raise database_unreachable(self._dsn, exc) from exc
        if applied and context.log:
            context.log.info(f"schema migrations applied: {', '.join(applied)}")

    def engine(self) -> sa.Engine:
        return engine_for(self._dsn or self.dsn or resolve_dsn())


def pool_instance_connections(instance: dg.DagsterInstance) -> None:
    """Keep a small pool of connections to Dagster's PostgreSQL event log and run storage in this process.

    dagster-postgres opens a new connection for every event by default (NullPool), and a stored event
    nests a second connection (its table check); with per-day check results and materialisations a
    month's run records hundreds of events, and connection set-up (password auth) took 16 s of a
    95 s backfill. dagster-webserver pools too (``optimize_for_webserver``), but with one connection,
    so the nested one would still be opened and closed per event: this keeps four.
    """
    try:
        from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage
        from dagster_postgres.utils import create_pg_engine
    except ImportError:
        return
    bound_instance_retries()
    for storage in (instance.event_log_storage, instance.run_storage):
        if not isinstance(storage, PostgresEventLogStorage | PostgresRunStorage):
            continue
        if getattr(storage, "_marketfs_pooled", False):
            continue
        storage._engine = create_pg_engine(
            storage.postgres_url,
            getattr(storage, "_token_provider", None),
            isolation_level="AUTOCOMMIT",
            pool_size=4,
            max_overflow=4,
            pool_recycle=3600,
            pool_pre_ping=True,
            # libpq waits for ever on a host that drops packets; a lost server must end the run, not hang it.
            connect_args={"connect_timeout": 5},
        )
        storage._marketfs_pooled = True


def pooled_instance() -> dg.DagsterInstance:
    """``DagsterInstance.get()`` with its connections pooled from the start, for a process that executes runs
    in-process: a run's planned-materialisation events (one per asset and day) are stored when the run is
    created, before any resource is set up, and each opened two connections (measured: 450 connections, 2.3 s
    of a 21-day backfill of 50 instruments)."""
    instance = dg.DagsterInstance.get()
    pool_instance_connections(instance)
    return instance


def database_unreachable(dsn: str, exc: Exception) -> dg.Failure:
    """The failure a run ends with when the feature store database cannot be reached (retries allowed)."""
    return dg.Failure(description=unreachable_message(dsn, exc), allow_retries=True)


class _BoundedRetry:
    """dagster-postgres's connection retry, bounded in time, quiet, and short-circuited once the server is gone.

    Its own retry logs a warning per attempt and backs off for about 6 s per call; a stored event is
    several calls and a failing step logs several events, so a lost server took minutes and hundreds of
    lines before a `DagsterPostgresException`. Here a call retries for at most ``$MARKETFS_DB_OUTAGE_SECONDS``
    (60 s by default: a server restart or failover is ridden out, and the run goes on where it was) and,
    once one call has given up (or a step found the feature store's server still gone after that long),
    the next ones try once, until a connection succeeds again: a lost server ends the run in one line.
    """

    def __init__(self) -> None:
        self.gone = False

    def __call__(self, fn, retry_limit: int = 5, retry_wait: float = 0.2):
        from dagster_postgres.utils import DagsterPostgresException

        failed = (sa.exc.DatabaseError, sa.exc.OperationalError, sa.exc.TimeoutError)
        try:
            result = _with_backoff(fn, lambda exc: isinstance(exc, failed), first_wait=retry_wait)
        except failed as exc:
            self.gone = True
            raise DagsterPostgresException("too many retries for DB connection") from exc
        self.gone = False
        return result


def _with_backoff(fn, retryable, first_wait: float = 0.2):
    """``fn()``, called again after a growing pause while it raises what ``retryable`` accepts, for at most
    ``$MARKETFS_DB_OUTAGE_SECONDS`` (once only while a call has given up: the server is gone)."""
    import time

    deadline = time.monotonic() + (0 if _bounded_retry.gone else outage_seconds())
    wait = first_wait
    while True:
        try:
            return fn()
        except Exception as exc:
            if not retryable(exc) or time.monotonic() + wait > deadline:
                raise
            time.sleep(wait)
            wait = min(wait * 2, 2.0)


_bounded_retry = _BoundedRetry()


def bound_instance_retries() -> None:
    """Make this process's dagster-postgres storages use the bounded, quiet retry above (idempotent).

    The modules import ``retry_pg_connection_fn`` by name, so each module's binding is replaced.
    """
    try:
        from dagster_postgres import utils
        from dagster_postgres.event_log import event_log
        from dagster_postgres.run_storage import run_storage
        from dagster_postgres.schedule_storage import schedule_storage
    except ImportError:
        return
    for module in (utils, event_log, run_storage, schedule_storage):
        if hasattr(module, "retry_pg_connection_fn"):
            module.retry_pg_connection_fn = _bounded_retry
    event_log.PostgresEventLogStorage.store_event = _store_event_riding_out_restarts


def _ride_out(write):
    """``write()``, one transaction, again while the connection it ran on was lost (within the outage budget).

    dagster-postgres retries opening a connection, not a statement: a server stopping while an event is written
    (a restart ends every open transaction) failed the step, hence the run, however soon the server came back.
    """
    return _with_backoff(write, lambda exc: isinstance(exc, sa.exc.DBAPIError) and connection_lost(exc))


def _store_event_riding_out_restarts(self, event) -> None:
    """`PostgresEventLogStorage.store_event` (dagster-postgres 0.29), each of its three transactions ridden out
    apart: retrying the whole call after its first transaction committed would store the event twice."""
    from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS
    from dagster._core.storage.event_log import SqlEventLogStorageTable
    from dagster_postgres.event_log.event_log import CHANNEL_NAME

    statement = self.prepare_insert_event(event).returning(
        SqlEventLogStorageTable.c.run_id, SqlEventLogStorageTable.c.id
    )

    def insert() -> int:
        with self._connect() as conn:
            run_id, event_id = conn.execute(statement).one()
            # Kept from dagster-postgres: webservers of older versions still LISTEN for it.
            conn.execute(sa.text(f"NOTIFY {CHANNEL_NAME}, :notify_id"), {"notify_id": f"{run_id}_{event_id}"})
        return int(event_id)

    def asset_event() -> None:
        with self.index_transaction() as conn:
            self._store_asset_event_tags(conn, [event], [event_id])
            self._store_asset_event(conn, event, event_id)

    event_id = _ride_out(insert)
    if event.is_dagster_event and event.dagster_event_type in ASSET_EVENTS and event.dagster_event.asset_key:
        _ride_out(asset_event)
    if event.is_dagster_event and event.dagster_event_type in ASSET_CHECK_EVENTS:
        _ride_out(lambda: self.store_asset_check_event(event, event_id))


def translate_database_errors(fn):
    """Wrap an asset body: a database lost mid-run is waited for, then the step is retried.

    A lost connection (a server restart, a failover, a dropped connection) waits up to
    ``$MARKETFS_DB_OUTAGE_SECONDS`` for the server to answer again and then fails the attempt as
    retryable: the step's retry policy runs it again (every write is one transaction, so the failed
    attempt wrote nothing). A server still gone after that ends the run in the one clear line of
    ``unreachable_message``, not retried. Works for plain and generator asset functions; the wrapped
    signature is what Dagster sees.
    """

    def failure(kwargs: dict, exc: Exception) -> dg.Failure:
        lost = write_conflict(exc)
        if lost is not None:
            # Not "cannot reach the database": the server is there, the transaction lost and was rolled back.
            return dg.Failure(
                description=f"a write lost {lost} after retries; nothing of it was written. The step is retried; "
                "if it keeps failing, see the server log for the other transaction",
                allow_retries=True,
            )
        store = kwargs.get("store")
        dsn = (store._dsn or store.dsn) if isinstance(store, FeatureStore) else resolve_dsn()
        waited = wait_until_reachable(dsn, outage_seconds())
        if waited is None:
            _bounded_retry.gone = True  # Dagster's own writes of this failure try once: the server is gone
            return dg.Failure(description=unreachable_message(dsn, exc), allow_retries=False)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return dg.Failure(
            description=f"lost the feature store database ({reason[0] if reason else 'connection lost'}); it "
            f"answered again after {waited:.0f} s. Nothing of this attempt was written; the step is retried",
            allow_retries=True,
        )

    def handled(exc: Exception) -> bool:
        return write_conflict(exc) is not None or connection_lost(exc)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (sa.exc.DBAPIError, psycopg.Error) as exc:
                if not handled(exc):
                    raise
                raise failure(kwargs, exc) from exc

        return generator

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (sa.exc.DBAPIError, psycopg.Error) as exc:
            if not handled(exc):
                raise
            raise failure(kwargs, exc) from exc

    return plain


# Safe to retry: every write is one transaction, so a step that failed wrote nothing. A lost database is
# waited for inside the failed attempt (translate_database_errors), so the delays here stay short.
DATABASE_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)


SOURCES = ("synthetic", "landing")


class MarketData(dg.ConfigurableResource):
    """Where raw bars and events come from: ``synthetic`` (deterministic demo data) or ``landing``
    (``<landing_dir>/bars`` and ``<landing_dir>/events``)."""

    # A str, not a Literal: a field bound to dg.EnvVar is validated against the variable's name when the
    # resource is declared (Dagster 1.13), which a Literal refuses; the value is checked where it is used.
    source: str = "synthetic"
    landing_dir: str = "landing"
    # What a landed bar's ts means: "open" (09:30 holds 09:30-09:31, as most vendors stamp) or "close".
    bar_stamp: str = "open"
    synthetic_instruments: int = 10
    synthetic_seed: int = 7
    # The synthetic source delivers daily bars only before this session, minute bars from it on.
    synthetic_minutes_from: str = "2024-01-02"

    def _instruments(self) -> tuple[str, ...]:
        return tuple(f"SYN{i:03d}" for i in range(self.synthetic_instruments))

    def _check(self) -> None:
        if self.source not in SOURCES:
            raise dg.Failure(
                f"unknown market data source {self.source!r}; set MARKETFS_SOURCE to one of {', '.join(SOURCES)}"
            )

    def _synthetic_bars(self) -> SyntheticBars:
        return SyntheticBars(
            instruments=self._instruments(),
            seed=self.synthetic_seed,
            minutes_from=date.fromisoformat(self.synthetic_minutes_from),
        )

    def bar_source(self) -> BarSource:
        self._check()
        if self.source == "synthetic":
            return self._synthetic_bars()
        return LandingFolderBars(Path(self.landing_dir) / "bars", stamp=self.bar_stamp)

    def daily_bar_source(self) -> SyntheticBars | LandingFolderDailyBars:
        """Daily deliveries: ``<landing_dir>/bars_1d`` (absent: none), or the synthetic history."""
        self._check()
        if self.source == "synthetic":
            return self._synthetic_bars()
        return LandingFolderDailyBars(Path(self.landing_dir) / "bars_1d")

    def declared_instruments(self) -> tuple[str, ...]:
        """The instruments the source itself declares (synthetic); a landing folder declares none."""
        return self._instruments() if self.source == "synthetic" else ()

    def corporate_actions_dir(self) -> Path | None:
        """``<landing_dir>/corporate_actions`` (absent: none), or None for the synthetic source (no actions)."""
        self._check()
        return None if self.source == "synthetic" else Path(self.landing_dir) / "corporate_actions"

    def event_source(self) -> EventSource:
        self._check()
        if self.source == "synthetic":
            return SyntheticEvents(instruments=self._instruments(), seed=self.synthetic_seed)
        return LandingFolderEvents(Path(self.landing_dir) / "events")


# Where each field of the resources comes from: read through dg.EnvVar when a run, sensor or schedule
# starts (and shown as such in the UI), not when the code location is imported. The defaults are set
# by every entry point (pipelines/environment.py) for variables left unset.
MARKET_DATA_ENV = {
    "source": ("MARKETFS_SOURCE", "synthetic"),
    "landing_dir": ("MARKETFS_LANDING_DIR", "landing"),
    "bar_stamp": ("MARKETFS_BAR_STAMP", "open"),
    "synthetic_instruments": ("MARKETFS_SYNTHETIC_INSTRUMENTS", "10"),
    "synthetic_minutes_from": ("MARKETFS_SYNTHETIC_MINUTES_FROM", "2024-01-02"),
}


def market_data_from_env() -> MarketData:
    """The market data resource of the code location, its fields bound to environment variables."""
    return MarketData(
        source=dg.EnvVar(MARKET_DATA_ENV["source"][0]),
        landing_dir=dg.EnvVar(MARKET_DATA_ENV["landing_dir"][0]),
        bar_stamp=dg.EnvVar(MARKET_DATA_ENV["bar_stamp"][0]),
        synthetic_instruments=dg.EnvVar.int(MARKET_DATA_ENV["synthetic_instruments"][0]),
        synthetic_minutes_from=dg.EnvVar(MARKET_DATA_ENV["synthetic_minutes_from"][0]),
    )
