"""What a user sees during long work: tqdm progress bars, metrics as JSONL + TensorBoard."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

from tqdm.auto import tqdm


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
    """Append metrics to ``workdir/metrics.jsonl`` and TensorBoard event files."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True,
                 filename: str = "metrics.jsonl"):
        self.enabled = enabled
        self._tb = None
        self._f = None
        if not enabled:
            return
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

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str, filename: str = "metrics.jsonl") -> list[dict]:
    path = os.path.join(workdir, filename)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
