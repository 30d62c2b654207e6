"""Dense layers' weight gradient for XLA:CPU as an XLA FFI custom call (cpu_dense.cc).

XLA:CPU computes dw = x^T dy (both operands contracted over their leading, token axis) by
first transposing dy into a (features, tokens) copy and then calling Eigen, at about half
the speed of its other matrix products; the kernel reads both in place. Results agree with
XLA's to float32 rounding and do not depend on the thread count.

Compiled on first use (see kernels.build). Without a compiler, or with
``JAXMED_CPU_DENSE=0``, jaxmed uses XLA's dot. Accelerators never use it.
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
    vector width). Measured on a 2-core AVX-512 CPU, 2026-11, XLA vs kernel, ms: 1024 x 512
    x 128 0.69 vs 0.37; 1024 x 128 x 128 0.16 vs 0.11; 256 x 256 x 256 0.17 vs 0.08; 4096 x
    64 x 64 0.25 vs 0.15. Alone, XLA is faster for wide N (1024 x 128 x 1024: 0.70 vs 0.89),
    but in the medium UNet's train step the kernel is faster there too (step 273 -> 263 ms),
    as XLA's transposed copies of dy compete with the rest of the step for memory."""
    return n % 16 == 0


def wgrad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """x^T dy for float32 x (M, K) and dy (M, N), N a multiple of 16. Call `available()`
    first."""
    return jax.ffi.ffi_call(_WGRAD, jax.ShapeDtypeStruct((x.shape[1], dy.shape[1]), jnp.float32),
                            vmap_method="sequential")(x, dy)
