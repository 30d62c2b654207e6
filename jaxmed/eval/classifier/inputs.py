"""Images and labels as the classifier takes them.

Images. Functions accept numpy arrays (N, H, W) or (N, H, W, C) with C in {1, 3}: uint8
(0..255), uint16 (0..65535) or float in [0, 1] or [-1, 1] (``value_range``; "auto" picks
[-1, 1] when the array has a negative value). 3-channel input is averaged to grey (chest
X-rays are grey; SD's decoded images are nearly so), resized to ``image_size`` x
``image_size`` without crop (antialiased bilinear, `jax.image.resize`) and stored as uint8,
so a 20,000-image set at 224 px takes 1 GB.

Labels are (N, num_labels) 0/1 arrays: uncertain (-1) or blank (NaN) entries must be mapped
before they get here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=16)
def _resize_fn(size: int) -> Callable:
    def f(x):
        y = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear", antialias=True)
        return jnp.round(jnp.clip(y, 0.0, 1.0) * 255.0).astype(jnp.uint8)

    return jax.jit(f)


def prepare_images(images, image_size: int, value_range: str = "auto", *,
                   name: str = "images", chunk: int = 64) -> np.ndarray:
    """Any accepted image array -> uint8 (N, image_size, image_size, 1) (see module doc)."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected (N, H, W) or (N, H, W, C) with C in 1 or 3; "
                         f"got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no images")
    if value_range not in ("auto", "0,1", "-1,1"):
        raise ValueError(f"value_range must be 'auto', '0,1' or '-1,1'; got {value_range!r}")
    if x.dtype == np.uint8 or x.dtype == np.uint16:
        scale, offset = 1.0 / np.iinfo(x.dtype).max, 0.0
    elif np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x)
        if not finite.all():
            bad = np.nonzero(~finite.reshape(x.shape[0], -1).all(axis=1))[0]
            raise ValueError(f"{name}: NaN or inf in {bad.size} image(s), e.g. index "
                             f"{bad[:5].tolist()}")
        lo, hi = float(x.min()), float(x.max())
        vr = value_range if value_range != "auto" else ("-1,1" if lo < -1e-3 else "0,1")
        lo_ok = -1.0 if vr == "-1,1" else 0.0
        if lo < lo_ok - 1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"{name}: float values must lie in [{lo_ok:g}, 1] "
                             f"(value_range={value_range!r}); got [{lo:.4g}, {hi:.4g}]")
        scale, offset = (0.5, 0.5) if vr == "-1,1" else (1.0, 0.0)
    else:
        raise ValueError(f"{name}: dtype {x.dtype} not supported; give uint8, uint16 or float "
                         "images")

    n, h, w, c = x.shape
    if x.dtype == np.uint8 and (h, w) == (image_size, image_size):
        if c == 1:
            return np.ascontiguousarray(x)
        return np.round(x.astype(np.float32).mean(axis=-1, keepdims=True)).astype(np.uint8)
    out = np.empty((n, image_size, image_size, 1), np.uint8)
    resize = _resize_fn(int(image_size))
    for s in range(0, n, chunk):
        xb = x[s:s + chunk].astype(np.float32) * scale + offset
        xb = np.clip(xb.mean(axis=-1, keepdims=True), 0.0, 1.0)
        if (h, w) == (image_size, image_size):
            out[s:s + chunk] = np.round(xb * 255.0).astype(np.uint8)
            continue
        m = xb.shape[0]
        if m < chunk and n > chunk:  # keep one compiled shape
            xb = np.concatenate([xb, np.zeros((chunk - m, *xb.shape[1:]), xb.dtype)])
        out[s:s + m] = np.asarray(resize(xb))[:m]
    return out


def validate_labels(labels, n_images: int, num_labels: int, *, name: str = "labels"):
    y = np.asarray(labels)
    if y.ndim == 1 and num_labels == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ValueError(f"{name}: expected an (N, {num_labels}) array; got shape {y.shape}")
    if y.shape[1] != num_labels:
        raise ValueError(f"{name}: {y.shape[1]} label columns but the classifier has "
                         f"num_labels={num_labels}")
    if y.shape[0] != n_images:
        raise ValueError(f"{name}: {y.shape[0]} label rows for {n_images} images (counts differ)")
    yf = y.astype(np.float32)
    ok = (yf == 0) | (yf == 1)
    if not ok.all():
        rows = np.nonzero(~ok.all(axis=1))[0]
        vals = np.unique(yf[~ok])[:5].tolist()
        raise ValueError(f"{name}: labels must be 0/1 (uncertain -1 / blank NaN must be mapped "
                         f"first); rows {rows[:5].tolist()} hold {vals}")
    return yf
