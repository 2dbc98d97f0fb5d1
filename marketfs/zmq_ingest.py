"""``marketfs ingest zmq``: a live bar and event feed in, from a ZeroMQ PUB socket, served as minutes close.

    marketfs ingest zmq --connect tcp://127.0.0.1:5556 [--metrics-port 9101]

Messages: each one's last frame is JSON (earlier frames, such as a PUB topic, are ignored): one object
or a list of objects, each a bar or an event, told apart by ``kind``:

    {"kind": "bar", "instrument_id": "AAPL", "ts": "2024-01-03T14:30:00Z",
     "open": 187.1, "high": 187.4, "low": 186.9, "close": 187.2, "volume": 1200}
    {"kind": "event", "event_id": "n-1", "instrument_id": "AAPL", "published_at": "2024-01-03T14:30:12Z",
     "sentiment": 0.4, "confidence": 0.8, "source": "wire"}

A bar is stamped at its minute's open (as everywhere in the store); timestamps are ISO 8601 with an offset.
Bars are held until their minute has closed, then pushed with every other closed bar of the batch through
``push_bars`` (events through ``push_events`` at once): what a push does, this does: a bar delivered twice
is one bar, a late or out-of-order bar recomputes from its minute, a bar that cannot be stored is refused
and logged with the message that carried it (the others go on). ``marketfs_ingest_lag_seconds`` (now minus
the close of the newest bar pushed) and the message counters are exported for Prometheus on
``--metrics-port``. SIGTERM or SIGINT: the closed minutes held are pushed, then it exits.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import polars as pl

from marketfs.features.events import EVENT_SCHEMA
from marketfs.sources.base import BAR_SCHEMA

logger = logging.getLogger(__name__)
MINUTE = timedelta(minutes=1)


def _ts(value: object) -> datetime:
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no offset; write it with one, e.g. 2024-01-03T14:30:00Z")
    return parsed.astimezone(UTC)


def parse_message(frames: list[bytes]) -> tuple[list[dict], list[dict], list[str]]:
    """(bars, events, problems) of one message; a problem names the object and what is wrong with it."""
    bars: list[dict] = []
    events: list[dict] = []
    problems: list[str] = []
    try:
        payload = json.loads(frames[-1])
    except (ValueError, IndexError) as exc:
        return bars, events, [f"a message that is not JSON ({exc}): {frames[-1][:200]!r}"]
    for item in payload if isinstance(payload, list) else [payload]:
        try:
            kind = item.get("kind") if isinstance(item, dict) else None
            if kind == "bar":
                bars.append({c: _ts(item["ts"]) if c == "ts" else item[c] for c in BAR_SCHEMA})
            elif kind == "event":
                events.append({c: _ts(item[c]) if c == "published_at" else item[c] for c in EVENT_SCHEMA})
            else:
                problems.append(f"kind must be 'bar' or 'event': {json.dumps(item)[:200]}")
        except (KeyError, ValueError, TypeError) as exc:
            problems.append(f"{exc.__class__.__name__} {exc}: {json.dumps(item)[:200]}")
    return bars, events, problems


@dataclass
class Batcher:
    """Bars held until their minute closes; what to push at ``now``."""

    held: list[dict] = field(default_factory=list)

    def add(self, bars: list[dict]) -> None:
        self.held.extend(bars)

    def closed(self, now: datetime) -> pl.DataFrame | None:
        ready = [b for b in self.held if b["ts"] + MINUTE <= now]
        if not ready:
            return None
        self.held = [b for b in self.held if b["ts"] + MINUTE > now]
        return pl.DataFrame(ready, schema=BAR_SCHEMA, orient="row")


def run(
    connect: str,
    *,
    dsn: str | None = None,
    metrics_port: int | None = None,
    stop: threading.Event | None = None,
    landing_dir: str | None = None,
    poll_ms: int = 200,
) -> int:
    """Subscribe to ``connect`` and push what arrives until ``stop`` is set (or SIGTERM/SIGINT)."""
    import zmq
    from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

    from marketfs.ingest import IntradayBreach, PushError, push_bars, push_events

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    registry = CollectorRegistry()
    lag = Gauge("marketfs_ingest_lag_seconds", "Now minus the close of the newest bar pushed", registry=registry)
    messages = Counter("marketfs_ingest_messages", "Messages received, by outcome", ["outcome"], registry=registry)
    pushed = Counter("marketfs_ingest_rows", "Rows pushed, by kind", ["kind"], registry=registry)
    if metrics_port is not None:
        start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(connect)
    batcher = Batcher()
    newest_close: datetime | None = None

    def push(frame: pl.DataFrame | None, now: datetime) -> None:
        nonlocal newest_close
        if frame is None:
            return
        try:
            push_bars(frame, now=now, dsn=dsn, landing_dir=landing_dir)
        except IntradayBreach as exc:  # stored and stepped; the gate held some minutes (quarantined)
            logger.warning("a step's gate failed: %s", exc)
        except PushError as exc:
            messages.labels("refused").inc()
            logger.error("bars refused, nothing of them stored: %s", exc)
            return
        pushed.labels("bar").inc(frame.height)
        close = frame["ts"].max() + MINUTE
        newest_close = close if newest_close is None else max(newest_close, close)

    logger.info("subscribed to %s", connect)
    try:
        while not stop.is_set():
            if socket.poll(poll_ms):
                bars, events, problems = parse_message(socket.recv_multipart())
                for problem in problems:
                    messages.labels("bad").inc()
                    logger.error("message object skipped: %s", problem)
                messages.labels("received").inc()
                batcher.add(bars)
                if events:
                    try:
                        push_events(
                            pl.DataFrame(events, schema=EVENT_SCHEMA, orient="row"), dsn=dsn, landing_dir=landing_dir
                        )
                        pushed.labels("event").inc(len(events))
                    except (PushError, IntradayBreach) as exc:
                        logger.error("events: %s", exc)
            now = datetime.now(UTC)
            push(batcher.closed(now), now)
            if newest_close is not None:
                lag.set((now - newest_close).total_seconds())
    finally:
        now = datetime.now(UTC)
        push(batcher.closed(now), now)
        socket.close(linger=0)
        context.term()
    return 0
