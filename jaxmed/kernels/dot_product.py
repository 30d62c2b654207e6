"""Attention by `jax.nn.dot_product_attention`: XLA's own fused attention, and on NVIDIA
GPUs cuDNN's flash attention where cuDNN takes the shapes and dtype (bfloat16/float16,
head dims that are multiples of 8 up to 128: SD's 40 and 80; its 160 stays on XLA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


def _heads(x: jax.Array, heads: int) -> jax.Array:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads)  # (B, T, N, H): the layout the API takes


def _cudnn_applies(q: jax.Array, d: int, mask: jax.Array | None) -> bool:
    return (mask is None and q.dtype in CUDNN_DTYPES and d % 8 == 0
            and d <= CUDNN_MAX_HEAD_DIM)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *,
              mask: jax.Array | None = None, upcast: bool = True,
              implementation: str | None = "xla") -> jax.Array:
    """Multi-head attention on (B, L, C) tensors, as `kernels.reference.attention`.

    ``implementation`` is the API's: ``"xla"``, or ``"cudnn"`` (only where
    `_cudnn_applies`; a cuDNN that refuses the call at trace time leaves XLA's). With
    ``upcast`` and a low-precision input, XLA's path gets float32 q and k (its logits in
    float32, like the reference); cuDNN keeps its inputs and accumulates in float32."""
    b, lq, c = q.shape
    d = c // heads
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    m = None if mask is None else jnp.broadcast_to(mask, (b, heads, lq, k.shape[1]))
    if implementation == "cudnn" and _cudnn_applies(q, d, mask):
        try:
            out = jax.nn.dot_product_attention(qh, kh, vh, implementation="cudnn")
            return out.reshape(b, lq, c)
        except (RuntimeError, ValueError, NotImplementedError, TypeError):
            pass  # no cuDNN here, or one too old for these shapes: XLA's path
    dtype = q.dtype
    if upcast and dtype != jnp.float32:
        qh, kh = qh.astype(jnp.float32), kh.astype(jnp.float32)
        vh = vh.astype(jnp.float32)
    out = jax.nn.dot_product_attention(qh, kh, vh, mask=m, implementation="xla")
    return out.reshape(b, lq, c).astype(dtype)


def gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *,
                  mask: jax.Array | None = None, upcast: bool = True) -> jax.Array:
    """`attention` with cuDNN where it applies: the GPU branch of `kernels.dispatch`."""
    return attention(q, k, v, heads, mask=mask, upcast=upcast, implementation="cudnn")
