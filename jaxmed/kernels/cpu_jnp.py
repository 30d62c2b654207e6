"""CPU paths written in jnp: ops that XLA compiles, arranged for how XLA:CPU runs them.

Chosen by `kernels.dispatch` only where a computation is lowered for CPU: the blocked
attention (where the C++ attention kernel cannot be built or does not pay) and 3x3
convolutions on the smallest maps as one matmul (im2col).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.kernels import cpu_dense

# Logits per block of the blocked attention: 4 MB of float32, which stays in cache.
BLOCK_LOGITS = 1 << 20


def _divisor_at_most(n: int, m: int) -> int:
    m = max(1, min(n, m))
    while n % m:
        m -= 1
    return m


@jax.custom_vjp
def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v over the last two axes (q pre-scaled), flash-attention style: the
    backward pass recomputes the probabilities from the saved log-sum-exp instead of
    storing them, and uses the closed-form softmax gradient."""
    return _softmax_attention_fwd(q, k, v)[0]


def _softmax_attention_fwd(q, k, v):
    s = jnp.einsum("...qd,...kd->...qk", q, k)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("...qk,...kd->...qd", p, v) / denom
    return o, (q, k, v, o, m + jnp.log(denom))


def _softmax_attention_bwd(res, do):
    q, k, v, o, lse = res
    p = jnp.exp(jnp.einsum("...qd,...kd->...qk", q, k) - lse)
    dv = jnp.einsum("...qk,...qd->...kd", p, do)
    dp = jnp.einsum("...qd,...kd->...qk", do, v)
    ds = p * (dp - jnp.sum(do * o, axis=-1, keepdims=True))
    dq = jnp.einsum("...qk,...kd->...qd", ds, k)
    dk = jnp.einsum("...qk,...qd->...kd", ds, q)
    return dq, dk, dv


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                      upcast: bool) -> jax.Array:
    """Multi-head attention on (B, L, C) computed block by block (groups of (batch, head) x
    query rows), each block's logits small enough to stay in the CPU's cache: XLA:CPU
    otherwise streams the full (B, heads, Lq, Lk) logits through memory several times. The
    loop runs on one core, as XLA:CPU does not spread in-loop work, which is why the C++
    kernel (cpu_attention) is preferred where it can be built."""
    b, lq, c = q.shape
    lk = k.shape[1]
    d = c // heads
    dtype = q.dtype
    cdt = jnp.float32 if upcast else dtype
    g = b * heads

    def groups(x, n):
        return x.reshape(b, n, heads, d).transpose(0, 2, 1, 3).reshape(g, n, d).astype(cdt)

    qg, kg, vg = groups(q * (d**-0.5), lq), groups(k, lk), groups(v, lk)
    qc = _divisor_at_most(lq, 64)
    gc = _divisor_at_most(g, max(1, BLOCK_LOGITS // (qc * lk)))
    ng, nq = g // gc, lq // qc
    qb = qg.reshape(ng, gc, nq, qc, d).transpose(0, 2, 1, 3, 4)
    kb, vb = kg.reshape(ng, gc, lk, d), vg.reshape(ng, gc, lk, d)
    out = jax.lax.map(
        lambda a: jax.lax.map(lambda qq: _softmax_attention(qq, a[1], a[2]), a[0]), (qb, kb, vb))
    out = out.transpose(0, 2, 1, 3, 4).reshape(b, heads, lq, d).transpose(0, 2, 1, 3)
    return out.reshape(b, lq, c).astype(dtype)


def _patches(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B*H*W, 9*C): each pixel's 3x3 zero-padded neighbourhood."""
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.stack([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3)
    return cols.reshape(b * h * w, 9 * c)


@jax.custom_vjp
def im2col_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """SAME, stride-1 conv of x (B, H, W, Ci) with w (3, 3, Ci, Co) as one matmul, and its
    gradients as two more on the untransformed filter (XLA:CPU's convolution reverses and
    transposes the whole filter for the input gradient, which dominates on small maps)."""
    b, h, wd, c = x.shape
    return (_patches(x) @ w.reshape(9 * c, -1)).reshape(b, h, wd, -1)


def _im2col_fwd(x, w):
    return im2col_conv3x3(x, w), (x, w)


def _im2col_bwd(res, dy):
    x, w = res
    b, h, wd, c = x.shape
    dyf = dy.reshape(-1, w.shape[3])
    dcols = (dyf @ w.reshape(9 * c, -1).T).reshape(b, h, wd, 3, 3, c)
    dxp = jnp.zeros((b, h + 2, wd + 2, c), dy.dtype)
    for i in range(3):  # each tap's gradient lands on its shifted window
        for j in range(3):
            dxp = dxp.at[:, i:i + h, j:j + wd].add(dcols[:, :, :, i, j])
    cols, w2 = _patches(x), w.reshape(9 * c, -1)
    dw = cpu_dense.wgrad(cols, dyf) if cpu_dense.applies(cols, w2) else cols.T @ dyf
    return dxp[:, 1:-1, 1:-1], dw.reshape(w.shape)


im2col_conv3x3.defvjp(_im2col_fwd, _im2col_bwd)
