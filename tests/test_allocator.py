"""A pipeline process gives the memory a chunk freed back to the system (pipelines/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FREE_A_CHUNK = """
import sys, time
if sys.argv[1] == "pipeline":
    import pipelines  # noqa: F401  (what every pipeline process imports first)
import numpy as np
import polars as pl

def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

base = rss_mb()
frame = pl.DataFrame({f"c{i}": np.random.default_rng(i).random(1_000_000) for i in range(20)})
derived = frame.with_columns([(pl.col(c) * 2).alias(f"{c}_x2") for c in frame.columns])
held = rss_mb() - base
del frame, derived
time.sleep(0.3)
print(held, rss_mb() - base)
"""


def test_a_pipeline_process_returns_what_a_chunk_freed() -> None:
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    out = subprocess.run(
        [sys.executable, "-c", FREE_A_CHUNK, "pipeline"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    held, left = map(int, out.stdout.split())
    assert held > 250  # 40 columns of a million float64 values: ~320 MB while held
    # jemalloc (polars) and glibc (numpy) both give it back at once, not after jemalloc's 10 s decay.
    assert left < 0.2 * held, (held, left)
