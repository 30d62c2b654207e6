"""DoRA (Liu et al. 2024), exactly as peft computes it: LoRA plus a learned magnitude.

A magnitude m (out,) is initialised to the column norms of W, and a targeted Linear gives
``y + (m/n - 1) * x' W + (m/n) * s * (x' A) B`` with ``x' = dropout(x)`` and
``n = ||W + s A B||`` per output unit, held constant in the backward pass (peft's
``weight_norm.detach()``, DoRA section 4.3). With dropout 0 this is x (m/n)(W + sAB) + b.
Everything else (targets, A and B, dropout, export, peft format) is `LoraStrategy`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxmed.strategies.lora import STUDY_TARGETS, LoraStrategy, build


@dataclasses.dataclass(frozen=True)
class DoraStrategy(LoraStrategy):
    use_dora: ClassVar[bool] = True

    def new_adapter(self, kernel: jax.Array, rng: jax.Array) -> dict[tuple[str, ...], Any]:
        adapter = super().new_adapter(kernel, rng)
        adapter[("lora_magnitude_vector",)] = jnp.linalg.norm(kernel, axis=0)
        return adapter

    def add_branch(self, entry: dict, base: dict, xd: jax.Array, layer, dropout: bool,
                   dtype) -> jax.Array:
        y, dt = layer(), dtype
        lora = self.lora_out(entry, xd, dt)
        w = base["kernel"]
        norm = jax.lax.stop_gradient(column_norm(w, entry, self.scaling))
        mag = (entry["lora_magnitude_vector"] / norm).astype(dt)
        if dropout:
            base_out = jnp.dot(xd.astype(dt), w.astype(dt))
        else:  # x W is the layer's output less its bias: no second matmul
            base_out = y - base["bias"].astype(dt) if "bias" in base else y
        return y + (mag - 1.0) * base_out + mag * lora

    def merge(self, w: jax.Array, entry: dict) -> jax.Array:
        merged = super().merge(w, entry)
        return merged * (entry["lora_magnitude_vector"] / column_norm(w, entry, self.scaling))


def column_norm(w: jax.Array, entry: dict, scaling: float) -> jax.Array:
    """||W + s A B|| per output unit (axis 0 of the (in, out) kernel), as peft's weight norm."""
    delta = entry["lora_A"]["kernel"] @ entry["lora_B"]["kernel"]
    return jnp.linalg.norm(w + scaling * delta, axis=0)


def dora(rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=STUDY_TARGETS,
         text_targets=(), lr: float = 1e-4, text_lr: float | None = None) -> DoraStrategy:
    return build(DoraStrategy, "dora", rank, alpha, dropout, targets, text_targets, lr,
                 text_lr, per_device_batch=8)
