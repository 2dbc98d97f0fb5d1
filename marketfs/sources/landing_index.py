"""Which UTC days each landing file holds, kept with the file's fingerprint so an unchanged file is not re-read.

A file's fingerprint is (path, size, mtime_ns). For each file the index keeps the UTC days its
rows fall on (the daily partitions it feeds), the errors of those days, and the error of a file
that cannot say which days it holds. A range read then opens only the files holding days of the
range, and the sensor learns which days a new or changed file touches without reading the others.

Kept as one JSON file per folder under ``$MARKETFS_HOME/landing_index/``, not as a table: the
landing source and the sensor have no database at hand, the index is a cache that the files can
rebuild at any time (delete it and the next read re-reads every file), and a person can read it.
It is written atomically (temporary file, then rename); two processes writing at once lose at
most an entry, which is then re-read. Where it cannot be written (a read-only home), reads still
work and re-read the files each time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from marketfs.sources.base import SourceFileError
from marketfs.sources.landing_file import FileScan, LandingKind, scan_landing_file

# Bump when what a scan finds changes (validation rules): every file is re-read once.
INDEX_VERSION = 1


def landing_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` sorted by path, or an error saying how to configure the folder."""
    if not root.is_dir():
        raise SourceFileError(
            root, "the landing folder does not exist", "create it or set MARKETFS_LANDING_DIR to the folder"
        )
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def _shift_tag(kind: LandingKind) -> str:
    # Days of close-stamped files differ at midnight: their index must not be shared with open-stamped reads.
    seconds = int(kind.ts_shift.total_seconds())
    return f"-shift{seconds}s" if seconds else ""


def default_index_path(root: Path, kind: LandingKind) -> Path:
    """``$MARKETFS_HOME/landing_index/<kind>-<hash of the folder's absolute path and calendar>.json``.

    The calendar is in the hash because it decides the trading day of every row: an index written
    under another universe's calendar would name the wrong days.
    """
    from marketfs.universe import active_sessions

    key = f"{root.resolve()}|{active_sessions().name}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (
        Path(os.environ.get("MARKETFS_HOME", ".marketfs"))
        / "landing_index"
        / f"{kind.name}{_shift_tag(kind)}-{digest}.json"
    )


@dataclass
class IndexEntry:
    size: int
    mtime_ns: int
    days: list[str] = field(default_factory=list)
    day_errors: dict[str, dict] = field(default_factory=dict)  # day -> {problem, fix, line}
    error: dict | None = None  # the file cannot say which days it holds


class LandingIndex:
    """The days and errors of every file of one landing folder, re-read only when a file changes."""

    def __init__(self, root: Path, kind: LandingKind, store: Path | None = None) -> None:
        self.root = root
        self.kind = kind
        self.store = store or default_index_path(root, kind)
        self.entries: dict[str, IndexEntry] = self._load()
        self.reads: list[Path] = []  # files this index has opened, in order
        self._dirty = False

    def refresh(self, keep_days: set[str] | frozenset[str] = frozenset()) -> dict[Path, FileScan]:
        """Index new and changed files, forget removed ones, and save.

        Only new or changed files are read; the scans of those holding any of ``keep_days`` are
        returned, so a caller that wants their rows does not read them twice.
        """
        kept: dict[Path, FileScan] = {}
        present = set()
        for path in landing_files(self.root, self.kind.suffixes):
            key = self._key(path)
            present.add(key)
            entry = self.entries.get(key)
            with contextlib.suppress(FileNotFoundError):  # removed since listed: gone at the next refresh
                if entry is None or (entry.size, entry.mtime_ns) != _fingerprint(path):
                    scan = self.read(path)
                    if keep_days.intersection(scan.days):
                        kept[path] = scan
        for key in set(self.entries) - present:
            del self.entries[key]
            self._dirty = True
        self.save()
        return kept

    def read(self, path: Path) -> FileScan:
        """Read one file (its rows too) and record what it holds under the fingerprint it had before the read."""
        size, mtime_ns = _fingerprint(path)
        self.reads.append(path)
        scan = scan_landing_file(path, self.kind)
        self.entries[self._key(path)] = IndexEntry(
            size=size,
            mtime_ns=mtime_ns,
            days=list(scan.days),
            day_errors={day: _error_record(e) for day, e in scan.day_errors.items()},
            error=_error_record(scan.error) if scan.error is not None else None,
        )
        self._dirty = True
        return scan

    def files_holding(self, days: set[str] | frozenset[str]) -> list[Path]:
        """The indexed files with rows on any of ``days``, sorted by path."""
        return sorted(self.root / key for key, entry in self.entries.items() if days.intersection(entry.days))

    def days_of(self, path: Path) -> list[str]:
        entry = self.entries.get(self._key(path))
        return list(entry.days) if entry else []

    def fingerprint_of(self, path: Path) -> tuple[int, int] | None:
        entry = self.entries.get(self._key(path))
        return (entry.size, entry.mtime_ns) if entry else None

    def unplaced(self) -> list[SourceFileError]:
        """Errors of the files that cannot say which days they hold, sorted by path."""
        return [
            _error_of(self.root / key, entry.error)
            for key, entry in sorted(self.entries.items())
            if entry.error is not None
        ]

    def unplaced_error(self, path: Path) -> SourceFileError | None:
        entry = self.entries.get(self._key(path))
        return _error_of(path, entry.error) if entry and entry.error is not None else None

    def day_errors(self, path: Path) -> dict[str, SourceFileError]:
        entry = self.entries.get(self._key(path))
        return {day: _error_of(path, e) for day, e in entry.day_errors.items()} if entry else {}

    def save(self) -> None:
        if not self._dirty:
            return
        payload = {
            "version": INDEX_VERSION,
            "root": str(self.root.resolve()),
            "kind": self.kind.name,
            "files": {key: asdict(entry) for key, entry in sorted(self.entries.items())},
        }
        try:
            self.store.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.store.name, dir=self.store.parent)
            with os.fdopen(fd, "w") as out:
                json.dump(payload, out, indent=1)
            os.replace(tmp, self.store)
        except OSError:
            return  # a cache: without it every read re-reads the files, nothing is wrong
        self._dirty = False

    def _load(self) -> dict[str, IndexEntry]:
        try:
            payload = json.loads(self.store.read_text())
        except (OSError, ValueError):
            return {}  # absent or unreadable: rebuilt from the files
        if not isinstance(payload, dict) or payload.get("version") != INDEX_VERSION:
            return {}
        try:
            return {key: IndexEntry(**entry) for key, entry in payload.get("files", {}).items()}
        except TypeError:
            return {}

    def _key(self, path: Path) -> str:
        return str(path.relative_to(self.root))


def _fingerprint(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _error_record(error: SourceFileError) -> dict:
    return {"problem": error.problem, "fix": error.fix, "line": error.line}


def _error_of(path: Path, record: dict) -> SourceFileError:
    return SourceFileError(path, record["problem"], record["fix"], line=record.get("line"))
