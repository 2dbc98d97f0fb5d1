"""Shared pieces of the benchmark scripts: a throwaway database, timing and peak memory."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The project's embedded server, wherever the script is started from.
os.environ.setdefault("MARKETFS_HOME", str(ROOT / ".marketfs"))

from marketfs.db import resolve_dsn  # noqa: E402
from marketfs.store.migrations import migrate  # noqa: E402


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    """A fresh, migrated database on the configured server (embedded unless MARKETFS_DSN is set), dropped after."""
    server = resolve_dsn()
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sa.make_url(server).set(database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        migrate(dsn)
        yield dsn
    finally:
        from marketfs.db import engine_for

        engine_for(dsn).dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pipeline_env(dsn: str, instance_dsn: str, home: str, instruments: int, **extra: str) -> dict[str, str]:
    """Environment of a ``python -m pipelines`` process on ``dsn``, with its own Dagster instance and home."""
    return {
        **os.environ,
        "MARKETFS_DSN": dsn,
        "DAGSTER_HOME": home,
        "MARKETFS_HOME": home,
        "MARKETFS_SYNTHETIC_INSTRUMENTS": str(instruments),
        "PYTHONWARNINGS": "ignore",
        "MARKETFS_DAGSTER_PG_URL": sa.make_url(instance_dsn)
        .set(drivername="postgresql+psycopg2")
        .render_as_string(hide_password=False),
        **extra,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child started by a
    big parent would report the parent's peak.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def timed() -> Iterator[dict]:
    out: dict = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


def machine() -> str:
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_doc_section(header: str, text: str) -> None:
    """Put ``text`` under ``header`` in docs/benchmarks.md: replace that section, or append it."""
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text()
    section = f"{header}\n\n{text}\n"
    if header in doc:
        before, _, rest = doc.partition(header)
        after = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        doc = before + section + ("\n" + after if after else "")
    else:
        doc = doc.rstrip() + "\n\n" + section
    path.write_text(doc)
