"""BitFit (Ben Zaken et al. 2022): train only the biases of the UNet."""

from __future__ import annotations

from jaxmed.strategies.base import MaskStrategy


def bitfit(lr: float = 1e-4, components: tuple[str, ...] = ("unet",)) -> MaskStrategy:
    # Every bias: conv, linear, GroupNorm and LayerNorm (343,684 in SD 1.5's UNet: docs/STUDY.md
    # "Parameter counts of SD 1.5").
    return MaskStrategy(
        name="bitfit",
        description="biases only (conv, linear, GroupNorm, LayerNorm) of " + "+".join(components),
        trains=components,
        lrs=tuple((c, lr) for c in components),
        per_device_batch=8,
        select=lambda c, p, v: c in components and p[-1] == "bias",
    )
