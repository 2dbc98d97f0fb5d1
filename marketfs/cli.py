"""``marketfs``: the embedded default database and the quarantine.

marketfs dsn                         print the feature store DSN (starting the embedded server if needed)
marketfs stop                        stop the embedded server (data stays in $MARKETFS_HOME/postgres)
marketfs status                      say whether the embedded server runs, and where
marketfs quarantine list [--all]     held quarantine batches (all of them with --all)
marketfs quarantine show BATCH       a batch, why it was held, and its failed expectations
marketfs quarantine release BATCH --by NAME --note WHY   runs `python -m pipelines quarantine release ...`
marketfs quarantine discard BATCH --by NAME --note WHY   drop its rows (the day is a gap), recompute, logged
marketfs latest INSTRUMENT... --features F,G [--timeframe 1m]          the newest vector per instrument
marketfs frame ENTITIES --features F,1d:G,fs_v2:1m:H --tolerance 5m|none [--as-of T|entity] [--flags] [--snapshot ID]
               [--out FILE]          point-in-time join of a CSV or Parquet of (instrument_id, ts) rows; 1d:G is
                                     another timeframe's feature, fs_v2:1m:H another feature set's
marketfs serve [--host 127.0.0.1] [--port 8000] [--workers 1]
                                     /v1/latest, /health and /metrics over HTTP (marketfs/serve.py)

Exit codes: 2 a usage error or a request that cannot be served (the message says why), 3 the database
cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import datetime, timedelta

import psycopg
import sqlalchemy as sa

from marketfs.db import DSN_ENV, engine_for, resolve_dsn, unreachable_message
from marketfs.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError, default_home


def _quarantine(args: argparse.Namespace) -> int:
    from marketfs.store import quality
    from marketfs.store.migrations import migrate

    dsn = resolve_dsn()
    migrate(dsn)
    engine = engine_for(dsn)
    try:
        if args.action == "list":
            with engine.connect() as conn:
                batches = quality.list_batches(conn, None if args.all else "held")
            if not batches:
                print("no quarantine batches" + ("" if args.all else " held"))
            for b in batches:
                print(f"{b['batch_id']:>6}  {b['status']:<9} {b['asset']:<20} {b['partition']:<24} {b['reason'][:90]}")
        elif args.action == "show":
            with engine.connect() as conn:
                batch = conn.execute(
                    sa.text("SELECT * FROM quarantine_batches WHERE batch_id = :b"), {"b": args.batch}
                ).first()
                if batch is None:
                    raise quality.QuarantineError(f"no quarantine batch {args.batch}")
                for key, value in batch._mapping.items():
                    print(f"{key:<13} {value}")
                rows = conn.execute(
                    sa.text(
                        "SELECT suite, expectation, column_name, observed_value, unexpected_count, reference, "
                        "docs_url FROM quality_log WHERE batch_id = :b AND NOT success ORDER BY id"
                    ),
                    {"b": args.batch},
                ).all()
            print("failed expectations:")
            for r in rows:
                print(
                    f"  {r.suite}: {r.expectation}({r.column_name}) observed={r.observed_value} "
                    f"unexpected={r.unexpected_count} reference={r.reference or '-'}"
                )
                if r.docs_url:
                    print(f"    {r.docs_url}")
        else:
            with engine.begin() as conn:
                batch = quality.discard(conn, args.batch, actor=args.by, note=args.note)
            day = batch["partition"].split("|")[0]
            print(f"batch {args.batch} discarded by {args.by}")
            if batch["gaps"]:
                print(f"{day} is now a gap for what it held: the runs that follow restart its instruments after it")
    except quality.QuarantineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _decide_through_dagster(args: argparse.Namespace) -> int:
    """A release or a discard changes what is served: it goes through the pipelines command, which records a
    release in Dagster (a materialisation of the released day) and recomputes what follows the day (for a
    discard: the held instruments restart after it, a gap)."""
    import importlib.util

    action = args.action
    command = [sys.executable, "-m", "pipelines", "quarantine", action, str(args.batch), "--by", args.by]
    command += ["--note", args.note]
    if importlib.util.find_spec("pipelines") is None:
        if action == "discard":  # the decision itself needs no Dagster; what follows is recomputed later
            return _quarantine(args)
        print(
            f"error: a {action} goes through Dagster; run it from the project folder:\n"
            f"  .venv/bin/python -m pipelines quarantine {action} {args.batch} --by {args.by!r} --note {args.note!r}",
            file=sys.stderr,
        )
        return 2
    print(f"a {action} goes through Dagster: {' '.join(command[1:])}", file=sys.stderr)
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return 0  # not reached


def _snapshot(args: argparse.Namespace) -> int:
    import json

    from marketfs import snapshots
    from marketfs.store.migrations import migrate

    dsn = resolve_dsn()
    migrate(dsn)
    try:
        if args.action == "list":
            with engine_for(dsn).connect() as conn:
                rows = snapshots.list_snapshots(conn)
            if not rows:
                print("no snapshots")
            for r in rows:
                print(
                    f"{r['snapshot_id']}  {r['row_count']:>10} rows  {r['instruments']:>4} instruments  "
                    f"created {r['created_at']:%Y-%m-%d %H:%M}  {r['content_hash'][:19]}"
                )
        elif args.action == "describe":
            with engine_for(dsn).connect() as conn:
                print(json.dumps(snapshots.describe_snapshot(conn, args.id), indent=2))
        else:
            with engine_for(dsn).begin() as conn:
                snapshots.delete_snapshot(conn, args.id, actor=args.by, note=args.note)
            print(f"deleted {args.id} (logged in snapshot_log)")
    except snapshots.SnapshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", None: "seconds"}


def _tolerance(text: str) -> timedelta | None:
    """An argparse type: a duration such as 90s, 5m, 1h, 2d (a bare number is seconds), never negative;
    ``none`` (or a duration beyond what a timedelta holds) for no bound."""
    if text.strip().lower() == "none":
        return None
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a tolerance is how far back from each entity's ts a vector may be, never negative; "
            f"write {text.strip()[1:]!r}"
        )
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration >= 0; write e.g. 90s, 5m, 1h or 2d")
    try:
        return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    except OverflowError:
        return None  # longer than any timestamps can span: no bound, as training_frame takes timedelta.max


def _as_of(text: str) -> datetime | str:
    """An argparse type: ``entity``, or an ISO 8601 instant with its offset."""
    if text.strip() == "entity":
        return "entity"
    try:
        instant = datetime.fromisoformat(text.strip())
    except ValueError:
        instant = None
    if instant is None or instant.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write an instant with its offset, e.g. 2024-03-01T00:00Z, or entity"
        )
    return instant


def _attached(argv: list[str], option: str) -> list[str]:
    """``option VALUE`` as ``option=VALUE``: argparse takes a value such as ``-5m`` for an option and says only
    "expected one argument"; attached, the value reaches its type, which says what is wrong with it."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == option:
            value = next(it, None)
            out.append(arg if value is None else f"{option}={value}")
        else:
            out.append(arg)
    return out


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one feature, e.g. --features ret_1,rsi_14")
    return names


def _retrieve(args: argparse.Namespace) -> int:
    import polars as pl

    from marketfs import retrieval
    from marketfs.snapshots import SnapshotError

    dsn = resolve_dsn()
    try:
        if args.command == "latest":
            frame = retrieval.latest(
                args.instruments, args.features, args.timeframe, feature_set=args.feature_set, dsn=dsn
            )
        else:
            path = args.entities
            try:
                entities = (
                    pl.read_parquet(path) if path.endswith(".parquet") else pl.read_csv(path, try_parse_dates=True)
                )
            except (OSError, pl.exceptions.PolarsError) as exc:
                print(f"error: cannot read entities file {path}: {str(exc).splitlines()[0]}", file=sys.stderr)
                return 2
            frame = retrieval.training_frame(
                entities,
                args.features,
                args.tolerance,
                args.snapshot,
                timeframe=args.timeframe,
                feature_set=args.feature_set,
                as_of=args.as_of,
                include_flags=args.flags,
                full_feature_names=args.full_feature_names,
                dsn=dsn,
            )
    except (retrieval.RetrievalError, SnapshotError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "out", None):
        frame.write_parquet(args.out) if args.out.endswith(".parquet") else frame.write_csv(args.out)
        print(f"{frame.height} rows written to {args.out}")
    else:
        with pl.Config(tbl_rows=50, tbl_cols=-1):
            print(frame)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="marketfs", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dsn")
    sub.add_parser("stop")
    sub.add_parser("status")
    q = sub.add_parser("quarantine").add_subparsers(dest="action", required=True)
    listing = q.add_parser("list")
    listing.add_argument("--all", action="store_true")
    q.add_parser("show").add_argument("batch", type=int)
    for action in ("release", "discard"):
        p = q.add_parser(action)
        p.add_argument("batch", type=int)
        p.add_argument("--by", required=True, help="who reviewed it")
        p.add_argument("--note", required=True, help="why")
    snap = sub.add_parser("snapshot").add_subparsers(dest="action", required=True)
    snap.add_parser("list")
    snap.add_parser("describe").add_argument("id")
    delete = snap.add_parser("delete")
    delete.add_argument("id")
    delete.add_argument("--by", required=True, help="who deletes it")
    delete.add_argument("--note", required=True, help="why")
    served = sub.add_parser("serve", help="the newest vectors and metrics over HTTP")
    served.add_argument("--host", default="127.0.0.1", help="the address to listen on (default loopback only)")
    served.add_argument("--port", type=int, default=8000)
    served.add_argument("--workers", type=int, default=1, help="server processes sharing the port (default 1)")
    ingest = sub.add_parser("ingest", help="a live feed in").add_subparsers(dest="source", required=True)
    zmq = ingest.add_parser("zmq", help="subscribe to bars and events on a ZeroMQ PUB socket (JSON messages)")
    zmq.add_argument("--connect", required=True, help="the publisher's endpoint, e.g. tcp://127.0.0.1:5556")
    zmq.add_argument("--metrics-port", type=int, help="serve the ingest lag for Prometheus on this loopback port")
    latest = sub.add_parser("latest", help="the newest feature vector per instrument")
    latest.add_argument("instruments", nargs="+")
    frame = sub.add_parser("frame", help="point-in-time join of entity rows (instrument_id, ts)")
    frame.add_argument("entities", help="a CSV or Parquet file with columns instrument_id and ts (with offset)")
    frame.add_argument(
        "--tolerance", required=True, type=_tolerance, help="e.g. 5m: how old a vector may be; none: no bound"
    )
    frame.add_argument("--as-of", type=_as_of, help="read values as served then: an ISO instant with offset, or entity")
    frame.add_argument("--flags", action="store_true", help="add the matched vectors' quality_flags")
    frame.add_argument(
        "--full-feature-names",
        action="store_true",
        help="name columns <feature set>_<timeframe>__<feature> (as Feast's full_feature_names)",
    )
    frame.add_argument("--snapshot", help="read a frozen snapshot instead of the live table")
    frame.add_argument("--out", help="write the frame to this .parquet or .csv file instead of printing it")
    examples = {latest: "ret_1,rsi_14", frame: "ret_1,1d:rsi_14,fs_v2:1m:rsi_7 (<timeframe>:, <set>:<timeframe>:)"}
    for p in (latest, frame):
        p.add_argument("--features", required=True, type=_names, help=f"comma-separated, e.g. {examples[p]}")
        p.add_argument("--timeframe", default="1m", help="the timeframe of unprefixed features: 1m, 5m or 1d")
        p.add_argument("--feature-set", default=None, help="a declared feature set version (default fs_v1)")
    args = parser.parse_args(_attached(sys.argv[1:] if argv is None else argv, "--tolerance"))
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and "\x00" in v for v in values):
            parser.error(f"{name} {value!r} contains a NUL byte; remove it")
    try:
        return _command(args)
    except EmbeddedPostgresError as exc:
        print(f"error: {exc}", file=sys.stderr)  # it says what failed and what to do
        return 3
    except (sa.exc.OperationalError, psycopg.OperationalError) as exc:
        if not os.environ.get(DSN_ENV):
            raise  # the embedded server is started on demand: its own errors say what failed
        print(f"error: {unreachable_message(os.environ[DSN_ENV], exc)}", file=sys.stderr)
        return 3


def _command(args: argparse.Namespace) -> int:
    server = EmbeddedPostgres(default_home())
    if args.command == "dsn":
        print(resolve_dsn())
    elif args.command == "stop":
        if os.environ.get(DSN_ENV):
            print(f"{DSN_ENV} is set: nothing embedded to stop", file=sys.stderr)
        print("stopped" if server.stop() else "the embedded server was not running")
    elif args.command == "status":
        print(f"embedded server home: {server.home}")
        print(f"data directory: {server.data_dir}")
        print(f"running: {'yes' if server.running_port() else 'no'}")
    elif args.command == "snapshot":
        return _snapshot(args)
    elif args.command in ("latest", "frame"):
        return _retrieve(args)
    elif args.command == "serve":
        from marketfs.serve import serve

        serve(resolve_dsn(), host=args.host, port=args.port, workers=args.workers)
    elif args.command == "ingest":
        import logging

        from marketfs.zmq_ingest import run

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        logging.getLogger("marketfs").setLevel(logging.INFO)  # its own lines; the libraries' only when they warn
        return run(args.connect, dsn=resolve_dsn(), metrics_port=args.metrics_port)
    elif args.command == "quarantine" and args.action in ("release", "discard"):
        return _decide_through_dagster(args)
    else:
        return _quarantine(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
