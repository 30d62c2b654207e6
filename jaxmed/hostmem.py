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

It pays only where XLA runs the model on the host. With an accelerator the host runs the
input pipeline's many threads (one arena is contention there) and keeps nothing big, and
a host such as Colab's (12 GB) cannot afford to keep its peak heap: the command-line tools
apply it through `keep_freed_memory_on_cpu`, which asks which backend jax will pick
without starting one (a backend started before ``jax.distributed.initialize`` would break a
multi-process run).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import jax
from jax._src import hardware_utils, xla_bridge  # private: jax's probes that start no backend

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


def _accelerator_visible() -> bool:
    """Whether this host shows a TPU or GPU to jax (its own cheap probes: PCI ids and
    device files, no backend started); True when it cannot tell."""
    try:
        return bool(hardware_utils.has_visible_nvidia_gpu()
                    or hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
                    or os.path.exists("/dev/kfd"))  # ROCm
    except Exception:  # noqa: BLE001 - an unknown jax: assume an accelerator, keep malloc
        return True


def cpu_backend_expected() -> bool:
    """Whether jax's default backend is (or will be) the CPU, without starting a backend:
    the started backend if there is one; else the first of ``JAX_PLATFORMS`` (or
    ``jax.config.jax_platforms``) if set; else CPU only when no accelerator is visible."""
    if xla_bridge.backends_are_initialized():
        return jax.default_backend() == "cpu"
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not _accelerator_visible()


def keep_freed_memory_on_cpu() -> bool:
    """`keep_freed_memory` if jax's backend will be the CPU (see above); True if applied."""
    if not cpu_backend_expected():
        log.info("jax's backend is an accelerator: host malloc left as it is")
        return False
    return keep_freed_memory()
