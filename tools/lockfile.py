"""requirements.lock: the exact, hashed set of packages `make install` installs, and its tie to pyproject.toml.

    python tools/lockfile.py stamp     # after `uv pip compile`: record which pyproject.toml the lock answers
    python tools/lockfile.py check     # exit 1, saying what to run, when pyproject.toml changed since

The lock is resolved by uv (`make lock`) from pyproject.toml's ranges, for every platform (``--universal``)
and Python >= 3.11, with the sha256 of every distribution, and keeps the versions it already holds unless
a range excludes them (`make lock ARGS=--upgrade` re-resolves everything). pyproject.toml keeps its ranges
for those who install marketfs as a library; `make run`, `make test` and CI install the lock.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
DIGEST_LINE = "# pyproject.toml dependencies sha256: "
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pyproject_digest(path: Path | None = None) -> str:
    """sha256 of what the lock is resolved from: requires-python, dependencies and optional-dependencies."""
    project = tomllib.loads((path or PYPROJECT).read_text())["project"]
    resolved_from = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }
    return hashlib.sha256(json.dumps(resolved_from, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path = LOCK) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_LINE):
            return line[len(DIGEST_LINE) :].strip()
    return None


def pins(lock: Path = LOCK) -> list[tuple[str, str, str | None]]:
    """(name, version, environment marker or None) of every package of the lock."""
    found = []
    for line in lock.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            found.append((match.group(1), match.group(2), match.group(3)))
    return found


def stamp(lock: Path = LOCK) -> None:
    lines = [line for line in lock.read_text().splitlines() if not line.startswith(DIGEST_LINE)]
    lines.insert(0, DIGEST_LINE + pyproject_digest())
    lock.write_text("\n".join(lines) + "\n")


def stale_message(lock: Path = LOCK) -> str | None:
    if not lock.exists():
        return f"{lock.name} is missing: run `make lock` and commit it"
    if recorded_digest(lock) != pyproject_digest():
        return (
            f"pyproject.toml's dependencies changed since {lock.name} was made: run `make lock` and commit "
            f"both files (make install installs {lock.name}, not pyproject.toml's ranges)"
        )
    return None


def main(argv: list[str]) -> int:
    if argv == ["stamp"]:
        stamp()
        print(f"{LOCK.name}: {len(pins())} packages, made from pyproject.toml {pyproject_digest()[:12]}")
        return 0
    if argv == ["check"]:
        message = stale_message()
        if message:
            print(f"error: {message}", file=sys.stderr)
            return 1
        return 0
    print("usage: python tools/lockfile.py stamp|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
