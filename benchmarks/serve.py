"""`marketfs serve` latency and throughput, beside in-process `latest()` on the same store.

    make run                                   # the sample store, once
    .venv/bin/python benchmarks/serve.py [--requests 2000] [--clients 8] [--seconds 10] [--workers 1]

The server runs as `marketfs serve` in its own process on loopback (one uvicorn worker, as shipped);
the clients are http.client connections kept alive, in this process. Latency: one instrument's newest
fs_v1 1m vector, `--requests` sequential requests on one connection after 200 warm-up requests.
Throughput: `--clients` threads, each on its own kept-alive connection, for `--seconds`.
Targets (issue 33): p50 <= 1 ms (bar 2 ms) and p99 <= 5 ms; >= 5,000 requests/s with 8 clients.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marketfs.db import resolve_dsn  # noqa: E402
from marketfs.retrieval import latest  # noqa: E402

PATH = "/v1/latest?instruments={i}&feature_set=fs_v1&timeframe=1m&features=ret_1,rsi_14,vol_20"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def get(conn: http.client.HTTPConnection, path: str) -> None:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"{path}: HTTP {response.status}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--instrument", default="SYN001")
    parser.add_argument("--workers", type=int, default=1, help="marketfs serve --workers")
    args = parser.parse_args()

    dsn = resolve_dsn()
    in_process = []
    latest([args.instrument], ["ret_1", "rsi_14", "vol_20"], output="records", dsn=dsn)
    for _ in range(args.requests):
        began = time.perf_counter()
        rows = latest([args.instrument], ["ret_1", "rsi_14", "vol_20"], output="records", dsn=dsn)
        in_process.append(time.perf_counter() - began)
    if rows[0]["ts"] is None:
        raise SystemExit(f"no vector of {args.instrument} in the store: run `make run` first")

    port = free_port()
    env = {**os.environ, "MARKETFS_DSN": dsn}
    env.pop("MARKETFS_SERVE_TOKEN", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "marketfs.cli", "serve", "--port", str(port), "--workers", str(args.workers)],
        env=env,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                get(conn, "/health")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("marketfs serve did not answer in 60 s") from None
                time.sleep(0.2)
        path = PATH.format(i=args.instrument)
        for _ in range(200):
            get(conn, path)
        latencies = []
        for _ in range(args.requests):
            began = time.perf_counter()
            get(conn, path)
            latencies.append(time.perf_counter() - began)

        counts = [0] * args.clients
        stop = time.monotonic() + args.seconds

        def client(k: int) -> None:
            own = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            while time.monotonic() < stop:
                get(own, path)
                counts[k] += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rate = sum(counts) / (time.perf_counter() - began)
    finally:
        server.terminate()
        server.wait(10)

    ms = [x * 1000 for x in latencies]
    local = [x * 1000 for x in in_process]
    p50, p99 = statistics.median(ms), percentile(ms, 0.99)
    print(f"latest in process (records): p50 {statistics.median(local):.3f} ms, p99 {percentile(local, 0.99):.3f} ms")
    print(f"GET /v1/latest, 1 instrument: p50 {p50:.3f} ms, p99 {p99:.3f} ms ({args.requests} kept-alive requests)")
    workers = f", {args.workers} server workers" if args.workers > 1 else ""
    print(f"GET /v1/latest, {args.clients} clients: {rate:.0f} requests/s over {args.seconds:g} s{workers}")
    print(f"target p50 <= 1 ms (bar 2 ms): {'met' if p50 <= 1 else 'bar met' if p50 <= 2 else 'missed'}")
    print(f"target p99 <= 5 ms: {'met' if p99 <= 5 else 'missed'}")
    print(f"target >= 5000 requests/s with 8 clients: {'met' if rate >= 5000 else 'missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
