r"""Fine-tune Stable Diffusion with one strategy of the registry.

    python -m jaxmed.train --config configs/finetune.py:lora --workdir /tmp/lora \
        --config.model.path=/data/stable-diffusion-v1-5 \
        --config.data.kind=chexpert --config.data.csv=/data/chexpert/train.csv \
        --config.data.image_root=/data --config.data.resolution=512

The argument is a strategy name (``python -m jaxmed.counts --list`` prints them):
unet, text, vae, unet+text, unet+vae, vae+text, unet+vae+text, lora, dora, bitfit, difffit
(the study's 11) and difffit-orig, svdiff, attn. The defaults are the study's
hyperparameters (docs/STUDY.md "The 11 strategies and their hyperparameters"): AdamW
(0.9, 0.999), weight decay 1e-2, eps 1e-8, constant lr per component, gradient clipping
1.0, gradient accumulation 4, 101 epochs, a checkpoint every 5 epochs. Strategy options
live under ``config.strategy`` (e.g. ``--config.strategy.rank=4``).
An optional second part picks the model: ``finetune.py:lora,sd15`` uses the SD 1.5 hub folder
at 512 px; the default is jaxmed's tiny foundation model at 128 px (runs on a laptop CPU).

An optional third part names the TPU slice to run on (``finetune.py:unet,sd15,v5e-8``; any
`jaxmed.plan_topologies` name but ``cpu``) and switches on the accelerator preset
(`accelerator_preset`): bf16 compute with float32 master weights and optimizer state,
rematerialised blocks, parameters, gradients and Adam moments sharded over every chip
(``mesh.data=1, mesh.fsdp=-1``), the encoders' caches on where the strategy freezes them,
and the study's batch per optimizer step (its per-GPU batch x 4 GPUs x 4 accumulation
steps: 64 or 128 images) kept as per-chip batch x chips x ``optim.grad_accum``.
``python -m jaxmed.plan --config configs/finetune.py:unet,sd15,v5e-8 --topology v5e-8``
checks that it fits before a run.
"""

from __future__ import annotations

import ml_collections

from jaxmed import plan_topologies, strategies
from jaxmed.strategies.full import STUDY_FULL

VALIDATION_PROMPTS = (
    "Chest X-ray showing Cardiomegaly",
    "Chest X-ray showing Pleural Effusion",
    "Chest X-ray showing Lung Opacity, Pneumonia",
    "Normal chest X-ray with no significant findings",
)

MODELS = {
    # name: (path, resolution)
    "tiny": ("jaxmed:tiny-sd", 128),
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", 512),
}


def strategy_config(name: str) -> ml_collections.ConfigDict:
    """``config.strategy``: the name plus every option the registry accepts, at its default."""
    opts = strategies.options(name)
    c = ml_collections.ConfigDict()
    c.name = name
    for k, v in opts.items():
        if k == "lrs":
            v = ml_collections.ConfigDict(STUDY_FULL[name])
        elif isinstance(v, list):
            v = tuple(v)
        if v is None:
            v = ml_collections.FieldReference(None, field_type=float)
        c[k] = v
    return c


# The study trained on 4 GPUs with 4 accumulation steps (docs/STUDY.md "The 11 strategies
# and their hyperparameters"): one optimizer step saw 16 x the per-GPU batch.
STUDY_GPUS, STUDY_ACCUM = 4, 4

# Strategies whose trainable state is model-sized (weights + 2 Adam moments of every weight
# they train, or a full-size delta): on a 16 GiB chip they leave room for 1 image of
# activations per chip at 512 px; the adapters (a few MB of state) for 4.
MODEL_SIZED = (*STUDY_FULL, "difffit", "attn")


def per_chip_batch(name: str, hbm_gib: float) -> int:
    """The accelerator preset's per-chip batch: 1 (model-sized state) or 4 (adapters) per
    16 GiB of HBM, in powers of two, at most the study's per-GPU batch."""
    scale = 1 << max(0, int(hbm_gib // 16).bit_length() - 1)
    base = 1 if name in MODEL_SIZED else 4
    return min(base * scale, strategies.get(name).per_device_batch)


def accelerator_preset(c: ml_collections.ConfigDict, topology: str) -> None:
    """Set ``c`` up for a TPU slice (see the module docstring): the settings that compile
    within the chips' HBM, with the study's batch per optimizer step."""
    topo = plan_topologies.get(topology)
    if topo.chip is None:
        raise ValueError(f"finetune.py: {topology!r} is not an accelerator; name a TPU slice "
                         "such as v5e-8 (or leave the third part out for the CPU defaults)")
    name = c.strategy.name
    study_batch = strategies.get(name).per_device_batch * STUDY_GPUS * STUDY_ACCUM
    per_chip = per_chip_batch(name, topo.chip.hbm_gib)
    per_chip = min(per_chip, max(1, study_batch // topo.chips))
    if study_batch % (per_chip * topo.chips):
        raise ValueError(f"finetune.py: the study's batch of {study_batch} images does not "
                         f"split over {topo.chips} chips at {per_chip} per chip; set "
                         "--config.train.per_device_batch and --config.optim.grad_accum")
    c.model.dtype = "bfloat16"  # compute; params and optimizer state stay float32
    c.model.remat = True
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.train.per_device_batch = per_chip
    c.optim.grad_accum = study_batch // (per_chip * topo.chips)
    c.cache.latents = c.cache.text = "auto"  # on for every encoder the strategy freezes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = (arg or "lora").split(",")
    if len(parts) > 3:
        raise ValueError(f"finetune.py: {arg!r}: at most strategy,model,topology")
    name, model = parts[0], parts[1] if len(parts) > 1 else "tiny"
    if model not in MODELS:
        raise ValueError(f"finetune.py: unknown model preset {model!r}; choose from "
                         f"{sorted(MODELS)}")
    path, resolution = MODELS[model]
    c = ml_collections.ConfigDict()
    c.seed = 42

    c.model = ml_collections.ConfigDict()
    # a diffusers folder, a hub id, jaxmed:tiny-sd (bundled) or random:<test|tiny>[@res]
    c.model.path = path
    # "" = read config.json under model.path; sd15 | sd21 | test | tiny: a built-in
    # architecture (no weights needed; what jaxmed.counts uses)
    c.model.arch = ""
    c.model.variant = ""  # e.g. "fp16" to read *.fp16.safetensors
    c.model.allow_pickle = False  # read pickled .bin weights (runs code from the file)
    c.model.dtype = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
    c.model.remat = False  # rematerialise blocks in the backward pass (less memory)
    # the UNet's attention: auto (CPU: jaxmed's CPU kernels, GPU: dot_product, TPU: flash),
    # einsum (the XLA reference), dot_product (jax.nn.dot_product_attention; cuDNN flash on
    # GPU where it applies), flash (the Pallas kernel on TPU; elsewhere as auto)
    c.model.attention = "auto"
    c.model.prediction_type = ""  # "" = the scheduler config's; epsilon | v_prediction

    c.strategy = strategy_config(name)

    c.data = ml_collections.ConfigDict()
    c.data.kind = "phantom"  # phantom | chexpert | folder | tfds
    c.data.csv = ""  # chexpert / folder: the CSV
    c.data.image_root = ""  # prefix for the CSV's Path column
    # "old=>new" (several separated by ";"), e.g. "CheXpert-v1.0/=>CheXpert-v1.0_512x512/";
    # without one, the CheXpert folder layouts are guessed when the paths do not resolve
    c.data.path_rewrite = ""
    c.data.frontal_only = True
    c.data.uncertain = "zeros"  # CheXpert -1 labels: zeros | ones | ignore
    c.data.resolution = resolution
    c.data.caption_dropout = 0.1  # the study had none although it samples with CFG
    c.data.templates = ()  # optional caption templates with {findings}
    c.data.on_bad_image = "error"  # error | skip
    c.data.workers = 4
    c.data.prefetch = 2
    c.data.max_images = -1  # -1: all; else the first N rows (after filtering)
    c.data.tfds_split = "train"
    c.data.phantom_patients = 400  # phantom: synthetic patients (train split ~70%)
    c.data.phantom_dir = ""  # "" = <workdir>/../phantom-data shared cache

    c.optim = ml_collections.ConfigDict()
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-2
    c.optim.clip_norm = 1.0  # 0 disables
    c.optim.clip_adapters = True  # False = the authors' behaviour: adapters not clipped
    c.optim.grad_accum = 4
    c.optim.warmup_steps = 0

    c.train = ml_collections.ConfigDict()
    c.train.per_device_batch = 0  # 0 = the strategy's study default (4 or 8)
    c.train.epochs = 101
    c.train.max_steps = -1  # > 0 overrides epochs (optimizer steps)
    # the reconstruction term when the VAE trains (docs/STUDY.md "The 11 strategies and
    # their hyperparameters")
    c.train.vae_loss_weight = 1.0
    c.train.ema_decay = 0.0  # > 0 keeps an EMA of the trainable params, exported instead
    c.train.noise_offset = 0.0
    c.train.objective = "diffusion"  # diffusion | autoencoder (VAE pretraining)
    c.train.kl_weight = 1e-6  # autoencoder objective only
    # XLA's exec_time_optimization_effort for the step, in [-1, 1]: 0 is XLA's default;
    # -1 compiles an SD 1.5 step for TPU several times faster (README, "Compile time"), at a
    # step speed not yet measured on a TPU
    c.train.compile_effort = 0.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0  # 0 = every `every_epochs` epochs
    c.checkpoint.every_epochs = 5
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    c.log.sample_every_steps = 0  # 0 = at every checkpoint
    c.log.sample_prompts = VALIDATION_PROMPTS
    c.log.sample_steps = 25
    c.log.sample_sampler = "pndm"  # the synthesis sampler, not DDPM (a study pitfall)
    c.log.guidance_scale = 7.5
    c.log.tensorboard = True
    c.log.progress = True

    c.export = ml_collections.ConfigDict()
    c.export.diffusers = True
    c.export.adapters = True  # peft-format adapter for lora / dora

    c.cache = ml_collections.ConfigDict()
    c.cache.latents = "auto"  # auto | on | off (auto: on when the VAE is frozen)
    c.cache.text = "auto"  # auto | on | off (auto: on when the text encoder is frozen)
    c.cache.dir = ""  # "" = <workdir>/cache; the study shares one across strategies
    # False: encode (once) only the images this run's steps read, the rest when first read;
    # True: encode every image before the first step (a long run; a folder shared by
    # several processes is always filled whole)
    c.cache.prefill = False

    if len(parts) > 2 and parts[2]:
        accelerator_preset(c, parts[2])
    return c
