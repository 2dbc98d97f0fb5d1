"""Where raw data comes from: a deterministic synthetic generator or a landing folder of files."""

from marketfs.sources.base import BAR_SCHEMA, BarSource, SourceFileError
from marketfs.sources.landing import LandingFolderBars
from marketfs.sources.synthetic import SyntheticBars

__all__ = ["BAR_SCHEMA", "BarSource", "LandingFolderBars", "SourceFileError", "SyntheticBars"]
