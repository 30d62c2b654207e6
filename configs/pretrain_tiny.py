r"""Pretrain jaxmed's tiny foundation model (``jaxmed:tiny-sd``) on a generic, non-medical corpus.

The whole recipe (corpus -> stage 1 -> stage 1b -> VAE scaling factor -> stage 2 -> install
into ``jaxmed/assets/tiny-sd``) is one resumable command:

    python launch/pretrain_tiny.py            # [--root runs/pretrain_tiny]

which runs, in order (ROOT = runs/pretrain_tiny):

    python -m jaxmed.data.corpus ROOT/corpus --n 6000 --resolution 128 --seed 0 \
        --patches ROOT/patches64          # + one 64 px patch of each image (stage 1)
    python -m jaxmed.train --config configs/pretrain_tiny.py:vae --workdir ROOT/vae
    python -m jaxmed.train --config configs/pretrain_tiny.py:vae-hr --workdir ROOT/vae-hr
    #   then vae/config.json's scaling_factor := 1 / std(latents over 2048 corpus images)
    #   (jaxmed.data.corpus.latent_scaling_factor, as SD chose 0.18215): 1/3.382 = 0.2957
    python -m jaxmed.train --config configs/pretrain_tiny.py:unet --workdir ROOT/unet
    #   then ROOT/unet/export -> jaxmed/assets/tiny-sd (float16 safetensors + README.md)

Stage 1, ``vae``: the tiny architecture (`jaxmed/models/tiny.py`, ``random:tiny@128``:
VAE (32, 64, 64, 64) f=8, 4 latent channels) trained alone as an autoencoder
(``train.objective=autoencoder``: reconstruction MSE of a posterior sample + 1e-6 x KL),
AdamW lr 1e-3 (200 warm-up steps), batch 16, 2000 steps on 64 px patches of the corpus
(the VAE is fully convolutional: a quarter of the cost of 128 px). Its export carries the
untouched random UNet and text encoder.
Stage 1b, ``vae-hr``: the same objective from stage 1's export on the 128 px images, lr
5e-4, batch 8, 300 steps (64 px training alone leaves a bright spot near the bottom-right
corner and colour shifts at 128 px).
Stage 2, ``unet``: diffusion (epsilon MSE on scaled latents, SD 1.5's DDPM schedule) with
strategy ``unet+text`` on stage 1b's export: UNet (64, 128, 128) lr 1e-3, CLIP text tower
(64-d, 4 layers, CLIP's BPE) lr 1e-4, 200 warm-up steps, batch 32, 2500 steps, caption
dropout 0.1, EMA 0.998 (exported); the VAE is frozen so latents come from the cache (one
encode per corpus image). Sample grids of `PROMPTS` land in ROOT/unet/samples.

Each stage's wall-clock time and final loss are recorded in ROOT/timings.json and in the
installed model's README (``jaxmed/assets/tiny-sd/README.md``).

An optional second part moves the run folder: ``pretrain_tiny.py:unet,/tmp/pt`` reads the
corpus from /tmp/pt/corpus and stage 1b from /tmp/pt/vae-hr/export.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

ROOT = "runs/pretrain_tiny"
RESOLUTION = 128
CORPUS_IMAGES = 6000

PROMPTS = (
    "a photo of a cat",
    "a texture of red bricks",
    "a black and white photo of the moon",
    "a photo of a cup of coffee",
    "a texture of green grass",
    "a photo of galaxies in deep space",
    "a photo of an astronaut",
    "a blue and yellow checkerboard",
)


STAGES = ("vae", "vae-hr", "unet")


def _finetune():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune.py")
    spec = importlib.util.spec_from_file_location("jaxmed_config_finetune", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = (arg or "unet").split(",", 1)
    stage, root = parts[0], (parts[1] if len(parts) > 1 else ROOT)
    if stage not in STAGES:
        raise ValueError(f"pretrain_tiny.py: stage {stage!r}: choose one of {STAGES}")
    finetune = _finetune()
    c = finetune.get_config("unet+text" if stage == "unet" else "vae")
    c.seed = 0

    c.data.kind = "folder"
    c.data.csv = os.path.join(root, "corpus", "captions.csv")
    c.data.image_root = ""  # paths are relative to the CSV
    c.data.resolution = RESOLUTION
    c.data.workers = 2
    c.data.caption_dropout = 0.1

    c.optim.grad_accum = 1
    c.optim.weight_decay = 1e-2
    c.optim.clip_norm = 1.0
    c.checkpoint.keep = 2
    c.log.every_steps = 25
    c.log.sample_prompts = PROMPTS
    c.log.sample_steps = 25
    c.log.guidance_scale = 5.0

    if stage == "vae":
        c.model.path = f"random:tiny@{RESOLUTION}"
        # 64 px patches of the 128 px corpus (jaxmed.data.corpus.make_patches): the VAE is
        # fully convolutional, so it trains at a quarter of the cost and is used at 128 px.
        c.data.csv = os.path.join(root, "patches64", "captions.csv")
        c.data.resolution = 64
        c.train.objective = "autoencoder"
        c.train.kl_weight = 1e-6
        c.strategy.lrs.vae = 1e-3
        c.optim.warmup_steps = 200
        c.train.per_device_batch = 16
        c.train.max_steps = 2000
        c.checkpoint.every_steps = 250
        c.log.sample_every_steps = -1  # no text-to-image samples for the VAE stage
        c.cache.latents = "off"
        c.cache.text = "off"
    elif stage == "vae-hr":
        # Stage 1b: the same objective on the full 128 px corpus images, from stage 1's
        # export. A VAE trained only on 64 px patches reconstructs 128 px images worse than
        # 64 px ones (a bright artefact near the bottom-right corner, colour shifts): its
        # zero-padded convolutions and mid-block attention only ever saw 8 x 8 latents.
        c.model.path = os.path.join(root, "vae", "export")
        c.train.objective = "autoencoder"
        c.train.kl_weight = 1e-6
        c.strategy.lrs.vae = 5e-4
        c.optim.warmup_steps = 50
        c.train.per_device_batch = 8
        c.train.max_steps = 300
        c.checkpoint.every_steps = 100
        c.log.sample_every_steps = -1
        c.cache.latents = "off"
        c.cache.text = "off"
    else:
        c.model.path = os.path.join(root, "vae-hr", "export")
        c.train.objective = "diffusion"
        c.strategy.lrs.unet = 1e-3
        c.strategy.lrs.text_encoder = 1e-4
        c.optim.warmup_steps = 200
        c.train.per_device_batch = 32
        c.train.max_steps = 2500
        c.train.ema_decay = 0.998  # exported and sampled: smooths the high-lr updates
        c.checkpoint.every_steps = 500
        c.log.sample_every_steps = 500
        c.cache.latents = "auto"  # the VAE is frozen: encode the corpus once
    return c
