"""Softmax attention for XLA:CPU as an XLA FFI custom call (cpu_attention.cc).

XLA:CPU runs fusions inside while loops on one core, so attention written in jnp either
streams the full logits through memory (unblocked) or uses one core (blocked). The kernel
keeps a row of logits in L1 and spreads (batch x head) groups over XLA's intra-op threads.

Compiled on first use (see kernels.build). Without a compiler, or with
``JAXMED_CPU_ATTENTION=0``, jaxmed falls back to its jnp attention (same results within
float32 rounding; slower). Chosen by `kernels.dispatch` only where a computation is lowered
for CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.kernels.build import Kernel

_FWD, _BWD = "jaxmed_attention_fwd", "jaxmed_attention_bwd"
KERNEL = Kernel("cpu_attention.cc", {_FWD: "JaxmedAttentionFwd", _BWD: "JaxmedAttentionBwd"},
                switch="JAXMED_CPU_ATTENTION", fallback="the slower jnp attention")
available = KERNEL.available


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(scale q k^T) v for float32 (..., L, D) arrays; call `available()` first."""
    return _fwd(q, k, v, scale)[0]


def _fwd(q, k, v, scale):
    if k.shape[-2] == 0:
        raise ValueError("attention over zero keys")
    kt, vt = jnp.swapaxes(k, -1, -2), jnp.swapaxes(v, -1, -2)
    f32 = jnp.float32
    o, lse = jax.ffi.ffi_call(
        _FWD, (jax.ShapeDtypeStruct(q.shape, f32), jax.ShapeDtypeStruct(q.shape[:-1], f32)),
        vmap_method="broadcast_all")(q, kt, vt, scale=np.float32(scale))
    return o, (q, kt, vt, o, lse)


def _bwd(scale, res, do):
    q, kt, vt, o, lse = res
    f32 = jnp.float32
    dq, dkt, dvt = jax.ffi.ffi_call(
        _BWD, tuple(jax.ShapeDtypeStruct(x.shape, f32) for x in (q, kt, vt)),
        vmap_method="broadcast_all")(q, kt, vt, o, lse, do.astype(f32), scale=np.float32(scale))
    return dq, jnp.swapaxes(dkt, -1, -2), jnp.swapaxes(dvt, -1, -2)


attention.defvjp(_fwd, _bwd)


def multi_head(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """`attention` of (B, L, C) q, k, v split into ``heads`` heads, in float32 (the kernel
    always upcasts), returned as (B, Lq, C) in q's dtype. Call `available()` first."""
    b, lq, c = q.shape
    lk = k.shape[1]
    d = c // heads

    def split(x, n):
        return x.reshape(b, n, heads, d).transpose(0, 2, 1, 3).astype(jnp.float32)

    out = attention(split(q, lq), split(k, lk), split(v, lk), d**-0.5)
    return out.transpose(0, 2, 1, 3).reshape(b, lq, c).astype(q.dtype)
