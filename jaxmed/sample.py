r"""Guided sampling and batch synthesis: the whole denoising loop inside one jitted function.

    python -m jaxmed.sample --model DIR_OR_WORKDIR --combinations combos.csv --out synth/ \
        [--sampler pndm|ddim|dpmpp_2m|ddpm] [--steps 50] [--guidance 7.5] [--seed 42] \
        [--batch-size 8] [--micro-batch 1] [--resolution N] [--mesh-data -1 --mesh-fsdp 1] \
        [--grayscale]
    python -m jaxmed.sample --model DIR --prompt "Chest X-ray showing Edema" --num 8 \
        --out grid.png

`make_sample_fn` builds ``fn(params, cond_ids, uncond_ids, image_ids) -> images`` for a
model, sampler, number of steps, guidance scale and size. Every image's starting noise
comes from ``fold_in(PRNGKey(seed), image_id)`` (and the per-step noise of the stochastic
samplers from ``fold_in(fold_in(fold_in(PRNGKey(seed), image_id), 1), step)``), so an image
is a function of the seed and its id only, whichever batch, padding or number of devices
computes it. Bit for bit too with ``micro_batch`` set (synthesis defaults to 1): each device
then runs the same program on m images at a time, whatever the device count, whereas CPU
GEMM blocking depends on the batch size and moves results by ~1e-6.

Classifier-free guidance runs the unconditional and conditional branches as one batch of
2B, as diffusers does, except at guidance 1, where ``u + 1 * (c - u)`` is the conditional
prediction and the unconditional branch is skipped.
With a ``mesh`` the batch axis is sharded over the mesh's ('data', 'fsdp') axes and the
parameters are replicated (or placed as given); batches are padded to a multiple of the
number of batch shards and the padding images are dropped.

`synthesize` turns a combination CSV (SEED.md "Synthesis": the label columns + ``count``)
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
luma of the RGB output).

``metadata.csv`` columns: ``Path`` (relative to the output folder), the label columns in
order (values as in the combination CSV: 1, 0, -1 or blank), then three extras: ``caption``
(the prompt, by the study's rule), ``image_id`` and ``seed``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxmed.diffusion import samplers as schedulers
from jaxmed.data.captions import LABEL_COLUMNS, caption_from_labels
from jaxmed.models.sd import StableDiffusion

log = logging.getLogger("jaxmed.sample")

SAMPLERS = schedulers.SAMPLERS
METADATA_EXTRAS = ("caption", "image_id", "seed")
IMAGE_DIR = "images"
MANIFEST = "synthesis.json"


# ---------------------------------------------------------------------------------------
# Noise and guidance


def initial_noise(seed: int, image_ids: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """(B, *shape) standard normal noise, one independent stream per global image id."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(image_ids)


def step_noise(seed: int, image_ids: jax.Array, step: jax.Array, shape: tuple[int, ...]
               ) -> jax.Array:
    """(B, *shape) noise of sampling step ``step`` (DDPM, DDIM eta > 0), per image id."""
    base = jax.random.PRNGKey(seed)

    def one(i):
        k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, i), 1), step)
        return jax.random.normal(k, shape)

    return jax.vmap(one)(image_ids)


def guided_model_fn(sd: StableDiffusion, unet_params: Any, context: jax.Array,
                    uncond_context: jax.Array, guidance_scale: float, *,
                    skip_uncond_at_one: bool = True):
    """``model_fn(x, t)`` with classifier-free guidance ``u + g * (c - u)`` (diffusers' rule).

    Both branches run as one UNet batch of 2B. The two are interleaved per image (rows
    u_0, c_0, u_1, c_1, ...) rather than concatenated, so that a batch sharded over devices
    stays on its devices (no all-to-all); every row is computed independently, so the order
    does not change the result. At ``guidance_scale == 1`` the unconditional branch is
    skipped unless ``skip_uncond_at_one=False``.
    """
    g = float(guidance_scale)
    if g == 1.0 and skip_uncond_at_one:
        return lambda x, t: sd.predict(unet_params, x, t, context)
    ctx2 = jnp.stack([uncond_context, context], axis=1).reshape(
        (-1,) + context.shape[1:])

    def model_fn(x, t):
        x2 = jnp.stack([x, x], axis=1).reshape((-1,) + x.shape[1:])
        out = sd.predict(unet_params, x2, t, ctx2).reshape((x.shape[0], 2) + x.shape[1:])
        u, c = out[:, 0], out[:, 1]
        return u + g * (c - u)

    return model_fn


# ---------------------------------------------------------------------------------------
# The jitted sampling function


def _check_size(sd: StableDiffusion, height: int, width: int) -> None:
    f = sd.vae_scale
    m = f * 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if height % m or width % m or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} must be a positive multiple of {m} "
                         f"(VAE factor {f} x 2^(UNet levels - 1)) for this model")


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
    mesh: jax.sharding.Mesh | None = None,
    params_sharding: Any = None,
    micro_batch: int | None = None,
    skip_uncond_at_one: bool = True,
):
    """A jitted ``fn(params, cond_ids, uncond_ids, image_ids) -> (B, H, W, 3) float32 [0, 1]``.

    ``params`` are plain (adapter-free) params {'unet', 'vae', 'text_encoder'}: fold any
    adapter in first with `Strategy.export`. ``cond_ids`` / ``uncond_ids`` are (B, 77) token
    ids, ``image_ids`` (B,) int32 global image ids (they seed the noise).

    With ``mesh``: inputs and output are sharded on the batch axis over ('data', 'fsdp'),
    params replicated (or placed by ``params_sharding``, a sharding or a tree of them); the
    batch is padded to a multiple of the batch shards and the padding dropped. Without a
    mesh it is plain ``jax.jit`` on the default device.

    ``micro_batch``: None runs each device's whole shard as one batch (fastest). On CPU
    the result of a convolution / matmul row can change in the last bits with the batch
    size (the GEMM blocking depends on it), so images then agree across device counts
    only to ~1e-6. With ``micro_batch=m`` each device runs its shard m images at a time
    (``lax.map``), so the per-device program is the same whatever the device count and
    the images are bitwise identical for a given m; batches are padded to a multiple of
    m x the batch shards. ``fn.jitted`` is the jitted function (for ``.lower().compile()``),
    ``fn.replicas`` the number of batch shards.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1 or None, got {micro_batch}")
    res = sd.vae.config.sample_size
    height = int(height or res)
    width = int(width or height)
    _check_size(sd, height, width)
    f = sd.vae_scale
    opts = {"eta": eta} if sampler == "ddim" else {}
    smp = schedulers.make_sampler(sampler, sd.scheduler_config, num_steps, **opts)
    stochastic = sampler == "ddpm" or (sampler == "ddim" and eta > 0)
    lat_shape = (height // f, width // f, sd.unet.config.in_channels)
    batch_sh = None
    if mesh is not None:
        from jaxmed import sharding

        batch_sh = {n: sharding.batch_sharding(mesh, n) for n in (1, 2, 4)}

    def constrain(x):
        if batch_sh is None:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sh[x.ndim])

    def run(params, cond_ids, uncond_ids, image_ids):
        ctx = sd.encode_text(params["text_encoder"], cond_ids)
        uctx = None
        if not (guidance_scale == 1.0 and skip_uncond_at_one):
            uctx = sd.encode_text(params["text_encoder"], uncond_ids)
        model_fn = guided_model_fn(sd, params["unet"], ctx, uctx, guidance_scale,
                                   skip_uncond_at_one=skip_uncond_at_one)
        x = constrain(initial_noise(seed, image_ids, lat_shape) * smp.init_noise_sigma)
        state = smp.init_state(x, jax.random.PRNGKey(seed) if stochastic else None)

        def body(carry, i):
            x, st = carry
            out = model_fn(smp.scale_model_input(x, i), smp.timesteps[i])
            kw = {"noise": step_noise(seed, image_ids, i, lat_shape)} if stochastic else {}
            x, st = smp.step(st, out, i, x, **kw)
            return (constrain(x), st), None

        (latents, _), _ = jax.lax.scan(body, (x, state), jnp.arange(smp.num_inference_steps))
        images = sd.decode_latents(params["vae"], latents)
        return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)

    replicas = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    chunk = replicas * (micro_batch or 1)

    def fn(params, cond_ids, uncond_ids, image_ids):
        if micro_batch is None:
            return run(params, cond_ids, uncond_ids, image_ids)
        # Each device runs its shard micro_batch images at a time (lax.map), so the
        # per-device program, and hence every image bit, is the same for any device count.
        b, m = image_ids.shape[0], micro_batch
        k = b // chunk

        def split(a):  # (B, ...) -> (k, R, m, ...): device r keeps its rows
            return jnp.swapaxes(a.reshape((replicas, k, m) + a.shape[1:]), 0, 1)

        def one(args):
            c, u, i = (constrain(a.reshape((replicas * m,) + a.shape[2:])) for a in args)
            out = run(params, c, u, i)
            return out.reshape((replicas, m) + out.shape[1:])

        out = jax.lax.map(one, tuple(split(a) for a in (cond_ids, uncond_ids, image_ids)))
        return constrain(jnp.swapaxes(out, 0, 1).reshape((b,) + out.shape[3:]))

    if mesh is None:
        jitted = jax.jit(fn)
        p_sh = None
    else:
        from jaxmed import sharding

        p_sh = params_sharding if params_sharding is not None else sharding.replicated(mesh)
        jitted = jax.jit(fn, in_shardings=(p_sh, batch_sh[2], batch_sh[2], batch_sh[1]),
                         out_shardings=batch_sh[4])

    def call(params, cond_ids, uncond_ids, image_ids):
        xp = jnp if mesh is None else np  # host arrays are placed shard by shard below
        args = [xp.asarray(cond_ids), xp.asarray(uncond_ids), xp.asarray(image_ids, np.int32)]
        n = args[2].shape[0]
        pad = -n % chunk
        if pad:  # repeat the last image; the padding is computed and dropped
            args = [xp.concatenate([a, xp.repeat(a[-1:], pad, axis=0)]) for a in args]
        if mesh is not None:
            params = jax.device_put(params, p_sh)
            args = [_put(a, batch_sh[a.ndim]) for a in args]
        out = jitted(params, *args)
        return out[:n] if pad else out

    call.jitted, call.replicas, call.micro_batch, call.mesh = jitted, replicas, micro_batch, mesh
    call.height, call.width = height, width
    return call


def _put(x: np.ndarray, sh) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


@functools.lru_cache(maxsize=8)
def _empty_ids(sd: StableDiffusion, n: int, text: str = "") -> np.ndarray:
    return np.repeat(np.asarray(sd.tokenize([text])), n, axis=0)


def generate(
    sd: StableDiffusion,
    params: dict,
    prompts: Sequence[str],
    *,
    first_id: int = 0,
    fn=None,
    negative_prompt: str = "",
    **kwargs,
) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for ``prompts``; ids first_id.. seed their noise."""
    fn = fn or make_sample_fn(sd, **kwargs)
    cond = np.asarray(sd.tokenize(list(prompts)))
    uncond = _empty_ids(sd, len(prompts), negative_prompt)
    ids = np.arange(first_id, first_id + len(prompts), dtype=np.int32)
    if getattr(fn, "mesh", None) is None:
        ids = jnp.asarray(ids)
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


# ---------------------------------------------------------------------------------------
# Combination CSVs


@dataclass(frozen=True)
class Combination:
    """One row of a combination CSV: label values (NaN = blank) and how many images."""

    labels: tuple[float, ...]
    count: int
    row: int  # data row number (0 = first row after the header)

    def caption(self, columns: Sequence[str] = LABEL_COLUMNS) -> str:
        return caption_from_labels(self.labels, columns)


def _label_value(text: Any, where: str) -> float:
    if text is None:
        return math.nan
    if isinstance(text, (int, float, np.integer, np.floating)) and not isinstance(text, bool):
        v = float(text)
    else:
        s = str(text).strip()
        if s == "" or s.lower() == "nan":
            return math.nan
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"{where}: label value {text!r} is not a number "
                             "(use 1, 0, -1 or leave blank)") from None
    if math.isnan(v):
        return v
    if v not in (1.0, 0.0, -1.0):
        raise ValueError(f"{where}: label value {text!r} must be 1, 0, -1 or blank")
    return v


def _count_value(text: Any, where: str) -> int:
    s = str(text).strip() if text is not None else ""
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"{where}: count {text!r} is not a whole number") from None
    if not math.isfinite(v) or v != int(v):
        raise ValueError(f"{where}: count {text!r} is not a whole number")
    if v < 0:
        raise ValueError(f"{where}: count {text!r} is negative (need >= 0)")
    return int(v)


def parse_combinations(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                       source: str = "combinations", header: Sequence[str] | None = None,
                       ) -> list[Combination]:
    """Validate rows (dicts: label columns + ``count``) into `Combination` s."""
    columns = tuple(columns)
    if header is None:
        header = list(rows[0].keys()) if rows else []
    have = set(header)
    missing = [c for c in (*columns, "count") if c not in have]
    if missing:
        what = " and ".join(f"column {c!r}" for c in missing)
        raise ValueError(
            f"{source} has no {what}: a combination CSV needs the label columns "
            f"{list(columns)} and 'count' (images per row); found columns {list(header)}")
    out = []
    for r, row in enumerate(rows):
        where = f"{source}, data row {r} (line {r + 2})"
        labels = tuple(_label_value(row.get(c), f"{where}, column {c!r}") for c in columns)
        out.append(Combination(labels, _count_value(row.get("count"), where), r))
    return out


def read_combinations(path: str, columns: Sequence[str] = LABEL_COLUMNS) -> list[Combination]:
    """A combination CSV (label columns + ``count``; other columns ignored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"combination CSV {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    if not header:
        raise ValueError(f"combination CSV {path} is empty (no header line)")
    return parse_combinations(rows, columns, source=f"combination CSV {path}", header=header)


# ---------------------------------------------------------------------------------------
# Files


def _atomic_write_png(img: Image.Image, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def png_ok(path: str, size: tuple[int, int] | None = None, mode: str | None = None) -> bool:
    """True when ``path`` decodes completely (and has the given (W, H) size and mode)."""
    try:
        with Image.open(path) as im:
            im.load()
            return (size is None or im.size == tuple(size)) and (mode is None or im.mode == mode)
    except Exception:  # noqa: BLE001 - any failure means "regenerate it"
        return False


def _fmt_label(v: float) -> str:
    return "" if math.isnan(v) else str(int(v))


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
    label_columns: Sequence[str] = LABEL_COLUMNS,
    negative_prompt: str = "",
    eta: float = 0.0,
    model_id: str | None = None,
) -> dict:
    """Images for every combination row into ``out_dir`` (see the module docstring).

    ``combos``: a combination CSV path, `Combination` s, or dicts (label columns + count).
    ``micro_batch`` (default 1): images each device computes at once; with a fixed value
    the images are bitwise the same for any device count and batch size (see
    `make_sample_fn`); None = each device's whole shard at once (faster on accelerators,
    equal across device counts only to ~1e-6). ``batch_size`` is rounded up to a multiple
    of the batch shards x ``micro_batch``.
    Returns a summary: total, generated, skipped, seconds, images_per_second, metadata path.
    """
    from jaxmed.logging_utils import progress as progress_bar

    label_columns = tuple(label_columns)
    if isinstance(combos, (str, os.PathLike)):
        combos = read_combinations(str(combos), label_columns)
    elif combos and not isinstance(combos[0], Combination):
        combos = parse_combinations(list(combos), label_columns)
    combos = list(combos)
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
    _check_size(sd, res, res)
    mode = "L" if grayscale else "RGB"

    # Global ids, row by row in CSV order.
    entries = []  # (image_id, combination index)
    for k, c in enumerate(combos):
        first = len(entries)
        entries.extend([(first + j, k) for j in range(c.count)])
    total = len(entries)
    width = max(6, len(str(max(total - 1, 0))))
    rel = lambda i: f"{IMAGE_DIR}/{i:0{width}d}.png"  # noqa: E731
    captions = [c.caption(label_columns) for c in combos]

    os.makedirs(os.path.join(out_dir, IMAGE_DIR), exist_ok=True)
    manifest = {
        "model": model_id if model_id is not None else sd.path,
        "sampler": sampler, "steps": int(steps), "guidance": float(guidance),
        "seed": int(seed), "resolution": res, "grayscale": bool(grayscale),
        "eta": float(eta), "negative_prompt": negative_prompt,
        "label_columns": list(label_columns),
        "combinations": [[_fmt_label(v) for v in c.labels] + [c.count] for c in combos],
    }
    _check_manifest(out_dir, manifest)
    _atomic_write_text(json.dumps(manifest, indent=1) + "\n", os.path.join(out_dir, MANIFEST))

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:  # decoding releases the GIL
        done = list(pool.map(lambda e: png_ok(os.path.join(out_dir, rel(e[0])), (res, res),
                                                mode), entries))
    pending = [e for e, ok in zip(entries, done) if not ok]
    skipped = total - len(pending)
    t0 = time.perf_counter()
    if pending:
        fn = _cached_sample_fn(sd, sampler, int(steps), float(guidance), res, res, int(seed),
                               float(eta), mesh, micro_batch)
        if mesh is not None:
            from jaxmed import sharding

            params = jax.device_put(params, sharding.replicated(mesh))
        tokens = {}
        for k in sorted({k for _, k in pending}):
            tokens.setdefault(captions[k], np.asarray(sd.tokenize([captions[k]]))[0])
        uncond = _empty_ids(sd, batch_size, negative_prompt)
        bar = progress_bar(total=total, initial=skipped, desc="synthesize", unit="img",
                           enabled=progress)

        def launch(chunk):
            chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # pad: one shape
            ids = np.asarray([i for i, _ in chunk], np.int32)
            cond = np.stack([tokens[captions[k]] for _, k in chunk])
            return fn(params, cond, uncond, ids if mesh is not None else jnp.asarray(ids))

        def save(chunk, images):
            arr = to_uint8(images)
            for (i, _), img in zip(chunk, arr):
                im = Image.fromarray(img)
                _atomic_write_png(im.convert("L") if grayscale else im,
                                  os.path.join(out_dir, rel(i)))
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
    _write_metadata(meta, entries, combos, captions, label_columns, rel, seed)
    return {"total": total, "generated": len(pending), "skipped": skipped,
            "seconds": round(seconds, 3),
            "images_per_second": round(len(pending) / seconds, 4) if pending else 0.0,
            "metadata": meta, "out_dir": out_dir}


def _check_manifest(out_dir: str, manifest: dict) -> None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return  # unreadable: rewritten below; PNG checks still guard the images
    diff = [k for k in manifest if k in old and old[k] != manifest[k]]
    if diff:
        shown = "; ".join(
            f"{k}: {old[k]!r} then, {manifest[k]!r} now" if k != "combinations"
            else "the combination rows differ" for k in diff)
        raise ValueError(
            f"{out_dir} holds images synthesised with other settings ({shown}); resuming "
            "would mix them. Use another output folder, or delete it to start over.")


def _write_metadata(path, entries, combos, captions, label_columns, rel, seed) -> None:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Path", *label_columns, *METADATA_EXTRAS])
    for i, k in entries:
        w.writerow([rel(i), *map(_fmt_label, combos[k].labels), captions[k], i, seed])
    _atomic_write_text(buf.getvalue(), path)


# ---------------------------------------------------------------------------------------
# Loading a model: a diffusers folder or a jaxmed training workdir


def load_for_sampling(path: str, *, dtype: str = "float32") -> tuple[StableDiffusion, dict]:
    """(sd, plain params) from a diffusers folder (or bundled name) or a training workdir.

    A workdir (it holds ``config.json`` and ``checkpoints/``) is read from its ``export/``
    diffusers folder when present; otherwise its latest checkpoint is restored onto the
    config's base model and strategy, and the adapters folded in (``Strategy.export``).
    """
    from jaxmed.models.sd import BUNDLED

    if path in BUNDLED or os.path.isfile(os.path.join(path, "model_index.json")):
        return StableDiffusion.load(path, dtype=dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path}: no such folder")
    export = os.path.join(path, "export")
    if os.path.isfile(os.path.join(export, "model_index.json")):
        return StableDiffusion.load(export, dtype=dtype)
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
            os.path.join(path, "checkpoints")):
        return _load_workdir_checkpoint(path, dtype)
    raise FileNotFoundError(
        f"--model {path} is neither a diffusers folder (no model_index.json) nor a jaxmed "
        "training workdir (config.json + checkpoints/ or export/)")


def _load_workdir_checkpoint(workdir: str, dtype: str) -> tuple[StableDiffusion, dict]:
    """Base model + strategy from config.json, the latest checkpoint's trainable (or EMA)
    tree restored onto one device, adapters folded in: what `Trainer.exported_params` gives,
    without building the data pipeline or the caches."""
    import ml_collections

    from jaxmed import train
    from jaxmed.checkpoint import Checkpointer

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"training workdir {workdir} has no export/ and no finished checkpoint; "
                "train further or point --model at a diffusers folder")
        try:
            sd, params = StableDiffusion.load(
                config.model.path, dtype=dtype, variant=config.model.get("variant") or None,
                allow_pickle=bool(config.model.get("allow_pickle", False)))
            strategy = train.build_strategy(config.strategy)
            rng = jax.random.PRNGKey(config.seed)
            trainable, frozen = jax.jit(strategy.init)(params, rng)
            tx = train.make_optimizer(strategy, trainable, config.optim)
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            to_abs = lambda t: jax.tree_util.tree_map(  # noqa: E731
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), t)
            abs_t = to_abs(trainable)
            scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=dev)
            target = train.TrainState(
                step=scalar, trainable=abs_t, opt_state=to_abs(jax.eval_shape(tx.init, trainable)),
                ema=abs_t if config.train.ema_decay > 0 else None, bad_step=scalar)
            del trainable
            state, _ = ckpt.restore(step, target)
            keep = state.ema if state.ema is not None else state.trainable
            params = jax.device_get(jax.jit(strategy.export)(keep, frozen))
        except Exception as err:
            raise RuntimeError(
                f"could not rebuild the model of training workdir {workdir} from config.json "
                f"and checkpoint {step} ({type(err).__name__}: {err}). Export it to a "
                "diffusers folder (a finished training run writes export/) and pass that "
                "folder as --model.") from err
    finally:
        ckpt.close()
    log.info("restored %s checkpoint %d (strategy %s)", workdir, step, strategy.name)
    return sd, params


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
    ap.add_argument("--label-columns", default=None,
                    help="comma-separated label columns (default: the study's eight)")
    ap.add_argument("--mesh-data", type=int, default=-1)
    ap.add_argument("--mesh-fsdp", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=1,
                    help="images per device at once (default 1: bitwise the same images on "
                         "any number of devices); 0 = the whole per-device batch (faster)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        if args.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {args.sampler!r}: unknown sampler "
                             f"(choose from {', '.join(SAMPLERS)})")
        if args.steps < 1 or args.batch_size < 1 or args.num < 1 or args.micro_batch < 0:
            raise ValueError("--steps, --batch-size and --num must be >= 1, --micro-batch "
                             ">= 0")
        columns = LABEL_COLUMNS
        if args.label_columns:
            columns = tuple(c.strip() for c in args.label_columns.split(",") if c.strip())
        combos = read_combinations(args.combinations, columns) if args.combinations else None
        from jaxmed import sharding
        from jaxmed.cli import enable_compilation_cache

        enable_compilation_cache()  # first: it tunes malloc before jax starts its backend
        if os.environ.get("JAXMED_DISTRIBUTED") == "1":
            jax.distributed.initialize()

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
                model_id=os.path.abspath(args.model) if os.path.exists(args.model)
                else args.model)
            print(f"[jaxmed.sample] {summary['total']} images in {args.out} "
                  f"({summary['generated']} generated, {summary['skipped']} already there; "
                  f"{summary['images_per_second']} img/s); metadata {summary['metadata']}",
                  flush=True)
            return 0
        prompts = [p for p in args.prompt for _ in range(args.num)]
        params = jax.device_put(params, sharding.replicated(mesh))
        fn = make_sample_fn(sd, sampler=args.sampler, num_steps=args.steps,
                            guidance_scale=args.guidance, height=args.resolution,
                            seed=args.seed, eta=args.eta, mesh=mesh,
                            micro_batch=args.micro_batch or None)
        images = np.concatenate([
            generate(sd, params, prompts[s:s + args.batch_size], first_id=s, fn=fn,
                     negative_prompt=args.negative_prompt)
            for s in range(0, len(prompts), args.batch_size)])
        if args.grayscale:
            images = np.asarray([np.asarray(Image.fromarray(im).convert("L"))[..., None]
                                 for im in images])
        out = args.out if args.out.lower().endswith(".png") else args.out + ".png"
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        sheet = grid(images, prompts, cols=args.num if len(args.prompt) > 1 else None)
        tmp = out + f".tmp{os.getpid()}"
        sheet.save(tmp, format="PNG")
        os.replace(tmp, out)
        print(f"[jaxmed.sample] {len(prompts)} images -> {out}", flush=True)
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
