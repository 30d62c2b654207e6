"""What a user sees during long work: progress bars (tqdm on a terminal, plain periodic
lines in a redirected log), bounded per-file warnings, metrics as JSONL + TensorBoard."""

from __future__ import annotations

import json
import logging
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

    def set_postfix(self, ordered_dict=None, **kw):  # as tqdm: a mapping or keywords
        pass

    def set_description(self, *a, **kw):
        pass

    def close(self):
        pass


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class LineBar:
    """A progress bar for logs that are not a terminal: one plain line every ``every``
    seconds (and at the end), never carriage-return frames. Same methods as tqdm's."""

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", unit: str = "step",
                 every: float = 30.0, file=None):
        self.total, self.n, self.desc, self.unit, self.every = total, initial, desc, unit, every
        self.file = file or sys.stderr
        self._start_n, self._t0 = initial, time.perf_counter()
        self._last = self._t0
        self._postfix = ""
        self._closed = False
        self._printed = initial  # n at the last line written (close adds none if unchanged)

    def _line(self) -> str:
        elapsed = time.perf_counter() - self._t0
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total and rate > 0 and self.n < self.total:
            eta = f", about {_duration((self.total - self.n) / rate)} left"
        post = f", {self._postfix}" if self._postfix else ""
        return (f"{self.desc}: {self.n}{of} {self.unit}{pct} in {_duration(elapsed)}, "
                f"{rate:.2f} {self.unit}/s{eta}{post}")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last, self._printed = now, self.n
            print(self._line(), file=self.file, flush=True)

    def set_postfix(self, ordered_dict: Mapping | None = None, **kw) -> None:
        items = {**(ordered_dict or {}), **kw}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", *a, **kw) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self._closed and self.n > self._printed:
            print(self._line(), file=self.file, flush=True)
        self._closed = True


def _in_kernel() -> bool:
    """Whether this process is a running Jupyter/Colab kernel (tqdm draws a widget there).
    An imported ``ipykernel`` alone is not one: a test or a tool may import it."""
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
    except Exception:  # noqa: BLE001 - an IPython too old or half-imported: not a kernel
        return False
    return getattr(shell, "kernel", None) is not None


def progress(total: int | None = None, initial: int = 0, desc: str = "", enabled: bool = True,
             unit: str = "step"):
    """A tqdm bar (step, postfix metrics, rate, ETA) on a terminal or in a notebook,
    periodic plain lines (`LineBar`) when stderr is redirected to a file or pipe, or a
    silent stand-in."""
    if not enabled:
        return _NullBar()
    if not sys.stderr.isatty() and not _in_kernel():
        return LineBar(total, initial, desc, unit)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                file=sys.stderr, smoothing=0.1)


class BoundedWarnings:
    """Per-item warnings (a bad image each) that stop after ``limit`` items with one line
    saying the rest are counted, not listed: a wrong image root must not bury the one
    message that explains it under thousands of lines."""

    def __init__(self, logger: logging.Logger, what: str, limit: int = 5):
        self.logger, self.what, self.limit, self.count = logger, what, limit, 0

    def warn(self, msg: str, *args) -> None:
        self.count += 1
        if self.count <= self.limit:
            self.logger.warning(msg, *args)
        if self.count == self.limit:
            self.logger.warning("further %s are counted, not listed one by one", self.what)


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


class Throughput:
    """Images per second of a whole run, and of its steady state: from the moment the first
    step's result was read (that step compiles) to the end. Honest numbers, not the last
    step's rate."""

    def __init__(self, images_per_step: int, first_step: int = 0):
        self.images_per_step, self.first_step = images_per_step, first_step
        self.t0 = time.perf_counter()
        self._steady: tuple[float, int] | None = None

    def step_read(self, step: int) -> None:
        """The result of step ``step`` (1-based count) has been read; the first call marks
        the steady state's start."""
        if self._steady is None:
            self._steady = (time.perf_counter(), step)

    def summary(self, last_step: int) -> dict:
        now = time.perf_counter()
        elapsed = now - self.t0
        images = self.images_per_step * (last_step - self.first_step)
        out = {"train_seconds": round(elapsed, 2), "images": images,
               "images_per_second": round(images / elapsed, 3) if elapsed > 0 else None,
               "steady_images_per_second": None}
        if self._steady is not None and last_step > self._steady[1] and now > self._steady[0]:
            t, s = self._steady
            out["steady_images_per_second"] = round(
                self.images_per_step * (last_step - s) / (now - t), 3)
        return out

    def line(self, last_step: int) -> str:
        s = self.summary(last_step)
        steady = s["steady_images_per_second"]
        return (f"{s['images']} images in {s['train_seconds']:.1f}s: "
                f"{s['images_per_second'] or 0:.2f} img/s over the whole run"
                + (f" ({steady:.2f} img/s after the first step, which compiles)"
                   if steady is not None else ""))
