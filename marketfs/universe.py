"""The instrument universe a deployment serves: its calendar and what a complete session holds.

Declared in ``marketfs/config/universes.toml`` (the only place), chosen by ``$MARKETFS_UNIVERSE``.
"""

from __future__ import annotations

import functools
import os
import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime
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
    # An instrument's life: its first and last session (listing, delisting), where declared. Outside it no bar
    # is a missing delivery, and nothing is computed after its last session.
    listings: dict[str, tuple[date | None, date | None]] = field(default_factory=dict, hash=False)

    @property
    def sessions(self) -> Sessions:
        return sessions(self.calendar)

    def listed_on(self, instrument_id: str, day: date | str) -> bool:
        first, last = self.listings.get(instrument_id, (None, None))
        d = date.fromisoformat(str(day))
        return (first is None or first <= d) and (last is None or d <= last)

    def delisted_at(self) -> dict[str, datetime]:
        """Per delisted instrument, the close of its last session: nothing of it is stamped from then on."""
        return {i: self.sessions.bounds(last)[1] for i, (_, last) in self.listings.items() if last is not None}

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
            listings=_listings(fields.pop("listings", {})),
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
    for instrument, (first, last) in universe.listings.items():
        for key, day in (("first", first), ("last", last)):
            if day is not None and not universe.sessions.is_session(day):
                raise UniverseError(
                    f"{path}: universe [{name}] listings.{instrument}.{key} = {day}: "
                    f"{universe.sessions.not_a_session(day)}. Fix: give a session of {universe.calendar}"
                )
        if first is not None and last is not None and last < first:
            raise UniverseError(
                f"{path}: universe [{name}] listings.{instrument}: last {last} is before first {first}. Fix: swap them"
            )
    return universe


def _listings(declared: object) -> dict[str, tuple[date | None, date | None]]:
    """``{instrument = { first = "YYYY-MM-DD", last = "YYYY-MM-DD" }}``, either bound optional."""
    if not isinstance(declared, dict):
        raise TypeError("listings must be a table of instrument = { first = ..., last = ... }")
    listings = {}
    for instrument, life in declared.items():
        if not isinstance(life, dict) or set(life) - {"first", "last"}:
            raise ValueError(f"listings.{instrument} must be {{ first = 'YYYY-MM-DD', last = 'YYYY-MM-DD' }}")
        bounds = [date.fromisoformat(str(life[k])) if k in life else None for k in ("first", "last")]
        listings[str(instrument)] = (bounds[0], bounds[1])
    return listings


def active_universe() -> Universe:
    """The universe ``$MARKETFS_UNIVERSE`` names (default us_equities), declared in ``$MARKETFS_UNIVERSES``
    or the packaged file."""
    name = os.environ.get("MARKETFS_UNIVERSE", "").strip() or DEFAULT_UNIVERSE
    return _universe(name, Path(os.environ.get("MARKETFS_UNIVERSES", DEFAULT_FILE)))


def active_sessions() -> Sessions:
    """The sessions of the active universe's calendar."""
    return active_universe().sessions
