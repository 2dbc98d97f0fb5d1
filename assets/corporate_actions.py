"""Corporate actions as delivered: splits and cash dividends, checked by their suite, stored, or held.

Every run reads the whole folder (``marketfs/sources/corporate_actions.py``): an action is a fact about an
instrument, not about the day being run, and a late or corrected one must be seen whatever days a run covers.
A good row is stored (a redelivery is a no-op); a row that arrives after vectors across its ex-date were
served opens a restatement of that instrument (``python -m pipelines restate``, which ``run`` does itself). A
bad row is set aside in quarantine with its file, line and problem and holds its instrument from the ex-date:
the jump it was to explain is not served unexplained; the other instruments are.
"""

from collections.abc import Iterator

import dagster as dg
import polars as pl

from assets.gates import GATE_CHECK, DayCheck, check_results
from assets.partitions import daily_asset, day_dependency, day_window, run_scopes
from assets.resources import FeatureStore, MarketData, translate_database_errors
from marketfs.features.registry import datasets
from marketfs.sources.corporate_actions import CHECKS, check_store, good, nothing_delivered, problems, read_folder
from marketfs.store.corporate_actions import (
    known_instruments,
    open_restatements,
    quarantine_actions,
    resolve_fixed_actions,
    write_actions,
)

ASSET = "corporate_actions"


@daily_asset(
    ASSET,
    group_name="raw",
    code_version="1",
    # After the day's bars: an action is checked against the instruments the store knows.
    deps=[day_dependency("raw_ohlcv", 0), day_dependency("bars_1d", 0)],
    description="Splits and cash dividends (instrument_id, ex_date, kind, ratio, known_at) from "
    "<landing>/corporate_actions/, in table corporate_actions, every version kept. Features see each instrument's "
    "history on one scale with the actions known (docs/corporate_actions.md).",
    checks={
        GATE_CHECK: "Great Expectations suite expectations/suites/corporate_actions.json on every delivered row; a bad "
        "row is quarantined and holds its instrument from the ex-date."
    },
)
@translate_database_errors
def corporate_actions(context: dg.AssetExecutionContext, store: FeatureStore, market_data: MarketData) -> Iterator:
    from expectations.gate import validate_frame

    folder = market_data.corporate_actions_dir()
    delivered, unreadable = read_folder(folder) if folder is not None else (nothing_delivered(), [])
    for error in unreadable:
        context.log.error(f"{error} (the file's actions are not read)")
    scopes = run_scopes(context.partition_keys)
    ids = delivered["instrument_id"].drop_nulls().unique().to_list()
    # A shard's run stores and checks its own instruments' actions (a row with no readable id: the first shard's).
    ours = [i for i in ids if any(s.shard.holds(i) for s in scopes)]
    first_shard = any(s.shard.index == 0 for s in scopes)
    mine = delivered.filter(pl.col("instrument_id").is_in(ours) | (pl.col("instrument_id").is_null() & first_shard))
    last_day = scopes[-1].days[-1]
    with store.engine().begin() as conn:
        checked = check_store(mine, known_instruments(conn, ours))
        verdict = validate_frame(checked.drop("source", "line"), ASSET) if checked.height else None
        stored = write_actions(conn, checked.filter(good(checked)))
        opened = open_restatements(conn, stored, sorted(datasets()))
        bad = problems(checked)
        resolved = resolve_fixed_actions(conn, bad, context.run_id)
        held = quarantine_actions(
            conn, bad, run_id=context.run_id, verdict=verdict, fallback=(last_day, *day_window(last_day))
        )
    for row in opened:
        context.log.warning(
            f"{row['instrument_id']}: a corporate action ex {row['from_date']} arrived after {row['dataset']} served "
            "vectors across it; they are restated from the ex-date (python -m pipelines restate)"
        )
    for line in held:
        context.log.error(line)
    if resolved:
        context.log.info(f"quarantine batch(es) {resolved}: the bad action rows are gone from the delivery; resolved")
    metadata = {
        "delivered_rows": dg.MetadataValue.int(delivered.height),
        "stored_new": dg.MetadataValue.int(stored.height),
        "rows_with_problems": dg.MetadataValue.int(bad.height),
        "restatements_opened": dg.MetadataValue.int(len(opened)),
        "folder": dg.MetadataValue.path(str(folder) if folder is not None else "(synthetic source: none)"),
    }
    yield dg.MaterializeResult(asset_key=context.asset_key, metadata=metadata)
    for key in context.partition_keys:
        yield dg.AssetMaterialization(asset_key=context.asset_key, partition=key, metadata=metadata)
    check_metadata = {
        "problems": dg.MetadataValue.md(
            "\n".join(f"- {r['source']} line {r['line']}: {r['problem']}" for r in bad.head(20).iter_rows(named=True))
            or "none"
        ),
        "checks": dg.MetadataValue.md("\n".join(f"- `{c}`: {why}" for c, why in CHECKS.items())),
    }
    yield from check_results(
        context, [DayCheck(GATE_CHECK, key, bad.is_empty(), check_metadata) for key in context.partition_keys]
    )
