"""Where raw data comes from: a deterministic synthetic generator or a landing folder of files."""

from marketfs.sources.base import BAR_SCHEMA, BarSource, EventSource, SourceFileError
from marketfs.sources.landing import LandingFolderBars, LandingFolderDailyBars, LandingFolderEvents
from marketfs.sources.synthetic import SyntheticBars, SyntheticEvents

__all__ = [
    "BAR_SCHEMA",
    "BarSource",
    "EventSource",
    "LandingFolderBars",
    "LandingFolderDailyBars",
    "LandingFolderEvents",
    "SourceFileError",
    "SyntheticBars",
    "SyntheticEvents",
]
