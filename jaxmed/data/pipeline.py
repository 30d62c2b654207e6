"""Records -> training batches: shuffled, sharded per process, resumable, prefetched.

Each global batch of ``batch_size`` records is a slice of a per-epoch permutation
(``np.random.default_rng([seed, epoch])``; all processes compute the same one). Process
``i`` of ``P`` decodes only its slice ``[i*b, (i+1)*b)`` of every global batch,
``b = batch_size / P``; the remainder of an epoch that does not fill a global batch is
dropped. A batch is therefore a pure function of ``(epoch, step)``, which is all the
state needed to resume exactly (`Batches.state_dict` / `Batches.load_state_dict`), and
every process yields the same number of batches.

Bad images (``on_bad_image='skip'``): the slot is filled from the next records of this
process's share of the epoch (its slices of the following steps, wrapping around; those
records then appear twice in that epoch), so batch shapes never change, the fill is still a
pure function of ``(epoch, step)``, and the processes stay in lock step. Each bad file is
logged once; `Batches.num_skipped` counts skip events and `Batches.bad_images` maps each
bad path to its error. ``on_bad_image='error'`` raises `BadImageError` naming the path
and the CSV row.

Images are decoded by a thread pool (PIL releases the GIL while decoding and resizing);
at most ``prefetch`` batches are being decoded and at most ``prefetch`` finished batches
wait in a queue, so memory stays bounded whatever the dataset size. Captions are
tokenised once per distinct caption string (a dict cache).

Batch: ``{'image': (b, H, W, 3) float32 in [-1, 1], 'input_ids': (b, 77) int32,
'labels': (b, L) float32, 'index': (b,) int64, 'position': (b,) int64}`` (``index`` = the
CSV row, ``position`` = the record's position in ``records``), plus
``'caption'`` (a list of str) with ``return_captions=True``. ``input_ids`` is absent when
no tokenizer is given.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmed.data.captions import Captioner
from jaxmed.data.chexpert import BadImageError, Records
from jaxmed.errors import UserError
from jaxmed.logging_utils import BoundedWarnings
from jaxmed.models.tokenizer import tokenize

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
_END = object()


class Batches(Iterator[dict]):
    """Iterator of per-process training batches (see the module docstring).

    Args:
      records: the dataset (`Records`).
      batch_size: the GLOBAL batch size (over all processes).
      tokenizer: a CLIPTokenizer; None leaves ``input_ids`` out.
      resolution: image size (int, or (H, W)); plain resize, no crop.
      resample: 'bilinear' (default, as the study) | 'bicubic' | 'lanczos' | 'nearest'.
      seed: seed of the per-epoch shuffle (and of the default captioner).
      shuffle: False keeps the records' order every epoch.
      num_epochs: stop after this many epochs; None repeats forever.
      num_steps: stop before global batch ``num_steps`` (counted over epochs from epoch 0
        step 0: ``epoch * steps_per_epoch + step``), so nothing past a run's last step is
        read ahead; None: no such limit.
      process_index, process_count: this process and the number of processes; default
        ``jax.process_index()`` / ``jax.process_count()``.
      captioner: a `Captioner` (templates, caption dropout); default the study's rule.
      max_length: tokenizer length (77).
      on_bad_image: 'error' | 'skip'.
      num_workers: decoding threads.
      prefetch: batches decoded ahead (and batches queued).
      return_captions: also return the caption strings.
      load_images: False skips decoding (e.g. when latents come from a cache); the batch
        then has no ``image``.
      extras: ``extras(positions) -> dict`` of per-record arrays (record positions in
        ``records``) added to each batch, e.g. cached VAE latents.
      unreadable: with ``load_images=False``, ``unreadable(position) -> reason or None``:
        records whose image could not be read (a latent cache knows), handled as bad images.
    """

    def __init__(
        self,
        records: Records,
        batch_size: int,
        *,
        tokenizer=None,
        resolution: int | tuple[int, int] = 512,
        resample: str = "bilinear",
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        num_steps: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        captioner: Captioner | None = None,
        max_length: int = 77,
        on_bad_image: str = "error",
        num_workers: int | None = None,
        prefetch: int = 2,
        return_captions: bool = False,
        load_images: bool = True,
        extras=None,
        unreadable=None,
    ):
        if process_index is None or process_count is None:
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image={on_bad_image!r} is not one of {BAD_IMAGE_POLICIES}")
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(
                f"global batch size {batch_size} must be a positive multiple of the "
                f"process count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.records = records
        self.batch_size = int(batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.batch_size // self.process_count
        self.steps_per_epoch = len(records) // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{records.source}: {len(records)} records, fewer than one global batch "
                f"of {batch_size}"
            )
        self.tokenizer = tokenizer
        self.resolution, self.resample = resolution, resample
        self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
        self.num_steps = num_steps
        self.captioner = captioner or Captioner(records.label_columns, seed=seed)
        self.max_length = max_length
        self.on_bad_image = on_bad_image
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.prefetch = max(1, int(prefetch))
        self.return_captions = return_captions
        self.load_images = bool(load_images)
        self.extras = extras
        self.unreadable = unreadable
        self.bad_images: dict[str, str] = {}
        self._warn = BoundedWarnings(logger, "bad images")
        self.num_skipped = 0
        self._token_cache: dict[str, np.ndarray] = {}
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._epoch, self._step = 0, 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._pool: ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------- positions
    def permutation(self, epoch: int) -> np.ndarray:
        """The record order of ``epoch`` (identical on every process)."""
        cached = self._perm_cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        n = len(self.records)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            perm = np.arange(n)
        self._perm_cache = (epoch, perm)
        return perm

    def local_positions(self, epoch: int, step: int) -> np.ndarray:
        """Record positions this process reads for global batch ``step`` of ``epoch``."""
        start = step * self.batch_size + self.process_index * self.local_batch_size
        return self.permutation(epoch)[start : start + self.local_batch_size]

    def global_positions(self, epoch: int, step: int) -> np.ndarray:
        start = step * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size]

    def _fill_candidates(self, epoch: int, step: int) -> Iterator[int]:
        for k in range(1, self.steps_per_epoch):
            yield from self.local_positions(epoch, (step + k) % self.steps_per_epoch)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Position of the next batch this iterator yields (plus checks)."""
        return {
            "epoch": self._epoch, "step": self._step, "seed": self.seed,
            "batch_size": self.batch_size, "num_records": len(self.records),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state`` (from `state_dict`): the next batch is (epoch, step)."""
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size),
                          ("num_records", len(self.records))):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"data state has {key}={state[key]}, this pipeline {mine}")
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"data state step {step} outside [0, {self.steps_per_epoch}]")
        if step == self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        self._shutdown_producer()
        self._epoch, self._step = epoch, step

    # ---------------------------------------------------------------- loading
    def _load(self, pos: int):
        path = self.records.paths[pos]
        if path in self.bad_images:
            return BadImageError(path, int(self.records.rows[pos]), self.records.source,
                                 self.bad_images[path])
        if not self.load_images:
            reason = self.unreadable(pos) if self.unreadable is not None else None
            if reason is None:
                return None
            return BadImageError(path, int(self.records.rows[pos]), self.records.source,
                                 reason)
        try:
            return self.records.load(pos, self.resolution, self.resample)
        except BadImageError as e:
            return e

    def _note_bad(self, err: BadImageError) -> None:
        if self.on_bad_image == "error":
            raise err
        self.num_skipped += 1
        if err.path not in self.bad_images:
            self.bad_images[err.path] = err.reason
            self._warn.warn("skipping bad image: %s", err)

    def skipped_summary(self) -> str:
        return (f"{len(self.bad_images)} bad image(s), {self.num_skipped} skip(s)"
                + (f"; e.g. {next(iter(self.bad_images))}" if self.bad_images else ""))

    def _tokens(self, captions: list[str]) -> np.ndarray:
        new = sorted({c for c in captions if c not in self._token_cache})
        if new:
            for c, ids in zip(new, tokenize(self.tokenizer, new, self.max_length)):
                self._token_cache[c] = ids
        return np.stack([self._token_cache[c] for c in captions]).astype(np.int32)

    def _assemble(self, epoch: int, step: int, positions, futures) -> dict:
        chosen: list[int] = []
        images: list[np.ndarray] = []
        for pos, fut in zip(positions, futures):
            img = fut.result()
            if isinstance(img, BadImageError):
                self._note_bad(img)
                continue
            chosen.append(int(pos))
            images.append(img)
        if len(chosen) < len(positions):
            used = set(int(p) for p in positions)
            for pos in self._fill_candidates(epoch, step):
                if len(chosen) == len(positions):
                    break
                if pos in used:
                    continue
                used.add(pos)
                img = self._load(pos)
                if isinstance(img, BadImageError):
                    self._note_bad(img)
                    continue
                chosen.append(int(pos))
                images.append(img)
            if not chosen:
                path, reason = next(iter(self.bad_images.items()))
                root = self.records.image_root or os.path.dirname(path)
                raise UserError(
                    f"{self.records.source}: every image tried ({len(self.bad_images)}, all "
                    f"of this process's share of epoch {epoch}) was unreadable, e.g. {path} "
                    f"({reason}); images are read under {root}: check data.image_root and "
                    "data.path_rewrite")
            if len(chosen) < len(positions):
                raise UserError(
                    f"{self.records.source}: process {self.process_index} found only "
                    f"{len(chosen)} readable images in its share of epoch {epoch} "
                    f"(needed {len(positions)}); {self.skipped_summary()}"
                )
        idx = np.asarray(chosen, dtype=np.int64)
        rec = self.records
        captions = [
            self.captioner(rec.labels[p], epoch=epoch, index=int(rec.rows[p]),
                           fixed=None if rec.captions is None else rec.captions[p])
            for p in chosen
        ]
        batch = {
            "labels": rec.labels[idx].astype(np.float32),
            "index": rec.rows[idx].astype(np.int64),
            "position": idx,
        }
        if self.load_images:
            batch["image"] = np.stack(images).astype(np.float32, copy=False)
        if self.extras is not None:
            batch.update(self.extras(idx))
        if self.tokenizer is not None:
            batch["input_ids"] = self._tokens(captions)
        if self.return_captions:
            batch["caption"] = captions
        return batch

    def _advance(self, epoch: int, step: int) -> tuple[int, int]:
        step += 1
        if step == self.steps_per_epoch:
            return epoch + 1, 0
        return epoch, step

    def _finished(self, epoch: int, step: int = 0) -> bool:
        if self.num_steps is not None and epoch * self.steps_per_epoch + step >= self.num_steps:
            return True
        return self.num_epochs is not None and epoch >= self.num_epochs

    @staticmethod
    def _produce(ref: weakref.ref, epoch: int, step: int, out: queue.Queue,
                 stop: threading.Event) -> None:
        # Holds only a weak reference between batches, so an abandoned iterator is
        # garbage-collected and its thread ends.
        def put(item) -> bool:
            while not stop.is_set() and ref() is not None:
                try:
                    out.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        pending: deque = deque()
        try:
            while not stop.is_set():
                me = ref()
                if me is None:
                    return
                while len(pending) < me.prefetch and not me._finished(epoch, step):
                    pos = me.local_positions(epoch, step)
                    futs = [me._pool.submit(me._load, int(p)) for p in pos]
                    pending.append((epoch, step, pos, futs))
                    epoch, step = me._advance(epoch, step)
                if not pending:
                    del me
                    put(_END)
                    return
                e, s, pos, futs = pending.popleft()
                batch = me._assemble(e, s, pos, futs)
                del me
                if not put((e, s, batch)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(err)
        finally:
            for *_, futs in pending:
                for f in futs:
                    f.cancel()

    def _start_producer(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="jaxmed-decode")
        self._thread = threading.Thread(
            target=Batches._produce, name="jaxmed-batches", daemon=True,
            args=(weakref.ref(self), self._epoch, self._step, self._queue, self._stop),
        )
        self._thread.start()

    def _shutdown_producer(self, wait: bool = True) -> None:
        if self._thread is not None:
            self._stop.set()
            if wait and self._thread is not threading.current_thread():
                self._thread.join()
        self._thread = self._queue = self._stop = None

    def close(self, wait: bool = True) -> None:
        """Stop the background threads (the position is kept)."""
        self._shutdown_producer(wait)
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close(wait=False)  # may run on one of our own threads: never join
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        if self._finished(self._epoch, self._step):
            raise StopIteration
        if self._thread is None:
            self._start_producer()
        item = self._queue.get()
        if item is _END:
            self._shutdown_producer()
            raise StopIteration
        if isinstance(item, BaseException):
            self._shutdown_producer()
            raise item
        epoch, step, batch = item
        self._epoch, self._step = self._advance(epoch, step)
        return batch

    def batch_at(self, epoch: int, step: int) -> dict:
        """This process's batch (epoch, step), computed synchronously (tests, debugging)."""
        pos = self.local_positions(epoch, step)
        futs = [_Done(self._load(int(p))) for p in pos]
        return self._assemble(epoch, step, pos, futs)

    def caption_variants(self) -> list[str]:
        """Every caption these batches can contain (for a text-embedding cache)."""
        return self.captioner.variants(self.records.labels, self.records.captions)


class _Done:
    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def _default_sharding():
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    return NamedSharding(mesh, PartitionSpec("data"))


def prefetch_to_device(iterator: Iterable[Mapping], size: int = 2, sharding=None
                       ) -> Iterator[dict]:
    """Place batches on devices ``size`` ahead of use, as global jax Arrays.

    Each numeric array is put with ``jax.make_array_from_process_local_data(sharding,
    local)``: each process passes its local batch and gets the global array (batch axis
    sharded over the mesh). ``sharding`` is one Sharding for every key, a mapping
    key -> Sharding (None leaves that key on the host), or None: the batch axis over all
    devices on a 1-D ``data`` mesh. Non-array values (captions) pass through.
    """
    if sharding is None:
        sharding = _default_sharding()

    def place(batch: Mapping) -> dict:
        out = {}
        for k, v in batch.items():
            sh = sharding.get(k) if isinstance(sharding, Mapping) else sharding
            if sh is None or not isinstance(v, np.ndarray) or v.dtype == object:
                out[k] = v
            else:
                out[k] = jax.make_array_from_process_local_data(sh, v)
        return out

    it = iter(iterator)
    ahead: deque = deque()
    ahead.extend(place(b) for b in itertools.islice(it, max(1, size)))
    while ahead:
        yield ahead.popleft()
        ahead.extend(place(b) for b in itertools.islice(it, 1))
