"""Feast's feature server beside `marketfs serve`, on the same vectors, measured the same way as serve.py.

    make run                                                 # the sample store, once
    python3 -m venv /tmp/feastenv && /tmp/feastenv/bin/pip install "feast[sqlite]"   # Feast is no dependency
    .venv/bin/python benchmarks/serve_feast.py --feast-venv /tmp/feastenv [--requests 2000]

Exports the store's fs_v1 1m vectors (ret_1, rsi_14, vol_20; event timestamp = known-at, the bar's close)
to Parquet, writes a Feast repository (file offline store, SQLite online store, the project's own choice for
a single machine), `feast apply` and `feast materialize`, then starts `feast serve` and times
POST /get-online-features for one instrument: the same three features `benchmarks/serve.py` asks
`marketfs serve` for, on one kept-alive connection after 200 warm-up requests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve import free_port, percentile  # noqa: E402

FEATURES = ["ret_1", "rsi_14", "vol_20"]
REPO = """
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource
from feast.types import Float64
from feast.value_type import ValueType

instrument = Entity(name="instrument", join_keys=["instrument_id"], value_type=ValueType.STRING)
source = FileSource(path="{parquet}", timestamp_field="event_timestamp")
fs_v1_1m = FeatureView(
    name="fs_v1_1m",
    entities=[instrument],
    ttl=timedelta(days=3650),
    schema=[{fields}],
    source=source,
)
"""
CONFIG = """project: marketfs_bench
registry: data/registry.db
provider: local
online_store:
  type: sqlite
  path: data/online.db
offline_store:
  type: file
entity_key_serialization_version: 3
"""


def export(parquet: Path) -> int:
    import polars as pl
    import sqlalchemy as sa

    from marketfs.db import engine_for, resolve_dsn

    with engine_for(resolve_dsn()).connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT instrument_id, ts + interval '1 minute' AS event_timestamp, {', '.join(FEATURES)} "
                "FROM feature_vectors WHERE feature_set_version = 'fs_v1' AND timeframe = '1m'"
            )
        ).all()
    frame = pl.DataFrame(
        [tuple(r) for r in rows],
        schema={
            "instrument_id": pl.String,
            "event_timestamp": pl.Datetime("us", "UTC"),
            **dict.fromkeys(FEATURES, pl.Float64),
        },
        orient="row",
    )
    frame.write_parquet(parquet)
    return frame.height


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--feast-venv", required=True, help="a virtualenv with feast[sqlite] installed")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--instrument", default="SYN001")
    args = parser.parse_args()
    feast = Path(args.feast_venv) / "bin" / "feast"
    if not feast.exists():
        raise SystemExit(f"no feast in {args.feast_venv}: pip install 'feast[sqlite]' into it first")
    shown = subprocess.run([str(feast), "version"], capture_output=True, text=True).stdout
    version = (re.findall(r"\d+\.\d+\.\d+", shown) or ["?"])[0]
    with tempfile.TemporaryDirectory() as work:
        repo = Path(work)
        (repo / "data").mkdir()
        rows = export(repo / "data" / "vectors.parquet")
        fields = ", ".join(f'Field(name="{f}", dtype=Float64)' for f in FEATURES)
        (repo / "repo.py").write_text(REPO.format(parquet=repo / "data" / "vectors.parquet", fields=fields))
        (repo / "feature_store.yaml").write_text(CONFIG)
        for step in (["apply"], ["materialize", "2000-01-01T00:00:00", "2100-01-01T00:00:00"]):
            done = subprocess.run([str(feast), *step], cwd=repo, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"feast {' '.join(step)} failed:\n{done.stderr[-2000:]}")
        port = free_port()
        server = subprocess.Popen(
            [str(feast), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=repo,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        body = json.dumps(
            {"features": [f"fs_v1_1m:{f}" for f in FEATURES], "entities": {"instrument_id": [args.instrument]}}
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    conn.request("POST", "/get-online-features", body, {"Content-Type": "application/json"})
                    answer = json.loads(conn.getresponse().read())
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("feast serve did not answer") from None
                    time.sleep(0.5)
            values = answer["results"]
            assert len(values) == len(FEATURES) + 1, answer  # the entity column, then one per feature

            def one() -> float:
                t0 = time.perf_counter()
                conn.request("POST", "/get-online-features", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise SystemExit(f"HTTP {response.status}")
                return time.perf_counter() - t0

            for _ in range(200):
                one()
            times = [one() for _ in range(args.requests)]
        finally:
            server.terminate()
            server.wait(20)
    print(f"feast {version}, sqlite online store, {rows} vectors materialised")
    print(
        f"POST /get-online-features, 1 instrument: p50 {1000 * percentile(times, 0.5):.3f} ms, "
        f"p99 {1000 * percentile(times, 0.99):.3f} ms ({args.requests} kept-alive requests)"
    )
    shutil.rmtree(repo, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
