"""With two shards, through the daemon and the UI: a backfill launched as the UI launches it runs each shard's
range in order and the shards side by side, and every asset's Partitions tab shows the day x shard grid.

Starts `dagster dev` (webserver + daemon) with MARKETFS_SHARDS=2 on the test database, launches the
backfill through the same GraphQL mutation as the UI's *Launch backfill*, and checks the UI in headless
Chromium (skipped without it, as in test_ui_browser.py). Screenshots go to test-artifacts/ui-shards/.
"""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import pytest
from dagster_helpers import dagster_dev, dagster_process_env, launch_backfill, run_ranges, wait_for_backfill
from test_ui_browser import CHROMIUM, CHROMIUM_ARGS

from assets.partitions import SESSIONS, day_window
from marketfs.db import engine_for
from marketfs.sources import SyntheticBars
from marketfs.store.bars import replace_bars

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "ui-shards"
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: pip install -e '.[dev]'")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium installed (apt-get install chromium); .ci/run installs it"
)

# More sessions x shards than Dagster's 31 partitions per run: the case where multi-run chunks of a
# self-dependent asset were picked out of order.
DAYS = [d.isoformat() for d in SESSIONS.between(date(2024, 1, 2), date(2024, 2, 28))[:20]]
INSTRUMENTS = tuple(f"SYN{i:03d}" for i in range(8))
FEATURES = "feature_vectors_fs_v1_1m"  # depends on its own previous day (the state chain)


@pytest.fixture
def sharded_ui(dsn: str, tmp_path: Path, request: pytest.FixtureRequest):
    start, end = day_window(DAYS[0])[0], day_window(DAYS[-1])[1]
    with engine_for(dsn).begin() as conn:  # the stored bars the feature backfill reads
        replace_bars(conn, SyntheticBars(instruments=INSTRUMENTS).bars(start, end), start, end)
    env = dagster_process_env(dsn, request.getfixturevalue("empty_dsn"), tmp_path, MARKETFS_SHARDS="2")
    with dagster_dev(env, tmp_path / "dagster-dev.log") as base:
        yield base, tmp_path / "dagster-dev.log"


def test_a_ui_backfill_runs_each_shard_in_order_and_the_shards_at_once(sharded_ui: tuple[str, Path]) -> None:
    base, log = sharded_ui
    keys = [f"{day}|{shard}" for day in DAYS for shard in "01"]
    backfill = launch_backfill(base, [FEATURES], keys)
    status, runs = wait_for_backfill(base, backfill, log, timeout=420)
    assert status == "COMPLETED_SUCCESS" and all(r["status"] == "SUCCESS" for r in runs), (status, runs)

    # One run per shard, each holding the shard's days in order (one range), the two side by side.
    ranges = run_ranges(runs)
    assert ranges == [(f"{DAYS[0]}|{s}", f"{DAYS[-1]}|{s}") for s in "01"], ranges
    assert max(r["startTime"] for r in runs) < min(r["endTime"] for r in runs), runs

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        try:
            for asset, materialized in (("raw_ohlcv", 0), (FEATURES, 2 * len(DAYS))):
                page.goto(f"{base}/assets/{asset}?view=partitions")
                # One column of days and one of shards, each entry with its status; the counts are of shard-days.
                page.get_by_placeholder("Filter by day…").wait_for()
                page.get_by_placeholder("Filter by shard…").wait_for()
                page.get_by_text(f"Materialized ({materialized})").wait_for()
                if page.get_by_role("button", name="Skip").count():  # a fresh instance's newsletter prompt
                    page.get_by_role("button", name="Skip").click()
                page.get_by_text("Failed (0)").wait_for()
                page.screenshot(path=ARTIFACTS / f"{asset}-partitions.png", full_page=True)
        finally:
            page.screenshot(path=ARTIFACTS / "99-last.png")
            browser.close()
