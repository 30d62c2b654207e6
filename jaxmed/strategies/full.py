"""Full fine-tuning of whole components (the study's strategies 1-7) and of attention only."""

from __future__ import annotations

from jaxmed.strategies.base import MaskStrategy, StrategyError, match_targets, module_of

# The study's learning rates (docs/STUDY.md "The 11 strategies and their hyperparameters"):
# the UNet at 1e-5; the text encoder at 5e-6 alone, 1e-6 beside the UNet; the VAE at 1e-6.
STUDY_FULL = {
    "unet": {"unet": 1e-5},
    "text": {"text_encoder": 5e-6},
    "vae": {"vae": 1e-6},
    "unet+text": {"unet": 1e-5, "text_encoder": 1e-6},
    "unet+vae": {"unet": 1e-5, "vae": 1e-6},
    "vae+text": {"text_encoder": 5e-6, "vae": 1e-6},
    "unet+vae+text": {"unet": 1e-5, "text_encoder": 1e-6, "vae": 1e-6},
}


def full(name: str, lrs: dict[str, float] | None = None) -> MaskStrategy:
    """Train every parameter of the components in ``name``; ``lrs`` overrides their learning
    rates (it cannot add a component: pick the strategy that trains it)."""
    groups = dict(STUDY_FULL[name])
    extra = sorted(set(lrs or {}) - set(groups))
    if extra:
        raise StrategyError(
            f"strategy {name!r} trains {sorted(groups)}; lrs names {extra}, which it does not "
            f"train (the strategies {sorted(STUDY_FULL)} say which components train)"
        )
    groups.update({k: float(v) for k, v in (lrs or {}).items()})
    comps = tuple(groups)
    return MaskStrategy(
        name=name,
        description="full fine-tuning of " + " + ".join(comps),
        trains=comps,
        lrs=tuple(groups.items()),
        per_device_batch=4,
        select=lambda c, p, v, comps=comps: c in comps,
    )


ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def attn(lr: float = 1e-5, targets=ATTN_TARGETS) -> MaskStrategy:
    """Full fine-tuning of the UNet's attention projections (weights and biases)."""
    targets = tuple(targets) if not isinstance(targets, str) else targets
    if not targets:
        raise StrategyError("attn: targets is empty; give module names such as "
                            f"{ATTN_TARGETS} or a regex")
    return MaskStrategy(
        name="attn",
        description="full fine-tuning of UNet attention projections " + str(targets),
        trains=("unet",),
        lrs=(("unet", lr),),
        per_device_batch=4,
        select=lambda c, p, v: c == "unet" and match_targets(targets, module_of(p)),
        pattern=targets,
    )
