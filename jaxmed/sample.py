"""Guided sampling: the whole denoising loop inside one jitted function.

`make_sample_fn` builds ``fn(params, cond_ids, uncond_ids, image_ids) -> images`` for a
model, sampler (pndm / ddim / dpmpp_2m / ddpm), number of steps, guidance scale and size.
Every image's starting noise comes from ``fold_in(seed, image_id)``, so an image is the
same whichever batch or device computes it. Classifier-free guidance runs the
unconditional and conditional branches as one batch of 2B, as diffusers does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxmed import schedulers
from jaxmed.models.sd import StableDiffusion


def initial_noise(seed: int, image_ids: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """(B, *shape) standard normal noise, one independent stream per global image id."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(image_ids)


def make_sample_fn(
    sd: StableDiffusion,
    *,
    sampler: str = "pndm",
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int = 42,
    eta: float = 0.0,
):
    """A jitted ``fn(params, cond_ids, uncond_ids, image_ids) -> (B, H, W, 3) float32 [0, 1]``.

    ``params`` are plain (adapter-free) params {'unet', 'vae', 'text_encoder'}: fold any
    adapter in first with `Strategy.export`.
    """
    res = height or sd.vae.config.sample_size
    height, width = height or res, width or res
    f = sd.vae_scale
    if height % (f * 2 ** (len(sd.unet.config.block_out_channels) - 1)) or width % f:
        raise ValueError(f"image size {height}x{width} must be a multiple of "
                         f"{f * 2 ** (len(sd.unet.config.block_out_channels) - 1)}")
    opts = {"eta": eta} if sampler == "ddim" else {}
    smp = schedulers.make_sampler(sampler, sd.scheduler_config, num_steps, **opts)
    lat_shape = (height // f, width // f, sd.unet.config.in_channels)

    def fn(params, cond_ids, uncond_ids, image_ids):
        ctx = sd.encode_text(params["text_encoder"], cond_ids)
        uctx = sd.encode_text(params["text_encoder"], uncond_ids)
        x = initial_noise(seed, image_ids, lat_shape) * smp.init_noise_sigma

        def model_fn(x, t):
            if guidance_scale == 1.0:
                return sd.predict(params["unet"], x, t, ctx)
            both = sd.predict(params["unet"], jnp.concatenate([x, x]), t,
                              jnp.concatenate([uctx, ctx]))
            u, c = jnp.split(both, 2)
            return u + guidance_scale * (c - u)

        key = jax.random.fold_in(jax.random.PRNGKey(seed + 1), image_ids[0])
        latents = schedulers.sample_loop(smp, model_fn, x, key)
        images = sd.decode_latents(params["vae"], latents)
        return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)

    return jax.jit(fn)


@functools.lru_cache(maxsize=8)
def _empty_ids(sd: StableDiffusion, n: int) -> np.ndarray:
    return np.repeat(np.asarray(sd.tokenize([""])), n, axis=0)


def generate(
    sd: StableDiffusion,
    params: dict,
    prompts: Sequence[str],
    *,
    first_id: int = 0,
    fn=None,
    **kwargs,
) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for ``prompts``; ids first_id.. seed their noise."""
    fn = fn or make_sample_fn(sd, **kwargs)
    cond = np.asarray(sd.tokenize(list(prompts)))
    uncond = _empty_ids(sd, len(prompts))
    ids = jnp.arange(first_id, first_id + len(prompts), dtype=jnp.int32)
    images = fn(params, cond, uncond, ids)
    return to_uint8(images)


def to_uint8(images) -> np.ndarray:
    return np.asarray(np.round(np.asarray(images, np.float32) * 255.0), np.uint8)


def grid(images: np.ndarray, captions: Sequence[str] | None = None, cols: int | None = None,
         ) -> Image.Image:
    """Tile (N, H, W, C) uint8 images into one PIL image, with optional captions below."""
    from PIL import ImageDraw

    n, h, w = images.shape[:3]
    cols = cols or min(n, 4)
    rows = math.ceil(n / cols)
    cap_h = 14 if captions else 0
    sheet = Image.new("RGB", (cols * w, rows * (h + cap_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        tile = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
        sheet.paste(tile.convert("RGB"), (c * w, r * (h + cap_h)))
        if captions:
            text = captions[i]
            max_chars = max(4, w // 6)
            text = text if len(text) <= max_chars else text[: max_chars - 1] + "…"
            draw.text((c * w + 2, r * (h + cap_h) + h + 1), text, fill="black")
    return sheet
