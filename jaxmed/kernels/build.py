"""jaxmed's XLA:CPU kernels in C++ (XLA FFI custom calls), compiled on first use.

The C++ sources ship with the package and are compiled with the machine's C++ compiler
(a few seconds each) into ``$JAXMED_KERNEL_DIR`` (default ``~/.cache/jaxmed/kernels``),
keyed by source, jaxlib version, compiler and CPU, so a shared home directory serves
machines of different kinds. Without a compiler, after a failed build, or when switched off
by its environment variable, a kernel reports itself unavailable (one warning) and its
caller uses the jnp/XLA path instead.

`kernels.dispatch` places a kernel only in the branch a computation takes when lowered for
CPU, so nothing lowered for an accelerator calls one, whatever the host. A process whose
default backend is an accelerator does not build them either: it rarely lowers for CPU, and
then takes the jnp paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import jax
import jaxlib

from jaxmed.files import atomic_path

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
HEADERS = (HERE / "cpu_parallel.h", HERE / "cpu_gemm.h")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
         # Reassociation lets reductions vectorise; NaN/inf semantics are kept.
         "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-ffp-contract=fast")
_OFF = ("0", "off", "false", "xla")


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


class Kernel:
    """One C++ source whose FFI handler symbols are registered as XLA:CPU targets.

    ``targets`` maps the XLA target name to the exported symbol; ``switch`` is the
    environment variable that turns the kernel off (0/off/false/xla); ``fallback`` names
    what runs instead, for the warning.
    """

    def __init__(self, source: str, targets: dict[str, str], switch: str, fallback: str):
        self.source = HERE / source
        self.targets = targets
        self.switch = switch
        self.fallback = fallback
        self._lock = threading.Lock()
        self._ok: bool | None = None

    def build(self, cxx: str | None = None) -> Path:
        """Compile the source (or find it already compiled) and return the shared library."""
        cxx = cxx or os.environ.get("CXX") or next(
            (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
        if not cxx:
            raise RuntimeError("no C++ compiler on PATH (c++, g++ or clang++): install one "
                               "(e.g. `apt install g++`) or set CXX")
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        texts = [p.read_text() for p in (self.source, *HEADERS)]
        key = hashlib.sha256("\0".join([*texts, jaxlib.__version__, version, " ".join(FLAGS),
                                        _cpu_id()]).encode()).hexdigest()[:16]
        out = kernel_dir() / f"{self.source.stem}-{key}.so"
        if out.exists():
            return out
        # Atomic: a concurrent process sees no library or the whole of it.
        with atomic_path(str(out)) as tmp:
            cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), "-I", str(HERE), str(self.source),
                   "-o", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"compiling {self.source.name} failed ({' '.join(cmd)}):\n"
                                   f"{proc.stderr[-2000:]}")
        return out

    def available(self) -> bool:
        """True when compiled and registered with XLA:CPU (built on the first call); False
        when switched off, or in a process whose default backend is not CPU."""
        if os.environ.get(self.switch, "1").lower() in _OFF or jax.default_backend() != "cpu":
            return False
        with self._lock:
            if self._ok is None:
                try:
                    lib = ctypes.cdll.LoadLibrary(str(self.build()))
                    for target, symbol in self.targets.items():
                        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                                    platform="cpu")
                    self._ok = True
                except Exception as e:  # any failure means: use the fallback instead
                    log.warning("%s unavailable, using %s (set %s=0 to silence): %s",
                                self.source.name, self.fallback, self.switch, e)
                    self._ok = False
        return self._ok


def prebuild(kernels: list[Kernel] | tuple[Kernel, ...]) -> list[threading.Thread]:
    """Build (and register) ``kernels`` in background threads, one each, and return them.

    A cold first run otherwise compiles each kernel with the C++ compiler when a model is
    first traced, one after another on the main thread while the other cores wait; started
    early (a command line's first step), the builds overlap the work before that tracing.
    Each kernel's lock makes a later `available()` wait for its build, not repeat it.
    A process whose default backend is not CPU builds nothing. The backend is started here,
    on the calling thread, as it would be without this (not first inside a build thread)."""
    if jax.default_backend() != "cpu":
        return []
    threads = [threading.Thread(target=k.available, name=f"build {k.source.name}",
                                daemon=True) for k in kernels]
    for t in threads:
        t.start()
    return threads
