r"""Pretrain and install jaxmed's tiny foundation model, ``jaxmed:tiny-sd``.

    python launch/pretrain_tiny.py [--root runs/pretrain_tiny] [--stages all]
        [--vae-steps N] [--unet-steps N] [--dest jaxmed/assets/tiny-sd]

Stages (each skipped when its output is complete, so a killed run resumes; the training
stages also resume from their own checkpoints):

1. ``corpus``: ``ROOT/corpus`` = `jaxmed.data.corpus.make_corpus` (6000 captioned 128 px
   crops of scikit-image / scikit-learn / matplotlib's bundled photos, textures and
   graphics; nothing medical), and ``ROOT/patches64`` = one 64 px patch of each (stage 1).
2. ``vae``: ``python -m jaxmed.train --config configs/pretrain_tiny.py:vae,ROOT
   --workdir ROOT/vae`` (autoencoder objective, VAE alone, on the 64 px patches).
3. ``vae-hr``: the same on the 128 px images from stage 1's export
   (``configs/pretrain_tiny.py:vae-hr,ROOT``, workdir ``ROOT/vae-hr``).
4. ``scale``: the VAE's ``scaling_factor`` := 1 / std of its latents (posterior samples)
   over 2048 corpus images, written into ``ROOT/vae-hr/export/vae/config.json`` (SD chose
   its 0.18215 the same way) and recorded in ``ROOT/vae-hr/scaling.json``.
5. ``unet``: ``python -m jaxmed.train --config configs/pretrain_tiny.py:unet,ROOT
   --workdir ROOT/unet`` (diffusion, strategy unet+text, frozen VAE through the latent
   cache).
6. ``install``: ``ROOT/unet/export`` -> ``DEST`` with every weight as float16 safetensors
   (the loaders cast to float32), a README.md (what, how, command, corpus, licences),
   ``docs/tiny_sd_samples.png`` (non-medical prompts) and ``docs/tiny_sd_vae.png``
   (corpus images over their VAE reconstructions); fails if DEST exceeds 30 MB.

Wall-clock times of each stage go to ``ROOT/timings.json`` and into the README.

The training stages run ``python -m jaxmed.train`` in a child process (one process per
stage, so each stage's memory is returned).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

CONFIG = os.path.join(REPO, "configs", "pretrain_tiny.py")
DEST = os.path.join(REPO, "jaxmed", "assets", "tiny-sd")
MAX_MB = 30.0
STAGES = ("corpus", "vae", "vae-hr", "scale", "unet", "install")

# The docs grid: the training config's sample prompts (what the model was watched on) + these.
EXTRA_DOC_PROMPTS = (
    "a photo of a red motorcycle",
    "a photo of an orange flower",
    "a black and white photo of old coins",
    "a photo of a chinese temple",
)


# ---------------------------------------------------------------------------------------
# Stages


def _timings(root: str) -> dict:
    path = os.path.join(root, "timings.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _record(root: str, stage: str, seconds: float, **extra) -> None:
    t = _timings(root)
    prev = t.get(stage, {}).get("seconds", 0.0) if extra.pop("accumulate", False) else 0.0
    t[stage] = {"seconds": round(prev + seconds, 1), **extra}
    with open(os.path.join(root, "timings.json"), "w") as f:
        json.dump(t, f, indent=2)


def _done(workdir: str, steps: int) -> bool:
    path = os.path.join(workdir, "summary.json")
    if not (os.path.isfile(path) and os.path.isfile(
            os.path.join(workdir, "export", "model_index.json"))):
        return False
    with open(path) as f:
        return json.load(f).get("steps") == steps


def stage_corpus(a) -> None:
    from jaxmed.data import corpus

    t0 = time.perf_counter()
    csv_path = corpus.ensure_corpus(os.path.join(a.root, "corpus"), a.n, 128, a.seed)
    corpus.make_patches(csv_path, os.path.join(a.root, "patches64"), 64, a.seed)
    if "corpus" not in _timings(a.root):
        _record(a.root, "corpus", time.perf_counter() - t0, images=a.n)


def _train(a, stage: str, steps: int | None, extra: list[str]) -> None:
    workdir = os.path.join(a.root, stage)
    from jaxmed.cli import load_config

    cfg = load_config(f"{CONFIG}:{stage},{a.root}")
    steps = steps or cfg.train.max_steps
    if _done(workdir, steps):
        print(f"[pretrain_tiny] {stage}: already done ({workdir})", flush=True)
        return
    cmd = [sys.executable, "-m", "jaxmed.train",
           "--config", f"{CONFIG}:{stage},{a.root}", "--workdir", workdir,
           f"--config.train.max_steps={steps}", *extra]
    print("[pretrain_tiny] " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    _record(a.root, stage, time.perf_counter() - t0, accumulate=True, steps=steps,
            final_loss=summary.get("final_loss"), train_seconds=summary.get("train_seconds"))


def stage_scale(a) -> None:
    from jaxmed.data import corpus

    out = os.path.join(a.root, "vae-hr", "scaling.json")
    export = os.path.join(a.root, "vae-hr", "export")
    if os.path.isfile(out):
        with open(out) as f:
            s = json.load(f)
        corpus.set_scaling_factor(export, s["scaling_factor"])  # idempotent
        return
    t0 = time.perf_counter()
    s = corpus.latent_scaling_factor(export, os.path.join(a.root, "corpus", "captions.csv"),
                                     resolution=128, max_images=2048, seed=a.seed)
    corpus.set_scaling_factor(export, s["scaling_factor"])
    with open(out, "w") as f:
        json.dump(s, f, indent=2)
    print(f"[pretrain_tiny] VAE scaling_factor = 1/{s['std']:.4f} = {s['scaling_factor']:.5f} "
          f"(latent mean {s['mean']:.4f}, {s['images']} images)", flush=True)
    _record(a.root, "scale", time.perf_counter() - t0, **s)


def _dir_mb(folder: str) -> float:
    total = 0
    for dp, _, files in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(dp, f)) for f in files)
    return total / 2**20


def stage_install(a) -> None:
    import numpy as np

    from jaxmed.models import weights

    src = os.path.join(a.root, "unet", "export")
    pipe = weights.load_pipeline(src)
    tmp = a.dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    weights.save_pipeline(tmp, pipe.configs, pipe.params, pipe.scheduler_config,
                          pipe.tokenizer, dtype=np.float16)
    write_readme(a, tmp, pipe)
    mb = _dir_mb(tmp)
    if mb > MAX_MB:
        raise SystemExit(f"{tmp}: {mb:.1f} MB exceeds the {MAX_MB} MB budget")
    if os.path.isdir(a.dest):
        shutil.rmtree(a.dest)
    os.replace(tmp, a.dest)
    du = subprocess.run(["du", "-sh", a.dest], capture_output=True, text=True).stdout.strip()
    print(f"[pretrain_tiny] installed {a.dest}: {mb:.2f} MiB (du: {du})", flush=True)
    if a.docs:
        write_docs(a)


def write_docs(a) -> None:
    """docs/tiny_sd_samples.png and docs/tiny_sd_vae.png from the installed model."""
    import jax
    import numpy as np
    from PIL import Image

    from jaxmed.checkpoint import load_for_sampling
    from jaxmed.cli import load_config
    from jaxmed.data import load_image, read_folder_csv
    from jaxmed.diffusion.sampling import generate
    from jaxmed.images import grid

    docs = os.path.join(REPO, "docs")
    os.makedirs(docs, exist_ok=True)
    prompts = [*load_config(f"{CONFIG}:unet,{a.root}").log.sample_prompts, *EXTRA_DOC_PROMPTS]
    sd, params = load_for_sampling(a.dest)
    images = generate(sd, params, prompts, sampler="pndm", num_steps=25,
                      guidance_scale=5.0, height=128, width=128, seed=a.seed)
    grid(images, prompts, cols=4).save(os.path.join(docs, "tiny_sd_samples.png"))

    records = read_folder_csv(os.path.join(a.root, "corpus", "captions.csv"))
    pick = np.linspace(0, len(records) - 1, 8).astype(int)
    x = np.stack([load_image(records.paths[i], 128) for i in pick])
    enc = jax.jit(lambda p, x: sd.encode_images(p, x)[0])
    dec = jax.jit(lambda p, z: sd.vae.apply({"params": p}, z, method=sd.vae.decode))
    recon = np.asarray(dec(params["vae"], enc(params["vae"], x)))
    both = np.concatenate([x, recon])
    u8 = np.round((np.clip(both, -1, 1) + 1) * 127.5).astype(np.uint8)
    caps = ["corpus"] * 8 + ["VAE reconstruction"] * 8
    grid(u8, caps, cols=8).save(os.path.join(docs, "tiny_sd_vae.png"))
    Image.open(os.path.join(docs, "tiny_sd_samples.png")).verify()
    print(f"[pretrain_tiny] wrote {docs}/tiny_sd_samples.png and tiny_sd_vae.png", flush=True)


def write_readme(a, folder: str, pipe) -> None:
    import jax
    import numpy as np

    from jaxmed.cli import load_config
    from jaxmed.data import corpus

    t = _timings(a.root)
    counts = {k: int(sum(np.size(x) for x in jax.tree_util.tree_leaves(v)))
              for k, v in pipe.params.items()}
    with open(os.path.join(a.root, "corpus", "corpus.json")) as f:
        meta = json.load(f)
    cv = load_config(f"{CONFIG}:vae,{a.root}")
    ch = load_config(f"{CONFIG}:vae-hr,{a.root}")
    cu = load_config(f"{CONFIG}:unet,{a.root}")
    scale = pipe.configs["vae"].scaling_factor

    def minutes(stage):
        s = t.get(stage, {}).get("seconds")
        return f"{s / 60:.1f} min" if s else "n/a"

    def loss(stage):
        v = t.get(stage, {}).get("final_loss")
        return f"{v:.4f}" if isinstance(v, float) else "n/a"

    arch = "\n".join([
        "| UNet | block_out_channels (64, 128, 128), 1 layer/block, cross-attention in the "
        f"two lower levels, 4 heads, cross_attention_dim 64 | {counts['unet']:,} |",
        "| VAE | block_out_channels (32, 64, 64, 64), f = 8, 4 latent channels, "
        f"scaling_factor {scale:.5f} | {counts['vae']:,} |",
        "| text encoder | CLIP text tower, 64-d, 4 layers, 4 heads, 77 tokens | "
        f"{counts['text_encoder']:,} |",
        "| tokenizer | CLIP's BPE (49,408 tokens, SD 1.x padding), rebuilt from open_clip's "
        "vocabulary file | |",
        "| scheduler | SD 1.5's PNDMScheduler config (1000 steps, scaled_linear "
        "0.00085..0.012, epsilon) | |",
    ])
    total_min = sum(v.get("seconds", 0) for v in t.values()) / 60
    sources = [s for s in corpus.SOURCES if s.name in meta["sources"]]
    rows = "\n".join(f"| {s.name} | {meta['counts'].get(s.name, 0)} | {s.style} | {s.origin} |"
                     for s in sources)
    text = f"""# jaxmed:tiny-sd -- a tiny Stable Diffusion that knows images, not radiographs

A complete Stable Diffusion 1.x pipeline in diffusers layout (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer, PNDMScheduler), small enough to ship inside
the repository ({_dir_mb(folder):.1f} MiB, float16 safetensors; jaxmed's loaders cast to
float32). It plays the role SD 1.5 plays in the study: a foundation model pretrained on
generic captioned images -- photos, textures, drawings -- that has never seen a chest X-ray,
which jaxmed's fine-tuning strategies then adapt to (phantom) radiographs at 128 px.
Load it with `StableDiffusion.load("jaxmed:tiny-sd")` or
`jaxmed.models.weights.load_pipeline("jaxmed/assets/tiny-sd")`; the folder also loads
in PyTorch diffusers with `StableDiffusionPipeline.from_pretrained(folder,
torch_dtype=torch.float32)` (without `torch_dtype`, diffusers keeps the float16 weights
of some modules and fails on mixed dtypes).

It is tiny and was trained for {total_min:.0f} minutes on a shared 2-core CPU: samples are
blurry, 128 x 128, and follow prompts in colour, texture and rough layout (a brick grid for
"red bricks", rows of discs for "old coins", a cup rim for "coffee"), not in detail. It is a
test bed for fine-tuning methods, not an image generator. See
`docs/tiny_sd_samples.png` and `docs/tiny_sd_vae.png`.

## Architecture (`jaxmed/models/tiny.py`, `random:tiny@128`)

| component | shape | parameters |
|---|---|---|
{arch}

## How it was trained

    python launch/pretrain_tiny.py  # corpus -> stage 1, 1b (VAE) -> scaling factor -> stage 2

1. **Corpus** (`jaxmed/data/corpus.py`, {meta['n_images']} images, 128 px, seed {meta['seed']},
   {meta['captions']} distinct captions, {minutes('corpus')}): random resized crops
   (scale and aspect jitter), flips, brightness / contrast / saturation jitter, grayscale
   and sepia conversions, colour tints of grayscale textures, captioned from a small
   vocabulary that follows the augmentation ("a photo of a cat", "a black and white photo
   of the moon", "a texture of red bricks", "a blue and yellow checkerboard", ...).
   Medical and biological-microscopy images that these packages also ship (retina,
   microaneurysms, cell, immunohistochemistry, Shepp-Logan phantom, brain, kidney, lily,
   skin, mitosis, matplotlib's MRI slice) are excluded.
2. **Stage 1, VAE** (`configs/pretrain_tiny.py:vae`, {minutes('vae')}): autoencoder
   objective (reconstruction MSE + {cv.train.kl_weight:g} x KL), AdamW lr
   {cv.strategy.lrs.vae:g} (warm-up {cv.optim.warmup_steps}), batch
   {cv.train.per_device_batch}, {t.get('vae', {}).get('steps', cv.train.max_steps)} steps
   on 64 px patches of the corpus (the VAE is fully convolutional); final loss {loss('vae')}.
   **Stage 1b** (`configs/pretrain_tiny.py:vae-hr`, {minutes('vae-hr')}): the same
   objective on the 128 px images, lr {ch.strategy.lrs.vae:g}, batch
   {ch.train.per_device_batch}, {t.get('vae-hr', {}).get('steps', ch.train.max_steps)}
   steps (a VAE trained on 64 px patches alone leaves a bright spot near the bottom-right
   corner and shifts colours at 128 px); final loss {loss('vae-hr')}.
3. **Scaling factor**: 1 / std of the VAE's latents over 2048 corpus images
   ({scale:.5f}), as SD's 0.18215 was chosen.
4. **Stage 2, UNet + text encoder** (`configs/pretrain_tiny.py:unet`, {minutes('unet')}):
   SD's epsilon-prediction objective on the frozen VAE's cached latents, strategy
   unet+text, AdamW lr {cu.strategy.lrs.unet:g} (UNet) / {cu.strategy.lrs.text_encoder:g}
   (text encoder), warm-up {cu.optim.warmup_steps}, weight decay {cu.optim.weight_decay:g},
   clip 1.0, batch {cu.train.per_device_batch},
   {t.get('unet', {}).get('steps', cu.train.max_steps)} steps, caption dropout
   {cu.data.caption_dropout:g}, EMA {cu.train.ema_decay:g} of the weights (what is
   exported); final loss {loss('unet')}.

Times are wall clock on a shared (contended) 2-core CPU.

## Corpus sources and licences

The corpus images are derived from sample images that Python packages ship; the weights
are a derived work of these images.

| source | corpus images | style | origin and licence |
|---|---|---|---|
{rows}

scikit-image's data images are distributed with scikit-image (BSD-3-Clause) under the
licences stated in each `skimage.data` function's docstring (mostly CC0 / public domain;
see https://scikit-image.org/docs/stable/api/skimage.data.html). scikit-learn's
`china.jpg` and `flower.jpg` are CC BY 2.0 (Flickr users danielbuechele and vultilion,
per `sklearn/datasets/images/README.txt`). Grace Hopper's portrait in matplotlib's sample
data is a US Navy photograph (public domain). The tokenizer files are OpenAI CLIP's BPE
vocabulary as shipped by open_clip (MIT). jaxmed's own code is under the repository's
licence.
"""
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser("python launch/pretrain_tiny.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=os.path.join(REPO, "runs", "pretrain_tiny"))
    p.add_argument("--stages", default="all",
                   help=f"comma-separated subset of {','.join(STAGES)}, or all")
    p.add_argument("--n", type=int, default=6000, help="corpus images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--vae-hr-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--dest", default=DEST)
    p.add_argument("--no-docs", dest="docs", action="store_false",
                   help="skip docs/tiny_sd_samples.png and docs/tiny_sd_vae.png")
    p.add_argument("--vae-args", default="", help="extra --config.* flags for stage 1")
    p.add_argument("--vae-hr-args", default="", help="extra --config.* flags for stage 1b")
    p.add_argument("--unet-args", default="", help="extra --config.* flags for stage 2")
    a = p.parse_args(argv)
    a.root = os.path.abspath(a.root)
    os.makedirs(a.root, exist_ok=True)
    stages = STAGES if a.stages == "all" else tuple(a.stages.split(","))
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    for s in STAGES:
        if s not in stages:
            continue
        print(f"[pretrain_tiny] === {s} ===", flush=True)
        if s == "corpus":
            stage_corpus(a)
        elif s == "vae":
            _train(a, "vae", a.vae_steps, a.vae_args.split())
        elif s == "vae-hr":
            _train(a, "vae-hr", a.vae_hr_steps, a.vae_hr_args.split())
        elif s == "scale":
            stage_scale(a)
        elif s == "unet":
            _train(a, "unet", a.unet_steps, a.unet_args.split())
        elif s == "install":
            stage_install(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
