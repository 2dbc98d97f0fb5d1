"""The Grafana dashboard in deploy/ queries only metrics the server and the feed ingester export."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _exported() -> set[str]:
    """Metric names declared in the code (prometheus-client: a histogram or counter adds its suffixes)."""
    names: set[str] = set()
    for module in ("marketfs/serve.py", "marketfs/zmq_ingest.py"):
        text = (ROOT / module).read_text()
        for kind, name in re.findall(r'(Gauge|Histogram|Counter)\(\s*"([a-z_]+)"', text):
            suffixes = {"Gauge": [""], "Histogram": ["_bucket", "_count", "_sum"], "Counter": ["_total"]}[kind]
            names |= {name + s for s in suffixes}
    return names


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "marketfs.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bmarketfs_[a-z_]+", target["expr"])
    }
    assert queried and queried <= _exported(), queried - _exported()
    assert {"marketfs_freshness_seconds", "marketfs_ingest_lag_seconds"} <= queried
