"""Encode once, train many: cached VAE posteriors and text embeddings.

Most strategies freeze the VAE and the text encoder, yet a straightforward loop re-encodes
every image and caption at every step of every run. jaxmed encodes once per dataset,
resolution and VAE, and reuses it wherever it is valid.

* `LatentCache`: the VAE encoder's diagonal Gaussian — mean AND log-variance, not a sample —
  for every record, in memory-mapped ``.npy`` files (datasets larger than memory are fine).
  Training draws ``mean + std * eps`` from it each step with the same random stream as
  encoding on the fly, so the objective is unchanged.
* `TextCache`: the text encoder's last hidden state for every distinct caption the data
  pipeline can produce (each template and the empty caption of caption dropout included).

Each cache stores a fingerprint: the record list (path, size, mtime), the resolution and
resize filter, and a hash of the encoder's weights and config. A cache whose fingerprint
differs is stale: it is rebuilt (saying which part changed), never used. Files are written
under temporary names and renamed when complete, with ``meta.json`` last, so a killed
build is never mistaken for a cache. On a pod each host builds its own copy on local disk
with its local devices (no cross-host traffic).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data.chexpert import BadImageError
from jaxmed.files import atomic_path, write_json
from jaxmed.logging_utils import progress as bar
from jaxmed.strategies.base import flatten

log = logging.getLogger("jaxmed.cache")
FORMAT = 1


def params_hash(params: Any, config: Any = None) -> str:
    """sha256 of a param tree's bytes (sorted by path) and its config."""
    h = hashlib.sha256()
    for path, v in sorted(flatten(jax.device_get(params)).items()):
        h.update("/".join(path).encode())
        h.update(np.ascontiguousarray(np.asarray(v, np.float32)).tobytes())
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else config
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return h.hexdigest()


def records_hash(records) -> str:
    """sha256 over every record's path, file size and modification time (an edited or
    replaced image changes it), or the path alone for loader-backed records."""
    h = hashlib.sha256(records.source.encode())
    for p in records.paths:
        h.update(p.encode())
        try:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()


def _folder_for(cache_dir: str, kind: str, source: str) -> str:
    stem = os.path.splitext(os.path.basename(source))[0] or "data"
    return os.path.join(cache_dir, f"{kind}-{stem}-{hashlib.sha1(source.encode()).hexdigest()[:8]}")


def _read_meta(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _stale_reason(meta: dict | None, want: dict) -> str | None:
    if meta is None:
        return "no complete cache"
    for key in want:
        if meta.get(key) != want[key]:
            return {"records": "the images changed", "resolution": "the resolution changed",
                    "resample": "the resize filter changed", "encoder": "the VAE weights changed",
                    "text_encoder": "the text encoder changed", "captions": "the captions changed",
                    "format": "the cache format changed"}.get(key, f"{key} changed")
    return None


def _write_meta(folder: str, meta: dict) -> None:
    write_json(os.path.join(folder, "meta.json"), meta, indent=1)


class LatentCache:
    """VAE posteriors (mean, logvar) for every record, memory-mapped from disk."""

    def __init__(self, folder: str):
        self.folder = folder
        self.meta = _read_meta(folder)
        if self.meta is None:
            raise FileNotFoundError(f"{folder}: no complete latent cache here")
        self.mean = np.load(os.path.join(folder, "mean.npy"), mmap_mode="r")
        self.logvar = np.load(os.path.join(folder, "logvar.npy"), mmap_mode="r")
        self.valid = np.load(os.path.join(folder, "valid.npy"))

    def __len__(self) -> int:
        return self.mean.shape[0]

    def get(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        pos = np.asarray(positions)
        order = np.argsort(pos)  # sorted reads are kinder to a memory map
        mean = np.empty((len(pos),) + self.mean.shape[1:], np.float32)
        logvar = np.empty_like(mean)
        mean[order] = self.mean[pos[order]]
        logvar[order] = self.logvar[pos[order]]
        return {"latent_mean": mean, "latent_logvar": logvar}

    @classmethod
    def build_or_load(
        cls,
        cache_dir: str,
        records,
        encode: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
        params: Any,
        encoder_hash: str,
        *,
        resolution: int,
        resample: str = "bilinear",
        batch_size: int = 16,
        on_bad_image: str = "error",
        workers: int = 4,
        devices: Sequence[jax.Device] | None = None,
        progress: bool = True,
    ) -> LatentCache:
        """The valid cache for ``records`` (built now if missing or stale).

        ``encode(params, images (B, H, W, 3) in [-1, 1]) -> (mean, logvar)``: the VAE
        encoder, run jitted and sharded over ``devices`` (default: this process's local
        devices) with ``params`` as an argument: weights closed over would be baked into
        the compiled program as constants (slow to compile, a second copy in memory).
        """
        folder = _folder_for(cache_dir, "latents", records.source)
        want = {"format": FORMAT, "records": records_hash(records), "resolution": resolution,
                "resample": resample, "encoder": encoder_hash}
        reason = _stale_reason(_read_meta(folder), want)
        if reason is None:
            log.info("latent cache: using %s", folder)
            return cls(folder)
        if os.path.isdir(folder):
            log.info("latent cache at %s is stale (%s): rebuilding", folder, reason)
            shutil.rmtree(folder)
        os.makedirs(folder)
        devices = list(devices or jax.local_devices())
        mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
        sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        bs = max(len(devices), batch_size // len(devices) * len(devices))
        fn = jax.jit(encode, out_shardings=(sh, sh))
        n = len(records)
        shape = jax.eval_shape(encode, params, jax.ShapeDtypeStruct(
            (bs, resolution, resolution, 3), jnp.float32))[0].shape[1:]
        valid = np.ones(n, bool)

        def load(i):
            try:
                return records.load(i, resolution, resample)
            except BadImageError as err:
                if on_bad_image == "error":
                    raise
                log.warning("latent cache: skipping bad image: %s", err)
                valid[i] = False
                return np.zeros((resolution, resolution, 3), np.float32)

        pb = bar(total=n, desc="encoding latents (once)", enabled=progress, unit="img")
        # Both arrays are renamed into place when the with-block ends, after their last write.
        with contextlib.ExitStack() as files, ThreadPoolExecutor(workers) as pool:
            arrays = {k: np.lib.format.open_memmap(
                files.enter_context(atomic_path(os.path.join(folder, f"{k}.npy"))), mode="w+",
                dtype=np.float32, shape=(n, *shape)) for k in ("mean", "logvar")}
            for start in range(0, n, bs):
                idx = list(range(start, min(start + bs, n)))
                imgs = np.stack(list(pool.map(load, idx)))
                pad = bs - len(idx)
                if pad:
                    imgs = np.concatenate([imgs, np.zeros((pad, *imgs.shape[1:]), imgs.dtype)])
                mean, logvar = fn(params, jax.device_put(imgs, sh))
                arrays["mean"][start:start + len(idx)] = np.asarray(mean)[:len(idx)]
                arrays["logvar"][start:start + len(idx)] = np.asarray(logvar)[:len(idx)]
                pb.update(len(idx))
            for a in arrays.values():
                a.flush()
            del arrays
        pb.close()
        np.save(os.path.join(folder, "valid.npy"), valid)
        _write_meta(folder, {**want, "count": n, "shape": list(shape),
                             "skipped": int((~valid).sum())})
        log.info("latent cache: wrote %d posteriors %s to %s", n, tuple(shape), folder)
        return cls(folder)


class TextCache:
    """Text-encoder outputs for a fixed list of captions."""

    def __init__(self, folder: str):
        self.folder = folder
        self.meta = _read_meta(folder)
        if self.meta is None:
            raise FileNotFoundError(f"{folder}: no complete text cache here")
        self.captions = list(self.meta["caption_list"])
        self.index = {c: i for i, c in enumerate(self.captions)}
        self.context = np.load(os.path.join(folder, "context.npy"))

    def lookup(self, captions: Sequence[str]) -> np.ndarray:
        try:
            idx = [self.index[c] for c in captions]
        except KeyError as err:
            raise KeyError(
                f"caption {err.args[0]!r} is not in the text cache {self.folder}; the cache "
                "must hold every caption variant (set cache.text=off, or rebuild it)") from None
        return self.context[idx]

    @classmethod
    def build_or_load(
        cls,
        cache_dir: str,
        source: str,
        captions: Sequence[str],
        encode: Callable[[Any, jax.Array], jax.Array],
        params: Any,
        tokenize: Callable[[list[str]], np.ndarray],
        encoder_hash: str,
        *,
        batch_size: int = 32,
    ) -> TextCache:
        captions = sorted(set(captions))
        folder = _folder_for(cache_dir, "text", source)
        want = {"format": FORMAT, "text_encoder": encoder_hash,
                "captions": hashlib.sha256(json.dumps(captions).encode()).hexdigest()}
        reason = _stale_reason(_read_meta(folder), want)
        if reason is None:
            log.info("text cache: using %s", folder)
            return cls(folder)
        if os.path.isdir(folder):
            log.info("text cache at %s is stale (%s): rebuilding", folder, reason)
            shutil.rmtree(folder)
        os.makedirs(folder)
        fn = jax.jit(encode)
        out = []
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            ids = tokenize(chunk)
            pad = batch_size - len(chunk)
            if pad:  # one compiled shape
                ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
            out.append(np.asarray(fn(params, ids))[:len(chunk)])
        context = np.concatenate(out).astype(np.float32)
        with atomic_path(os.path.join(folder, "context.npy")) as tmp:
            np.save(tmp, context)
        _write_meta(folder, {**want, "caption_list": captions, "shape": list(context.shape)})
        log.info("text cache: wrote %d caption embeddings to %s", len(captions), folder)
        return cls(folder)
