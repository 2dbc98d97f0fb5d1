"""The landing-folder sensor: new or changed files launch runs for the days they touch."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from marketfs.sources import SourceFileError
from marketfs.sources.landing import BAR_SUFFIXES, EVENT_SUFFIXES, landing_files, read_landing_file
from pipelines.resources import MarketData


def _signature(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_mtime_ns}:{stat.st_size}"


def touched_days(path: Path, kind: str) -> list[str]:
    """UTC days (partition keys) that a landing file holds rows for."""
    from marketfs.features.events import EVENT_SCHEMA
    from marketfs.sources.base import BAR_SCHEMA

    schema, column = (BAR_SCHEMA, "ts") if kind == "bars" else (EVENT_SCHEMA, "published_at")
    frame = read_landing_file(path, schema, column)
    return sorted(frame[column].dt.strftime("%Y-%m-%d").unique().to_list())


def build_landing_sensor(job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    @dg.sensor(
        name="landing_files_sensor",
        job=job,
        minimum_interval_seconds=30,
        description="Watches MARKETFS_LANDING_DIR/bars and /events; a new or changed file launches the "
        "daily_features job for each day it holds rows for.",
    )
    def landing_files_sensor(context: dg.SensorEvaluationContext, market_data: MarketData):
        if market_data.source != "landing":
            return dg.SkipReason("MARKETFS_SOURCE is not 'landing': nothing to watch")
        root = Path(market_data.landing_dir)
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        current: dict[str, str] = {}
        days: dict[str, list[str]] = {}
        for kind, suffixes in (("bars", BAR_SUFFIXES), ("events", EVENT_SUFFIXES)):
            folder = root / kind
            if not folder.is_dir():
                continue
            for path in landing_files(folder, suffixes):
                signature = current[str(path)] = _signature(path)
                if seen.get(str(path)) == signature:
                    continue
                try:
                    for day in touched_days(path, kind):
                        days.setdefault(day, []).append(f"{path.name}@{signature}")
                except SourceFileError as exc:
                    # Not launched: the run would fail on the same file. The sensor log says why.
                    context.log.warning(f"skipping {path}: {exc}")
        context.update_cursor(json.dumps(current))
        if not days:
            return dg.SkipReason("no new or changed landing files")
        return [
            dg.RunRequest(
                partition_key=day,
                run_key=f"{day}:{'|'.join(sorted(files))}",
                tags={"landing_files": ",".join(sorted(f.split("@")[0] for f in files))[:200]},
            )
            for day, files in sorted(days.items())
        ]

    return landing_files_sensor
