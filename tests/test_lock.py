"""requirements.lock is what is installed: made from this pyproject.toml, within its ranges, and installed here."""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import lockfile  # noqa: E402


def locked() -> dict[str, tuple[str, str | None]]:
    return {canonicalize_name(name): (version, marker) for name, version, marker in lockfile.pins()}


def test_the_lock_was_made_from_this_pyproject() -> None:
    """Change a range, a dependency or requires-python without `make lock`, and this fails saying so."""
    assert lockfile.stale_message() is None, lockfile.stale_message()


def test_a_changed_range_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    changed = tmp_path / "pyproject.toml"
    changed.write_text(lockfile.PYPROJECT.read_text().replace('"polars>=2.0"', '"polars>=2.1"'))
    assert changed.read_text() != lockfile.PYPROJECT.read_text()
    monkeypatch.setattr(lockfile, "PYPROJECT", changed)
    assert "run `make lock`" in lockfile.stale_message()


def test_every_locked_version_is_within_pyproject_ranges() -> None:
    project = tomllib.loads(lockfile.PYPROJECT.read_text())["project"]
    wanted = [*project["dependencies"], *[r for extra in project["optional-dependencies"].values() for r in extra]]
    pinned = locked()
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == "marketfs":  # the project's own extras, named inside its extras
            continue
        assert name in pinned, f"{requirement.name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pinned[name][0], prereleases=True), (
            f"requirements.lock pins {requirement.name}=={pinned[name][0]}, outside {text!r}: run `make lock`"
        )


def test_this_environment_is_the_locked_set() -> None:
    """What `make install` installed (and the tests run on) is exactly the lock, for this platform."""
    differ = []
    for name, (version, marker) in locked().items():
        if marker and not Marker(marker).evaluate():
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            differ.append(f"{name}: locked {version}, installed {installed}")
    assert not differ, "the environment is not the lock (run `make install` after `touch requirements.lock`): " + (
        "; ".join(differ)
    )
