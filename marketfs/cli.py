"""``marketfs``: the embedded default database and the quarantine.

marketfs dsn                         print the feature store DSN (starting the embedded server if needed)
marketfs stop                        stop the embedded server (data stays in $MARKETFS_HOME/postgres)
marketfs status                      say whether the embedded server runs, and where
marketfs quarantine list [--all]     held quarantine batches (all of them with --all)
marketfs quarantine show BATCH       a batch, why it was held, and its failed expectations
marketfs quarantine release BATCH --by NAME --note WHY   write it to the served tables, logged
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
                action = quality.release if args.action == "release" else quality.discard
                result = action(conn, args.batch, actor=args.by, note=args.note)
            print(
                f"batch {args.batch} {args.action}d by {args.by}"
                + (f": {result['rows_written']} rows written" if "rows_written" in result else "")
            )
            if args.action == "release":
                print(
                    f"re-materialise the downstream assets of {result['asset']} from {result['partition']} on "
                    "(they were computed without these rows)"
                )
    except quality.QuarantineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


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
    else:
        return _quarantine(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
