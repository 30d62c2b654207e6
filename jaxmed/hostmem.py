"""Keep freed host memory in the process, so XLA:CPU steps stop page-faulting.

XLA:CPU mallocs each execution's temporaries and outputs and frees them afterwards. glibc
returns blocks above its mmap threshold (and any block too big for a thread's arena) to
the kernel, so the next step faults every page in again, and the OS kernel's time zeroing
and mapping those pages is a sizeable share of a CPU train step (compare bench/bench_train.py
with ``--malloc default``). With one arena, no mmap'd blocks and no trimming, freed blocks
are reused and a steady-state step faults no pages.

The price: the process keeps its peak heap (as tcmalloc or jemalloc would) and all threads
share one malloc arena (XLA allocates few, large blocks). It is process-wide, so jaxmed's
command-line tools apply it and a library user opts in by calling `keep_freed_memory()`
first thing, before jax starts its backend: threads that exist already keep their arenas,
and the call then does nothing useful.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc malloc as described above; True if applied (glibc only, once per process;
    ``JAXMED_HOST_MALLOC=default`` leaves malloc alone)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("JAXMED_HOST_MALLOC", "").lower() in ("default", "0", "off"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _applied = all(mallopt(p, v) == 1 for p, v in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    if not _applied:
        log.warning("mallopt refused a setting: freed host memory may still be returned to "
                    "the kernel (slower CPU steps)")
    return _applied
