"""The plain XLA ops: what every platform runs where `kernels.dispatch` picks no kernel, and
what each kernel is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) @ w (K, N)."""
    return jnp.dot(x, w)


def weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """x (M, K)^T @ dy (M, N) -> (K, N), contracting both leading (token) axes: a dense
    layer's weight gradient."""
    return lax.dot_general(x, dy, (((0,), (0,)), ((), ())))


def conv(x: jax.Array, w: jax.Array, strides: int = 1,
         padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))) -> jax.Array:
    """2-D convolution of x (N, H, W, Ci) with w (kh, kw, Ci, Co), explicit padding pairs."""
    return lax.conv_general_dilated(x, w, window_strides=(strides, strides), padding=padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *,
              mask: jax.Array | None = None, upcast: bool = True) -> jax.Array:
    """Multi-head softmax attention on (B, L, C) tensors as two einsums; see
    `kernels.dispatch.attention` for the arguments."""
    b, lq, c = q.shape
    lk = k.shape[1]
    d = c // heads
    qh = q.reshape(b, lq, heads, d)
    kh = k.reshape(b, lk, heads, d)
    vh = v.reshape(b, lk, heads, d)
    dtype = q.dtype
    if upcast:
        qh, kh = qh.astype(jnp.float32), kh.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) * (d**-0.5)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(vh.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, vh)
    return out.reshape(b, lq, c).astype(dtype)
