"""Building blocks shared by the UNet, the VAE and the CLIP text tower.

Conventions every model in jaxmed follows (the weight converter relies on them):

* Parameters are float32 and named like PyTorch's: ``kernel`` (Linear / Conv weight),
  ``bias``, ``scale`` (norm weight), ``embedding`` (nn.Embedding weight). Module names are
  the diffusers / transformers attribute names, with list indices written ``name_N``
  (``down_blocks_0``, ``to_out_0``); `jaxmed.models.convert` maps them to ``name.N``.
* Layouts are channels-last: activations NHWC, Linear kernels (in, out), Conv kernels HWIO.
* Every parameter carries logical axis names (`nn.with_logical_partitioning`) so that one
  rule table in `jaxmed.sharding` maps them to mesh axes; activations are constrained with
  `constrain` at block boundaries.
* ``dtype`` is the compute dtype (bfloat16 on accelerators); norms, softmax and the time
  embedding always compute in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxmed.kernels import dispatch

Dtype = Any
Axes = tuple[str | None, ...]

# PyTorch's default init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), ..), which is
# variance_scaling(1/3, fan_in, uniform). Used when a model is trained from scratch.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# Logical axis names of activations.
BATCH, LENGTH, HEIGHT, WIDTH, CHANNELS = "batch", "length", "height", "width", "channels"
NHWC: Axes = (BATCH, HEIGHT, WIDTH, CHANNELS)
BLC: Axes = (BATCH, LENGTH, CHANNELS)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Sharding hint by logical names; a no-op outside a mesh / axis-rules context."""
    return nn.with_logical_constraint(x, axes)


def _param(module: nn.Module, name: str, init: Callable, shape: Sequence[int], axes: Axes):
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), jnp.float32)


class Linear(nn.Module):
    """y = x @ kernel + bias, kernel stored (in, out) in float32, computed in ``dtype``."""

    features: int
    use_bias: bool = True
    axes: Axes = ("embed", "mlp")
    dtype: Dtype = jnp.float32
    kernel_init: Callable = torch_default_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.axes)
        y = dispatch.matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, (self.features,), self.axes[1:])
            y = y + bias.astype(self.dtype)
        return y


class Conv(nn.Module):
    """2-D convolution, NHWC x HWIO, symmetric padding ``padding`` or explicit pairs."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int | tuple[tuple[int, int], tuple[int, int]] = 1
    use_bias: bool = True
    axes: Axes = ("conv_h", "conv_w", "conv_in", "conv_out")
    dtype: Dtype = jnp.float32
    kernel_init: Callable = torch_default_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        shape = (k, k, x.shape[-1], self.features)
        kernel = _param(self, "kernel", self.kernel_init, shape, self.axes)
        pad = self.padding
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        y = dispatch.conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, pad)
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, (self.features,), self.axes[-1:])
            y = y + bias.astype(self.dtype)
        return y


class GroupNorm(nn.Module):
    """GroupNorm over NHWC (or (B, L, C)) inputs, statistics in float32 as torch does."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels not divisible by {self.num_groups} groups")
        scale = _param(self, "scale", nn.initializers.ones, (c,), ("norm",))
        bias = _param(self, "bias", nn.initializers.zeros, (c,), ("norm",))
        y = group_norm(x.astype(jnp.float32), scale.astype(jnp.float32),
                       bias.astype(jnp.float32), self.num_groups, self.epsilon)
        return y.astype(self.dtype)


# GroupNorm as per-channel sums over the pixels (reductions along the unit-stride channel
# axis, which XLA:CPU vectorises) folded into groups, with the analytic backward pass
# instead of autodiff's: reducing a (B, HW, G, C/G) view over axes (1, 3) makes XLA:CPU
# stride across the channels, and autodiff's backward re-reads the input several times
# (tests/models/test_layers.py holds it to torch's GroupNorm).
def _group_mean(sums: jax.Array, groups: int, n: int) -> jax.Array:
    """(B, C) per-channel sums -> their group means over n elements, as (B, 1, C)."""
    b, c = sums.shape
    g = sums.reshape(b, groups, c // groups).sum(-1) / n
    return jnp.repeat(g, c // groups, axis=1)[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
               eps: float) -> jax.Array:
    """float32 GroupNorm of x (B, ..., C) with per-channel scale and bias."""
    return _group_norm_fwd(x, scale, bias, groups, eps)[0]


def _group_norm_fwd(x, scale, bias, groups, eps):
    xf = x.reshape(x.shape[0], -1, x.shape[-1])
    n = xf.shape[1] * (xf.shape[2] // groups)
    mean = _group_mean(jnp.sum(xf, axis=1), groups, n)
    var = _group_mean(jnp.sum(jnp.square(xf - mean), axis=1), groups, n)  # two-pass, as torch
    rstd = lax.rsqrt(var + eps)
    return ((xf - mean) * rstd * scale + bias).reshape(x.shape), (x, scale, mean, rstd)


def _group_norm_bwd(groups, eps, res, dy):
    x, scale, mean, rstd = res
    b, c = x.shape[0], x.shape[-1]
    xf, dyf = x.reshape(b, -1, c), dy.reshape(b, -1, c)
    n = xf.shape[1] * (c // groups)
    xhat = (xf - mean) * rstd
    sum_dy, sum_dy_xhat = jnp.sum(dyf, axis=1), jnp.sum(dyf * xhat, axis=1)  # (B, C)
    # dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dy scale, group means
    dx = rstd * (dyf * scale - _group_mean(sum_dy * scale, groups, n)
                 - xhat * _group_mean(sum_dy_xhat * scale, groups, n))
    return dx.reshape(x.shape), jnp.sum(sum_dy_xhat, axis=0), jnp.sum(sum_dy, axis=0)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, float32 statistics."""

    epsilon: float = 1e-5
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, (c,), ("norm",))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + self.epsilon) * scale
        if self.use_bias:
            y = y + _param(self, "bias", nn.initializers.zeros, (c,), ("norm",))
        return y.astype(self.dtype)


class Embed(nn.Module):
    """Lookup table (torch nn.Embedding); parameter ``embedding`` (num, features)."""

    num_embeddings: int
    features: int
    axes: Axes = ("vocab", "embed")
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = _param(
            self, "embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features),
            self.axes,
        )
        return jnp.take(table, ids, axis=0).astype(self.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    *,
    mask: jax.Array | None = None,
    upcast: bool = True,
    impl: str = "auto",
) -> jax.Array:
    """Multi-head scaled dot-product attention on (B, L, C) tensors; returns (B, Lq, C).

    ``mask`` is boolean, broadcastable to (B, heads, Lq, Lk), True where attending is
    allowed. Logits and softmax run in float32 when ``upcast`` (SD's ``upcast_attention``).
    The implementation is `kernels.dispatch.attention`'s choice for the platform compiled for
    and ``impl`` (``model.attention``: auto, einsum, dot_product, flash).
    """
    return dispatch.attention(q, k, v, heads, mask=mask, upcast=upcast, impl=impl)


def silu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": silu,
    "swish": silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; jaxmed supports {sorted(ACTIVATIONS)}"
        ) from None
