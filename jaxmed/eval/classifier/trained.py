"""`TrainedClassifier`: trained weights with their config; predictions, features, metrics,
save / load. Also the compiled evaluation functions, cached per network definition so that
repeated runs (the data regimes train many classifiers) reuse them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from jaxmed.eval import metrics as M
from jaxmed.eval.classifier.config import ClassifierConfig, build_model
from jaxmed.eval.classifier.inputs import prepare_images, validate_labels
from jaxmed.eval.classifier.networks import abstract_variables


def _model_key(cfg: ClassifierConfig):
    return (cfg.arch, cfg.num_labels, cfg.widths, cfg.dtype)


def _variables(params, batch_stats):
    v = {"params": params}
    if batch_stats:
        v["batch_stats"] = batch_stats
    return v


@functools.lru_cache(maxsize=8)
def _eval_fns(model_key) -> tuple[Callable, Callable]:
    cfg = ClassifierConfig(arch=model_key[0], num_labels=model_key[1], widths=model_key[2],
                           dtype=model_key[3])
    model = build_model(cfg)

    @jax.jit
    def logits(variables, x_u8):
        x = x_u8.astype(jnp.float32) / 255.0
        return model.apply(variables, x, train=False).astype(jnp.float32)

    @jax.jit
    def features(variables, x_u8):
        x = x_u8.astype(jnp.float32) / 255.0
        return model.apply(variables, x, train=False, method="features").astype(jnp.float32)

    return logits, features


def _batched(fn: Callable, variables, x_u8: np.ndarray, batch_size: int) -> np.ndarray:
    """Run ``fn(variables, batch)`` over x in fixed-size batches (last one padded).

    Always ``batch_size`` rows, however few images: each distinct batch shape is a compile,
    and the study's validation subsets (scaled with the real fraction) and test set differ
    in size, so padding a small set costs less than compiling for it."""
    n = x_u8.shape[0]
    bs = batch_size
    outs = []
    for s in range(0, n, bs):
        xb = x_u8[s:s + bs]
        m = xb.shape[0]
        if m < bs:
            xb = np.concatenate([xb, np.zeros((bs - m, *xb.shape[1:]), xb.dtype)])
        outs.append(np.asarray(fn(variables, xb))[:m])
    return np.concatenate(outs, axis=0)


@dataclasses.dataclass
class TrainedClassifier:
    config: ClassifierConfig
    params: Any
    batch_stats: Any = dataclasses.field(default_factory=dict)
    history: list[dict] = dataclasses.field(default_factory=list)
    best_step: int | None = None

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.config.labels

    @property
    def variables(self) -> dict:
        return _variables(self.params, self.batch_stats)

    def _prep(self, images, value_range) -> np.ndarray:
        return prepare_images(images, self.config.image_size, value_range)

    def predict_logits(self, images, batch_size: int | None = None,
                       value_range: str = "auto") -> np.ndarray:
        fn, _ = _eval_fns(_model_key(self.config))
        return _batched(fn, self.variables, self._prep(images, value_range),
                        batch_size or self.config.eval_batch_size)

    def predict_proba(self, images, batch_size: int | None = None,
                      value_range: str = "auto") -> np.ndarray:
        """(N, num_labels) float32 sigmoid probabilities (eval mode: running BN stats)."""
        z = self.predict_logits(images, batch_size, value_range)
        return (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)

    def features(self, images, batch_size: int | None = None,
                 value_range: str = "auto") -> np.ndarray:
        """(N, feature_dim) float32 pooled features (a domain-FID / Vendi extractor)."""
        _, fn = _eval_fns(_model_key(self.config))
        return _batched(fn, self.variables, self._prep(images, value_range),
                        batch_size or self.config.eval_batch_size)

    def evaluate(self, images, labels, *, thresholds=None, value_range: str = "auto",
                 batch_size: int | None = None) -> dict:
        """`metrics.summarize` of the predictions on (images, labels)."""
        y = validate_labels(labels, len(images), self.config.num_labels)
        p = self.predict_proba(images, batch_size, value_range)
        return M.summarize(y, p, self.label_names, thresholds=thresholds)

    # ---- persistence -------------------------------------------------------------------

    def save(self, path: str) -> str:
        """Write ``path/`` = config.json + variables.msgpack, atomically (temp dir + rename)."""
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
        try:
            meta = {"format": "jaxmed.classifier/1", "config": self.config.to_dict(),
                    "history": self.history, "best_step": self.best_step}
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(meta, f, indent=1, allow_nan=True)
            state = jax.device_get({"params": self.params, "batch_stats": self.batch_stats})
            with open(os.path.join(tmp, "variables.msgpack"), "wb") as f:
                f.write(serialization.to_bytes(state))
            old = None
            if os.path.exists(path):
                old = tempfile.mkdtemp(prefix=".old-", dir=parent)
                os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str) -> TrainedClassifier:
        cfg_path = os.path.join(path, "config.json")
        var_path = os.path.join(path, "variables.msgpack")
        for p in (cfg_path, var_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{path} is not a saved classifier: {p} is missing")
        with open(cfg_path) as f:
            meta = json.load(f)
        if meta.get("format") != "jaxmed.classifier/1":
            raise ValueError(f"{cfg_path}: unknown format {meta.get('format')!r}")
        config = ClassifierConfig.from_dict(meta["config"])
        target = abstract_variables(build_model(config))
        target = {"params": jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                                   target["params"]),
                  "batch_stats": jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                                        target.get("batch_stats", {}))}
        with open(var_path, "rb") as f:
            try:
                state = serialization.from_bytes(target, f.read())
            except Exception as e:  # noqa: BLE001 - re-raise with the file name
                raise ValueError(f"{var_path} does not fit the config in {cfg_path}: {e}") from e
        return cls(config, state["params"], state["batch_stats"] or {},
                   meta.get("history", []), meta.get("best_step"))
