"""`marketfs serve`: a real uvicorn server on loopback, over the real PostgreSQL of the test."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
import sqlalchemy as sa
from dagster_helpers import free_port
from test_retrieval import DAY, T, vectors

from marketfs.feature_sets.fs_v1 import FEATURE_SET as FS_V1
from marketfs.store.feature_vectors import upsert_window

TOKEN = "s3cret-token"


@pytest.fixture
def server(dsn: str, engine: sa.Engine) -> Iterator[int]:
    import uvicorn

    from marketfs.serve import create_app

    with engine.begin() as conn:
        frame = pl.concat([vectors("A", [0, 5, 10], [1.0, 2.0, 3.0]), vectors("B", [7], [7.0])])
        upsert_window(conn, frame, feature_set=FS_V1, timeframe="1m", start=DAY, end=DAY + timedelta(days=1))
    port = free_port()
    config = uvicorn.Config(create_app(dsn, token=TOKEN), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        uv.should_exit = True
        thread.join(10)


def get(port: int, path: str, token: str | None = TOKEN, conn: http.client.HTTPConnection | None = None):
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    response = conn.getresponse()
    body = response.read()
    return response.status, response.getheader("content-type", ""), body


def test_latest_answers_each_instruments_newest_vector_by_name(server: int) -> None:
    status, kind, body = get(server, "/v1/latest?instruments=A,B,C&feature_set=fs_v1&timeframe=1m&features=ret_1")
    assert status == 200 and kind.startswith("application/json"), body
    answer = json.loads(body)
    assert (answer["feature_set"], answer["timeframe"]) == ("fs_v1", "1m")
    by_id = {v["instrument_id"]: v for v in answer["vectors"]}
    assert by_id["A"]["features"] == {"ret_1": 3.0} and by_id["B"]["features"] == {"ret_1": 7.0}
    assert datetime.fromisoformat(by_id["A"]["ts"]) == T + timedelta(minutes=10)
    # Known at the bar's close, a minute after the open it is stamped with.
    assert datetime.fromisoformat(by_id["A"]["known_at"]) == T + timedelta(minutes=11)
    assert by_id["A"]["quality_flags"] == []
    assert by_id["C"]["features"] == {"ret_1": None} and by_id["C"]["ts"] is None  # no vector: nulls
    # Without features=, every feature of the set's timeframe.
    status, _, body = get(server, "/v1/latest?instruments=A")
    assert status == 200 and set(FS_V1.names("1m")) == set(json.loads(body)["vectors"][0]["features"])


def test_requests_that_cannot_be_served_are_json_errors(server: int) -> None:
    status, _, body = get(server, "/v1/latest?instruments=A&features=no_such_feature")
    assert status == 400 and "no_such_feature" in json.loads(body)["error"]
    status, _, body = get(server, "/v1/latest?features=ret_1")
    assert status == 400 and "at least one instrument" in json.loads(body)["error"]
    many = ",".join(f"I{i}" for i in range(1001))
    status, _, body = get(server, f"/v1/latest?instruments={many}")
    assert status == 400 and "at most 1000" in json.loads(body)["error"]
    status, _, body = get(server, "/v1/latest?instruments=A%27%3B%20DROP%20TABLE%20feature_vectors%3B--")
    assert status == 200 and json.loads(body)["vectors"][0]["ts"] is None  # a bound parameter, not SQL


def test_the_token_guards_every_route_but_health(server: int) -> None:
    for token in (None, "wrong"):
        status, _, body = get(server, "/v1/latest?instruments=A", token=token)
        assert status == 401 and "MARKETFS_SERVE_TOKEN" in json.loads(body)["error"]
        assert get(server, "/metrics", token=token)[0] == 401
    status, _, body = get(server, "/health", token=None)
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_metrics_carry_freshness_and_request_latency(server: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)  # kept alive across requests
    for _ in range(3):
        assert get(server, "/v1/latest?instruments=A&features=ret_1", conn=conn)[0] == 200
    status, kind, body = get(server, "/metrics", conn=conn)
    assert status == 200 and kind.startswith("text/plain")
    text = body.decode()
    newest = T + timedelta(minutes=11)  # A's vector at +10 is known at its close
    lines = text.splitlines()
    line = next(
        x for x in lines if x.startswith('marketfs_newest_known_at_seconds{feature_set="fs_v1",timeframe="1m"}')
    )
    assert float(line.split()[-1]) == pytest.approx(newest.timestamp())
    lag = next(x for x in lines if x.startswith('marketfs_freshness_seconds{feature_set="fs_v1",timeframe="1m"}'))
    assert float(lag.split()[-1]) == pytest.approx((datetime.now(UTC) - newest).total_seconds(), abs=60)
    assert 'marketfs_request_seconds_count{route="/v1/latest",status="200"} 3.0' in text


def test_the_command_serves_with_several_workers(dsn: str, engine: sa.Engine, tmp_path) -> None:
    """`marketfs serve --workers 2`: two processes on one port, each with its own connection; SIGTERM ends both."""
    import os
    import signal
    import subprocess
    import sys

    with engine.begin() as conn:
        upsert_window(
            conn, vectors("A", [0], [4.0]), feature_set=FS_V1, timeframe="1m", start=DAY, end=DAY + timedelta(days=1)
        )
    port = free_port()
    env = {**os.environ, "MARKETFS_DSN": dsn, "MARKETFS_HOME": str(tmp_path)}
    env.pop("MARKETFS_SERVE_TOKEN", None)
    command = [sys.executable, "-m", "marketfs.cli", "serve", "--port", str(port), "--workers", "2"]
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "marketfs serve ended by itself"
            try:
                if get(port, "/health", token=None)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "marketfs serve did not answer in 60 s"
            time.sleep(0.2)
        for _ in range(20):  # fresh connections: both workers take some of them
            status, _, body = get(port, "/v1/latest?instruments=A&features=ret_1", token=None)
            assert status == 200 and json.loads(body)["vectors"][0]["features"] == {"ret_1": 4.0}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
