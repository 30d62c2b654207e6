"""Dense layers' weight gradient for XLA:CPU as an XLA FFI custom call (cpu_dense.cc).

XLA:CPU computes dw = x^T dy (both operands contracted over their leading, token axis) by
first transposing dy into a (features, tokens) copy and then calling Eigen, at about half
the speed of its other matrix products; the kernel reads both in place. Results agree with
XLA's to float32 rounding and do not depend on the thread count.

Compiled on first use (see kernels.build). Without a compiler, or with
``JAXMED_CPU_DENSE=0``, jaxmed uses XLA's dot. Chosen by `kernels.dispatch` only where a
computation is lowered for CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.kernels.build import Kernel

_WGRAD = "jaxmed_dense_wgrad"
KERNEL = Kernel("cpu_dense.cc", {_WGRAD: "JaxmedDenseWgrad"}, switch="JAXMED_CPU_DENSE",
                fallback="XLA's dot")
available = KERNEL.available


def wins(m: int, k: int, n: int) -> bool:
    """Whether the kernel takes x.T @ dy (M x K x N): whenever N is a multiple of 16 (its
    vector width). Alone, XLA is faster for wide N, but inside a train step the kernel is
    faster there too, as XLA's transposed copies of dy compete with the rest of the step
    for memory (bench/bench_dense.py)."""
    return n % 16 == 0


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether x (..., K) @ w (K, N) on CPU takes its weight gradient from the kernel: both
    float32, where it `wins`, and built."""
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32
            and wins(x.size // x.shape[-1], *w.shape) and available())


def wgrad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """x^T dy for float32 x (M, K) and dy (M, N), N a multiple of 16. Call `available()`
    first."""
    return jax.ffi.ffi_call(_WGRAD, jax.ShapeDtypeStruct((x.shape[1], dy.shape[1]), jnp.float32),
                            vmap_method="sequential")(x, dy)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) @ w (K, N) by XLA's dot, with the weight gradient by `wgrad` (where
    `applies`)."""
    return jnp.dot(x, w)


def _matmul_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    dw = wgrad(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
    return jnp.dot(dy, w.T), dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)
