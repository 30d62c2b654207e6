"""The training objectives: what one micro-batch's loss is, for each ``train.objective``.

``diffusion`` is the study's (noise the VAE latents at a uniform timestep, regress the UNet
onto the noise or the velocity); ``autoencoder`` pretrains a VAE alone. Both see the
parameters through the strategy (`Strategy.combine` and its `intercept` for adapters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxmed.diffusion.schedule import add_noise, training_target
from jaxmed.models.sd import StableDiffusion
from jaxmed.strategies.base import Strategy


def diffusion_loss(sd: StableDiffusion, strategy: Strategy, trainable: Any, frozen: Any,
                   batch: Mapping[str, jax.Array], rng: jax.Array, *,
                   prediction_type: str, vae_loss_weight: float = 1.0,
                   noise_offset: float = 0.0) -> tuple[jax.Array, dict]:
    """The study's objective on one micro-batch: epsilon (or v) MSE on VAE latents times
    the scaling factor, plus the VAE reconstruction MSE when the VAE trains (docs/STUDY.md
    "The 11 strategies and their hyperparameters").

    ``batch`` holds 'image' and 'input_ids', or, from the caches, 'latent_mean' /
    'latent_logvar' instead of 'image' and 'context' instead of 'input_ids'.
    """
    params = strategy.combine(trainable, frozen)
    r_lat, r_noise, r_t, r_ad, r_off = jax.random.split(rng, 5)

    def intercept(component):
        return strategy.intercept(component, trainable, frozen, rng=r_ad, train=True)

    if "context" in batch:
        context = batch["context"]
    else:
        with intercept("text_encoder"):
            context = sd.encode_text(params["text_encoder"], batch["input_ids"])
    if "latent_mean" in batch:
        mean, logvar = batch["latent_mean"], batch["latent_logvar"]
    else:
        with intercept("vae"):
            mean, logvar = sd.encode_images(params["vae"], batch["image"])
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(r_lat, mean.shape, mean.dtype)
    latents = z * sd.scaling_factor
    noise = jax.random.normal(r_noise, latents.shape, latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * jax.random.normal(
            r_off, (latents.shape[0], 1, 1, latents.shape[-1]), latents.dtype)
    n_train = sd.schedule.alphas_cumprod.shape[0]
    t = jax.random.randint(r_t, (latents.shape[0],), 0, n_train)
    noisy = add_noise(sd.schedule, latents, noise, t)
    target = training_target(sd.schedule, prediction_type, latents, noise, t)
    with intercept("unet"):
        pred = sd.predict(params["unet"], noisy, t, context)
    diff_loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))
    loss, aux = diff_loss, {"diffusion_loss": diff_loss}
    if "vae" in strategy.trains and vae_loss_weight:
        if "image" not in batch:
            raise ValueError("the VAE trains, so batches need images, not cached latents")
        with intercept("vae"):
            recon = sd.vae.apply({"params": params["vae"]}, z, method=sd.vae.decode)
        rec_loss = jnp.mean(jnp.square(recon - batch["image"].astype(jnp.float32)))
        loss = loss + vae_loss_weight * rec_loss
        aux["vae_loss"] = rec_loss
    return loss, aux


def autoencoder_loss(sd: StableDiffusion, strategy: Strategy, trainable: Any, frozen: Any,
                     batch: Mapping[str, jax.Array], rng: jax.Array, *,
                     kl_weight: float = 1e-6) -> tuple[jax.Array, dict]:
    """VAE pretraining (`configs/pretrain_tiny.py`): reconstruction MSE of a posterior
    sample plus a small KL to N(0, I) (per latent element, SD's VAE used a tiny weight too)."""
    params = strategy.combine(trainable, frozen)
    with strategy.intercept("vae", trainable, frozen, rng=rng, train=True):
        mean, logvar = sd.encode_images(params["vae"], batch["image"])
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        recon = sd.vae.apply({"params": params["vae"]}, z, method=sd.vae.decode)
    rec = jnp.mean(jnp.square(recon - batch["image"].astype(jnp.float32)))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return rec + kl_weight * kl, {"recon_loss": rec, "kl": kl}


OBJECTIVES = ("diffusion", "autoencoder")
