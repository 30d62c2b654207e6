"""Stable Diffusion as one object: the three Flax modules, the noise schedule, the tokenizer.

`StableDiffusion.load(path)` reads a diffusers folder (or ``jaxmed:tiny-sd``, the foundation
model bundled with jaxmed) and returns the modules plus float32 params
``{'unet', 'vae', 'text_encoder'}``. Its methods are pure functions of params, for use inside
jitted training and sampling code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxmed.diffusion import schedule as noise_schedule
from jaxmed.kernels import dispatch
from jaxmed.models import clip_text, tiny, unet, vae, weights
from jaxmed.models.tokenizer import tokenize

BUNDLED = {"jaxmed:tiny-sd": os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                           "assets", "tiny-sd")}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve(path: str) -> str:
    """Bundled names (``jaxmed:tiny-sd``) to their folder; other paths unchanged."""
    if path in BUNDLED:
        folder = BUNDLED[path]
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{path} should be bundled at {folder} but is missing; reinstall jaxmed from a "
                "full checkout, or rebuild it with `python launch/pretrain_tiny.py` "
                "(about 90 minutes on 2 CPU cores)"
            )
        return folder
    return path


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """Modules and configuration (no params: those travel separately through jit)."""

    unet: unet.UNet2DConditionModel
    vae: vae.AutoencoderKL
    text_encoder: clip_text.CLIPTextModel
    schedule: noise_schedule.NoiseSchedule
    scheduler_config: dict
    tokenizer: Any
    path: str = ""

    @classmethod
    def load(
        cls,
        path: str,
        *,
        dtype: str = "float32",
        remat: bool = False,
        attention: str = "auto",
        variant: str | None = None,
        allow_pickle: bool = False,
    ) -> tuple[StableDiffusion, dict]:
        if path.startswith("random:"):  # a named tiny architecture, randomly initialised
            name, _, res = path[len("random:"):].partition("@")
            cfgs = tiny.configs(name, int(res or 128))
            sd = cls.from_configs(cfgs, tiny.SD15_SCHEDULER, tiny.clip_tokenizer(), dtype=dtype,
                                  remat=remat, attention=attention, path=path)
            return sd, jax.device_get(tiny.init_params(cfgs, 0))
        folder = resolve(path)
        pipe = weights.load_pipeline(folder, variant=variant or None, allow_pickle=allow_pickle)
        sd = cls.from_configs(pipe.configs, pipe.scheduler_config, pipe.tokenizer,
                              dtype=dtype, remat=remat, attention=attention, path=pipe.path)
        return sd, pipe.params

    @classmethod
    def from_configs(cls, configs: dict, scheduler_config: dict, tokenizer: Any = None, *,
                     dtype: str = "float32", remat: bool = False, attention: str = "auto",
                     path: str = ""):
        """``attention`` (``model.attention``) picks the UNet's attention implementation:
        `jaxmed.kernels.dispatch.ATTENTION`."""
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype={dtype!r}: choose one of {sorted(DTYPES)}")
        if attention not in dispatch.ATTENTION:
            raise ValueError(f"model.attention={attention!r}: choose one of "
                             f"{list(dispatch.ATTENTION)}")
        dt = DTYPES[dtype]
        return cls(
            unet=unet.UNet2DConditionModel(configs["unet"], dtype=dt, remat=remat,
                                           attention=attention),
            vae=vae.AutoencoderKL(configs["vae"], dtype=dt, remat=remat),
            text_encoder=clip_text.CLIPTextModel(configs["text_encoder"], dtype=dt, remat=remat),
            schedule=noise_schedule.from_config(scheduler_config),
            scheduler_config=dict(scheduler_config),
            tokenizer=tokenizer,
            path=path,
        )

    # -- configs
    @property
    def configs(self) -> dict:
        return {"unet": self.unet.config, "vae": self.vae.config,
                "text_encoder": self.text_encoder.config}

    @property
    def vae_scale(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def abstract_variables(self) -> dict:
        """Boxed abstract params per component (logical axis names, for sharding)."""
        return {"unet": unet.abstract_variables(self.unet.config)["params"],
                "vae": vae.abstract_variables(self.vae.config)["params"],
                "text_encoder": clip_text.abstract_variables(self.text_encoder.config)["params"]}

    # -- pure functions of params
    def encode_text(self, params: dict, input_ids: jax.Array) -> jax.Array:
        """(B, 77) ids -> (B, 77, D) last hidden state (what the UNet cross-attends to)."""
        return self.text_encoder.apply({"params": params}, input_ids).last_hidden_state

    def encode_images(self, params: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, 3) in [-1, 1] -> posterior (mean, logvar), unscaled."""
        return self.vae.apply({"params": params}, images, method=self.vae.encode)

    def decode_latents(self, params: dict, latents: jax.Array) -> jax.Array:
        """Scaled latents -> images in [-1, 1] (not clipped)."""
        return self.vae.apply({"params": params}, latents / self.scaling_factor,
                              method=self.vae.decode)

    def predict(self, params: dict, latents: jax.Array, t: jax.Array, context: jax.Array):
        return self.unet.apply({"params": params}, latents, t, context)

    def tokenize(self, texts) -> jax.Array:
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer")
        return tokenize(self.tokenizer, texts)
