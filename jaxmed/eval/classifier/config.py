"""`ClassifierConfig`: everything that defines a classifier run, and the network it names."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxmed.data.labels import LABELS
from jaxmed.eval.classifier.networks import DenseNet121, ResNet50, SmallCNN

ARCHS = ("small_cnn", "resnet50", "densenet121")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Everything that defines a classifier run (JSON round-trips through `to_dict`)."""

    arch: str = "small_cnn"  # small_cnn | resnet50 | densenet121
    image_size: int = 224
    num_labels: int = 8
    label_names: tuple[str, ...] | None = None  # None: CheXpert's 8 when num_labels == 8
    widths: tuple[int, ...] = (32, 64, 128, 256)  # small_cnn only
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 1e-4  # AdamW, decoupled, kernels only
    batch_size: int = 32
    epochs: int = 10
    steps: int | None = None  # when set, overrides epochs
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    grad_clip: float = 0.0  # global-norm clip; 0 = off
    pos_weight: str = "none"  # none | balanced (n_neg / n_pos per label, clipped)
    pos_weight_max: float = 100.0
    seed: int = 0
    # augmentation (training only)
    augment: bool = True
    translate: float = 0.05  # max shift, fraction of the image side
    brightness: float = 0.1  # additive, uniform in [-b, b]
    contrast: float = 0.1  # multiplicative about the mean, uniform in [1-c, 1+c]
    hflip: bool = False
    # validation: evaluate every `eval_every` steps (0 = once per epoch), keep the best
    # macro AUROC, stop after `patience` evaluations without improvement (0 = never)
    eval_every: int = 0
    patience: int = 0
    eval_batch_size: int = 64
    # optional torchvision-format weights (.pth / .pt / .safetensors) for resnet50 / densenet121
    init_from: str | None = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"ClassifierConfig: {msg}")

        if self.arch not in ARCHS:
            bad(f"arch {self.arch!r} is not one of {ARCHS}")
        if int(self.image_size) < 8:
            bad(f"image_size must be >= 8; got {self.image_size}")
        if int(self.num_labels) < 1:
            bad(f"num_labels must be >= 1; got {self.num_labels}")
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
            if len(self.label_names) != self.num_labels:
                bad(f"{len(self.label_names)} label_names for num_labels={self.num_labels}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.widths or any(w <= 0 or w % 8 for w in self.widths):
            bad(f"widths must be positive multiples of 8 (GroupNorm of 8); got {self.widths}")
        if self.dtype not in ("float32", "bfloat16"):
            bad(f"dtype must be float32 or bfloat16; got {self.dtype!r}")
        if not self.lr > 0:
            bad(f"lr must be > 0; got {self.lr}")
        if self.weight_decay < 0:
            bad(f"weight_decay must be >= 0; got {self.weight_decay}")
        if int(self.batch_size) < 1 or int(self.eval_batch_size) < 1:
            bad("batch_size and eval_batch_size must be >= 1")
        if self.steps is None and int(self.epochs) < 1:
            bad(f"epochs must be >= 1 when steps is not set; got {self.epochs}")
        if self.steps is not None and int(self.steps) < 1:
            bad(f"steps must be >= 1 or None; got {self.steps}")
        if self.schedule not in ("cosine", "constant"):
            bad(f"schedule must be cosine or constant; got {self.schedule!r}")
        if self.pos_weight not in ("none", "balanced"):
            bad(f"pos_weight must be none or balanced; got {self.pos_weight!r}")
        if not 0 <= self.translate < 0.5 or self.brightness < 0 or not 0 <= self.contrast < 1:
            bad("translate must be in [0, 0.5), brightness >= 0, contrast in [0, 1)")
        if self.eval_every < 0 or self.patience < 0 or self.warmup_steps < 0:
            bad("eval_every, patience and warmup_steps must be >= 0")
        if self.init_from is not None and self.arch == "small_cnn":
            bad("init_from (torchvision weights) needs arch resnet50 or densenet121")

    @property
    def labels(self) -> tuple[str, ...]:
        if self.label_names is not None:
            return self.label_names
        if self.num_labels == len(LABELS):
            return LABELS
        return tuple(f"label_{k}" for k in range(self.num_labels))

    @property
    def compute_dtype(self):
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

    def replace(self, **kw) -> ClassifierConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassifierConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ClassifierConfig: unknown keys {unknown}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)


def build_model(config: ClassifierConfig) -> nn.Module:
    dt = config.compute_dtype
    if config.arch == "small_cnn":
        return SmallCNN(num_labels=config.num_labels, widths=config.widths, dtype=dt)
    if config.arch == "resnet50":
        return ResNet50(config.num_labels, dt)
    return DenseNet121(config.num_labels, dt)


def feature_dim(config: ClassifierConfig) -> int:
    return {"small_cnn": config.widths[-1], "resnet50": 2048, "densenet121": 1024}[config.arch]
