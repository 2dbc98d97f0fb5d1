"""Snapshots: reproducible byte for byte after the live table changes; listed, described, deleted with a log."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from dagster_helpers import materialize_range, resources

from marketfs import snapshots
from marketfs.snapshots import SnapshotError, content_hash, read_snapshot

START, END = datetime(2024, 1, 2, tzinfo=UTC), datetime(2024, 1, 5, tzinfo=UTC)


def test_snapshot_reads_back_identically_after_the_live_table_is_recomputed(dsn: str, engine: sa.Engine) -> None:
    assert materialize_range(dsn, "2024-01-02", "2024-01-04").success
    import dagster as dg

    from assets.snapshots import feature_snapshots

    result = dg.materialize(
        [feature_snapshots],
        resources=resources(dsn),
        run_config={"ops": {"feature_snapshots": {"config": {"start": "2024-01-02", "end": "2024-01-05"}}}},
    )
    [materialization] = result.asset_materializations_for_node("feature_snapshots")
    snapshot_id = materialization.metadata["snapshot_id"].value
    with engine.connect() as conn:
        manifest = snapshots.describe_snapshot(conn, snapshot_id)
        before = read_snapshot(conn, snapshot_id)
    assert manifest["content_hash"] == f"sha256:{content_hash(before)}"
    assert manifest["row_count"] == before.height > 2000
    assert set(manifest["upstream_partitions"]) == {"2024-01-02", "2024-01-03", "2024-01-04"}
    assert manifest["feature_definitions"]["rsi_14"]["lookback"] == 15
    assert "feature_vectors_fs_v1_1m" in manifest["suite_versions"]
    assert set(manifest["dagster_upstream"]) == {"feature_vectors_fs_v1_1m"}  # the test instance keeps no history

    # The live table changes under the snapshot: a recomputation and a direct edit.
    assert materialize_range(dsn, "2024-01-02", "2024-01-04", instruments=2).success
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE feature_vectors SET ret_1 = 0.123 WHERE timeframe = '1m'"))
    with engine.connect() as conn:
        after = read_snapshot(conn, snapshot_id)
    assert after.equals(before)
    assert content_hash(after) == content_hash(before)


def test_snapshot_rows_cannot_be_updated(dsn: str, engine: sa.Engine) -> None:
    assert materialize_range(dsn, "2024-01-03").success
    with engine.begin() as conn:
        snap = snapshots.create_snapshot(conn, feature_set_version="fs_v1", timeframe="1m", start=START, end=END)
    with pytest.raises(sa.exc.DBAPIError, match="immutable"), engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE feature_snapshot_rows SET ret_1 = 1 WHERE snapshot_id = :s"), {"s": snap.snapshot_id}
        )


def test_same_content_gives_the_same_snapshot_and_instruments_filter(dsn: str, engine: sa.Engine) -> None:
    assert materialize_range(dsn, "2024-01-03").success
    with engine.begin() as conn:
        a = snapshots.create_snapshot(conn, feature_set_version="fs_v1", timeframe="1m", start=START, end=END)
        b = snapshots.create_snapshot(conn, feature_set_version="fs_v1", timeframe="1m", start=START, end=END)
        one = snapshots.create_snapshot(
            conn, feature_set_version="fs_v1", timeframe="1m", start=START, end=END, instruments=["SYN001"]
        )
    assert a.snapshot_id == b.snapshot_id
    assert one.snapshot_id != a.snapshot_id and one.manifest["instruments"] == ["SYN001"]
    with engine.connect() as conn:
        assert [s["snapshot_id"] for s in snapshots.list_snapshots(conn)] == [a.snapshot_id, one.snapshot_id]


def test_delete_is_explicit_and_logged(dsn: str, engine: sa.Engine) -> None:
    assert materialize_range(dsn, "2024-01-03").success
    with engine.begin() as conn:
        snap = snapshots.create_snapshot(conn, feature_set_version="fs_v1", timeframe="1m", start=START, end=END)
    with pytest.raises(SnapshotError, match="who deletes"), engine.begin() as conn:
        snapshots.delete_snapshot(conn, snap.snapshot_id, actor="", note="")
    with engine.begin() as conn:
        snapshots.delete_snapshot(conn, snap.snapshot_id, actor="dana", note="superseded by fs_v2")
    with engine.connect() as conn:
        with pytest.raises(SnapshotError, match="unknown snapshot"):
            snapshots.describe_snapshot(conn, snap.snapshot_id)
        assert conn.execute(sa.text("SELECT count(*) FROM feature_snapshot_rows")).scalar() == 0
        log = conn.execute(sa.text("SELECT action, actor, manifest->>'row_count' FROM snapshot_log ORDER BY id")).all()
    assert log[-1] == ("delete", "dana", str(snap.row_count))


def test_empty_selection_is_a_clear_error(dsn: str, engine: sa.Engine) -> None:
    with pytest.raises(SnapshotError, match="materialise the feature partitions first"), engine.begin() as conn:
        snapshots.create_snapshot(conn, feature_set_version="fs_v1", timeframe="1m", start=START, end=END)
