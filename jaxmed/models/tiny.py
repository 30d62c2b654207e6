"""Tiny Stable Diffusion architectures, randomly initialised, written in diffusers layout.

Used by the tests (fast compiles) and as the starting point of jaxmed's own tiny
foundation model (`configs/pretrain_tiny.py`). The tokenizer is CLIP's real BPE vocabulary
rebuilt from the file open_clip ships, so prompts tokenise exactly as for SD 1.5.
"""

from __future__ import annotations

import os

import jax

from jaxmed.models import clip_text, unet, vae, weights
from jaxmed.models.tokenizer import build_clip_bpe_tokenizer, load_tokenizer, open_clip_bpe_path

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "trained_betas": None,
}


def configs(size: str = "test", image_size: int = 32) -> dict:
    """Architectures by name.

    * ``test``: the smallest useful SD 1.x shape (UNet (32, 64) 1 layer/block, VAE f=4).
    * ``tiny``: jaxmed's tiny foundation model (UNet (64, 128, 128), VAE f=8 at 128 px).
    """
    if size == "test":
        u = dict(block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 num_attention_heads=4, norm_num_groups=8, sample_size=image_size // 4)
        v = dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
                 norm_num_groups=8, sample_size=image_size,
                 down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3)
        t = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, projection_dim=32, vocab_size=49408,
                 max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407)
    elif size == "tiny":
        u = dict(block_out_channels=(64, 128, 128), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=64, num_attention_heads=4, norm_num_groups=32,
                 sample_size=image_size // 8)
        v = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4,
                 norm_num_groups=32, sample_size=image_size,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4)
        t = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, projection_dim=64, vocab_size=49408,
                 max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407)
    else:
        raise ValueError(f"unknown tiny architecture {size!r}: 'test' or 'tiny'")
    return {"unet": unet.UNetConfig(**u), "vae": vae.VAEConfig(**v),
            "text_encoder": clip_text.CLIPTextConfig(**t)}


def init_params(cfgs: dict, seed: int = 0) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"unet": unet.init_params(cfgs["unet"], k1),
            "vae": vae.init_params(cfgs["vae"], k2),
            "text_encoder": clip_text.init_params(cfgs["text_encoder"], k3)}


def clip_tokenizer(cache_dir: str | None = None):
    """CLIP's tokenizer (SD 1.x padding), built once from open_clip's BPE file."""
    cache_dir = cache_dir or os.path.join(
        os.environ.get("JAXMED_CACHE", os.path.expanduser("~/.cache/jaxmed")), "clip-tokenizer")
    if os.path.isfile(os.path.join(cache_dir, "vocab.json")):
        return load_tokenizer(cache_dir)
    return build_clip_bpe_tokenizer(open_clip_bpe_path(), cache_dir)


def write_random_pipeline(folder: str, size: str = "test", image_size: int = 32,
                          seed: int = 0) -> str:
    """A complete diffusers folder with random weights (what tests load)."""
    cfgs = configs(size, image_size)
    params = jax.device_get(init_params(cfgs, seed))
    return weights.save_pipeline(folder, cfgs, params, SD15_SCHEDULER, clip_tokenizer())
