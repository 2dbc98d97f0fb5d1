"""Corporate actions delivered as files (``<landing>/corporate_actions/``) or pushed as a frame, read and checked.

Columns ``instrument_id, ex_date, kind, ratio, known_at``: ``kind`` is ``split`` (``ratio`` new shares per old
share: 2 for a 2-for-1 split, 0.1 for a 1-for-10 reverse split) or ``cash_dividend`` (``ratio`` the amount per
share, in price units); ``ex_date`` a session date of the universe's calendar; ``known_at`` an ISO 8601
instant (an offset is converted to UTC, none is taken as UTC), when the action became known.

Every file is read on every run: the folder is small (an action per instrument a few times a year) and a
late file or a correction is then seen whatever days a run covers. Rows are checked one by one
(``check_columns``): a bad row is set aside with its file, line and problem, and holds its instrument (a
jump it would have explained is not served unexplained); the good rows are stored.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from marketfs.corporate_actions import ACTION_KEY, ACTION_SCHEMA, KINDS
from marketfs.sources.base import SourceFileError
from marketfs.sources.landing_file import INSTRUMENT_ID, _parse_ts, _read_raw

SUFFIXES = (".csv", ".parquet")
# The columns a delivered row is checked by (expectations/suites/corporate_actions.json reads them).
CHECKS = {
    "ratio_ok": "ratio is a positive finite number",
    "kind_ok": f"kind is one of {', '.join(KINDS)}",
    "instrument_ok": "instrument_id is 1 to 64 visible characters",
    "ex_date_is_session": "ex_date is a session date (YYYY-MM-DD) of the universe's calendar",
    "known_at_ok": "known_at is an ISO 8601 instant",
    "known_instrument": "the instrument has bars in the store (an action of an unknown instrument is a typo)",
    "no_conflict": "no other row has the same instrument_id, ex_date, kind and known_at with another ratio",
}
DELIVERED_SCHEMA: dict[str, pl.DataType] = {
    **ACTION_SCHEMA,
    "source": pl.String(),
    "line": pl.Int64(),
    **{name: pl.Boolean() for name in CHECKS},
}


def read_folder(root: Path) -> tuple[pl.DataFrame, list[SourceFileError]]:
    """Every row of every file in ``root`` (none when the folder does not exist), parsed, with its source and
    line; and the files that cannot be read at all."""
    frames: list[pl.DataFrame] = []
    errors: list[SourceFileError] = []
    if not root.is_dir():
        return nothing_delivered(), errors
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()):
        try:
            raw = _read_raw(path)
        except SourceFileError as exc:
            errors.append(exc)
            continue
        missing = [c for c in ACTION_SCHEMA if c not in raw.columns]
        if missing:
            errors.append(
                SourceFileError(
                    path, f"missing column(s) {', '.join(missing)}", f"the file needs {', '.join(ACTION_SCHEMA)}"
                )
            )
            continue
        first_line = 2 if path.suffix.lower() == ".csv" else 1
        frames.append(parse(raw, str(path), first_line))
    if not frames:
        return nothing_delivered(), errors
    return pl.concat(frames), errors


def nothing_delivered() -> pl.DataFrame:
    """No row, with every column a delivery has (a synthetic source, an absent folder)."""
    return parse(pl.DataFrame(schema={c: pl.String() for c in ACTION_SCHEMA}), "none")


def parse(raw: pl.DataFrame, source: str, first_line: int = 1) -> pl.DataFrame:
    """``raw`` (the five columns, any types) as ``ACTION_SCHEMA`` plus source, line and the checks that need no
    store; a value that cannot be read is null, and its check false."""
    from marketfs.universe import active_sessions

    text = raw.select([pl.col(c).cast(pl.String).str.strip_chars().alias(c) for c in ACTION_SCHEMA])
    ex_date = text["ex_date"].str.to_date("%Y-%m-%d", strict=False)
    ratio = text["ratio"].cast(pl.Float64, strict=False)
    known_at = _parse_ts(raw["known_at"]) if raw.height else pl.Series("known_at", [], pl.Datetime("us", "UTC"))
    sessions = active_sessions().days
    parsed = pl.DataFrame(
        {
            "instrument_id": text["instrument_id"],
            "ex_date": ex_date,
            "kind": text["kind"].str.to_lowercase(),
            "ratio": ratio,
            "known_at": known_at,
        },
        schema=ACTION_SCHEMA,
    ).with_columns(
        pl.lit(source).alias("source"),
        (pl.int_range(pl.len()) + first_line).cast(pl.Int64).alias("line"),
    )
    return parsed.with_columns(
        (pl.col("ratio").is_finite() & (pl.col("ratio") > 0)).fill_null(False).alias("ratio_ok"),
        pl.col("kind").is_in(list(KINDS)).fill_null(False).alias("kind_ok"),
        pl.col("instrument_id").str.contains(INSTRUMENT_ID).fill_null(False).alias("instrument_ok"),
        pl.col("ex_date").is_in(sessions.implode()).fill_null(False).alias("ex_date_is_session"),
        pl.col("known_at").is_not_null().alias("known_at_ok"),
    )


def check_store(delivered: pl.DataFrame, known_instruments: set[str]) -> pl.DataFrame:
    """The checks that need the store or every row: a known instrument, no conflicting duplicate. Identical
    rows (a file delivered twice) are one row."""
    rows = delivered.unique(subset=list(ACTION_SCHEMA), keep="first", maintain_order=True)
    ratios = pl.col("ratio").n_unique().over(list(ACTION_KEY))
    return rows.with_columns(
        pl.col("instrument_id").is_in(sorted(known_instruments)).fill_null(False).alias("known_instrument"),
        (ratios == 1).alias("no_conflict"),
    ).select(list(DELIVERED_SCHEMA))


def good(checked: pl.DataFrame) -> pl.Expr:
    return pl.all_horizontal([pl.col(c) for c in CHECKS])


def problems(checked: pl.DataFrame) -> pl.DataFrame:
    """The rows that fail a check, each with its problems in words."""
    bad = checked.filter(~good(checked))
    words = pl.concat_list([pl.when(~pl.col(c)).then(pl.lit(why)) for c, why in CHECKS.items()]).list.drop_nulls()
    return bad.with_columns(words.list.join("; ").alias("problem"))


def describe(row: dict) -> str:
    """One bad row as a person finds it: file, line, the values, what is wrong."""
    values = ",".join(str(row[c]) if row[c] is not None else "" for c in ACTION_SCHEMA)
    return f"{row['source']}, line {row['line']}: {values}: not {row['problem']}"
