"""jaxmed.hostmem: with freed host memory kept, repeated XLA:CPU executions stop faulting
their buffers in again; the opt-out leaves malloc alone."""

import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import resource, sys
from jaxmed.hostmem import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.cos(jnp.sin(x) @ x) @ x))  # 64 MB temporaries
x = jnp.ones((4096, 4096))
for _ in range(2):
    f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5)
"""


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_kept_memory_stops_page_faults_per_execution():
    applied, kept = _faults("keep")
    _, default = _faults("default")
    # The temporaries (64 MB each) are faulted in on every call by default (glibc unmaps
    # freed blocks that large), reused when kept (the medium UNet's train step: 123k
    # faults per step by default, 0 kept).
    assert applied
    assert default > 15000, default
    assert kept < default / 10, (kept, default)


def test_opt_out(monkeypatch):
    from jaxmed import hostmem

    monkeypatch.setattr(hostmem, "_applied", None)
    monkeypatch.setenv("JAXMED_HOST_MALLOC", "default")
    assert hostmem.keep_freed_memory() is False


_BACKEND_SCRIPT = r"""
import jax
from jax._src import xla_bridge
from jaxmed import hostmem

seen = {}
for platforms in ("cpu", "cpu,tpu", "tpu", "cuda,cpu"):
    jax.config.update("jax_platforms", platforms)
    seen[platforms] = hostmem.cpu_backend_expected()
jax.config.update("jax_platforms", None)
for visible in (True, False):  # JAX_PLATFORMS unset: jax would pick a visible accelerator
    hostmem._accelerator_visible = lambda: visible
    seen[f"unset, accelerator {visible}"] = hostmem.cpu_backend_expected()
jax.config.update("jax_platforms", "tpu")
tpu = hostmem.keep_freed_memory_on_cpu(), hostmem._applied
assert not xla_bridge.backends_are_initialized(), "a backend was started"
jax.config.update("jax_platforms", "cpu")
cpu = hostmem.keep_freed_memory_on_cpu()
jax.devices()
print(seen, tpu, cpu, hostmem.cpu_backend_expected())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_applied_on_the_cpu_backend_only_and_without_starting_a_backend():
    out = subprocess.run([sys.executable, "-c", _BACKEND_SCRIPT], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    # On the TPU backend keep_freed_memory is never called (_applied stays None); the last
    # word is the started CPU backend's own answer.
    assert out.stdout.strip() == (
        "{'cpu': True, 'cpu,tpu': True, 'tpu': False, 'cuda,cpu': False, "
        "'unset, accelerator True': False, 'unset, accelerator False': True} "
        "(False, None) True True"), out.stdout
