"""What a user sees during long work: tqdm progress bars, metrics as JSONL + TensorBoard."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping

from tqdm.auto import tqdm

from jaxmed import storage


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def set_description(self, *a, **kw):
        pass

    def close(self):
        pass


def progress(total: int | None = None, initial: int = 0, desc: str = "", enabled: bool = True,
             unit: str = "step"):
    """A tqdm bar (step, postfix metrics, rate, ETA) or a silent stand-in."""
    if not enabled:
        return _NullBar()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                file=sys.stderr, smoothing=0.1)


class MetricWriter:
    """Append metrics to ``workdir/metrics.jsonl`` and TensorBoard event files.

    An object store cannot append: for a storage-URL workdir both are written in a local
    folder and uploaded over the workdir's copies (each upload replaces an object whole)
    every ``sync_seconds`` and at `close`; an existing ``metrics.jsonl`` is read first, so
    a resumed run appends to it."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True,
                 filename: str = "metrics.jsonl", sync_seconds: float = 60.0):
        self.enabled = enabled
        self._tb = None
        self._f = None
        self._url = None
        if not enabled:
            return
        if storage.is_url(workdir):
            self._url, self._sync_seconds = workdir, sync_seconds
            workdir = tempfile.mkdtemp(prefix="jaxmed-metrics-")
            remote = storage.join(self._url, filename)
            if storage.isfile(remote):
                with storage.open_file(remote, "rb") as src, \
                        open(os.path.join(workdir, filename), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            self._synced = time.monotonic()
        self._local = workdir
        os.makedirs(workdir, exist_ok=True)
        self._f = open(os.path.join(workdir, filename), "a")
        if tensorboard:
            try:  # imported here: optional, and heavy (protobuf) for runs that never log to it
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional: JSONL is always written
                self._tb = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time(), 3),
               **{k: float(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))
        if self._url and time.monotonic() - self._synced >= self._sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Upload the local copies to a storage-URL workdir (nothing to do otherwise)."""
        if not self._url or self._f is None:
            return
        if self._tb is not None:
            self._tb.flush()
        storage.upload_tree(self._local, self._url)
        self._synced = time.monotonic()

    def close(self) -> None:
        self.sync()
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._url:
            self._url = None
            shutil.rmtree(self._local, ignore_errors=True)


def read_metrics(workdir: str, filename: str = "metrics.jsonl") -> list[dict]:
    path = storage.join(workdir, filename)
    if not storage.isfile(path):
        return []
    with storage.open_file(path) as f:
        return [json.loads(line) for line in f if line.strip()]
