"""Dagster resources: the feature store database and the market data source, configured from the environment."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

import dagster as dg
import psycopg
import sqlalchemy as sa
from pydantic import PrivateAttr

from marketfs.db import engine_for, resolve_dsn
from marketfs.sources import (
    BarSource,
    EventSource,
    LandingFolderBars,
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
            applied = migrate(self._dsn)
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
        )
        storage._marketfs_pooled = True


def database_unreachable(dsn: str, exc: Exception) -> dg.Failure:
    """The failure a run ends with when the feature store database cannot be reached (retries allowed)."""
    url = sa.make_url(dsn)
    reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
    return dg.Failure(
        description=(
            f"cannot reach the feature store database {url.host}:{url.port}/{url.database} ({reason}). "
            "Nothing was written by this step. Check that the server runs and that MARKETFS_DSN points at it "
            "(`make dsn` starts the embedded one)."
        ),
        allow_retries=True,
    )


def translate_database_errors(fn):
    """Wrap an asset body: a database lost mid-run ends in the clear, retryable failure above.

    Works for plain and generator asset functions; the wrapped signature is what Dagster sees.
    """

    def failure(kwargs: dict, exc: Exception) -> dg.Failure:
        store = kwargs.get("store")
        dsn = (store._dsn or store.dsn) if isinstance(store, FeatureStore) else resolve_dsn()
        return database_unreachable(dsn, exc)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (sa.exc.OperationalError, psycopg.OperationalError) as exc:
                raise failure(kwargs, exc) from exc

        return generator

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (sa.exc.OperationalError, psycopg.OperationalError) as exc:
            raise failure(kwargs, exc) from exc

    return plain


# Safe to retry: every write is one transaction, so a step that failed wrote nothing.
DATABASE_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)


class MarketData(dg.ConfigurableResource):
    """Where raw bars and events come from: ``synthetic`` (deterministic demo data) or ``landing``
    (``<landing_dir>/bars`` and ``<landing_dir>/events``)."""

    source: str = "synthetic"
    landing_dir: str = "landing"
    synthetic_instruments: int = 10
    synthetic_seed: int = 7

    def _instruments(self) -> tuple[str, ...]:
        return tuple(f"SYN{i:03d}" for i in range(self.synthetic_instruments))

    def _check(self) -> None:
        if self.source not in ("synthetic", "landing"):
            raise dg.Failure(
                f"unknown market data source {self.source!r}; set MARKETFS_SOURCE to 'synthetic' or 'landing'"
            )

    def bar_source(self) -> BarSource:
        self._check()
        if self.source == "synthetic":
            return SyntheticBars(instruments=self._instruments(), seed=self.synthetic_seed)
        return LandingFolderBars(Path(self.landing_dir) / "bars")

    def event_source(self) -> EventSource:
        self._check()
        if self.source == "synthetic":
            return SyntheticEvents(instruments=self._instruments(), seed=self.synthetic_seed)
        return LandingFolderEvents(Path(self.landing_dir) / "events")


def market_data_from_env() -> MarketData:
    return MarketData(
        source=os.environ.get("MARKETFS_SOURCE", "synthetic"),
        landing_dir=os.environ.get("MARKETFS_LANDING_DIR", "landing"),
        synthetic_instruments=int(os.environ.get("MARKETFS_SYNTHETIC_INSTRUMENTS", "10")),
    )
