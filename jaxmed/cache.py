"""Encode once, train many: cached VAE posteriors and text embeddings.

Most strategies freeze the VAE and the text encoder, yet a straightforward loop re-encodes
every image and caption at every step of every run. jaxmed encodes once per dataset,
resolution and VAE, and reuses it wherever it is valid.

* `LatentCache`: the VAE encoder's diagonal Gaussian — mean AND log-variance, not a sample —
  for every record, in memory-mapped ``.npy`` files (datasets larger than memory are fine).
  Training draws ``mean + std * eps`` from it each step with the same random stream as
  encoding on the fly, so the objective is unchanged. It fills lazily: a run encodes up
  front the records its own steps will read (`LatentCache.ensure`; a 3-step smoke run
  encodes 3 batches, not the dataset), any other record when first read, and ``done.npy``
  marks which entries hold posteriors, so the next run reuses them and encodes only the
  rest. ``build_or_load(positions=None)`` (``cache.prefill=true``) encodes every record.
* `TextCache`: the text encoder's last hidden state for every distinct caption the data
  pipeline can produce (each template and the empty caption of caption dropout included).

Each cache stores a fingerprint: the record list (path, size, mtime), the resolution and
resize filter, and a hash of the encoder's weights and config. A cache whose fingerprint
differs is stale: it is rebuilt (saying which part changed), never used. Files are written
under temporary names and renamed when complete, with ``meta.json`` last, so a killed
build is never mistaken for a cache.

Several JAX processes (a pod): when the cache folder is one that every process sees (a
shared workdir), process 0 alone checks, deletes and writes its files; the latents are
encoded by every process, each its share of the records on its own devices, into the same
files, and the others wait at a barrier until process 0 has published them. When the folder
is per host (local disk), each host builds its own copy with its local devices, with no
cross-host traffic. A run whose workdir is a storage URL (``gs://``) keeps its caches per
host by default (`jaxmed.storage.local_twin`); ``cache.dir`` itself must be a local or
mounted folder, since the latents are memory-mapped. A folder shared by several
processes is always filled whole (each process its share), as that needs no coordination
of ``done.npy`` across hosts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxmed import storage
from jaxmed.data.chexpert import BadImageError
from jaxmed.files import atomic_path, write_json
from jaxmed.logging_utils import BoundedWarnings
from jaxmed.logging_utils import progress as bar
from jaxmed.strategies.base import flatten

log = logging.getLogger("jaxmed.cache")
FORMAT = 1
# How often a lazy fill publishes its progress (done.npy): a killed fill loses at most this.
PERSIST_SECONDS = 5.0


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


def shared_by_processes(cache_dir: str) -> bool:
    """Whether every JAX process sees the same ``cache_dir`` (False with one process):
    process 0 writes a token there; each process looks for it. Every process must call it."""
    if jax.process_count() == 1:
        return False
    main = jax.process_index() == 0
    token = int(multihost_utils.broadcast_one_to_all(
        np.asarray(int.from_bytes(os.urandom(4), "little") >> 1, np.int64)))
    probe = os.path.join(cache_dir, f".process-probe-{token}")
    if main:
        os.makedirs(cache_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("shared?")
    multihost_utils.sync_global_devices(f"jaxmed.cache probe {token} written")
    seen = np.asarray([os.path.exists(probe)], np.int32)
    shared = bool(multihost_utils.process_allgather(seen, tiled=True).all())
    multihost_utils.sync_global_devices(f"jaxmed.cache probe {token} read")
    if main:
        os.remove(probe)
    return shared


def _encoder(encode, devices, batch_size: int):
    """(jitted encode sharded over this process's ``devices``, batch size, mesh sharding)."""
    devices = list(devices or jax.local_devices())
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    bs = max(len(devices), batch_size // len(devices) * len(devices))
    return jax.jit(encode, out_shardings=(sh, sh)), bs, sh


def _encode_positions(fn, params, bs: int, sh, records, positions: np.ndarray,
                      arrays: dict, valid: np.ndarray, *, resolution: int, resample: str,
                      on_bad_image: str, workers: int, pb, warn: BoundedWarnings,
                      after_chunk=None, reasons: dict | None = None) -> None:
    """Encode the records at ``positions`` (ascending) into ``arrays`` (mean, logvar:
    (n, ...) memmaps), ``bs`` at a time; a bad image is skipped (valid[i] = False) or
    raised, per ``on_bad_image``. ``after_chunk(chunk)`` runs after each chunk's writes."""
    def load(i):
        try:
            return records.load(i, resolution, resample)
        except BadImageError as err:
            if on_bad_image == "error":
                raise
            warn.warn("latent cache: skipping bad image: %s", err)
            if reasons is not None:
                reasons[int(i)] = err.reason
            valid[i] = False
            return None

    with ThreadPoolExecutor(workers) as pool:
        for lo in range(0, len(positions), bs):
            idx = np.asarray(positions[lo:lo + bs])
            loaded = list(pool.map(load, idx))
            if all(x is None for x in loaded):  # nothing readable: nothing to encode
                pb.update(len(idx))
                if after_chunk is not None:
                    after_chunk(idx)
                continue
            shape = next(x.shape for x in loaded if x is not None)
            imgs = np.zeros((bs, *shape), np.float32)
            for j, x in enumerate(loaded):
                if x is not None:
                    imgs[j] = x
            mean, logvar = fn(params, jax.device_put(imgs, sh))
            arrays["mean"][idx] = np.asarray(mean)[:len(idx)]
            arrays["logvar"][idx] = np.asarray(logvar)[:len(idx)]
            pb.update(len(idx))
            if after_chunk is not None:
                after_chunk(idx)


def _latent_shape(encode, params, bs: int, resolution: int) -> tuple[int, ...]:
    return jax.eval_shape(encode, params, jax.ShapeDtypeStruct(
        (bs, resolution, resolution, 3), jnp.float32))[0].shape[1:]


class _Encoder:
    """What a lazy cache needs to encode more records: the jitted encoder and its inputs."""

    def __init__(self, encode, params, devices, batch_size: int, records, opts: dict):
        self.fn, self.bs, self.sh = _encoder(encode, devices, batch_size)
        self.params, self.records, self.opts = params, records, opts
        self.warn = BoundedWarnings(log, "bad images")


class LatentCache:
    """VAE posteriors (mean, logvar) for every record, memory-mapped from disk; entries not
    encoded yet (``done`` False) are encoded when `ensure`d or first read."""

    def __init__(self, folder: str, encoder: _Encoder | None = None):
        self.folder = folder
        self.meta = _read_meta(folder)
        if self.meta is None:
            raise FileNotFoundError(f"{folder}: no complete latent cache here")
        self.mean = np.load(os.path.join(folder, "mean.npy"), mmap_mode="r")
        self.logvar = np.load(os.path.join(folder, "logvar.npy"), mmap_mode="r")
        self.valid = np.load(os.path.join(folder, "valid.npy"))
        done = os.path.join(folder, "done.npy")  # absent: a cache filled whole
        self.done = np.load(done) if os.path.exists(done) else np.ones(len(self.valid), bool)
        self._encoder = encoder
        self._lock = threading.Lock()
        self.reasons: dict[int, str] = {}  # why an image was unreadable (this process saw)

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def num_encoded(self) -> int:
        return int(self.done.sum())

    def ensure(self, positions, *, progress: bool = False, desc: str = "") -> int:
        """Encode the records at ``positions`` that are not in the cache yet (and publish
        them: the arrays first, then ``valid.npy`` and ``done.npy``); returns how many."""
        with self._lock:
            pos = np.unique(np.asarray(positions, np.int64))
            missing = pos[~self.done[pos]]
            if not len(missing):
                return 0
            enc = self._encoder
            if enc is None:
                raise RuntimeError(f"{self.folder}: {len(missing)} records are not encoded "
                                   "and this cache was opened without an encoder")
            arrays = {k: np.load(os.path.join(self.folder, f"{k}.npy"), mmap_mode="r+")
                      for k in ("mean", "logvar")}
            pb = bar(total=len(missing), desc=desc or "encoding latents (once)",
                     enabled=progress, unit="img")
            last = [time.monotonic()]
            pending: list[np.ndarray] = []

            def publish(chunk=None):
                if chunk is not None:
                    pending.append(chunk)
                    if time.monotonic() - last[0] < PERSIST_SECONDS:
                        return
                for a in arrays.values():
                    a.flush()
                for c in pending:
                    self.done[c] = True
                pending.clear()
                self._save_masks()
                last[0] = time.monotonic()

            try:
                _encode_positions(enc.fn, enc.params, enc.bs, enc.sh, enc.records, missing,
                                  arrays, self.valid, pb=pb, warn=enc.warn,
                                  after_chunk=publish, reasons=self.reasons, **enc.opts)
            finally:
                publish()
                pb.close()
                arrays.clear()  # unmap
            bad = int((~self.valid[missing]).sum())
            log.info("latent cache: encoded %d records%s (%d of %d now cached) in %s",
                     len(missing) - bad, f", {bad} unreadable" if bad else "",
                     self.num_encoded, len(self), self.folder)
            return len(missing)

    def _save_masks(self) -> None:
        for k, a in (("valid", self.valid), ("done", self.done)):  # done last
            with atomic_path(os.path.join(self.folder, f"{k}.npy")) as tmp:
                np.save(tmp, a)

    def unreadable(self, position: int) -> str | None:
        """Why record ``position`` has no posterior (its image could not be read), or
        None; encodes it first if needed."""
        if not self.done[position]:
            self.ensure([position])
        if self.valid[position]:
            return None
        return self.reasons.get(int(position), "unreadable when the latent cache encoded it")

    def get(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        pos = np.asarray(positions)
        if not self.done[pos].all():
            self.ensure(pos)
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
        positions: Sequence[int] | np.ndarray | None = None,
    ) -> LatentCache:
        """The valid cache for ``records`` (made now if missing or stale), with the records
        at ``positions`` encoded (None: every record, the full pre-encode); any other
        record is encoded when first read.

        ``encode(params, images (B, H, W, 3) in [-1, 1]) -> (mean, logvar)``: the VAE
        encoder, run jitted and sharded over ``devices`` (default: this process's local
        devices) with ``params`` as an argument: weights closed over would be baked into
        the compiled program as constants (slow to compile, a second copy in memory).
        A folder every process sees is filled whole, whatever ``positions``.
        """
        storage.require_local(cache_dir, "cache.dir")
        folder = _folder_for(cache_dir, "latents", records.source)
        want = {"format": FORMAT, "records": records_hash(records), "resolution": resolution,
                "resample": resample, "encoder": encoder_hash}
        opts = dict(resolution=resolution, resample=resample, on_bad_image=on_bad_image,
                    workers=workers)
        if shared_by_processes(cache_dir):
            cls._build_shared(folder, want, records, encode, params, devices, batch_size,
                              progress, **opts)
            return cls(folder)
        reason = _stale_reason(_read_meta(folder), want)
        enc = _Encoder(encode, params, devices, batch_size, records, opts)
        if reason is None:
            try:
                cache = cls(folder, enc)
            except (OSError, ValueError) as err:  # a file gone or cut short
                reason = f"unreadable: {err}"
            else:
                log.info("latent cache: using %s (%d of %d records encoded)", folder,
                         cache.num_encoded, len(cache))
        if reason is not None:
            if os.path.isdir(folder):
                log.info("latent cache at %s is stale (%s): rebuilding", folder, reason)
                shutil.rmtree(folder)
            cache = cls._create(folder, want, records, encode, params, enc)
        todo = np.arange(len(records)) if positions is None else positions
        cache.ensure(todo, progress=progress)
        return cache

    @classmethod
    def _create(cls, folder, want, records, encode, params, enc: _Encoder) -> LatentCache:
        """An empty cache (nothing encoded) for ``records``; meta.json is written last."""
        os.makedirs(folder)
        n = len(records)
        shape = _latent_shape(encode, params, enc.bs, enc.opts["resolution"])
        for k in ("mean", "logvar"):  # sparse on most filesystems until written
            with atomic_path(os.path.join(folder, f"{k}.npy")) as tmp:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                          shape=(n, *shape)).flush()
        for k, a in (("valid", np.ones(n, bool)), ("done", np.zeros(n, bool))):
            with atomic_path(os.path.join(folder, f"{k}.npy")) as tmp:
                np.save(tmp, a)
        _write_meta(folder, {**want, "count": n, "shape": list(shape)})
        return cls(folder, enc)

    @staticmethod
    def _build_shared(folder, want, records, encode, params, devices, batch_size, progress,
                      **opts) -> None:
        """Several processes, one folder they all see: process 0 decides and publishes;
        if stale, each process encodes its contiguous share of the records into the same
        files. Every process calls it; all return once the cache is complete."""
        main = jax.process_index() == 0
        fresh = _stale_reason(_read_meta(folder), want) is None
        # Process 0's view decides (the others may read meta.json while it is replaced).
        fresh = bool(multihost_utils.broadcast_one_to_all(np.asarray(fresh, np.int32)))
        tag = f"jaxmed.cache latents {folder}"
        if fresh:
            log.info("latent cache: using %s", folder)
            multihost_utils.sync_global_devices(tag + " checked")
            return
        n = len(records)
        fn, bs, sh = _encoder(encode, devices, batch_size)
        shape = _latent_shape(encode, params, bs, resolution=opts["resolution"])
        parts = {k: os.path.join(folder, f"{k}.npy.partial") for k in ("mean", "logvar", "valid")}
        if main:
            if os.path.isdir(folder):
                log.info("latent cache at %s is stale: rebuilding (%d processes)", folder,
                         jax.process_count())
                shutil.rmtree(folder)
            os.makedirs(folder)
            for k in ("mean", "logvar"):
                np.lib.format.open_memmap(parts[k], mode="w+", dtype=np.float32,
                                          shape=(n, *shape)).flush()
            valid = np.lib.format.open_memmap(parts["valid"], mode="w+", dtype=bool, shape=(n,))
            valid[:] = True
            valid.flush()
            del valid
        multihost_utils.sync_global_devices(tag + " created")
        i, count = jax.process_index(), jax.process_count()
        start, stop = i * n // count, (i + 1) * n // count
        log.info("latent cache: process %d of %d encodes its share, records [%d, %d) of %d, "
                 "into %s", i, count, start, stop, n, folder)
        arrays = {k: np.load(parts[k], mmap_mode="r+") for k in ("mean", "logvar")}
        valid = np.load(parts["valid"], mmap_mode="r+")
        pb = bar(total=stop - start, desc="encoding latents (once, this process's share)",
                 enabled=progress, unit="img")
        _encode_positions(fn, params, bs, sh, records, np.arange(start, stop), arrays, valid,
                          pb=pb, warn=BoundedWarnings(log, "bad images"), **opts)
        pb.close()
        for a in (*arrays.values(), valid):
            a.flush()
        del arrays, valid
        multihost_utils.sync_global_devices(tag + " encoded")
        if main:
            valid = np.load(parts["valid"])
            os.replace(parts["valid"], os.path.join(folder, "valid.npy"))
            for k in ("mean", "logvar"):
                os.replace(parts[k], os.path.join(folder, f"{k}.npy"))
            _write_meta(folder, {**want, "count": n, "shape": list(shape),
                                 "skipped": int((~valid).sum())})
            log.info("latent cache: wrote %d posteriors %s to %s", n, tuple(shape), folder)
        multihost_utils.sync_global_devices(tag + " published")


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
        storage.require_local(cache_dir, "cache.dir")
        captions = sorted(set(captions))
        if shared_by_processes(cache_dir):
            # Process 0 builds (or checks) it alone; the others read it once published.
            folder = _folder_for(cache_dir, "text", source)
            if jax.process_index() == 0:
                cls._build_or_load(folder, captions, encode, params, tokenize, encoder_hash,
                                   batch_size)
            multihost_utils.sync_global_devices(f"jaxmed.cache text {folder} published")
            return cls(folder)
        return cls._build_or_load(_folder_for(cache_dir, "text", source), captions, encode,
                                  params, tokenize, encoder_hash, batch_size)

    @classmethod
    def _build_or_load(cls, folder: str, captions: list[str], encode, params, tokenize,
                       encoder_hash: str, batch_size: int) -> TextCache:
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
