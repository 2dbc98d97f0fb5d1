"""Reading and driving a TimescaleDB test database: what the TimescaleDB tests share."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa


def scalar(engine: sa.Engine, query: str, **params: object) -> object:
    with engine.connect() as conn:
        return conn.execute(sa.text(query), params).scalar()


def convert_all(engine: sa.Engine, *tables: str, older_than: datetime | None = None) -> None:
    """Every chunk of ``tables`` (ending before ``older_than`` when given) into the columnstore, as the policy
    would once they are old enough."""
    with engine.connect() as conn:
        for table in tables:
            chunks = conn.execute(
                sa.text("SELECT show_chunks(CAST(:t AS regclass), older_than => CAST(:o AS timestamptz))::text"),
                {"t": table, "o": older_than},
            )
            for chunk in chunks.all():
                conn.execute(sa.text("CALL convert_to_columnstore(CAST(:c AS regclass))"), {"c": chunk[0]})
                conn.commit()


def run_jobs(engine: sa.Engine, *procs: str) -> None:
    """Run this database's jobs of the kinds ``procs`` now, in that order, as the scheduler would."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for proc in procs:
            for job in conn.execute(
                sa.text("SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = :p ORDER BY job_id"),
                {"p": proc},
            ).scalars():
                conn.execute(sa.text("CALL run_job(:j)"), {"j": job})
