"""Layer building blocks against PyTorch: GroupNorm's custom forward and backward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

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
