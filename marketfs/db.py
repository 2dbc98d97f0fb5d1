"""Connections to the feature store database.

Everything resolves one DSN: ``$MARKETFS_DSN`` when set (any PostgreSQL or TimescaleDB server),
else the embedded default server, started on demand.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: a training or inference client need not load SQLAlchemy (0.19 s)
    import sqlalchemy as sa

DSN_ENV = "MARKETFS_DSN"
OUTAGE_ENV = "MARKETFS_DB_OUTAGE_SECONDS"
DEFAULT_OUTAGE_SECONDS = 60.0


def outage_seconds() -> float:
    """How long a run waits for a lost database to come back before it fails (``$MARKETFS_DB_OUTAGE_SECONDS``).

    A server restart, a failover or a dropped connection lasts seconds to a minute; a run that waits it
    out needs nobody, one that fails at once needs a person to re-run it.
    """
    text = os.environ.get(OUTAGE_ENV, "").strip()
    if not text:
        return DEFAULT_OUTAGE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{OUTAGE_ENV}={text!r}: a number of seconds >= 0 (default {DEFAULT_OUTAGE_SECONDS:g})")
    return value


def resolve_dsn() -> str:
    """The feature store DSN: ``$MARKETFS_DSN``, else the embedded server's (started if needed)."""
    dsn = os.environ.get(DSN_ENV)
    if dsn:
        return dsn
    from marketfs.embedded_pg import EmbeddedPostgres, default_home

    return EmbeddedPostgres(default_home()).ensure_running()


def sqlalchemy_url(dsn: str) -> sa.URL:
    """A libpq-style DSN as a SQLAlchemy URL on the psycopg 3 driver."""
    import sqlalchemy as sa

    url = sa.make_url(dsn)
    return url.set(drivername="postgresql+psycopg")


# Every bulk connection: sessions in UTC, a bounded wait for the server, no automatic server-side prepares.
CONNECT_ARGS = {"options": "-c timezone=UTC", "connect_timeout": 10, "prepare_threshold": None}


@lru_cache(maxsize=16)
def engine_for(dsn: str) -> sa.Engine:
    """One pooled engine per DSN and process; every session runs in UTC.

    No automatic server-side prepares: psycopg prepares a statement on its fifth run, and the generic
    plan PostgreSQL then reuses ignores the statistics of freshly loaded staging tables (seen: a
    stale-key anti-join turned nested loop, minutes instead of seconds). These are bulk statements
    where planning is noise anyway; ``latest()`` keeps its own prepared connection.
    """
    import sqlalchemy as sa

    return sa.create_engine(
        sqlalchemy_url(dsn),
        pool_pre_ping=True,
        connect_args=CONNECT_ARGS,
    )


def unreachable_message(
    dsn: str, exc: BaseException | str, what: str = "feature store database", variable: str = DSN_ENV
) -> str:
    """The one line said whenever the server behind ``dsn`` cannot be reached: which server, why, what to do.

    Names host:port/database, never the password. ``exc`` is the driver's error (or its text); only
    its first line is kept, the rest is libpq's advice, which the fix below replaces. ``variable`` is
    the setting that names the server.
    """
    import sqlalchemy as sa

    url = sa.make_url(dsn)
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    where = f"{url.host or 'localhost'}:{url.port or 5432}/{url.database}"
    return (
        f"cannot reach the {what} {where} ({reason[0] if reason else 'no reason given'}). Nothing was written by "
        f"the step that noticed. Check that the server runs and that {variable} points at it "
        "(`make dsn` starts the embedded one), then run the command again."
    )


def timescaledb_installed(conn: sa.Connection) -> bool:
    """True when the TimescaleDB extension is installed in the connected database."""
    import sqlalchemy as sa

    return bool(conn.execute(sa.text("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")).scalar())


def connection_lost(exc: BaseException) -> bool:
    """True when ``exc`` says the server is gone or the connection broke (not a bad statement or a conflict)."""
    import psycopg
    import sqlalchemy as sa

    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", None) or exc
    return isinstance(orig, (psycopg.OperationalError, psycopg.InterfaceError)) and write_conflict(orig) is None


def wait_until_reachable(dsn: str, seconds: float, poll: float = 1.0) -> float | None:
    """Wait up to ``seconds`` for the server behind ``dsn`` to answer; the seconds waited, or None if it did not."""
    import time

    import psycopg

    began = time.monotonic()
    url = sqlalchemy_url(dsn)
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    while True:
        try:
            with psycopg.connect(conninfo, connect_timeout=max(1, min(5, int(seconds) or 1))) as conn:
                conn.execute("SELECT 1")
            return time.monotonic() - began
        except psycopg.Error:
            remaining = began + seconds - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(poll, remaining))


def write_conflict(exc: BaseException) -> str | None:
    """What a write lost to, when it lost a deadlock or a serialization conflict (SQLSTATE 40xxx), else None.

    On TimescaleDB the other party is often the columnstore policy converting the chunk being written.
    """
    import psycopg

    orig = getattr(exc, "orig", exc)
    if isinstance(orig, psycopg.errors.DeadlockDetected):
        return "a deadlock with another transaction (on TimescaleDB often the columnstore job converting that chunk)"
    if isinstance(orig, psycopg.errors.TransactionRollback):
        return f"a conflict with a concurrent transaction ({type(orig).__name__})"
    return None


def retry_on_conflict(write, what: str, attempts: int = 3):  # noqa: ANN001, ANN201 - any callable, its result
    """``write()``, run again (a new transaction each time) when it loses a deadlock or serialization
    conflict, at most ``attempts`` times; other errors, and the last conflict, propagate."""
    import logging
    import time

    import sqlalchemy as sa

    for attempt in range(1, attempts + 1):
        try:
            return write()
        except sa.exc.DBAPIError as exc:
            lost = write_conflict(exc)
            if lost is None or attempt == attempts:
                raise
            logging.getLogger(__name__).warning(
                "%s lost %s and wrote nothing; retrying (%d of %d)", what, lost, attempt, attempts - 1
            )
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")
