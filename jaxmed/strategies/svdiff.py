"""SVDiff (Han et al. 2023): train a shift of the singular values of every weight.

Each Linear / Conv kernel, viewed as a matrix K (fan_in, out) = U diag(s) V^T, becomes
U diag(relu(s + ds)) V^T with only ds trainable (min(fan_in, out) numbers per weight).
jaxmed computes it as K + U diag(relu(s + ds) - s) V^T: the same weights, but a zero shift
gives the base weights bit for bit rather than a reconstruction with SVD round-off.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmed.strategies.base import Params, Strategy, flatten, leaf_kind, unflatten

SHIFT, U, S, VT = "spectral_shift", "svd_u", "svd_s", "svd_vt"


@dataclasses.dataclass(frozen=True)
class SVDiffStrategy(Strategy):
    def init(self, params: Params, rng: jax.Array) -> tuple[Params, Params]:
        self.require_components(params)
        trainable, frozen = {}, {}
        for c, sub in params.items():
            flat = flatten(sub)
            tflat, fflat = {}, dict(flat)
            if c in self.trains:
                for p, v in flat.items():
                    if leaf_kind(p, v) not in ("linear", "conv"):
                        continue
                    u, s, vt = jnp.linalg.svd(v.reshape(-1, v.shape[-1]), full_matrices=False)
                    mod = p[:-1]
                    fflat[mod + (U,)], fflat[mod + (S,)], fflat[mod + (VT,)] = u, s, vt
                    tflat[mod + (SHIFT,)] = jnp.zeros_like(s)
                trainable[c] = unflatten(tflat)
            frozen[c] = unflatten(fflat)
        return trainable, frozen

    def combine(self, trainable: Params, frozen: Params) -> Params:
        out = {}
        for c, sub in frozen.items():
            flat = flatten(sub)
            shifts = flatten(trainable.get(c, {}))
            for key in [k for k in flat if k[-1] == S]:
                mod = key[:-1]
                s = flat.pop(key)
                u, vt = flat.pop(mod + (U,)), flat.pop(mod + (VT,))
                ds = shifts.get(mod + (SHIFT,))
                kernel = flat[mod + ("kernel",)]
                if ds is not None:
                    delta = (u * (jax.nn.relu(s + ds) - s)) @ vt
                    flat[mod + ("kernel",)] = kernel + delta.reshape(kernel.shape)
            out[c] = unflatten(flat)
        return out

    def adapter_mask(self, trainable: Params) -> Params:
        return jax.tree_util.tree_map(lambda _: True, trainable)


def svdiff(lr: float = 1e-4, components: tuple[str, ...] = ("unet",)) -> SVDiffStrategy:
    return SVDiffStrategy(
        name="svdiff",
        description="SVDiff: trainable shift of the singular values of every weight of "
        + "+".join(components),
        trains=components, lrs=tuple((c, lr) for c in components), per_device_batch=8,
    )
