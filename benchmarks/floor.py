"""The floor for end-to-end timings: a Dagster job with one partitioned asset that does nothing."""

import dagster as dg

from assets.partitions import DAILY


@dg.asset(partitions_def=DAILY)
def nothing() -> None:
    return None


empty_job = dg.define_asset_job("empty", selection=[nothing], executor_def=dg.in_process_executor)

defs = dg.Definitions(assets=[nothing], jobs=[empty_job])
