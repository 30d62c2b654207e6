"""Sampling images/s: jaxmed's jitted 50-step CFG loop vs diffusers' StableDiffusionPipeline.

    python bench/bench_sample.py [--unets tiny,medium] [--latent 16] [--batch 4] \
        [--steps 50] [--repeats 3] [--out bench/results_sample.json]

Same random model on both sides, written once in diffusers layout: the bench's ``tiny``
UNet ((32, 64), 1 layer/block) or ``medium`` UNet ((64, 128, 256), 2 layers/block), 8
heads, cross-attention dim 32 / 64, with a small VAE (f=4: (16, 32, 32), 1 layer/block)
and a small CLIP text tower (2 layers, width = the cross-attention dim). A latent of
``--latent`` L gives 4L px images. Both sides run the whole pipeline: tokens -> text
encoder -> 50 PNDM steps with classifier-free guidance 7.5 (2B UNet batch) -> VAE decode
-> images in [0, 1], from the same initial latents (the outputs are compared too).

Rows per UNet:
* torch: ``StableDiffusionPipeline(prompts, latents=..., output_type='np')`` under
  ``torch.no_grad()``, after one warm-up call, at the fastest of ``--torch-threads``;
* jaxmed: ``make_sample_fn`` (the whole loop in one jit), each device's batch at once;
* jaxmed micro_batch=1: what ``synthesize`` runs by default (one image at a time per
  device, ``lax.map``), which makes images bit-identical for any device count.

Times are the median of ``--repeats`` calls; compile time (lower + compile, no persistent
cache) is reported separately. fp32 on whatever JAX / torch find (CPU here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxmed.checkpoint import load_for_sampling  # noqa: E402
from jaxmed.diffusion import sampling  # noqa: E402
from jaxmed.models import clip_text, tiny, unet, vae, weights  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import CONFIGS  # noqa: E402

UNETS = CONFIGS  # the UNets of bench_train.py, so both benchmarks measure the same models


def write_model(folder: str, name: str, latent: int) -> str:
    u = unet.UNetConfig(**UNETS[name], num_attention_heads=8, sample_size=latent)
    d = u.cross_attention_dim
    v = vae.VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
                      norm_num_groups=8, sample_size=latent * 4,
                      down_block_types=("DownEncoderBlock2D",) * 3,
                      up_block_types=("UpDecoderBlock2D",) * 3)
    t = clip_text.CLIPTextConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                                 num_attention_heads=4, projection_dim=d, vocab_size=49408,
                                 max_position_embeddings=77, bos_token_id=49406,
                                 eos_token_id=49407, pad_token_id=49407)
    cfgs = {"unet": u, "vae": v, "text_encoder": t}
    params = jax.device_get(tiny.init_params(cfgs, seed=0))
    return weights.save_pipeline(folder, cfgs, params, tiny.SD15_SCHEDULER,
                                 tiny.clip_tokenizer())


def timed(f, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_one(name: str, args) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    folder = write_model(os.path.join(args.tmp, name), name, args.latent)
    px = args.latent * 4
    prompts = [f"Chest X-ray showing {c}" for c in
               ("Edema", "Cardiomegaly, Pleural Effusion", "Pneumothorax",
                "No Finding")][: args.batch]
    prompts += prompts[:1] * (args.batch - len(prompts))
    sd, params = load_for_sampling(folder)
    params = jax.device_put(params)
    cond = np.asarray(sd.tokenize(prompts))
    unc = np.asarray(sd.tokenize([""] * args.batch))
    ids = np.arange(args.batch, dtype=np.int32)
    row = {"unet": name, "latent": args.latent, "image_px": px, "batch": args.batch,
           "steps": args.steps}

    outs = {}
    for label, micro in (("jaxmed", None), ("jaxmed_micro1", 1)):
        fn = sampling.make_sample_fn(sd, sampler="pndm", num_steps=args.steps,
                                     guidance_scale=7.5, seed=0, micro_batch=micro)
        j_args = (params, jax.numpy.asarray(cond), jax.numpy.asarray(unc),
                  jax.numpy.asarray(ids))
        t0 = time.perf_counter()
        compiled = fn.jitted.lower(*j_args).compile()
        row[f"{label}_compile_s"] = round(time.perf_counter() - t0, 2)
        outs[label] = np.asarray(compiled(*j_args))
        sec = timed(lambda c=compiled, a=j_args: c(*a).block_until_ready(), args.repeats)
        row[f"{label}_s"] = round(sec, 3)
        row[f"{label}_img_s"] = round(args.batch / sec, 3)
        print(f"  {name} {label}: compile {row[f'{label}_compile_s']} s, {sec:.2f} s/batch, "
              f"{args.batch / sec:.2f} img/s", flush=True)

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = np.asarray(sampling.initial_noise(0, jax.numpy.asarray(ids),
                                                (args.latent, args.latent, 4)))
    lat_t = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())

    def run_torch():
        with torch.no_grad():
            return pipe(prompts, height=px, width=px, num_inference_steps=args.steps,
                        guidance_scale=7.5, output_type="np", latents=lat_t).images

    best = None
    for nt in sorted({int(x) for x in args.torch_threads.split(",")}):
        torch.set_num_threads(nt)
        ref = run_torch()  # warm-up
        sec = timed(run_torch, args.repeats)
        row[f"torch_{nt}thr_s"] = round(sec, 3)
        print(f"  {name} torch ({nt} threads): {sec:.2f} s/batch, {args.batch / sec:.2f} img/s",
              flush=True)
        if best is None or sec < best[0]:
            best = (sec, nt)
    sec, row["torch_threads"] = best
    row["torch_s"] = round(sec, 3)
    row["torch_img_s"] = round(args.batch / sec, 3)
    row["max_abs_vs_torch"] = float(np.abs(outs["jaxmed"] - ref).max())
    row["max_abs_micro1_vs_torch"] = float(np.abs(outs["jaxmed_micro1"] - ref).max())
    row["speedup_vs_torch"] = round(row["torch_s"] / row["jaxmed_s"], 2)
    row["speedup_micro1_vs_torch"] = round(row["torch_s"] / row["jaxmed_micro1_s"], 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unets", default="tiny,medium")
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-threads", default=f"1,{os.cpu_count()}",
                    help="torch thread counts to try; the fastest is the torch row (on a "
                         "loaded machine 1 thread can beat all cores by several times)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    import torch

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        for name in args.unets.split(","):
            rows.append(bench_one(name.strip(), args))
    hdr = (f"{'unet':7} {'img px':>6} {'torch img/s':>11} {'jaxmed img/s':>12} {'x torch':>7} "
           f"{'micro1 img/s':>12} {'x torch':>7} {'compile s':>9} {'max|d|':>8}")
    print(hdr)
    for r in rows:
        print(f"{r['unet']:7} {r['image_px']:>6} {r['torch_img_s']:>11.3f} "
              f"{r['jaxmed_img_s']:>12.3f} {r['speedup_vs_torch']:>7.2f} "
              f"{r['jaxmed_micro1_img_s']:>12.3f} {r['speedup_micro1_vs_torch']:>7.2f} "
              f"{r['jaxmed_compile_s']:>9.1f} {r['max_abs_vs_torch']:>8.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.platform(), "cpus": os.cpu_count(),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
