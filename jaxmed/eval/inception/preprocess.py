"""Images into the network's input: checks, resizing to 299 and normalisation to [-1, 1].

* ``resize="bilinear"`` (default; pytorch-fid): images in [0, 1] (uint8 / 255) ->
  ``F.interpolate(size=299, mode="bilinear", align_corners=False)`` (no antialiasing) ->
  ``2 x - 1``;
* ``resize="clean"`` (clean-fid's "clean" mode): uint8 values as float32 -> PIL bicubic to
  299x299 per channel in mode "F" (no quantisation, no clipping) -> ``(x - 128) / 128``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from PIL import Image

from jaxmed.eval.inception.network import INPUT_SIZE

RESIZE_MODES = ("bilinear", "clean")


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch ``F.interpolate(mode="bilinear", align_corners=False)``.

    Half-pixel centres, source index clamped at 0, no antialiasing when shrinking. The
    weights are computed as torch's CPU kernel computes them: float32 scale ``in / out``,
    source index ``scale * (dst + 0.5) - 0.5`` rounded once to float32 (the compiled
    kernel contracts it into an FMA; rounding twice moves a weight by up to 1.5e-5).
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    dst = np.arange(out_size, dtype=np.float64) + 0.5
    src = (np.float64(scale) * dst - 0.5).astype(f32)  # exact in float64, then one rounding
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    w = np.zeros((out_size, in_size), f32)
    rows = np.arange(out_size)
    np.add.at(w, (rows, i0), f32(1.0) - lam)
    np.add.at(w, (rows, i1), lam)
    return w


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """(N, H, W, C) -> (N, size, size, C) as torch's bilinear, align_corners=False."""
    _, h, w, _ = x.shape
    wh = jnp.asarray(bilinear_matrix(h, size))
    ww = jnp.asarray(bilinear_matrix(w, size))
    hp = lax.Precision.HIGHEST
    y = jnp.einsum("oh,nhwc->nowc", wh, x.astype(jnp.float32), precision=hp)
    return jnp.einsum("pw,nowc->nopc", ww, y, precision=hp)


def resize_clean(images: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: PIL bicubic per channel on float32 values, unclipped.

    ``images``: (N, H, W, C) uint8 (or float already on the 0..255 scale); returns float32
    (N, size, size, C) on the 0..255 scale.
    """
    images = np.asarray(images)
    n, _, _, c = images.shape
    out = np.empty((n, size, size, c), np.float32)
    for i in range(n):
        for ch in range(c):
            img = Image.fromarray(np.ascontiguousarray(images[i, :, :, ch], dtype=np.float32))
            out[i, :, :, ch] = np.asarray(img.resize((size, size), resample=Image.BICUBIC))
    return out


def _check_images(images: Any) -> np.ndarray:
    """Validate (N, H, W, 3) / (N, H, W, 1) / (N, H, W) uint8 or float images."""
    if isinstance(images, (list, tuple)):
        shapes = {np.shape(im) for im in images}
        if len(shapes) > 1:
            raise ValueError(f"images of different shapes {sorted(shapes)[:4]}: resize them to "
                             "one size first or call extract_features per shape")
    if not isinstance(images, (np.ndarray, jax.Array)):
        images = np.asarray(images)
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    if len(shape) == 3 and shape[-1] in (3, 4):
        raise ValueError(
            f"images of shape {shape} look like one (H, W, C) image: pass images[None] "
            "(a batch of one), or (N, H, W, 1) for grayscale"
        )
    if len(shape) == 3:
        images = images[..., None]
    elif len(shape) != 4 or shape[-1] not in (1, 3):
        hint = ""
        if len(shape) == 4 and shape[1] in (1, 3):
            hint = " (channels-first? jaxmed takes channels-last NHWC)"
        elif len(shape) == 4 and shape[-1] == 4:
            hint = " (RGBA? drop the alpha channel)"
        raise ValueError(
            f"images must be (N, H, W, 3), (N, H, W, 1) or (N, H, W) grayscale; got shape "
            f"{shape}{hint}"
        )
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16):
        raise ValueError(
            f"images must be uint8 (0..255) or float (0..1); got dtype {dtype}"
        )
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"images have an empty spatial size: shape {shape}")
    return images


def _check_range(batch: np.ndarray) -> None:
    if batch.dtype == np.uint8 or batch.size == 0:
        return
    lo, hi = float(np.min(batch)), float(np.max(batch))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("float images contain NaN or inf")
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"float images must be in [0, 1] (pytorch-fid's convention); got values in "
            f"[{lo:.4g}, {hi:.4g}]. Pass uint8 for 0..255, or map [-1, 1] with (x + 1) / 2"
        )


@jax.jit
def _normalize_bilinear(x: jax.Array) -> jax.Array:
    """pytorch-fid: [0, 1] (uint8 / 255) -> bilinear 299 -> 2x - 1; grayscale -> 3 channels."""
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    x = x.astype(jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = resize_bilinear(x, INPUT_SIZE)
    x = 2.0 * x - 1.0
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    return x


@jax.jit
def _normalize_clean(x: jax.Array) -> jax.Array:
    """clean-fid: 0..255 (already PIL-bicubic resized) -> (x - 128) / 128."""
    x = (x.astype(jnp.float32) - 128.0) / 128.0
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    return x
