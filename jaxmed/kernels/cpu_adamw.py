"""One AdamW step of a float32 leaf, in place, for XLA:CPU as an XLA FFI custom call
(cpu_adamw.cc): one read of p, g, mu, nu and one write of p, mu, nu per element, where XLA's
fusions read the gradient and moments again for each of their three outputs.

Compiled on first use (see kernels.build). Without a compiler, or with
``JAXMED_CPU_ADAMW=0``, jaxmed.optim runs optax's update instead. Chosen by
`kernels.dispatch.adamw` only where a computation is lowered for CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.kernels.build import Kernel

_STEP = "jaxmed_adamw"
KERNEL = Kernel("cpu_adamw.cc", {_STEP: "JaxmedAdamW"}, switch="JAXMED_CPU_ADAMW",
                fallback="optax's update")
available = KERNEL.available

# The coefficient vector's layout (cpu_adamw.cc's enum Coef).
COEFS = ("scale", "one_minus_b1", "b1", "one_minus_b2", "b2", "bias1", "bias2", "eps",
         "decay", "neg_lr", "ok")


def coefficients(**values: jax.Array | float) -> jax.Array:
    """The kernel's float32 coefficient vector from its named entries (all required)."""
    missing = set(COEFS) - set(values)
    unknown = set(values) - set(COEFS)
    if missing or unknown:
        raise ValueError(f"adamw coefficients: missing {sorted(missing)}, "
                         f"unknown {sorted(unknown)}")
    return jnp.stack([jnp.asarray(values[k], jnp.float32).reshape(()) for k in COEFS])


def step(p: jax.Array, g: jax.Array, mu: jax.Array, nu: jax.Array, coef: jax.Array
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(p, mu, nu) after one AdamW step (see cpu_adamw.cc); the outputs alias p, mu, nu.
    Call `available()` first."""
    out = jax.ShapeDtypeStruct(p.shape, jnp.float32)
    return jax.ffi.ffi_call(_STEP, (out, out, out), vmap_method="sequential",
                            input_output_aliases={0: 0, 2: 1, 3: 2})(p, g, mu, nu, coef)
