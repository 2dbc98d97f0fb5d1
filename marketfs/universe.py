"""The instrument universe a deployment serves: its calendar and what a complete session holds.

Declared in ``marketfs/config/universes.toml`` (the only place), chosen by ``$MARKETFS_UNIVERSE``.
"""

from __future__ import annotations

import functools
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from marketfs.calendars import CalendarError, Sessions, sessions

DEFAULT_FILE = Path(__file__).resolve().parent / "config" / "universes.toml"
DEFAULT_UNIVERSE = "us_equities"


class UniverseError(ValueError):
    """A universe that is not declared, or declared wrongly."""


@dataclass(frozen=True)
class Universe:
    name: str
    calendar: str
    instruments: tuple[str, ...] = ()
    min_instrument_share: float = 0.8
    partial_session_coverage: float = 0.9
    learn_sessions: int = 5

    @property
    def sessions(self) -> Sessions:
        return sessions(self.calendar)

    def min_instruments(self, expected: int) -> int:
        """The fewest instruments a session may hold when ``expected`` are expected (at least 1)."""
        return max(1, int(expected * self.min_instrument_share + 1e-9))


def _declarations(path: Path) -> dict[str, dict]:
    data = tomllib.loads(DEFAULT_FILE.read_text())
    if path != DEFAULT_FILE:
        for name, fields in tomllib.loads(path.read_text()).items():
            data[name] = {**data.get(name, {}), **fields}
    return data


@functools.cache
def _universe(name: str, path: Path) -> Universe:
    try:
        declared = _declarations(path)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UniverseError(f"{path}: cannot read the universes ({exc}). Fix: see {DEFAULT_FILE}") from exc
    if name not in declared:
        raise UniverseError(
            f"universe {name!r} (MARKETFS_UNIVERSE) is not declared in {path}; "
            f"declared: {', '.join(sorted(declared))}. "
            f"Fix: set MARKETFS_UNIVERSE to one of them, or declare [{name}] with its calendar"
        )
    fields = dict(declared[name])
    try:
        universe = Universe(
            name=name,
            calendar=str(fields.pop("calendar")),
            instruments=tuple(str(i) for i in fields.pop("instruments", ())),
            min_instrument_share=float(fields.pop("min_instrument_share", 0.8)),
            partial_session_coverage=float(fields.pop("partial_session_coverage", 0.9)),
            learn_sessions=int(fields.pop("learn_sessions", 5)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UniverseError(f"{path}: universe [{name}] is invalid ({exc!r}). Fix: see {DEFAULT_FILE}") from exc
    if fields:
        unknown = ", ".join(fields)
        raise UniverseError(f"{path}: universe [{name}] has unknown key(s) {unknown}. Fix: see {DEFAULT_FILE}")
    if not (0 < universe.min_instrument_share <= 1 and 0 <= universe.partial_session_coverage <= 1):
        raise UniverseError(f"{path}: universe [{name}]: shares must lie in (0, 1]. Fix: see {DEFAULT_FILE}")
    try:
        universe.sessions  # noqa: B018 - an unknown calendar is named now, not at the first bar
    except CalendarError as exc:
        raise UniverseError(f"{path}: universe [{name}]: {exc}") from exc
    return universe


def active_universe() -> Universe:
    """The universe ``$MARKETFS_UNIVERSE`` names (default us_equities), declared in ``$MARKETFS_UNIVERSES``
    or the packaged file."""
    name = os.environ.get("MARKETFS_UNIVERSE", "").strip() or DEFAULT_UNIVERSE
    return _universe(name, Path(os.environ.get("MARKETFS_UNIVERSES", DEFAULT_FILE)))


def active_sessions() -> Sessions:
    """The sessions of the active universe's calendar."""
    return active_universe().sessions
