"""Softmax attention for XLA:CPU as an XLA FFI custom call (cpu_attention.cc).

XLA:CPU runs fusions inside while loops on one core, so attention written in jnp either
streams the full logits through memory (unblocked) or uses one core (blocked). The kernel
keeps a row of logits in L1 and spreads (batch x head) groups over XLA's intra-op threads.

The C++ source ships with the package and is compiled on first use with the machine's C++
compiler (about 3 s) into ``$JAXMED_KERNEL_DIR`` (default ``~/.cache/jaxmed/kernels``),
keyed by source, jaxlib version, compiler and CPU, so a shared home directory serves
machines of different kinds. Without a compiler, or with ``JAXMED_CPU_ATTENTION=0``,
jaxmed falls back to its jnp attention (same results within float32 rounding; slower).
Accelerators never use it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
         # Reassociation lets the row sums vectorise; NaN/inf semantics are kept.
         "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-ffp-contract=fast")
_FWD, _BWD = "jaxmed_attention_fwd", "jaxmed_attention_bwd"
_lock = threading.Lock()
_state: dict = {}


def kernel_dir() -> Path:
    if os.environ.get("JAXMED_KERNEL_DIR"):
        return Path(os.environ["JAXMED_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxmed" / "kernels"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def build(cxx: str | None = None) -> Path:
    """Compile the kernel (or find it already compiled) and return the shared library."""
    cxx = cxx or os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if not cxx:
        raise RuntimeError("no C++ compiler on PATH (c++, g++ or clang++): install one "
                           "(e.g. `apt install g++`) or set CXX")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, version,
                                    " ".join(FLAGS), _cpu_id()]).encode()).hexdigest()[:16]
    out = kernel_dir() / f"cpu_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.so")
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n"
                           f"{proc.stderr[-2000:]}")
    os.replace(tmp, out)  # atomic: a concurrent process sees the old state or the whole file
    return out


def available() -> bool:
    """True when the kernel is compiled and registered with XLA:CPU (built on first call)."""
    if os.environ.get("JAXMED_CPU_ATTENTION", "1").lower() in ("0", "off", "false", "xla"):
        return False
    with _lock:
        if "ok" not in _state:
            try:
                lib = ctypes.cdll.LoadLibrary(str(build()))
                for name, sym in ((_FWD, lib.JaxmedAttentionFwd), (_BWD, lib.JaxmedAttentionBwd)):
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(sym), platform="cpu")
                _state["ok"] = True
            except Exception as e:  # any failure means: use the jnp attention instead
                log.warning("CPU attention kernel unavailable, using the slower jnp attention "
                            "(set JAXMED_CPU_ATTENTION=0 to silence): %s", e)
                _state["ok"] = False
    return _state["ok"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(scale q k^T) v for float32 (..., L, D) arrays; call `available()` first."""
    return _fwd(q, k, v, scale)[0]


def _fwd(q, k, v, scale):
    if k.shape[-2] == 0:
        raise ValueError("attention over zero keys")
    kt, vt = jnp.swapaxes(k, -1, -2), jnp.swapaxes(v, -1, -2)
    f32 = jnp.float32
    o, lse = jax.ffi.ffi_call(
        _FWD, (jax.ShapeDtypeStruct(q.shape, f32), jax.ShapeDtypeStruct(q.shape[:-1], f32)),
        vmap_method="broadcast_all")(q, kt, vt, scale=np.float32(scale))
    return o, (q, kt, vt, o, lse)


def _bwd(scale, res, do):
    q, kt, vt, o, lse = res
    f32 = jnp.float32
    dq, dkt, dvt = jax.ffi.ffi_call(
        _BWD, tuple(jax.ShapeDtypeStruct(x.shape, f32) for x in (q, kt, vt)),
        vmap_method="broadcast_all")(q, kt, vt, o, lse, do.astype(f32), scale=np.float32(scale))
    return dq, jnp.swapaxes(dkt, -1, -2), jnp.swapaxes(dvt, -1, -2)


attention.defvjp(_fwd, _bwd)
