"""Process environment for Dagster commands: feature store DSN, instance storage DSN, DAGSTER_HOME."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import sqlalchemy as sa

from marketfs.db import DSN_ENV
from marketfs.embedded_pg import EmbeddedPostgres, default_home

DAGSTER_PG_ENV = "MARKETFS_DAGSTER_PG_URL"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_environment() -> None:
    """The documented defaults of the variables the resources read through dg.EnvVar, where unset."""
    from assets.resources import MARKET_DATA_ENV

    for variable, default in MARKET_DATA_ENV.values():
        os.environ.setdefault(variable, default)


class DatabaseUnreachable(RuntimeError):
    """A database a command needs did not answer when the command started; the message says which and what to do."""


def check_servers(dsn: str, instance_dsn: str) -> None:
    """One connection attempt to each database a command uses, before it starts anything.

    A run rides out a server lost mid-run for ``$MARKETFS_DB_OUTAGE_SECONDS`` (assets/resources.py); a
    server already down when a person starts a command is said at once instead.
    """
    import psycopg

    from marketfs.db import unreachable_message

    for url, what, variable in (
        (dsn, "feature store database", DSN_ENV),
        (instance_dsn, "Dagster instance database", DAGSTER_PG_ENV),
    ):
        conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            psycopg.connect(conninfo, connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            raise DatabaseUnreachable(unreachable_message(url, exc, what=what, variable=variable)) from exc


def prepare_environment(check: bool = False) -> dict[str, str]:
    """Set (and return) the variables a Dagster process of this project needs; start the embedded server if used.

    ``check``: connect once to each database first (``check_servers``).
    """
    default_environment()
    if os.environ.get(DSN_ENV):
        dsn = os.environ[DSN_ENV]
        instance_dsn = os.environ.get(DAGSTER_PG_ENV) or dsn
    else:
        server = EmbeddedPostgres(default_home())
        dsn = server.ensure_running()
        # Same embedded server, its `dagster` database: no second probe of the server.
        instance_dsn = os.environ.get(DAGSTER_PG_ENV) or sa.make_url(dsn).set(database="dagster").render_as_string(
            hide_password=False
        )
    os.environ[DSN_ENV] = dsn
    # dagster-postgres ships psycopg2; SQLAlchemy 2.1 would otherwise pick psycopg 3 for postgresql://.
    os.environ[DAGSTER_PG_ENV] = (
        sa.make_url(instance_dsn).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    )
    home = Path(os.environ.get("DAGSTER_HOME") or default_home() / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    template = PROJECT_ROOT / "dagster.yaml"
    target = home / "dagster.yaml"
    if template.exists() and (not target.exists() or target.read_text() != template.read_text()):
        shutil.copyfile(template, target)
    os.environ["DAGSTER_HOME"] = str(home)
    if check:
        check_servers(dsn, instance_dsn)
    return {k: os.environ[k] for k in (DSN_ENV, DAGSTER_PG_ENV, "DAGSTER_HOME")}
