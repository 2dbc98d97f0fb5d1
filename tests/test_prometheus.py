"""A real Prometheus (Debian's package, started here on loopback) scrapes `marketfs serve` and answers a query.

Skips, saying why, where no `prometheus` binary is installed (`.ci/run` installs Debian's package; its
service is never started: the test runs the binary itself, with its own configuration and storage).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa
from dagster_helpers import free_port
from process_helpers import stop_process_group
from test_serve import TOKEN, server  # noqa: F401  (fixture: a real uvicorn server on the test database)

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary: apt-get install prometheus (.ci/run does) to run this test"
)


def _query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_a_real_prometheus_scrapes_the_server_and_answers_for_the_freshness_metric(
    server: int,  # noqa: F811  (the fixture imported above)
    engine: sa.Engine,
    tmp_path: Path,
) -> None:
    port = free_port()
    (tmp_path / "token").write_text(TOKEN)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: marketfs\n"
        "    authorization:\n"
        f"      credentials_file: {tmp_path / 'token'}\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server}']\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        found: list[dict] = []
        while not found:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, (
                "Prometheus answered no freshness sample within 60 s: "
                + (tmp_path / "prometheus.log").read_text()[-2000:]
            )
            time.sleep(0.5)
            try:
                found = _query(port, 'marketfs_freshness_seconds{feature_set="fs_v1",timeframe="1m"}')
            except OSError:
                continue  # not listening yet
        [sample] = found
        assert sample["metric"]["job"] == "marketfs" and sample["metric"]["instance"] == f"127.0.0.1:{server}"
        # The store's newest fs_v1 1m vector (the fixture's) became known long ago: a lag of days, in seconds.
        with engine.connect() as conn:
            newest = conn.execute(
                sa.text("SELECT max(ts) FROM feature_vectors WHERE feature_set_version = 'fs_v1' AND timeframe = '1m'")
            ).scalar()
        lag = float(sample["value"][1])
        assert lag == pytest.approx(time.time() - newest.timestamp() - 60, abs=120)
        # The scrape itself succeeded (the bearer token was accepted).
        [up] = _query(port, 'up{job="marketfs"}')
        assert up["value"][1] == "1"
    finally:
        stop_process_group(process, timeout=10)
        log.close()
