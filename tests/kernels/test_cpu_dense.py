"""The C++ dense-layer weight gradient (jaxmed/kernels/cpu_dense.cc) against float64
numpy: odd shapes, several token blocks, partial panels, reproducibility, the
kernels.dispatch.matmul dispatch and gradients, dead-code elimination for frozen weights,
bad shapes, the fallback when no compiler is found, and a data-sharded batch on 8
simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.kernels import cpu_dense, dispatch
from tests.helpers import kernel_without_compiler, run_on_8_cpu_devices

pytestmark = pytest.mark.skipif(not cpu_dense.available(),
                                reason="no C++ compiler: the kernel cannot be built here")


def _data(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k)).astype(np.float32),
            rng.standard_normal((m, n)).astype(np.float32))


# (M, K, N): a single row, K not a multiple of the 6-row micro-kernel, several 256-row
# blocks of M, N with a half-width last panel (144 = 128 + 16), the UNet's shapes.
@pytest.mark.parametrize("shape", [(1, 16, 16), (7, 5, 48), (300, 130, 64), (513, 64, 144),
                                   (1024, 128, 128), (256, 256, 1024)])
def test_weight_gradient_matches_float64(shape):
    x, dy = _data(*shape)
    got = np.asarray(jax.jit(cpu_dense.wgrad)(jnp.asarray(x), jnp.asarray(dy)))
    want = x.astype(np.float64).T @ dy.astype(np.float64)
    assert got.shape == want.shape and got.dtype == np.float32
    # float32 sums over M products: measured <= 2e-6 of the largest entry
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= 1e-5, f"{shape}: relative error {err:.2e}"


def test_reproducible():
    x, dy = (jnp.asarray(a) for a in _data(1024, 192, 64))
    f = jax.jit(cpu_dense.wgrad)
    np.testing.assert_array_equal(f(x, dy), f(x, dy))


def _loss(mm, ct):
    return lambda x, w: jnp.sum(mm(x, w) * ct)


def test_matmul_gradients_and_dispatch():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 37, 48)), jnp.float32)  # (B, L, K)
    w = jnp.asarray(rng.standard_normal((48, 80)) / 7, jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 37, 80)), jnp.float32)
    grad = jax.jit(jax.value_and_grad(_loss(dispatch.matmul, ct), argnums=(0, 1)))
    assert "jaxmed_dense_wgrad" in grad.lower(x, w).as_text()
    (v, (dx, dw)), (v0, (dx0, dw0)) = grad(x, w), jax.value_and_grad(
        _loss(jnp.dot, ct), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(v, v0, rtol=1e-6)
    np.testing.assert_allclose(dx, dx0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(dw, dw0, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(dw0))))
    # A frozen weight (LoRA's base layers): the kernel is not run at all.
    dx_only = jax.jit(jax.grad(_loss(dispatch.matmul, ct))).lower(x, w).compile().as_text()
    assert "jaxmed_dense_wgrad" not in dx_only
    # Not: N not a multiple of 16, bfloat16.
    w8 = w[:, :8]
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(dispatch.matmul(x, w)), argnums=1))
    assert "jaxmed_dense_wgrad" not in f.lower(x, w8).as_text()
    assert "jaxmed_dense_wgrad" not in f.lower(x.astype(jnp.bfloat16),
                                               w.astype(jnp.bfloat16)).as_text()


def test_bad_shapes_are_rejected():
    x, dy = jnp.ones((4, 16), jnp.float32), jnp.ones((4, 8), jnp.float32)
    with pytest.raises(Exception, match="multiple of 16"):
        jax.block_until_ready(jax.jit(cpu_dense.wgrad)(x, dy))
    with pytest.raises(Exception, match=r"x must be \(M, K\) and dy \(M, N\)"):
        jax.block_until_ready(jax.jit(cpu_dense.wgrad)(x, jnp.ones((5, 16), jnp.float32)))


def test_fallback_without_compiler(monkeypatch, tmp_path, caplog):
    log = kernel_without_compiler(cpu_dense.KERNEL, monkeypatch, tmp_path, caplog)
    assert "XLA's dot" in log
    x, w = jnp.ones((8, 16), jnp.float32), jnp.ones((16, 32), jnp.float32)
    hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(dispatch.matmul(x, w)), argnums=1)).lower(
        x, w).as_text()
    assert "jaxmed_dense_wgrad" not in hlo


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("JAXMED_CPU_DENSE", "0")
    assert not cpu_dense.available()


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxmed.kernels import cpu_dense, dispatch
assert jax.device_count() == 8 and cpu_dense.available()
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((8, 40, 32)), jnp.float32)
w = jnp.asarray(rng.standard_normal((32, 48)) * 0.1, jnp.float32)
ct = jnp.asarray(rng.standard_normal((8, 40, 48)), jnp.float32)
f = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(dispatch.matmul(x, w) * ct), argnums=(0, 1)))
assert "jaxmed_dense_wgrad" in f.lower(x, w).as_text()
single = f(x, w)
mesh = Mesh(np.array(jax.devices()), ("data",))
sharded = f(jax.device_put(x, NamedSharding(mesh, P("data"))), w)
for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):  # loss, dx, dw
    a, b = np.asarray(a), np.asarray(b)
    err = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))  # the loss sums 15360 terms
    assert err <= 1e-5, err
print("OK")
"""


def test_data_sharded_batch_equals_single_device():
    run_on_8_cpu_devices(_SHARDED)
