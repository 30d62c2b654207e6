"""The C++ Winograd 3x3 convolution (jaxmed/kernels/cpu_conv.cc) against lax.conv: outputs,
input and weight gradients, odd sizes, both schedules, batch-split invariance, the
layers.Conv dispatch, bad shapes, the fallback when no compiler is found, and a
data-sharded batch on 8 simulated devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxmed.kernels import cpu_conv
from jaxmed.models import layers
from tests.helpers import kernel_without_compiler, run_on_8_cpu_devices

pytestmark = pytest.mark.skipif(not cpu_conv.available(),
                                reason="no C++ compiler: the kernel cannot be built here")


def _xla(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _data(n, h, w, cin, cout, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((n, h, w, cout)), jnp.float32)
    return x, k, ct


def _grads(conv, x, k, ct):
    return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(conv(x, k) * ct), argnums=(0, 1)))(x, k)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# (N, H, W, Ci, Co): odd heights and widths (partial tiles), a single pixel, channels that
# are not a multiple of the 32-wide register block, the medium UNet's shapes, enough tiles
# for several weight-gradient chunks.
SHAPES = [(2, 7, 9, 16, 48), (1, 1, 1, 32, 16), (3, 5, 4, 48, 32), (4, 16, 16, 64, 128),
          (2, 32, 32, 32, 32), (1, 8, 8, 256, 128)]


@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_and_gradients_match_lax_conv(shape):
    x, k, ct = _data(*shape)
    y = jax.jit(cpu_conv.conv3x3)(x, k)
    want = _xla(x, k)
    assert y.shape == want.shape and y.dtype == jnp.float32
    # Winograd F(2x2, 3x3) rounds differently from a direct convolution: float32 rounding
    # of sums over 9 * Ci terms, measured <= 2.5e-6 relative on the UNet's shapes.
    assert _rel(y, want) <= 1e-5
    (_, got), (_, ref) = _grads(cpu_conv.conv3x3, x, k, ct), _grads(_xla, x, k, ct)
    for name, a, b in zip(("dx", "dw"), got, ref):
        assert _rel(a, b) <= 1e-5, f"{name} {shape}: relative error {_rel(a, b):.2e}"


def test_fused_and_staged_schedules_are_bitwise_equal(monkeypatch):
    x, k, ct = _data(2, 9, 6, 32, 64)
    fused = _grads(cpu_conv.conv3x3, x, k, ct)
    monkeypatch.setattr(cpu_conv, "STAGED_CHANNELS", 0)
    f = jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(cpu_conv.conv3x3(x, k) * ct),
                                   argnums=(0, 1)))
    assert "tensor<16x30x96xf32>" in f.lower(x, k).as_text()  # the staged work buffer
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(f(x, k))):
        np.testing.assert_array_equal(a, b)


def test_filter_transformed_inside_the_conv_is_bitwise_equal(monkeypatch):
    """Small maps with wide filters transform the filter inside the product pass
    (ConvFilterImpl, forward and input gradient): same arithmetic, same bits."""
    x, k, ct = _data(2, 7, 5, 144, 160)  # odd sizes, 304 channels in + out, 2.5 panels
    f = jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(cpu_conv.conv3x3(x, k) * ct),
                                   argnums=(0, 1)))
    hlo = f.lower(x, k).as_text()
    assert hlo.count("jaxmed_winograd_conv_filter") == 2 and "jaxmed_winograd_filter" not in hlo
    inside = f(x, k)
    monkeypatch.setattr(cpu_conv, "_filter_inside", lambda *a: False)
    separate = _grads(cpu_conv.conv3x3, x, k, ct)
    for a, b in zip(jax.tree.leaves(inside), jax.tree.leaves(separate)):
        np.testing.assert_array_equal(a, b)
    (_, (dx, dw)), (_, ref) = inside, _grads(_xla, x, k, ct)
    assert _rel(dx, ref[0]) <= 1e-5 and _rel(dw, ref[1]) <= 1e-5


def test_example_does_not_depend_on_its_batch():
    """An image must come out bit for bit the same however a batch is split (sampling on
    any number of devices): every output element is summed in the same order."""
    x, k, _ = _data(5, 12, 10, 32, 48)
    f = jax.jit(cpu_conv.conv3x3)
    whole = f(x, k)
    for part in (slice(0, 1), slice(1, 4)):
        np.testing.assert_array_equal(f(x[part], k), whole[part])


def test_weight_gradient_is_reproducible():
    x, k, ct = _data(4, 32, 32, 32, 32)  # 1024 tiles: 4 chunks summed across threads
    a, b = _grads(cpu_conv.conv3x3, x, k, ct), _grads(cpu_conv.conv3x3, x, k, ct)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("h,cin,cout,want", [
    (32, 64, 64, True), (32, 640, 640, True), (32, 1280, 640, False), (16, 128, 128, True),
    (16, 640, 640, False), (8, 256, 256, True), (8, 64, 64, False), (4, 256, 256, False),
    (64, 4, 64, False), (32, 64, 4, False), (64, 1280, 1280, True)])
def test_dispatch_rule(h, cin, cout, want):
    assert cpu_conv.wins(h, h, cin, cout) is want


def _conv_hlo(x, **kw):
    m = layers.Conv(features=kw.pop("features", 32), **kw)
    p = m.init(jax.random.PRNGKey(0), x)
    return jax.jit(m.apply).lower(p, x).as_text(), m, p


def test_layers_conv_uses_the_kernel_where_it_wins():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 32)), jnp.float32)
    hlo, m, p = _conv_hlo(x)
    assert "jaxmed_winograd_conv" in hlo
    prm = nn.unbox(p)["params"]
    want = _xla(x, prm["kernel"]) + prm["bias"]
    np.testing.assert_allclose(m.apply(p, x), want, rtol=0, atol=1e-5)
    # Not: strided, a 4x4 map, 3 input channels, bf16.
    assert "winograd" not in _conv_hlo(x, strides=2)[0]
    assert "winograd" not in _conv_hlo(x[:, :4, :4])[0]
    assert "winograd" not in _conv_hlo(x[..., :3])[0]
    assert "winograd" not in _conv_hlo(x, dtype=jnp.bfloat16)[0]


def test_bad_shapes_are_rejected():
    x = jnp.ones((1, 4, 4, 16), jnp.float32)
    u = jnp.ones((16, 16, 8), jnp.float32)  # 8 output channels: not a multiple of 16
    with pytest.raises(Exception, match="multiple of 16"):
        jax.block_until_ready(jax.jit(cpu_conv._conv)(x, u))
    with pytest.raises(Exception, match=r"u must be \(16, Ci, Co\)"):
        jax.block_until_ready(jax.jit(cpu_conv._conv)(x, jnp.ones((16, 32, 16), jnp.float32)))
    with pytest.raises(Exception, match=r"w must be \(3, 3, Ci, Co\) with x's Ci"):
        f = jax.jit(lambda x, w: cpu_conv._conv_filter(x, w, False))
        jax.block_until_ready(f(x, jnp.ones((3, 3, 32, 16), jnp.float32)))


def test_fallback_without_compiler(monkeypatch, tmp_path, caplog):
    log = kernel_without_compiler(cpu_conv.KERNEL, monkeypatch, tmp_path, caplog)
    assert "XLA's convolution" in log
    x = jnp.ones((2, 16, 16, 32), jnp.float32)
    assert "winograd" not in _conv_hlo(x)[0]


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("JAXMED_CPU_CONV", "0")
    assert not cpu_conv.available()


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxmed.kernels import cpu_conv
assert jax.device_count() == 8 and cpu_conv.available()
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((8, 16, 16, 32)), jnp.float32)
k = jnp.asarray(rng.standard_normal((3, 3, 32, 48)) * 0.05, jnp.float32)
ct = jnp.asarray(rng.standard_normal((8, 16, 16, 48)), jnp.float32)
f = jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(cpu_conv.conv3x3(x, k) * ct), argnums=(0, 1)))
single = f(x, k)
mesh = Mesh(np.array(jax.devices()), ("data",))
sharded = f(jax.device_put(x, NamedSharding(mesh, P("data"))), k)
for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    assert err <= 1e-5, err
print("OK")
"""


def test_data_sharded_batch_equals_single_device():
    run_on_8_cpu_devices(_SHARDED)
