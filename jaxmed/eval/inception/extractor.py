"""`InceptionFeatures`: the jitted, batched FID-Inception feature extractor."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.eval.inception.network import FEATURE_DIM, INPUT_SIZE, Dtype, FIDInceptionV3
from jaxmed.eval.inception.preprocess import (
    RESIZE_MODES,
    _check_images,
    _check_range,
    _normalize_bilinear,
    _normalize_clean,
    resize_clean,
)
from jaxmed.eval.inception.weights import load_inception_params
from jaxmed.logging_utils import progress as progress_bar


class InceptionFeatures:
    """Jitted, batched FID-Inception pool3 features.

    >>> fe = InceptionFeatures()                    # weights via load_inception_params()
    >>> feats = fe.extract_features(images)         # (N, 2048) float32

    ``images``: (N, H, W, 3) / (N, H, W, 1) / (N, H, W), uint8 (0..255) or float (0..1).
    The network compiles once per batch size (the last batch is padded); the on-device
    bilinear resize compiles once per input (H, W).
    """

    def __init__(
        self,
        params: Mapping | None = None,
        *,
        weights: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        download: bool = False,
        dtype: Dtype = jnp.float32,
        precision: Any = "highest",
    ):
        if params is None:
            params = load_inception_params(weights, cache_dir=cache_dir, download=download)
        params = params if "params" in params else {"params": params}
        self.params = jax.tree_util.tree_map(jnp.asarray, dict(params))
        self.model = FIDInceptionV3(dtype=dtype, precision=precision)
        self._net = jax.jit(self.model.apply)

    def features_from_normalized(self, x: Any) -> np.ndarray:
        """The network alone: (N, 299, 299, 3) float in [-1, 1] -> (N, 2048) float32."""
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(
                f"expected (N, {INPUT_SIZE}, {INPUT_SIZE}, 3) inputs in [-1, 1]; got shape "
                f"{tuple(x.shape)}"
            )
        return np.asarray(self._net(self.params, x))

    def extract_features(
        self,
        images: Any,
        batch_size: int = 50,
        *,
        resize: str = "bilinear",
        out_dtype: Any = np.float32,
        progress: bool | None = None,
    ) -> np.ndarray:
        """(N, H, W, {1,3} or none) uint8 / [0, 1] float images -> (N, 2048) features."""
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}; got {resize!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        out_dtype = np.dtype(out_dtype)
        if out_dtype not in (np.float32, np.float64):
            raise ValueError(f"out_dtype must be float32 or float64; got {out_dtype}")
        images = _check_images(images)
        n = images.shape[0]
        if n == 0:
            return np.zeros((0, FEATURE_DIM), out_dtype)
        batch_size = int(min(batch_size, n))
        if progress is None:
            progress = n >= 1000
        # a tqdm bar on a terminal, periodic plain lines in a redirected log
        bar = progress_bar(total=n, desc="Inception features", enabled=progress, unit="img")
        outs = []
        try:
            for start in range(0, n, batch_size):
                batch = np.asarray(images[start:start + batch_size])
                m = batch.shape[0]
                outs.append((self._batch(batch, resize, batch_size), m))
                bar.update(m)
            feats = np.concatenate([np.asarray(f)[:m] for f, m in outs], axis=0)
        finally:
            bar.close()
        return feats.astype(out_dtype, copy=False)

    __call__ = extract_features

    def preprocess(self, images: Any, *, resize: str = "bilinear",
                   pad_to: int | None = None) -> jax.Array:
        """The network's input for ``images``: (N, 299, 299, 3) float32 in about [-1, 1].

        ``pad_to``: append zero images up to this batch size (one compile per batch size).
        """
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}; got {resize!r}")
        batch = np.asarray(_check_images(images))
        _check_range(batch)
        if batch.dtype != np.uint8 and batch.dtype != np.float32:
            batch = batch.astype(np.float32)
        if resize == "clean":
            if batch.dtype != np.uint8:
                batch = batch * np.float32(255.0)
            batch = resize_clean(batch)  # 0..255 float32, (m, 299, 299, C)
        m = batch.shape[0]
        if pad_to is not None and m < pad_to:
            pad = np.zeros((pad_to - m,) + batch.shape[1:], batch.dtype)
            batch = np.concatenate([batch, pad])
        norm = _normalize_clean if resize == "clean" else _normalize_bilinear
        return norm(jnp.asarray(batch))

    def _batch(self, batch: np.ndarray, resize: str, batch_size: int) -> jax.Array:
        return self._net(self.params, self.preprocess(batch, resize=resize, pad_to=batch_size))


@functools.cache
def default_extractor() -> InceptionFeatures:
    """One shared `InceptionFeatures` with weights from `load_inception_params()`."""
    return InceptionFeatures()


def extract_features(
    images: Any,
    batch_size: int = 50,
    *,
    resize: str = "bilinear",
    out_dtype: Any = np.float32,
    progress: bool | None = None,
) -> np.ndarray:
    """FID-Inception pool3 features of ``images`` with the shared default extractor."""
    return default_extractor().extract_features(
        images, batch_size, resize=resize, out_dtype=out_dtype, progress=progress
    )
