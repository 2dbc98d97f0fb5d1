"""Memory the allocators keep after a chunk frees it: returned to the system, so a run's peak is its chunk's.

A backfill computes a chunk (hundreds of MB of polars and numpy buffers, freed when the chunk is written),
then the next one. Both allocators kept what a chunk freed: jemalloc (polars) for its dirty-page decay time
(10 s), glibc (numpy, pandas for Great Expectations) in heap arenas whose mmap threshold had grown to the
chunk's largest buffers. The next chunk's peak then stood on top of the last one's leftovers, and a 30-day
run peaked 1.4x a 5-day run of the same chunks (``benchmarks/range_memory.py``, docs/benchmarks.md).

Called at the import of ``pipelines`` (the CLI, the code location, every run process), before polars
allocates: jemalloc reads its options once, at its first allocation. A setting already in the environment wins.
"""

from __future__ import annotations

import ctypes
import os
import sys

# jemalloc as linked into polars reads ``_RJEM_MALLOC_CONF`` (its prefixed MALLOC_CONF).
JEMALLOC_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"
# glibc mallopt parameters (malloc.h): buffers above 1 MiB are mapped and unmapped on free, and a heap top
# above 1 MiB free is trimmed. Fixed values also stop glibc raising its mmap threshold to the largest
# buffer freed, which put every later chunk's arrays in the heap.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
ONE_MIB = 1 << 20


def return_freed_memory() -> None:
    """Make this process's allocators give back what a chunk freed (idempotent; a no-op off glibc Linux)."""
    os.environ.setdefault("_RJEM_MALLOC_CONF", JEMALLOC_CONF)
    if not sys.platform.startswith("linux"):
        return
    try:
        # The symbols already loaded into this process: glibc's when it is the C library (no library search,
        # which would start ldconfig in every process that loads the code location).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return
    mallopt(M_MMAP_THRESHOLD, ONE_MIB)
    mallopt(M_TRIM_THRESHOLD, ONE_MIB)
