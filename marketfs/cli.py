"""``marketfs``: manage the embedded default database.

marketfs dsn     print the feature store DSN (starting the embedded server if needed)
marketfs stop    stop the embedded server (data stays in $MARKETFS_HOME/postgres)
marketfs status  say whether the embedded server runs, and where
"""

from __future__ import annotations

import argparse
import os
import sys

from marketfs.db import DSN_ENV, resolve_dsn
from marketfs.embedded_pg import EmbeddedPostgres, default_home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="marketfs", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("command", choices=["dsn", "stop", "status"])
    args = parser.parse_args(argv)
    server = EmbeddedPostgres(default_home())
    if args.command == "dsn":
        print(resolve_dsn())
    elif args.command == "stop":
        if os.environ.get(DSN_ENV):
            print(f"{DSN_ENV} is set: nothing embedded to stop", file=sys.stderr)
        print("stopped" if server.stop() else "the embedded server was not running")
    else:
        print(f"embedded server home: {server.home}")
        print(f"data directory: {server.data_dir}")
        print(f"running: {'yes' if server._running_port() else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
