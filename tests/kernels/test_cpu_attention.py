"""The C++ CPU attention kernel (jaxmed/kernels/cpu_attention.cc) against jnp softmax attention:
outputs and gradients, odd sizes, vmap, dtypes, the layers.attention dispatch, the fallback
when no compiler is found, and a data-sharded batch on 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.kernels import cpu_attention, dispatch
from jaxmed.models import layers
from tests.helpers import kernel_without_compiler, run_on_8_cpu_devices

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason="no C++ compiler: the kernel cannot be built here")


def _ref(q, k, v, scale):
    s = jnp.einsum("...qd,...kd->...qk", q, k) * scale
    return jnp.einsum("...qk,...kd->...qd", jax.nn.softmax(s, axis=-1), v)


def _data(lead, lq, lk, d, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(rng.standard_normal((*lead, n, d)) * s, jnp.float32)
                  for n, s in ((lq, 2.0), (lk, 2.0), (lk, 1.0), (lq, 1.0)))
    return q, k, v, w


# (leading dims, Lq, Lk, D): rows not a multiple of the 32-row tasks, keys not a multiple of
# the 16-lane max, a single key, SD's head sizes, the tiny UNet's 32x32 self-attention.
SHAPES = [((3,), 17, 5, 4), ((2, 3), 33, 77, 40), ((1,), 1, 1, 8), ((2,), 70, 19, 160),
          ((8,), 1024, 1024, 4)]


@pytest.mark.parametrize("lead,lq,lk,d", SHAPES)
def test_outputs_and_gradients_match_jnp(lead, lq, lk, d):
    q, k, v, w = _data(lead, lq, lk, d)
    scale = d**-0.5

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v, scale) * w),
                                          argnums=(0, 1, 2)))

    out = jax.jit(cpu_attention.attention, static_argnums=3)(q, k, v, scale)
    want = _ref(q, k, v, scale)
    assert out.shape == want.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    (_, got), (_, ref) = loss(cpu_attention.attention)(q, k, v), loss(_ref)(q, k, v)
    for name, a, b in zip("qkv", got, ref):
        # Sums over up to 1024 rows in another order: relative to the gradient's scale (a
        # single key's dq is exactly 0, hence the floor of 1).
        err = float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1.0))
        assert err <= 1e-5, f"d{name} {lead, lq, lk, d}: relative error {err:.2e}"


def test_vmap_matches_batched_call():
    q, k, v, _ = _data((2, 3), 40, 24, 8)
    batched = cpu_attention.attention(q, k, v, 0.3)
    mapped = jax.vmap(lambda a, b, c: cpu_attention.attention(a, b, c, 0.3))(q, k, v)
    np.testing.assert_array_equal(mapped, batched)
    # A key/value pair shared across the mapped axis (vmap broadcasts it).
    shared = jax.vmap(lambda a: cpu_attention.attention(a, k[0], v[0], 0.3))(q)
    np.testing.assert_allclose(shared, _ref(q, k[0][None], v[0][None], 0.3), atol=1e-5)


def test_deterministic_run_to_run():
    q, k, v, w = _data((4,), 300, 300, 8)
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(cpu_attention.attention(q, k, v, 0.5) * w),
                         argnums=(0, 1, 2)))
    for a, b in zip(f(q, k, v), f(q, k, v)):
        np.testing.assert_array_equal(a, b)


def _mha(q, k, v, heads):
    """Plain multi-head attention on (B, L, C), the reference for layers.attention."""
    b, lq, c = q.shape
    d = c // heads

    def split(x):
        return x.reshape(b, x.shape[1], heads, d).transpose(0, 2, 1, 3).astype(jnp.float32)

    o = _ref(split(q), split(k), split(v), d**-0.5)
    return o.transpose(0, 2, 1, 3).reshape(b, lq, c)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_layers_attention_uses_kernel_above_threshold(dtype, tol):
    b, heads, lq, lk, c = 2, 4, 400, 400, 32  # 640K logits per example, d=8
    assert heads * lq * lk > dispatch.KERNEL_ELEMS
    q, k, v, _ = _data((b,), lq, lk, c)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    hlo = jax.jit(layers.attention, static_argnums=3).lower(q, k, v, heads).as_text()
    assert "jaxmed_attention_fwd" in hlo
    out = layers.attention(q, k, v, heads)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), _mha(q, k, v, heads), atol=tol)


@pytest.mark.parametrize("b,heads,lq,lk,c,kernel", [
    (2, 8, 1024, 77, 320, False),  # SD 1.5 cross-attention (d=40, 77 keys): XLA's matmuls
    (2, 8, 128, 128, 320, False),  # wide heads, 131K logits per example: XLA's softmax
    (2, 8, 256, 256, 320, True),   # wide heads, 256 keys, 524K logits per example
    (4, 8, 256, 77, 32, True),     # d=4 above 64K logits per example: the kernel
    (1, 8, 256, 77, 32, True),     # the same on a batch of 1 (never decided on the batch)
    (4, 2, 64, 64, 8, False),      # small: XLA
])
def test_dispatch_rule(b, heads, lq, lk, c, kernel):
    q = jnp.zeros((b, lq, c), jnp.float32)
    k = jnp.zeros((b, lk, c), jnp.float32)
    hlo = jax.jit(layers.attention, static_argnums=3).lower(q, k, k, heads).as_text()
    assert ("jaxmed_attention_fwd" in hlo) == kernel


def test_batch_split_is_bitwise_invariant():
    """An example's output does not depend on what else is in its batch (synthesis promises
    the same image on any number of devices): same kernel choice, rows independent."""
    q, _, _, _ = _data((), 16 * 256, 1, 32)
    k, _, _, _ = _data((), 16 * 77, 1, 32, seed=1)
    q, k = q.reshape(16, 256, 32), k.reshape(16, 77, 32)
    f = jax.jit(layers.attention, static_argnums=3)
    assert "jaxmed_attention_fwd" in f.lower(q[:1], k[:1], k[:1], 4).as_text()
    whole = f(q, k, k, 4)
    for part in (slice(0, 1), slice(3, 8)):
        np.testing.assert_array_equal(f(q[part], k[part], k[part], 4), whole[part])


def test_fallback_without_compiler(monkeypatch, tmp_path, caplog):
    log = kernel_without_compiler(cpu_attention.KERNEL, monkeypatch, tmp_path, caplog)
    assert "no-such-compiler" in log
    b, heads, lq, c = 2, 4, 400, 16
    q, k, v, _ = _data((b,), lq, lq, c)
    hlo = jax.jit(layers.attention, static_argnums=3).lower(q, k, v, heads).as_text()
    assert "jaxmed_attention" not in hlo  # the jnp blocked attention instead
    np.testing.assert_allclose(layers.attention(q, k, v, heads), _mha(q, k, v, heads), atol=1e-5)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("JAXMED_CPU_ATTENTION", "0")
    assert not cpu_attention.available()


def test_compile_error_is_reported(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_attention.KERNEL, "source", bad)
    monkeypatch.setenv("JAXMED_KERNEL_DIR", str(tmp_path / "k"))
    with pytest.raises(RuntimeError, match="compiling bad.cc failed"):
        cpu_attention.KERNEL.build()
    assert not list((tmp_path / "k").glob("*.so"))


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxmed.models import layers
assert jax.device_count() == 8
rng = np.random.default_rng(0)
q, k, v, w = (jnp.asarray(rng.standard_normal((8, 400, 32)), jnp.float32) for _ in range(4))
def loss(q, k, v):
    return jnp.sum(layers.attention(q, k, v, 4) * w)
f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
assert "jaxmed_attention_fwd" in f.lower(q, k, v).as_text()
single = f(q, k, v)
mesh = Mesh(np.array(jax.devices()), ("data",))
shard = NamedSharding(mesh, P("data"))
sharded = f(*(jax.device_put(x, shard) for x in (q, k, v)))
for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    assert err <= 1e-5, err
print("OK")
"""


def test_data_sharded_batch_equals_single_device():
    run_on_8_cpu_devices(_SHARDED)
