"""`marketfs ingest zmq`: a real pyzmq publisher feeds the real command, whose minutes are served through latest()."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from dagster_helpers import free_port

from marketfs.retrieval import latest
from marketfs.sources import SyntheticBars
from marketfs.zmq_ingest import Batcher, parse_message

OPEN = datetime(2024, 1, 3, 14, 30, tzinfo=UTC)
MINUTES = 8


def _messages(bars: pl.DataFrame) -> list[bytes]:
    """One message per minute: every instrument's bar of it, as a list."""
    out = []
    for (_,), rows in bars.sort("ts").group_by("ts", maintain_order=True):
        items = [
            {"kind": "bar", **{k: (v.isoformat() if k == "ts" else v) for k, v in row.items()}}
            for row in rows.iter_rows(named=True)
        ]
        out.append(json.dumps(items).encode())
    return out


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values) if values else 0.0


def _yesterday(engine: sa.Engine) -> None:
    """The day before stored with its features, as a daily run leaves it: today's steps continue its state."""
    from marketfs.features.registry import FEATURE_SETS
    from marketfs.intraday import intraday_timeframes
    from marketfs.shards import ALL
    from marketfs.store.bars import replace_bars
    from marketfs.store.feature_vectors import compute_stored, write_features
    from marketfs.universe import active_sessions

    start, end = active_sessions().trading_day_window("2024-01-02")
    with engine.begin() as conn:
        replace_bars(conn, SyntheticBars(instruments=("AAA", "BBB")).bars(start, end), start, end)
        for fs in FEATURE_SETS.values():
            for tf in intraday_timeframes(fs):
                computed = compute_stored(conn, fs, tf, start, end, ALL)
                write_features(conn, computed, feature_set=fs, timeframe=tf, start=start, end=end)


def test_a_publisher_feeds_the_command_and_its_minutes_are_served(dsn: str, engine: sa.Engine, tmp_path: Path) -> None:
    import zmq

    _yesterday(engine)
    bars = SyntheticBars(instruments=("AAA", "BBB")).bars(OPEN, OPEN + timedelta(minutes=MINUTES))
    messages = _messages(bars)
    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    metrics = free_port()
    command = [
        str(Path(sys.executable).with_name("marketfs")),
        "ingest",
        "zmq",
        "--connect",
        f"tcp://127.0.0.1:{port}",
        "--metrics-port",
        str(metrics),
    ]
    log = (tmp_path / "ingest.log").open("w")
    process = subprocess.Popen(
        command, env={**os.environ, "MARKETFS_DSN": dsn}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        # A subscriber misses what is published before it connects (ZeroMQ's slow joiner): send the first
        # minute until the command says it received a message (a bar delivered twice is one bar).
        deadline = time.monotonic() + 60
        while not _metric(metrics, 'marketfs_ingest_messages_total{outcome="received"}'):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "ingest.log").read_text()
            publisher.send_multipart([b"bars", messages[0]])
            time.sleep(0.2)
        # A bad object is skipped; sent before the last minute, which one subscriber receives after it (one
        # publisher's messages arrive in order), so it is counted by the time that minute is served.
        publisher.send(json.dumps({"kind": "bar", "instrument_id": "AAA"}).encode())
        # Out of order and once more: minute 5 before minute 4, minute 2 twice.
        order = [1, 2, 2, 3, 5, 4, *range(6, len(messages))]
        for i in order:
            publisher.send_multipart([b"bars", messages[i]])
        last = bars["ts"].max()
        while True:
            served = latest(["AAA", "BBB"], ["ret_1"], dsn=dsn)
            if served["ts"].to_list() == [last, last]:
                break
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "ingest.log").read_text()
            time.sleep(0.3)
        closes = bars.filter(pl.col("instrument_id") == "AAA").sort("ts")["close"]
        assert served["ret_1"][0] == pytest.approx(closes[-1] / closes[-2] - 1, rel=1e-12)
        assert _metric(metrics, "marketfs_ingest_rows_total") >= bars.height
        assert _metric(metrics, "marketfs_ingest_lag_seconds") > 0  # 2024's bars: years behind the clock
        assert _metric(metrics, 'marketfs_ingest_messages_total{outcome="bad"}') == 1
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(20) == 0, (tmp_path / "ingest.log").read_text()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            log.close()
            publisher.close(linger=0)
            context.term()
    assert "KeyError" in (tmp_path / "ingest.log").read_text()  # the bad object, named in the log


def test_messages_are_parsed_and_bars_held_until_their_minute_closes() -> None:
    bar = {"kind": "bar", "instrument_id": "A", "ts": "2024-01-03T14:30:00Z", "open": 1, "high": 1, "low": 1}
    bars, events, problems = parse_message([b"topic", json.dumps([{**bar, "close": 1, "volume": 5}, bar]).encode()])
    assert len(bars) == 1 and not events and len(problems) == 1 and "close" in problems[0]
    assert parse_message([b"not json"])[2][0].startswith("a message that is not JSON")
    naive = {**bar, "ts": "2024-01-03T14:30:00", "close": 1, "volume": 1}
    assert "no offset" in parse_message([json.dumps(naive).encode()])[2][0]
    batcher = Batcher()
    batcher.add(bars)
    assert batcher.closed(OPEN + timedelta(seconds=59)) is None
    assert batcher.closed(OPEN + timedelta(minutes=1)).height == 1 and not batcher.held
