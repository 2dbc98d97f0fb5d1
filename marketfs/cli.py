"""``marketfs``: the embedded default database and the quarantine.

marketfs dsn                         print the feature store DSN (starting the embedded server if needed)
marketfs stop                        stop the embedded server (data stays in $MARKETFS_HOME/postgres)
marketfs status                      say whether the embedded server runs, and where
marketfs quarantine list [--all]     held quarantine batches (all of them with --all)
marketfs quarantine show BATCH       a batch, why it was held, and its failed expectations
marketfs quarantine release BATCH --by NAME --note WHY   runs `python -m pipelines quarantine release ...`
marketfs quarantine discard BATCH --by NAME --note WHY   drop its rows, logged
"""

from __future__ import annotations

import argparse
import os
import sys

import sqlalchemy as sa

from marketfs.db import DSN_ENV, engine_for, resolve_dsn
from marketfs.embedded_pg import EmbeddedPostgres, default_home


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
                quality.discard(conn, args.batch, actor=args.by, note=args.note)
            print(f"batch {args.batch} discarded by {args.by}")
    except quality.QuarantineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _release_through_dagster(args: argparse.Namespace) -> int:
    """A release changes served data: it goes through the pipelines command, which records it in Dagster
    (a materialisation of the released day) and recomputes what was computed without it."""
    import importlib.util

    command = [sys.executable, "-m", "pipelines", "quarantine", "release", str(args.batch), "--by", args.by]
    command += ["--note", args.note]
    if importlib.util.find_spec("pipelines") is None:
        print(
            "error: a release goes through Dagster; run it from the project folder:\n"
            f"  .venv/bin/python -m pipelines quarantine release {args.batch} --by {args.by!r} --note {args.note!r}",
            file=sys.stderr,
        )
        return 2
    print(f"a release goes through Dagster: {' '.join(command[1:])}", file=sys.stderr)
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
    args = parser.parse_args(argv)

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
    elif args.command == "quarantine" and args.action == "release":
        return _release_through_dagster(args)
    else:
        return _quarantine(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
