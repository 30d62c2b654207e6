r"""Batch synthesis from a combination CSV, and the sampling command line.

    python -m jaxmed.sample --model DIR_OR_WORKDIR --combinations combos.csv --out synth/ \
        [--sampler pndm|ddim|dpmpp_2m|ddpm] [--steps 50] [--guidance 7.5] [--seed 42] \
        [--batch-size 8] [--micro-batch 1] [--resolution N] [--mesh-data -1 --mesh-fsdp 1] \
        [--grayscale] [--paired-noise]
    python -m jaxmed.sample --model DIR --prompt "Chest X-ray showing Edema" --num 8 \
        --out grid.png

The sampling function itself (seeded noise, guidance, the jitted loop) is
`jaxmed.diffusion.sampling.make_sample_fn`: an image depends only on the seed and its id.
A trained run is loaded by `jaxmed.checkpoint.load_for_sampling`.

`synthesize` turns a combination CSV (docs/STUDY.md "Synthesis": the label columns + ``count``)
into PNGs plus ``metadata.csv`` in the study's format. Image ids are assigned row by row in
CSV order (row 0's images are ids 0..count-1, and so on); image ``i`` is written to
``images/{i:06d}.png``. Writes are atomic (temporary file + rename), so a killed run never
leaves a half-written PNG; rerunning the same command skips every image whose PNG exists and
decodes at the expected size and mode, regenerates the rest (identically, since an image
depends only on the seed and its id), and rebuilds ``metadata.csv`` from all rows.
``synthesis.json`` records the settings; resuming into a folder written with other settings
is an error rather than a silent mix.

Output images are RGB, as the authors' pipeline saves them (SD's VAE decodes 3 channels);
``grayscale=True`` (``--grayscale``) writes single-channel 'L' PNGs instead (PIL's ITU-R 601
luma of the RGB output, `jaxmed.diffusion.sampling.to_stored`); the study writes grey films,
as radiographs are stored.

Noise. By default image ``i`` starts from noise id ``i``. ``paired_noise=True``
(``--paired-noise``) gives image ``j`` of every combination row noise id ``j`` instead, so
the rows' images differ only by prompt: the study's paired alignment test
(docs/STUDY.md "Where jaxmed departs from the study").

``metadata.csv`` columns: ``Path`` (relative to the output folder), the label columns in
order (values as in the combination CSV: 1, 0, -1 or blank), then four extras: ``caption``
(the prompt, by the study's rule), ``image_id``, ``seed`` and ``noise_id`` (the id that
seeded the image's noise; images with the same noise id share their starting noise).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxmed import processes, sharding, storage
from jaxmed.checkpoint import load_for_sampling
from jaxmed.cli import (
    add_debug_flag,
    enable_compilation_cache,
    main_guard,
    setup_logging,
    start_distributed,
)
from jaxmed.data.combinations import (
    Combination,
    format_label,
    parse_combinations,
    read_combinations,
)
from jaxmed.data.labels import LABELS
from jaxmed.diffusion.samplers import SAMPLERS
from jaxmed.diffusion.sampling import (
    check_size,
    empty_ids,
    generate,
    make_sample_fn,
    place_params,
    to_stored,
)
from jaxmed.files import atomic_write, save_image
from jaxmed.images import grid
from jaxmed.logging_utils import progress as progress_bar
from jaxmed.models.sd import StableDiffusion

log = logging.getLogger("jaxmed.sample")

METADATA_EXTRAS = ("caption", "image_id", "seed", "noise_id")
IMAGE_DIR = "images"
MANIFEST = "synthesis.json"


# ---------------------------------------------------------------------------------------
# Files


def png_ok(path: str, size: tuple[int, int] | None = None, mode: str | None = None) -> bool:
    """True when ``path`` decodes completely (and has the given (W, H) size and mode)."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(path)) if storage.is_url(path)
                        else path) as im:
            im.load()
            return (size is None or im.size == tuple(size)) and (mode is None or im.mode == mode)
    except Exception:  # noqa: BLE001 - any failure means "regenerate it"
        return False


# ---------------------------------------------------------------------------------------
# Batch synthesis


def _batch_replicas(mesh) -> int:
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


@functools.lru_cache(maxsize=4)
def _cached_sample_fn(sd, sampler, steps, guidance, height, width, seed, eta, mesh,
                      micro_batch):
    return make_sample_fn(sd, sampler=sampler, num_steps=steps, guidance_scale=guidance,
                          height=height, width=width, seed=seed, eta=eta, mesh=mesh,
                          micro_batch=micro_batch)


def synthesize(
    sd: StableDiffusion,
    params: dict,
    combos: str | Sequence[Combination] | Sequence[Mapping[str, Any]],
    out_dir: str,
    *,
    batch_size: int = 8,
    sampler: str = "pndm",
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 42,
    resolution: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    micro_batch: int | None = 1,
    progress: bool = True,
    grayscale: bool = False,
    label_columns: Sequence[str] = LABELS,
    negative_prompt: str = "",
    eta: float = 0.0,
    model_id: str | None = None,
    paired_noise: bool = False,
) -> dict:
    """Images for every combination row into ``out_dir`` (see the module docstring).

    ``combos``: a combination CSV path, `Combination` s, or dicts (label columns + count).
    ``micro_batch`` (default 1): images each device computes at once; with a fixed value
    the images are bitwise the same for any device count and batch size (see
    `make_sample_fn`); None = each device's whole shard at once (faster on accelerators,
    equal across device counts only to ~1e-6). ``batch_size`` is rounded up to a multiple
    of the batch shards x ``micro_batch``.
    ``paired_noise``: image j of every row starts from the same noise (see the module doc).

    Under several JAX processes every process calls it with the same arguments: each
    samples its devices' share of every batch over ``mesh`` (default there: all global
    devices, data parallel), process 0 decides which images are missing and alone writes
    the files, and every process returns once the folder is complete.
    Returns a summary: total, generated, skipped, seconds, images_per_second, metadata path.
    """
    label_columns = tuple(label_columns)
    if isinstance(combos, (str, os.PathLike)):
        combos = read_combinations(str(combos), label_columns)
    elif combos and not isinstance(combos[0], Combination):
        combos = parse_combinations(list(combos), label_columns)
    combos = list(combos)
    if mesh is None and jax.process_count() > 1:  # a local jit would sample all on each
        mesh = sharding.make_mesh(-1, 1, 1)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step_size = _batch_replicas(mesh) * (micro_batch or 1)
    if batch_size % step_size:
        new = -(-batch_size // step_size) * step_size
        log.warning("batch size %d is not a multiple of %d (batch shards x micro batch); "
                    "using %d", batch_size, step_size, new)
        batch_size = new
    res = int(resolution or sd.vae.config.sample_size)
    check_size(sd, res, res)
    mode = "L" if grayscale else "RGB"

    # Global ids, row by row in CSV order.
    entries = []  # (image_id, combination index)
    noise_ids = []  # the id that seeds each entry's noise
    for k, c in enumerate(combos):
        first = len(entries)
        entries.extend([(first + j, k) for j in range(c.count)])
        noise_ids.extend([j if paired_noise else first + j for j in range(c.count)])
    total = len(entries)
    width = max(6, len(str(max(total - 1, 0))))
    rel = lambda i: f"{IMAGE_DIR}/{i:0{width}d}.png"  # noqa: E731
    captions = [c.caption(label_columns) for c in combos]

    storage.makedirs(os.path.join(out_dir, IMAGE_DIR))  # out_dir may be a storage URL
    manifest = {
        "model": model_id if model_id is not None else sd.path,
        "sampler": sampler, "steps": int(steps), "guidance": float(guidance),
        "seed": int(seed), "resolution": res, "grayscale": bool(grayscale),
        "eta": float(eta), "negative_prompt": negative_prompt,
        "noise": "paired" if paired_noise else "per-image",
        "label_columns": list(label_columns),
        "combinations": [[format_label(v) for v in c.labels] + [c.count] for c in combos],
    }

    def missing() -> str:  # on process 0: the images still to make, as a packed bit mask
        os.makedirs(os.path.join(out_dir, IMAGE_DIR), exist_ok=True)
        _check_manifest(out_dir, manifest)
        atomic_write(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")
        with ThreadPoolExecutor(8) as pool:  # decoding releases the GIL
            done = list(pool.map(lambda e: png_ok(os.path.join(out_dir, rel(e[0])),
                                                    (res, res), mode), entries))
        return np.packbits(~np.asarray(done, bool)).tobytes().hex()

    # Several processes: every one samples every batch (its devices' share of the global
    # mesh), so all must agree on what is missing: process 0 looks, the others follow.
    todo = np.unpackbits(np.frombuffer(bytes.fromhex(processes.on_main(
        f"synthesize {out_dir}: missing images", missing)), np.uint8), count=total)
    is_main = processes.is_main()
    pending = [e for e, t in zip(entries, todo) if t]
    skipped = total - len(pending)
    t0 = time.perf_counter()
    if pending:
        fn = _cached_sample_fn(sd, sampler, int(steps), float(guidance), res, res, int(seed),
                               float(eta), mesh, micro_batch)
        if mesh is not None:
            params = place_params(params, sharding.replicated(mesh))
        tokens = {}
        for k in sorted({k for _, k in pending}):
            tokens.setdefault(captions[k], np.asarray(sd.tokenize([captions[k]]))[0])
        uncond = empty_ids(sd, batch_size, negative_prompt)
        bar = progress_bar(total=total, initial=skipped, desc="synthesize", unit="img",
                           enabled=progress and is_main)

        def launch(chunk):
            chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # pad: one shape
            ids = np.asarray([noise_ids[i] for i, _ in chunk], np.int32)
            cond = np.stack([tokens[captions[k]] for _, k in chunk])
            return fn(params, cond, uncond, ids if mesh is not None else jnp.asarray(ids))

        def save(chunk, images):
            arr = to_stored(images, "grey" if grayscale else "rgb")  # several processes: a gather
            if not is_main:
                return
            for (i, _), img in zip(chunk, arr):
                save_image(Image.fromarray(img), os.path.join(out_dir, rel(i)))
            bar.update(len(chunk))

        chunks = [pending[s:s + batch_size] for s in range(0, len(pending), batch_size)]
        try:
            prev = None
            for chunk in chunks:
                out = launch(chunk)  # dispatched asynchronously: overlaps the PNG writes
                if prev is not None:
                    save(*prev)
                prev = (chunk, out)
            if prev is not None:
                save(*prev)
        finally:
            bar.close()
    seconds = time.perf_counter() - t0

    meta = os.path.join(out_dir, "metadata.csv")
    # The others return once the folder is complete (a caller may read it next).
    processes.on_main(f"synthesize {out_dir}: metadata", lambda: _write_metadata(
        meta, entries, combos, captions, label_columns, rel, seed, noise_ids))
    return {"total": total, "generated": len(pending), "skipped": skipped,
            "seconds": round(seconds, 3),
            "images_per_second": round(len(pending) / seconds, 4) if pending else 0.0,
            "metadata": meta, "out_dir": out_dir}


def _check_manifest(out_dir: str, manifest: dict) -> None:
    path = os.path.join(out_dir, MANIFEST)
    if not storage.isfile(path):
        return
    try:
        with storage.open_file(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return  # unreadable: rewritten below; PNG checks still guard the images
    old.setdefault("noise", "per-image")  # written before paired noise existed
    diff = [k for k in manifest if k in old and old[k] != manifest[k]]
    if diff:
        shown = "; ".join(
            f"{k}: {old[k]!r} then, {manifest[k]!r} now" if k != "combinations"
            else "the combination rows differ" for k in diff)
        raise ValueError(
            f"{out_dir} holds images synthesised with other settings ({shown}); resuming "
            "would mix them. Use another output folder, or delete it to start over.")


def _write_metadata(path, entries, combos, captions, label_columns, rel, seed,
                    noise_ids) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Path", *label_columns, *METADATA_EXTRAS])
    for i, k in entries:
        w.writerow([rel(i), *map(format_label, combos[k].labels), captions[k], i, seed,
                    noise_ids[i]])
    atomic_write(path, buf.getvalue())


def prompt_grid(sd: StableDiffusion, params: dict, prompts: Sequence[str], out: str, *,
                num: int = 4, batch_size: int = 8, sampler: str = "pndm", steps: int = 50,
                guidance: float = 7.5, seed: int = 42, eta: float = 0.0,
                resolution: int | None = None, mesh: jax.sharding.Mesh | None = None,
                micro_batch: int | None = 1, negative_prompt: str = "",
                grayscale: bool = False) -> str:
    """``num`` images of each prompt as one contact sheet (a row per prompt) at ``out``
    (``.png`` added if missing); returns its path. Image ids run over the repeated prompts
    in order, so a prompt's images do not depend on the batch size."""
    prompts = [p for p in prompts for _ in range(num)]
    mesh = mesh if mesh is not None else sharding.make_mesh()
    params = place_params(params, sharding.replicated(mesh))  # one or several processes
    fn = make_sample_fn(sd, sampler=sampler, num_steps=steps, guidance_scale=guidance,
                        height=resolution, seed=seed, eta=eta, mesh=mesh,
                        micro_batch=micro_batch)
    images = np.concatenate([
        generate(sd, params, prompts[s:s + batch_size], first_id=s, fn=fn,
                 negative_prompt=negative_prompt)
        for s in range(0, len(prompts), batch_size)])
    if grayscale:
        images = to_stored(images.astype(np.float32) / 255.0, "grey")[..., None]
    out = out if out.lower().endswith(".png") else out + ".png"
    if processes.is_main():  # every process sampled its share; process 0 writes
        save_image(grid(images, prompts, cols=num if len(prompts) > num else None), out)
    return out


# ---------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m jaxmed.sample",
        description="Sample a Stable Diffusion model: batch synthesis from a combination "
                    "CSV (PNGs + metadata.csv, resumable), or a grid for ad-hoc prompts.")
    ap.add_argument("--model", required=True,
                    help="a diffusers folder, jaxmed:tiny-sd, or a jaxmed training workdir")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--combinations", help="combination CSV: label columns + count")
    src.add_argument("--prompt", action="append",
                     help="an ad-hoc prompt (repeatable); writes a grid PNG to --out")
    ap.add_argument("--out", required=True,
                    help="output folder (--combinations) or grid PNG path (--prompt)")
    ap.add_argument("--num", type=int, default=4, help="images per --prompt (default 4)")
    ap.add_argument("--sampler", default="pndm",
                    help=f"one of {', '.join(SAMPLERS)} (default pndm, as SD 1.5)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    ap.add_argument("--batch-size", type=int, default=8, help="global batch")
    ap.add_argument("--resolution", type=int, default=None,
                    help="image size (default: the model's VAE sample_size)")
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--grayscale", action="store_true",
                    help="write single-channel 'L' PNGs instead of RGB")
    ap.add_argument("--paired-noise", action="store_true",
                    help="image j of every combination row starts from the same noise")
    ap.add_argument("--label-columns", default=None,
                    help="comma-separated label columns (default: the study's eight)")
    ap.add_argument("--mesh-data", type=int, default=-1)
    ap.add_argument("--mesh-fsdp", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=1,
                    help="images per device at once (default 1: bitwise the same images on "
                         "any number of devices); 0 = the whole per-device batch (faster)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--no-progress", action="store_true")
    add_debug_flag(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: user errors are one ``error:`` line, exit 2 (`jaxmed.cli.main_guard`;
    a RuntimeError is one too: a failed peer process, or the device runtime refusing the
    batch, which a smaller --batch-size or --micro-batch fixes)."""
    return main_guard(_main, argv, extra_errors=(RuntimeError,))


def _main(argv: list[str]) -> int:
    setup_logging()
    ap = _parser()
    args = ap.parse_args(argv)
    if args.sampler not in SAMPLERS:
        raise ValueError(f"--sampler {args.sampler!r}: unknown sampler "
                         f"(choose from {', '.join(SAMPLERS)})")
    if args.steps < 1 or args.batch_size < 1 or args.num < 1 or args.micro_batch < 0:
        raise ValueError("--steps, --batch-size and --num must be >= 1, --micro-batch "
                         ">= 0")
    columns = LABELS
    if args.label_columns:
        columns = tuple(c.strip() for c in args.label_columns.split(",") if c.strip())
    combos = read_combinations(args.combinations, columns) if args.combinations else None
    storage.check_url(args.out, "--out")
    enable_compilation_cache()  # first: it tunes malloc before jax starts its backend
    start_distributed()

    mesh = sharding.make_mesh(args.mesh_data, args.mesh_fsdp, 1)
    sd, params = load_for_sampling(args.model, dtype=args.dtype)
    if combos is not None:
        summary = synthesize(
            sd, params, combos, args.out, batch_size=args.batch_size,
            sampler=args.sampler, steps=args.steps, guidance=args.guidance,
            seed=args.seed, resolution=args.resolution, mesh=mesh,
            micro_batch=args.micro_batch or None, progress=not args.no_progress,
            grayscale=args.grayscale,
            label_columns=columns, negative_prompt=args.negative_prompt, eta=args.eta,
            paired_noise=args.paired_noise,
            model_id=os.path.abspath(args.model) if os.path.exists(args.model)
            else args.model)
        if not processes.is_main():
            return 0
        print(f"[jaxmed.sample] {summary['total']} images in {args.out} "
              f"({summary['generated']} generated, {summary['skipped']} already there; "
              f"{summary['images_per_second']} img/s); metadata {summary['metadata']}",
              flush=True)
        return 0
    out = prompt_grid(
        sd, params, args.prompt, args.out, num=args.num, batch_size=args.batch_size,
        sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=args.seed,
        eta=args.eta, resolution=args.resolution, mesh=mesh,
        micro_batch=args.micro_batch or None, negative_prompt=args.negative_prompt,
        grayscale=args.grayscale)
    if processes.is_main():
        print(f"[jaxmed.sample] {len(args.prompt) * args.num} images -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
