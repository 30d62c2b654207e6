"""Layer building blocks against PyTorch: GroupNorm's custom forward and backward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmed.kernels import cpu_dense, cpu_jnp
from jaxmed.models import layers


@pytest.mark.parametrize("shape,groups", [((2, 8, 6, 64), 32), ((3, 5, 48), 16),
                                          ((1, 4, 4, 32), 32), ((2, 3, 3, 96), 1)])
def test_group_norm_matches_torch(shape, groups):
    rng = np.random.default_rng(0)
    # An offset mean: a one-pass variance would lose digits here, the two-pass one does not.
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)
    scale, bias = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    ct = rng.standard_normal(shape).astype(np.float32)

    def loss(x, s, b):
        return jnp.sum(jax.nn.silu(layers.group_norm(x, s, b, groups, 1e-5)) * ct)

    y = layers.group_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), groups, 1e-5)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)

    def nchw(a):  # channels last -> torch's channels first
        return torch.tensor(np.moveaxis(a, -1, 1)).contiguous()

    xt = nchw(x).requires_grad_()
    st, bt = torch.tensor(scale).requires_grad_(), torch.tensor(bias).requires_grad_()
    yt = torch.nn.functional.group_norm(xt, groups, st, bt, 1e-5)
    (torch.nn.functional.silu(yt) * nchw(ct)).sum().backward()
    np.testing.assert_allclose(y, np.moveaxis(yt.detach().numpy(), 1, -1), rtol=0, atol=1e-5)
    want = (np.moveaxis(xt.grad.numpy(), 1, -1), st.grad.numpy(), bt.grad.numpy())
    for name, got, ref in zip(("dx", "dscale", "dbias"), grads, want):
        err = float(np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref)))
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("shape", [(4, 4, 4, 32, 48), (2, 3, 2, 16, 16), (1, 1, 1, 8, 4)])
def test_im2col_conv_matches_lax_conv(shape):
    n, h, w, cin, cout = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, jnp.float32)
    ct = jnp.asarray(rng.standard_normal((n, h, w, cout)), jnp.float32)

    def ref(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def grads(f):
        return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(f(x, k) * ct), argnums=(0, 1)))(x, k)

    np.testing.assert_allclose(cpu_jnp.im2col_conv3x3(x, k), ref(x, k), rtol=0, atol=1e-5)
    for got, want in zip(grads(cpu_jnp.im2col_conv3x3)[1], grads(ref)[1]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    # The weight gradient (patches^T dy) runs on the dense kernel where it applies.
    hlo = jax.jit(jax.grad(lambda k: jnp.sum(cpu_jnp.im2col_conv3x3(x, k)))).lower(k).as_text()
    assert ("jaxmed_dense_wgrad" in hlo) == (cout % 16 == 0 and cpu_dense.available())
    # layers.Conv takes this path on XLA:CPU for maps of at most 16 pixels.
    m = layers.Conv(features=cout)
    p = m.init(jax.random.PRNGKey(0), x)
    assert "convolution" not in jax.jit(m.apply).lower(p, x).as_text()
