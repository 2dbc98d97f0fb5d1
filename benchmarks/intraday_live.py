"""Intraday through Dagster, live: ``intraday_sensor`` and its ``intraday_step`` runs during a real session.

    .venv/bin/python benchmarks/intraday_live.py [--instruments 500] [--minutes 10] [--calendar XNYS]

Run it while a session of ``--calendar`` is open (XNYS, the default: 14:30-21:00 UTC in winter; XNZE:
21:00-03:45 UTC; any exchange_calendars name, declared as a universe of its own for the run). It materialises the
previous session with ``python -m pipelines run`` (synthetic data), starts ``dagster dev`` (webserver,
daemon, code server) on fresh databases, turns the sensor on, and polls ``latest()`` for one
instrument every 0.5 s. The synthetic source delivers a minute's bars the moment the minute closes,
so a bar stamped ``t`` is delivered at ``t + 1 minute``; its latency is the time from then until
``latest()`` first returns its vector. The first run fills the session so far and is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench import run_tree
from common import ROOT, bench_database, machine

sys.path.insert(0, str(ROOT / "tests"))
from dagster_helpers import dagster_dev, dagster_process_env  # noqa: E402

START_SENSOR = """mutation($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) { __typename ... on PythonError { message } }
}"""
REPOSITORIES = """query { repositoriesOrError { ... on RepositoryConnection {
  nodes { name location { name } sensors { name } } } } }"""
CATCH_UP = 3
RUNS = """query { runsOrError(filter: {pipelineName: "intraday_step"}) {
  ... on Runs { results { runId status startTime endTime } } } }"""


def _graphql(base: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.load(response)
    if "errors" in body:
        raise RuntimeError(body["errors"])
    return body["data"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--instruments", type=int, default=500)
    parser.add_argument("--minutes", type=int, default=10, help="minutes measured after the first run")
    parser.add_argument("--calendar", default="XNYS", help="the exchange whose session is live (exchange_calendars)")
    args = parser.parse_args()
    declared = tempfile.TemporaryDirectory()  # removed when the benchmark exits
    universes = Path(declared.name) / "universes.toml"
    universes.write_text(f"[bench]\ncalendar = {json.dumps(args.calendar)}\n")
    os.environ.update(MARKETFS_UNIVERSE="bench", MARKETFS_UNIVERSES=str(universes))
    from marketfs.intraday import active_day
    from marketfs.retrieval import OnlineReader
    from marketfs.universe import active_sessions

    now = datetime.now(UTC)
    sessions = active_sessions()
    day = active_day(now)
    i = sessions.position(day)
    if not sessions.opens[i] <= now < sessions.closes[i] - timedelta(minutes=args.minutes + 5):
        print(
            f"the {args.calendar} session of {day} is not open for another {args.minutes + 5} minutes; "
            "run this during a session"
        )
        return 2
    yesterday = sessions.days[i - 1].isoformat()
    with (
        bench_database() as dsn,
        bench_database() as instance_dsn,
        tempfile.TemporaryDirectory() as tmp,
    ):
        env = dagster_process_env(
            dsn,
            instance_dsn,
            Path(tmp),
            MARKETFS_SYNTHETIC_INSTRUMENTS=str(args.instruments),
            MARKETFS_START_DATE=yesterday,
        )
        run_tree(
            [sys.executable, "-m", "pipelines", "run", "--start", yesterday, "--end", yesterday, "--no-snapshot"], env
        )
        reader = OnlineReader(dsn)
        with dagster_dev(env, Path(tmp) / "dagster-dev.log") as base:
            repo, waited = None, time.monotonic() + 180
            while repo is None:  # the webserver answers before its code location has loaded
                repos = _graphql(base, REPOSITORIES)["repositoriesOrError"].get("nodes", [])
                repo = next((r for r in repos if any(x["name"] == "intraday_sensor" for x in r["sensors"])), None)
                if repo is None:
                    if time.monotonic() > waited:
                        raise RuntimeError(f"no intraday_sensor in {repos}")
                    time.sleep(2)
            selector = {
                "repositoryLocationName": repo["location"]["name"],
                "repositoryName": repo["name"],
                "sensorName": "intraday_sensor",
            }
            started = _graphql(base, START_SENSOR, {"selector": selector})["startSensor"]
            if started["__typename"] != "Sensor":
                raise RuntimeError(started)
            sensor_on = time.time()
            seen: dict[datetime, float] = {}
            first_fill = None
            deadline = time.monotonic() + 60 * (args.minutes + CATCH_UP + 5)
            while time.monotonic() < deadline:
                try:
                    row = reader.latest(["SYN000"], ["ret_1"], output="records")[0]
                except Exception:  # the table is created by the first run's migration
                    row = {"ts": None}
                # Yesterday's last vector is there from the start; the first of today is the first run's.
                if row["ts"] is not None and row["ts"] >= sessions.opens[i] and row["ts"] not in seen:
                    seen[row["ts"]] = time.time()
                    if first_fill is None:
                        first_fill = time.time() - sensor_on
                        measured_from = row["ts"]
                if first_fill is not None and len([t for t in seen if t > measured_from]) >= args.minutes + CATCH_UP:
                    break
                time.sleep(0.5)
            runs = _graphql(base, RUNS)["runsOrError"]["results"]
    if first_fill is None:
        print("no vector was served; see the dagster dev log")
        return 1
    latencies = [seen[t] - (t + timedelta(minutes=1)).timestamp() for t in sorted(seen) if t > measured_from]
    # The first run filled the session so far (the benchmark starts mid-session; a deployment's sensor
    # starts at the open), and the next ones catch up what closed meanwhile: steady state after that.
    steady = latencies[CATCH_UP:]
    durations = [r["endTime"] - r["startTime"] for r in runs if r["endTime"] and r["startTime"]]
    statuses = {r["status"] for r in runs}
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    print(f"# intraday live benchmark — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(
        f"# {args.instruments} instruments, {args.calendar} session of {day} (opened {sessions.opens[i]:%H:%M} UTC); "
        f"sensor every 30 s; first run filled it so far in {first_fill:.0f} s"
    )
    print("| path | p50 | p95 | max |")
    print("|---|---|---|---|")
    print(
        f"| bar closed -> latest() through intraday_sensor ({len(latencies)} minutes) | "
        f"{statistics.median(latencies):.1f} s | {q[18]:.1f} s | {max(latencies):.1f} s |"
    )
    qs = statistics.quantiles(steady, n=20, method="inclusive")
    print(
        f"| the same, after the first {CATCH_UP} minutes of catch-up ({len(steady)} minutes) | "
        f"{statistics.median(steady):.1f} s | {qs[18]:.1f} s | {max(steady):.1f} s |"
    )
    print(
        "# per minute (bar stamp: seconds from its close to latest()): "
        + ", ".join(
            f"{t:%H:%M} {seen[t] - (t + timedelta(minutes=1)).timestamp():.0f}"
            for t in sorted(seen)
            if t > measured_from
        )
    )
    print(
        f"| intraday_step run, start to end ({len(durations)} runs, {', '.join(sorted(statuses))}) | "
        f"{statistics.median(durations):.1f} s | {statistics.quantiles(durations, n=20, method='inclusive')[18]:.1f} s "
        f"| {max(durations):.1f} s |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
