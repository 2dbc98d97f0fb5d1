"""Great Expectations Data Docs: every validation stored and rendered into a folder of the project.

The file context lives in ``$MARKETFS_HOME/gx`` (git-ignored); pages are under
``$MARKETFS_HOME/gx/gx/uncommitted/data_docs/local_site``. Dagster check metadata links to the
page of each validation.
"""

from __future__ import annotations

import fcntl
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class DataDocs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._context: Any = None

    @classmethod
    def default(cls) -> DataDocs:
        return cls(Path(os.environ.get("MARKETFS_HOME", ".marketfs")).resolve() / "gx")

    def context(self) -> Any:
        if self._context is not None:
            return self._context
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.root.mkdir(parents=True, exist_ok=True)
        # Creating the context writes its config file once; two runs starting together must not race.
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            context = gx.get_context(mode="file", project_root_dir=str(self.root))
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self._context = context
        return context

    def publish(self, result: Any, suite_name: str, batch_label: str, run_name: str | None) -> str | None:
        """Store ``result`` and build its page; return the page's file:// URL."""
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        context = self.context()
        key = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=suite_name),
            run_id=RunIdentifier(run_name=run_name or "adhoc", run_time=datetime.now(UTC)),
            batch_identifier=batch_label.replace("/", "_"),
        )
        context.validation_results_store.set(key, result)
        # Only this validation's page: the index lists every stored validation and grows without bound,
        # so it is rebuilt on demand (`python -m expectations.docs`, and at the end of `make run`).
        context.build_data_docs(resource_identifiers=[key], build_index=False)
        urls = context.get_docs_sites_urls(resource_identifier=key)
        return urls[0]["site_url"] if urls else None

    def build_index(self) -> str:
        """Rebuild the Data Docs index page; return its file:// URL."""
        urls = self.context().build_data_docs()
        return next(iter(urls.values()))


if __name__ == "__main__":
    print(DataDocs.default().build_index())
