"""DiffFit, both of them.

* ``difffit`` — what the study's authors coded: a zero-initialised delta dW on every UNet
  Linear and Conv weight, W + dW (859,077,120 trainable parameters in SD 1.5). Equivalent
  to full fine-tuning of those weights except that weight decay pulls dW, not W, to zero.
* ``difffit-orig`` — Xie et al. 2023: train biases and norm parameters, plus new learnable
  scale factors gamma (init 1) on each residual branch. Adapted to the UNet: one gamma per
  output channel on every transformer block's attn1 / attn2 / feed-forward branch and on
  every resnet's residual branch (conv2). gamma * (x W + b) == x (W gamma) + b gamma, so it
  is applied by rescaling that branch's last layer and needs no change to the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmed.strategies.base import (
    Params,
    Strategy,
    flatten,
    leaf_kind,
    merge_trees,
    split_by,
    unflatten,
)


@dataclasses.dataclass(frozen=True)
class DeltaStrategy(Strategy):
    """W + dW on every Linear / Conv kernel of the trained components."""

    def init(self, params: Params, rng: jax.Array) -> tuple[Params, Params]:
        self.require_components(params)
        kernels, _ = split_by(
            params, lambda c, p, v: c in self.trains and leaf_kind(p, v) in ("linear", "conv")
        )
        return jax.tree_util.tree_map(jnp.zeros_like, kernels), params

    def combine(self, trainable: Params, frozen: Params) -> Params:
        flat = {(c, *p): v for c, sub in frozen.items() for p, v in flatten(sub).items()}
        for c, sub in trainable.items():
            for p, d in flatten(sub).items():
                flat[(c, *p)] = flat[(c, *p)] + d
        return unflatten(flat)

    def adapter_mask(self, trainable: Params) -> Params:
        return jax.tree_util.tree_map(lambda _: True, trainable)


def difffit(lr: float = 1e-4) -> DeltaStrategy:
    return DeltaStrategy(
        name="difffit",
        description="the authors' DiffFit: zero-init delta on every UNet Linear/Conv weight",
        trains=("unet",), lrs=(("unet", lr),), per_device_batch=8,
    )


GAMMA = "difffit_gamma"
# The last layer of each residual branch, as module-path suffixes.
_BRANCH_ENDS = (("attn1", "to_out_0"), ("attn2", "to_out_0"), ("ff", "net_2"), ("conv2",))


def _is_branch_end(module_path: tuple[str, ...]) -> bool:
    return any(module_path[-len(e):] == e for e in _BRANCH_ENDS) and (
        "transformer_blocks" in "/".join(module_path) or module_path[-1] == "conv2"
    )


@dataclasses.dataclass(frozen=True)
class DiffFitOrig(Strategy):
    def init(self, params: Params, rng: jax.Array) -> tuple[Params, Params]:
        self.require_components(params)
        trainable, frozen = split_by(
            params, lambda c, p, v: c in self.trains and leaf_kind(p, v) in ("bias", "norm")
        )
        gammas = {}
        for c in self.trains:
            for p, v in flatten(params[c]).items():
                if p[-1] == "kernel" and _is_branch_end(p[:-1]):
                    gammas[(c, *p[:-1], GAMMA)] = jnp.ones((v.shape[-1],), jnp.float32)
        return merge_trees(trainable, unflatten(gammas)), frozen

    def combine(self, trainable: Params, frozen: Params) -> Params:
        flat = {(c, *p): v for c, sub in merge_trees(frozen, trainable).items()
                for p, v in flatten(sub).items()}
        for key in [k for k in flat if k[-1] == GAMMA]:
            g = flat.pop(key)
            mod = key[:-1]
            flat[mod + ("kernel",)] = flat[mod + ("kernel",)] * g
            if mod + ("bias",) in flat:
                flat[mod + ("bias",)] = flat[mod + ("bias",)] * g
        return unflatten(flat)

    def adapter_mask(self, trainable: Params) -> Params:
        return {c: jax.tree_util.tree_map_with_path(
            lambda kp, _: getattr(kp[-1], "key", None) == GAMMA, sub)
            for c, sub in trainable.items()}


def difffit_orig(lr: float = 1e-4) -> DiffFitOrig:
    return DiffFitOrig(
        name="difffit-orig",
        description="DiffFit (Xie et al. 2023): biases, norms and per-branch scale factors",
        trains=("unet",), lrs=(("unet", lr),), per_device_batch=8,
    )
