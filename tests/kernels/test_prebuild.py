"""kernels.build.prebuild: a kernel built in a background thread is built once, and a caller
that needs it meanwhile waits for that build instead of starting its own."""

import ctypes.util
import threading
import time

import pytest

from jaxmed.kernels import build, dispatch


def test_prebuild_builds_once_in_the_background(monkeypatch):
    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no C library to stand in for a built kernel")
    k = build.Kernel("cpu_adamw.cc", {}, switch="JAXMED_TEST_PREBUILD", fallback="none")
    calls = []
    started = threading.Event()

    def slow_build(cxx=None):
        calls.append(threading.current_thread().name)
        started.set()
        time.sleep(0.3)
        return libc

    monkeypatch.setattr(k, "build", slow_build)
    threads = build.prebuild([k])
    assert started.wait(30)
    assert k.available()  # waits for the background build (the kernel's lock)
    for t in threads:
        t.join()
    assert k.available()
    assert calls == ["build cpu_adamw.cc"]


def test_prebuild_cpu_kernels_covers_every_cpu_kernel(monkeypatch):
    seen = []
    monkeypatch.setattr(build, "prebuild", lambda ks: seen.extend(k.source.name for k in ks))
    dispatch.prebuild_cpu_kernels()
    assert sorted(seen) == ["cpu_adamw.cc", "cpu_attention.cc", "cpu_conv.cc", "cpu_dense.cc"]
