"""``marketfs serve``: the newest vectors over HTTP for processes that cannot call ``latest()``, and metrics.

    GET /health                       200 {"status": "ok"} when the store answers, else 503 with the reason
    GET /v1/latest?instruments=A,B[&feature_set=fs_v1][&timeframe=1m][&features=ret_1,rsi_14]
                                      each instrument's newest vector: ts (the bar's open), known_at (its
                                      close, when the value became known), quality_flags and the features
    GET /metrics                      Prometheus text: request latency per route, freshness per data set

Starlette on uvicorn, the ASGI stack dagster-webserver already installs (no new server dependency);
prometheus-client for the metrics. Reads go through ``retrieval.OnlineReader`` (one prepared
connection, the same queries as ``latest()``), called in a worker thread so a slow read does not
stall the event loop. Input is never SQL text: instruments and feature names are bound parameters or
checked against the declared feature sets. With ``MARKETFS_SERVE_TOKEN`` set, every route but
``/health`` wants ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

from marketfs.features.registry import DEFAULT_FEATURE_SET, datasets
from marketfs.retrieval import OnlineReader, RetrievalError, _lag

TOKEN_ENV = "MARKETFS_SERVE_TOKEN"
MAX_INSTRUMENTS = 1000  # one request's instruments: a bounded query and a bounded answer
FRESHNESS_TTL_SECONDS = 15.0  # /metrics reads the store at most this often, whoever scrapes

# The newest ts of one data set without reading its rows: one index probe per instrument (a loose index
# scan over feature_vectors' (feature_set_version, timeframe, instrument_id, ts DESC) index).
_NEWEST_TS = """
WITH RECURSIVE inst AS (
    (SELECT instrument_id FROM feature_vectors
     WHERE feature_set_version = %(v)s AND timeframe = %(tf)s ORDER BY instrument_id LIMIT 1)
    UNION ALL
    SELECT (SELECT f.instrument_id FROM feature_vectors f
            WHERE f.feature_set_version = %(v)s AND f.timeframe = %(tf)s AND f.instrument_id > inst.instrument_id
            ORDER BY f.instrument_id LIMIT 1)
    FROM inst WHERE inst.instrument_id IS NOT NULL
)
SELECT max((SELECT f.ts FROM feature_vectors f
            WHERE f.feature_set_version = %(v)s AND f.timeframe = %(tf)s AND f.instrument_id = inst.instrument_id
            ORDER BY f.ts DESC LIMIT 1))
FROM inst WHERE inst.instrument_id IS NOT NULL
"""


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


class _Freshness:
    """Per data set, the newest served vector's known-at, read at most every ``FRESHNESS_TTL_SECONDS``."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._lock = threading.Lock()
        self._read_at = 0.0
        self._known: dict[tuple[str, str], datetime | None] = {}

    def known_at(self) -> dict[tuple[str, str], datetime | None]:
        import psycopg

        with self._lock:
            if time.monotonic() - self._read_at >= FRESHNESS_TTL_SECONDS:
                known: dict[tuple[str, str], datetime | None] = {}
                with psycopg.connect(self._dsn, connect_timeout=5) as conn:
                    for fs, tf in datasets().values():
                        newest = conn.execute(_NEWEST_TS, {"v": fs.version, "tf": tf}).fetchone()[0]
                        known[(fs.version, tf)] = None if newest is None else newest + _lag(tf)
                self._known, self._read_at = known, time.monotonic()
            return dict(self._known)


def create_app(dsn: str, token: str | None = None):  # noqa: ANN201 - a Starlette app
    """The ASGI app serving ``dsn``'s feature store; ``token`` (default ``$MARKETFS_SERVE_TOKEN``) guards it."""
    from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    reader = OnlineReader(dsn)
    freshness = _Freshness(dsn)
    registry = CollectorRegistry()
    latency = Histogram(
        "marketfs_request_seconds",
        "Time to answer a request, by route and status",
        ["route", "status"],
        registry=registry,
        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
    )
    lag = Gauge(
        "marketfs_freshness_seconds",
        "Now minus the known-at (bar close) of the newest served vector, per feature set and timeframe",
        ["feature_set", "timeframe"],
        registry=registry,
    )
    newest = Gauge(
        "marketfs_newest_known_at_seconds",
        "Unix time of the newest served vector's known-at, per feature set and timeframe",
        ["feature_set", "timeframe"],
        registry=registry,
    )

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def timed(route: str, handler):  # noqa: ANN001, ANN202 - an endpoint
        async def endpoint(request: Request) -> Response:
            began = time.perf_counter()
            if route != "/health" and not authorised(request):
                response: Response = error(401, f"this server wants 'Authorization: Bearer <{TOKEN_ENV}>'")
            else:
                response = await handler(request)
            latency.labels(route, str(response.status_code)).observe(time.perf_counter() - began)
            return response

        return endpoint

    async def health(request: Request) -> Response:
        try:
            await run_in_threadpool(freshness.known_at)
        except Exception as exc:  # any failure to read the store is the answer itself
            return JSONResponse({"status": "unavailable", "error": str(exc).splitlines()[0]}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def latest(request: Request) -> Response:
        query = request.query_params
        instruments = [i.strip() for i in query.get("instruments", "").split(",") if i.strip()]
        if not instruments:
            return error(400, "name at least one instrument: ?instruments=AAA,BBB")
        if len(instruments) > MAX_INSTRUMENTS:
            return error(400, f"{len(instruments)} instruments in one request; at most {MAX_INSTRUMENTS}")
        version = query.get("feature_set") or DEFAULT_FEATURE_SET.version
        timeframe = query.get("timeframe") or "1m"
        features = [f.strip() for f in query.get("features", "").split(",") if f.strip()]
        try:
            if not features:
                from marketfs.features.registry import feature_set

                features = feature_set(version).names(timeframe)
            rows = await run_in_threadpool(
                reader.latest, instruments, features, timeframe, feature_set=version, output="records"
            )
        except (RetrievalError, KeyError, ValueError) as exc:
            return error(400, str(exc).strip("'\""))
        vectors = [
            {
                "instrument_id": row["instrument_id"],
                "ts": _json_value(row["ts"]),
                "known_at": _json_value(row["known_at"]),
                "quality_flags": row["quality_flags"],
                "features": {name: _json_value(row[name]) for name in features},
            }
            for row in rows
        ]
        return JSONResponse({"feature_set": version, "timeframe": timeframe, "vectors": vectors})

    async def metrics(request: Request) -> Response:
        try:
            known = await run_in_threadpool(freshness.known_at)
        except Exception as exc:
            return error(503, f"cannot read the store for the freshness metrics: {str(exc).splitlines()[0]}")
        now = datetime.now(UTC)
        for (version, timeframe), at in known.items():
            if at is not None:
                lag.labels(version, timeframe).set((now - at).total_seconds())
                newest.labels(version, timeframe).set(at.timestamp())
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/health", timed("/health", health)),
        Route("/v1/latest", timed("/v1/latest", latest)),
        Route("/metrics", timed("/metrics", metrics)),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # noqa: ANN202 - Starlette's lifespan protocol
        yield
        reader.close()

    return Starlette(routes=routes, lifespan=lifespan)


def app_from_environment():  # noqa: ANN201 - a Starlette app
    """``create_app`` on ``$MARKETFS_DSN``: the factory each worker process of ``serve(workers > 1)`` calls."""
    from marketfs.db import resolve_dsn

    return create_app(resolve_dsn())


def serve(dsn: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the server until interrupted: uvicorn, in ``workers`` processes sharing the port, each with its
    own connection (one process serves one request's read at a time)."""
    import uvicorn

    options = {"host": host, "port": port, "log_level": "warning", "access_log": False}
    if workers <= 1:
        uvicorn.run(create_app(dsn), **options)
        return
    os.environ["MARKETFS_DSN"] = dsn  # the worker processes resolve the same server
    uvicorn.run("marketfs.serve:app_from_environment", factory=True, workers=workers, **options)
