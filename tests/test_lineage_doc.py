"""The README's lineage picture is what the code location's definitions give: `make docs` writes it, and a
committed picture that lags behind the assets fails here."""

from __future__ import annotations

from pipelines.definitions import defs
from pipelines.lineage import README_PATH, committed_block, lineage_block


def test_readme_lineage_is_what_the_definitions_give() -> None:
    committed = committed_block(README_PATH.read_text())
    assert committed == lineage_block(defs), (
        "README.md's lineage picture differs from the asset graph: run `make docs` "
        "(python -m pipelines.lineage --write) and commit README.md"
    )


def test_readme_lineage_names_every_asset() -> None:
    committed = committed_block(README_PATH.read_text())
    missing = [
        key.to_user_string()
        for key in defs.resolve_asset_graph().get_all_asset_keys()
        if f'"{key.to_user_string()}' not in committed
    ]
    assert not missing, f"README.md's lineage picture lacks {missing}: run `make docs` and commit README.md"
