"""What the command line says about a run: one block per failure, warnings, and the gate tally.

A failing step's message is written once, by the asset that raised it (it names the file and line,
or the day, instrument and ts, and the fix); Dagster's own console logging would repeat it twice
inside its stack traces, so the CLI turns that logging down and reads the run's events instead.
The instance keeps every event either way: the UI shows the whole run.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sqlalchemy as sa

from marketfs.db import DSN_ENV, unreachable_message

if TYPE_CHECKING:
    import dagster as dg

DAGSTER_PG_ENV = "MARKETFS_DAGSTER_PG_URL"
VERBOSE_HINT = "(--verbose shows the traceback)"


@dataclass
class Tally:
    """Gate results over the runs of one command: one check evaluation per asset, check and day."""

    passed: int = 0
    blocking: int = 0  # failed checks of severity ERROR: the day was held back
    warnings: int = 0  # failed checks of severity WARN: the day was written, flagged
    expectation_failures: int = 0  # failed checks with failed expectations (not a file that could not be read)
    failures: list[str] = field(default_factory=list)  # one block of text per failure, in order

    def add_checks(self, result: dg.ExecuteInProcessResult) -> None:
        import dagster as dg

        for evaluation in result.get_asset_check_evaluations():
            if evaluation.passed:
                self.passed += 1
            elif evaluation.severity == dg.AssetCheckSeverity.WARN:
                self.warnings += 1
            else:
                self.blocking += 1
            failed = evaluation.metadata.get("failed_expectations")
            if not evaluation.passed and failed is not None and failed.value:
                self.expectation_failures += 1

    def line(self) -> str:
        blocking = f"{self.blocking} blocking failure{'' if self.blocking == 1 else 's'}"
        warnings = f"{self.warnings} warning{'' if self.warnings == 1 else 's'}"
        return f"gate checks    {self.passed} passed, {blocking}, {warnings} (one check a day per asset)"


def console_log_level(verbose: bool) -> str:
    """Dagster's console logger for runs of the CLI: errors are reported by the CLI itself, once."""
    return os.environ.get("MARKETFS_LOG_LEVEL") or ("WARNING" if verbose else "CRITICAL")


def _error_chain(error) -> list:
    chain = []
    while error is not None:
        chain.append(error)
        error = error.cause or error.context
    return chain


def failure_blocks(result: dg.ExecuteInProcessResult, verbose: bool) -> list[str]:
    """One block per failed step or resource of ``result``: the asset's own message, once."""
    blocks: list[str] = []
    said: set[str] = set()
    for event in result.all_events:
        if event.event_type_value not in ("STEP_FAILURE", "RESOURCE_INIT_FAILURE"):
            continue
        data = event.event_specific_data
        user = getattr(data, "user_failure_data", None)
        chain = _error_chain(getattr(data, "error", None))
        if user is not None and user.description:
            text = user.description.strip()
        else:
            # A dg.Failure raised deeper (a resource's) is the message; else the first error, in one line.
            ours = next((e for e in chain if e.cls_name == "Failure"), None)
            first = ours or (chain[0] if chain else None)
            message = (first.message if first else event.message or "").strip()
            text = message.split(": ", 1)[1] if ours and ": " in message else message
            if ours is None:
                text = f"{text.splitlines()[0] if text else 'failed'} {VERBOSE_HINT}"
        if text in said:
            continue  # a resource's failure is also every step's failure
        said.add(text)
        where = event.step_key or "run"
        block = f"FAILED {where}: {text}"
        if verbose and chain:
            block += "\n" + "".join(e.to_string() for e in chain[:1])
        blocks.append(block)
    return blocks


def logged_warnings(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The warnings assets logged during the run (e.g. a landing file skipped, a report not rendered), and
    the errors (a breach that held instruments, which a later step of the run fails for)."""
    import logging

    labels = {logging.WARNING: "warning", logging.ERROR: "error"}
    return [
        f"{labels[entry.level]}: {entry.user_message}"
        for entry in instance.all_logs(run_id)
        if entry.level in labels and not entry.is_dagster_event
    ]


def _driver_error(exc: BaseException) -> tuple[BaseException | None, bool]:
    """The connection error behind ``exc``, if any, and whether it came from Dagster's storage (psycopg2)."""
    import psycopg

    seen: set[int] = set()
    found: BaseException | None = None
    dagster_storage = False
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        module = type(error).__module__
        if module.startswith("psycopg2") or type(error).__name__ == "DagsterPostgresException":
            dagster_storage = True
        if isinstance(error, sa.exc.OperationalError | psycopg.OperationalError) or (
            module.startswith("psycopg2") and type(error).__name__ == "OperationalError"
        ):
            found = error
        error = error.__cause__ or error.__context__
    return found, dagster_storage


def database_gone(exc: BaseException) -> str | None:
    """The project's one-line message when ``exc`` is a lost or unreachable database, else None."""
    driver, dagster_storage = _driver_error(exc)
    if driver is None:
        return None
    if dagster_storage and os.environ.get(DAGSTER_PG_ENV):
        return unreachable_message(
            os.environ[DAGSTER_PG_ENV], driver, what="Dagster instance database", variable=DAGSTER_PG_ENV
        )
    return unreachable_message(os.environ.get(DSN_ENV, ""), driver)


def is_database_message(text: str) -> bool:
    return "cannot reach the " in text and "database" in text


class _FilteredStderr:
    """sys.stderr without dagster's per-event "Exception while writing logger call to event log" lines."""

    DROP = "Exception while writing logger call to event log"

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return len(text) if text.startswith(self.DROP) else self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def quiet_storage_errors(verbose: bool) -> Iterator[None]:
    """While a run executes: a lost storage database is reported once, by the CLI, not per event by dagster."""
    if verbose:
        yield
        return
    previous = sys.stderr
    sys.stderr = _FilteredStderr(previous)
    try:
        yield
    finally:
        sys.stderr = previous
