"""LoRA (Hu et al. 2021), exactly as peft computes it.

For a targeted Linear ``y = x W + b`` (W stored (in, out)) with rank r and scaling s = alpha/r:
``y + s * (dropout(x) A) B`` with A (in, r) kaiming-uniform and B (r, out) zero. DoRA
(`jaxmed.strategies.dora`) is this strategy with a learned magnitude per output unit.

The adapters are applied while a component runs (`jaxmed.strategies.adapters`), never
stored merged, so the frozen W gets no weight gradient and LoRA dropout behaves as in peft.
Without dropout a targeted layer runs as `adapters.lora_matmul`: one matmul with the kernel
W + s A B formed on the fly, and a backward pass of rank-r products (see there for why).
`export` folds the adapters into plain weights; `save_peft` / `load_peft` write and read
peft's on-disk format (`jaxmed.strategies.peft`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxmed.models.layers import torch_default_init
from jaxmed.strategies import peft
from jaxmed.strategies.adapters import AdapterStrategy, lora_matmul, merge_kernel
from jaxmed.strategies.base import Params, StrategyError

STUDY_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclasses.dataclass(frozen=True)
class LoraStrategy(AdapterStrategy):
    targets: tuple[str, ...] | str = STUDY_TARGETS
    LEAVES: ClassVar[tuple[str, ...]] = peft.LEAVES
    use_dora: ClassVar[bool] = False

    def new_adapter(self, kernel: jax.Array, rng: jax.Array) -> dict[tuple[str, ...], Any]:
        d_in, d_out = kernel.shape
        return {("lora_A", "kernel"): torch_default_init(rng, (d_in, self.rank), jnp.float32),
                ("lora_B", "kernel"): jnp.zeros((self.rank, d_out), jnp.float32)}

    def lora_out(self, entry: dict, xd: jax.Array, dt) -> jax.Array:
        """s * (x' A) B in the compute dtype ``dt``."""
        a, b = entry["lora_A"]["kernel"].astype(dt), entry["lora_B"]["kernel"].astype(dt)
        return jnp.dot(jnp.dot(xd.astype(dt), a), b) * self.scaling

    def add_branch(self, entry: dict, base: dict, xd: jax.Array, layer, dropout: bool,
                   dtype) -> jax.Array:
        if dropout:  # the branch sees another input than the layer: two products
            return layer() + self.lora_out(entry, xd, dtype)
        y = lora_matmul(xd.astype(dtype), base["kernel"], entry["lora_A"]["kernel"],
                        entry["lora_B"]["kernel"], self.scaling)
        return y + base["bias"].astype(dtype) if "bias" in base else y

    def merge(self, w: jax.Array, entry: dict) -> jax.Array:
        return merge_kernel(w, entry["lora_A"]["kernel"], entry["lora_B"]["kernel"],
                            self.scaling)

    def save_peft(self, trainable: Params, out_dir: str, base_model: str = "") -> list[str]:
        return peft.save(self, trainable, out_dir, base_model)

    def load_peft(self, folder: str, params: Params) -> Params:
        return peft.load(self, folder, params)


def lora(rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=STUDY_TARGETS,
         text_targets=(), lr: float = 1e-4, text_lr: float | None = None) -> LoraStrategy:
    return build(LoraStrategy, "lora", rank, alpha, dropout, targets, text_targets, lr,
                 text_lr, per_device_batch=4)


def build(cls, name, rank, alpha, dropout, targets, text_targets, lr, text_lr,
          per_device_batch):
    """A `LoraStrategy` (or subclass) ``name`` from its options, checked."""
    if rank < 1:
        raise StrategyError(f"{name}: rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise StrategyError(f"{name}: dropout must be in [0, 1), got {dropout}")
    targets = targets if isinstance(targets, str) else tuple(targets)
    text_targets = text_targets if isinstance(text_targets, str) else tuple(text_targets)
    if not targets and not text_targets:
        raise StrategyError(f"{name}: no targets (targets and text_targets are both empty); "
                            f"the study's are targets={STUDY_TARGETS}")
    lrs = [("unet", lr)] if targets else []
    if text_targets:
        lrs.append(("text_encoder", text_lr if text_lr is not None else lr))
    what = "DoRA" if cls.use_dora else "LoRA"
    return cls(
        name=name,
        description=f"{what} r={rank} alpha={alpha} dropout={dropout} on {targets}"
        + (f" + text {text_targets}" if text_targets else ""),
        trains=tuple(c for c, _ in lrs), lrs=tuple(lrs), per_device_batch=per_device_batch,
        rank=rank, alpha=alpha, dropout=dropout, targets=targets, text_targets=text_targets,
    )
