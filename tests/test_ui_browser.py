"""The Dagster UI in a real browser: lineage, a partition materialised from the UI, a breaching partition's check.

Drives headless Chromium (Debian's package, /usr/bin/chromium) with Playwright against `dagster dev`
started by the test on the test database. Screenshots are kept in test-artifacts/ui/.
`.ci/run` installs Chromium; where it is absent the test skips and says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from dagster_helpers import dagster_dev, dagster_process_env

from marketfs.sources import SyntheticBars, SyntheticEvents

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: pip install -e '.[dev]'")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium installed (apt-get install chromium); .ci/run installs it"
)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def landing_days(root: Path) -> None:
    for kind in ("bars", "events"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    days = [(datetime(2024, 1, d, tzinfo=UTC), d == 4) for d in (3, 4, 5)]
    for day, bad in days:
        end = day + timedelta(days=1)
        bars = SyntheticBars(instruments=("AAA", "BBB")).bars(day, end)
        if bad:  # one bar whose low is above its high: the raw suite blocks the day
            bars = bars.with_columns(
                pl.when(pl.int_range(pl.len()) == 5).then(pl.col("high") * 2).otherwise(pl.col("low")).alias("low")
            )
        bars.write_parquet(root / "bars" / f"{day:%Y-%m-%d}.parquet")
        SyntheticEvents(instruments=("AAA", "BBB")).events(day, end).write_parquet(
            root / "events" / f"{day:%Y-%m-%d}.parquet"
        )


@pytest.fixture
def dagster_ui(dsn: str, tmp_path: Path, request: pytest.FixtureRequest):
    landing_days(tmp_path / "landing")
    env = dagster_process_env(
        dsn,
        request.getfixturevalue("empty_dsn"),
        tmp_path,
        MARKETFS_SOURCE="landing",
        MARKETFS_LANDING_DIR=str(tmp_path / "landing"),
    )
    with dagster_dev(env, tmp_path / "dagster-dev.log") as base:
        yield base, env


def launch_partition(page, base: str, asset: str, partition: str) -> str:
    """Materialise one partition through the asset's Materialize dialog; return the launched run's short id."""
    page.goto(f"{base}/assets/{asset}")
    page.get_by_role("button", name="Materialize…").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Show all partitions").click()
    box = dialog.locator("input").first
    box.click()
    box.fill(partition)
    box.press("Enter")
    dialog.get_by_role("button", name="Launch 1 run").click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    toast.wait_for()
    return re.search(r"[0-9a-f]{8}", toast.inner_text()).group(0)


def wait_for_run(page, base: str, run_id: str, status: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    page.goto(f"{base}/runs")
    while time.monotonic() < deadline:
        # The list renders "Loading runs…" first: read it only once it has loaded.
        page.get_by_text("Loading runs…").wait_for(state="hidden")
        body = page.inner_text("body")
        at = body.find(run_id)
        # The run's row: its id, tags, target and launcher come before its status.
        if at >= 0 and status in body[at : at + 400]:
            return
        page.wait_for_timeout(2500)
        page.reload()
    raise AssertionError(f"run {run_id} did not reach {status}: {page.inner_text('body')[:1500]}")


def test_lineage_materialise_and_failed_check_in_a_browser(dagster_ui: tuple[str, dict]) -> None:
    base, env = dagster_ui
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)
        try:
            page.goto(f"{base}/assets/feature_snapshots?view=lineage&lineageScope=upstream&lineageDepth=5")
            page.wait_for_timeout(3000)
            if page.get_by_role("button", name="Skip").count():  # the newsletter prompt of a fresh instance
                page.get_by_role("button", name="Skip").click()
            page.screenshot(path=ARTIFACTS / "01-lineage.png")
            # One group per feature set; the UI shortens the long feature asset names inside their boxes.
            for label in ("raw_ohlcv", "raw_events", "bars_1d", "features_fs_v1", "features_fs_v2"):
                assert page.get_by_text(label, exact=True).first.is_visible(), label

            run_id = launch_partition(page, base, "raw_ohlcv", "2024-01-03")
            wait_for_run(page, base, run_id, "Success")
            page.screenshot(path=ARTIFACTS / "02-partition-succeeded.png")

            # A three-day range in one run, as a backfill runs it: 2024-01-04 breaches, its neighbours do not.
            ranged = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipelines",
                    "run",
                    "--start",
                    "2024-01-03",
                    "--end",
                    "2024-01-05",
                    "--no-snapshot",
                ],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert ranged.returncode == 1, ranged.stdout[-2000:] + ranged.stderr[-2000:]

            page.goto(f"{base}/assets/raw_ohlcv?view=checks")
            page.wait_for_timeout(3000)
            page.get_by_text("quality_gate").first.click()
            page.wait_for_timeout(2000)
            page.get_by_text("Execution history", exact=True).click()
            page.wait_for_timeout(3000)
            # One result per partition: the failed day among passing ones, each named by its partition.
            rows = page.get_by_role("row").all_inner_texts()
            by_day = {day: [r for r in rows if day in r] for day in ("2024-01-03", "2024-01-04", "2024-01-05")}
            assert all(by_day.values()), rows
            assert any("Failed" in r for r in by_day["2024-01-04"]), rows
            assert all("Passed" in r for day in ("2024-01-03", "2024-01-05") for r in by_day[day]), rows
            page.screenshot(path=ARTIFACTS / "03-check-history-per-partition.png", full_page=True)
            page.get_by_text("Partitions", exact=True).last.click()
            page.wait_for_timeout(3000)
            body = page.inner_text("body")
            assert re.search(r"Failed\s*\(1\)", body) and re.search(r"Passed\s*\(2\)", body), body[:3000]
            page.get_by_placeholder("Filter by partition").fill("2024-01-04")
            page.wait_for_timeout(1000)
            page.locator("text='2024-01-04' >> visible=true").first.click()
            page.wait_for_timeout(3000)
            page.screenshot(path=ARTIFACTS / "04-check-partitions.png", full_page=True)
            body = page.inner_text("body")
            assert "FAILED expect_column_pair_values_a_to_be_greater_than_b(high,low)" in body, body[:3000]
            assert "quarantine_batch" in body and "data_docs" in body
            page.screenshot(path=ARTIFACTS / "05-failed-day.png", full_page=True)
        finally:
            page.screenshot(path=ARTIFACTS / "99-last.png")
            browser.close()
