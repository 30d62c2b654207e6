"""LoRA (Hu et al. 2021), exactly as peft computes it.

For a targeted Linear ``y = x W + b`` (W stored (in, out)) with rank r and scaling s = alpha/r:
``y + s * (dropout(x) A) B`` with A (in, r) kaiming-uniform and B (r, out) zero. DoRA
(`jaxmed.strategies.dora`) is this strategy with a learned magnitude per output unit.

The adapters are applied while a component runs (`jaxmed.strategies.adapters`), never
stored merged, so the frozen W gets no weight gradient and LoRA dropout behaves as in peft.
Without dropout a targeted layer runs as `lora_matmul`: one matmul with the kernel
W + s A B formed on the fly, and a backward pass of rank-r products (see there for why).
`export` folds the adapters into plain weights; `save_peft` / `load_peft` write and read
peft's on-disk format (`jaxmed.strategies.peft`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxmed.kernels import dispatch
from jaxmed.models.layers import torch_default_init
from jaxmed.strategies import peft
from jaxmed.strategies.adapters import AdapterStrategy
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


def merge_kernel(w: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """W + s A B: the kernel with the adapter folded in (what `LoraStrategy.export` writes)."""
    return w + scaling * a @ b


# Why a custom gradient: autodiff of the unmerged y = x W + s (x A) B adds, per targeted
# layer, a (tokens, r) x (r, out) product to the forward pass and, to the backward pass, the
# branch's share of dx plus products contracting the token axis with outputs only r wide,
# which XLA:CPU runs through transposed copies; each costs about as much as the layer's own
# matmul there (tokens x in x out), so a LoRA step saved little over full fine-tuning.
# Folding the adapter into the kernel first is one matmul forward and one for dx backward,
# the adapter's gradients are four rank-r products, and the frozen kernel's full gradient
# x^T dy is returned but unused, so jit drops it.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lora_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
                scaling: float) -> jax.Array:
    """x (..., in) @ (w + scaling * a @ b) in x's dtype, for a kernel w (in, out) and LoRA
    factors a (in, r), b (r, out): a LoRA layer's output without its bias."""
    return jnp.dot(x, merge_kernel(w, a, b, scaling).astype(x.dtype))


def _lora_matmul_fwd(x, w, a, b, scaling):
    return lora_matmul(x, w, a, b, scaling), (x, w, a, b)


def _lora_matmul_bwd(scaling, res, dy):
    x, w, a, b = res
    dt = dy.dtype
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = jnp.dot(dy, merge_kernel(w, a, b, scaling).astype(dt).T)
    u = jnp.dot(x2, a.astype(dt))  # (tokens, r): x A
    t = jnp.dot(dy2, b.astype(dt).T)  # (tokens, r): dy B^T
    da = scaling * dispatch.weight_grad(t, x2).T  # s x^T dy B^T, (in, r)
    db = scaling * dispatch.weight_grad(u, dy2)  # s A^T x^T dy, (r, out)
    dw = dispatch.weight_grad(x2, dy2)  # frozen in LoRA training: never computed there
    return dx, dw.astype(w.dtype), da.astype(a.dtype), db.astype(b.dtype)


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


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
