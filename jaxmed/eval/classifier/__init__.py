"""Downstream chest X-ray classifiers (Flax) and the data-regime experiment.

The study asks whether synthetic X-rays help a classifier tested on real images when real
data is scarce. This module trains multi-label classifiers with a sigmoid / BCE loss:

* ``small_cnn``  `SmallCNN`: four conv / GroupNorm / ReLU stages, global average pool,
  linear head. Fast on CPU; the default.
* ``resnet50``   `ResNet`  (torchvision's ResNet-50 v1.5: stride on the 3x3 conv).
* ``densenet121`` `DenseNet` (torchvision's DenseNet-121, growth 32, blocks 6/12/24/16).

The two standard networks are built like torchvision's (same parameter counts, BatchNorm
with running statistics, same module names), so a torchvision-format state dict loads with
`load_torchvision_state_dict` (ImageNet or chest X-ray weights such as a CheXpert
DenseNet-121), and every network's ``features`` method returns its pooled features (2048-d,
1024-d, ``widths[-1]``) for a domain FID.

Images. Functions accept numpy arrays (N, H, W) or (N, H, W, C) with C in {1, 3}: uint8
(0..255), uint16 (0..65535) or float in [0, 1] or [-1, 1] (``value_range``; "auto" picks
[-1, 1] when the array has a negative value). 3-channel input is averaged to grey (chest
X-rays are grey; SD's decoded images are nearly so), resized to ``image_size`` x
``image_size`` without crop (antialiased bilinear, `jax.image.resize`) and stored as uint8,
so a 20,000-image set at 224 px takes 1 GB. Inside the network the grey image is repeated to
3 channels and normalised with ImageNet's mean / std (what torchvision weights expect).

Training (`train_classifier`): AdamW (decoupled weight decay on kernels only), cosine or
constant learning rate, optional class-balanced ``pos_weight``, augmentation by small random
translations and brightness / contrast jitter (no flips unless asked: anatomy is not
mirror-symmetric), a fixed batch shape (batches wrap around the shuffled data, so one
compile serves every data size), best-on-validation by macro AUROC with optional early
stopping. Everything is a function of ``config.seed``.

`run_regimes` trains on fractions of the real training set, on synthetic data and on both,
and scores each on the real test set.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, traverse_util

from jaxmed.eval import metrics as M
from jaxmed.models.layers import Conv, GroupNorm, Linear

# The study's label columns, in CSV order (SEED.md, "Data").
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Cardiomegaly",
    "Lung Opacity",
    "Edema",
    "Pneumonia",
    "Pneumothorax",
    "Pleural Effusion",
    "Support Devices",
)
ARCHS = ("small_cnn", "resnet50", "densenet121")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_NORM_AXES = ("norm",)


# --------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------


def _to_network_input(x: jax.Array) -> jax.Array:
    """(B, H, W, 1 or 3) in [0, 1] -> 3 channels normalised with ImageNet mean / std."""
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise ValueError(f"networks take 1- or 3-channel images; got {x.shape[-1]} channels")
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std


def _pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _batch_norm(name: str, train: bool, dtype) -> nn.BatchNorm:
    # torch's momentum 0.1 is flax's 0.9 (weight of the old running value).
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, _NORM_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, _NORM_AXES),
        name=name,
    )


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class SmallCNN(nn.Module):
    """Stages of [conv3x3 stride 2, GroupNorm, ReLU, conv3x3, GroupNorm, ReLU], pool, linear."""

    num_labels: int = 8
    widths: tuple[int, ...] = (32, 64, 128, 256)
    num_groups: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False):
        del train  # GroupNorm: no train / eval difference
        x = _to_network_input(x).astype(self.dtype)
        for i, w in enumerate(self.widths):
            for part, stride in (("a", 2), ("b", 1)):
                x = Conv(w, 3, strides=stride, padding=1, use_bias=False, dtype=self.dtype,
                         kernel_init=_kaiming_fan_out, name=f"stage{i}_conv_{part}")(x)
                x = GroupNorm(self.num_groups, 1e-5, dtype=self.dtype,
                              name=f"stage{i}_norm_{part}")(x)
                x = nn.relu(x)
        feats = _pool(x)
        if features_only:
            return feats
        return Linear(self.num_labels, dtype=jnp.float32, name="head")(feats)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self(x, train=train, features_only=True)


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (v1.5: the stride sits on the 3x3 conv)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                                 kernel_init=_kaiming_fan_out)
        out = conv(self.planes, 1, padding=0, name="conv1")(x)
        out = nn.relu(_batch_norm("bn1", train, self.dtype)(out))
        out = conv(self.planes, 3, strides=self.stride, padding=1, name="conv2")(out)
        out = nn.relu(_batch_norm("bn2", train, self.dtype)(out))
        out = conv(self.planes * 4, 1, padding=0, name="conv3")(out)
        out = _batch_norm("bn3", train, self.dtype)(out)
        identity = x
        if self.downsample:
            identity = conv(self.planes * 4, 1, strides=self.stride, padding=0,
                            name="downsample_0")(x)
            identity = _batch_norm("downsample_1", train, self.dtype)(identity)
        return nn.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's bottleneck ResNet; the defaults are ResNet-50 (2048-d features)."""

    num_labels: int = 8
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False):
        x = _to_network_input(x).astype(self.dtype)
        x = Conv(64, 7, strides=2, padding=3, use_bias=False, dtype=self.dtype,
                 kernel_init=_kaiming_fan_out, name="conv1")(x)
        x = nn.relu(_batch_norm("bn1", train, self.dtype)(x))
        x = _max_pool_3x3_s2(x)
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                x = Bottleneck(64 * 2**i, stride=2 if (i > 0 and j == 0) else 1,
                               downsample=(j == 0), dtype=self.dtype,
                               name=f"layer{i + 1}_{j}")(x, train)
        feats = _pool(x)
        if features_only:
            return feats
        return Linear(self.num_labels, dtype=jnp.float32, name="fc")(feats)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self(x, train=train, features_only=True)


class DenseLayer(nn.Module):
    growth_rate: int
    bn_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                                 kernel_init=_kaiming_fan_in)
        y = nn.relu(_batch_norm("norm1", train, self.dtype)(x))
        y = conv(self.bn_size * self.growth_rate, 1, padding=0, name="conv1")(y)
        y = nn.relu(_batch_norm("norm2", train, self.dtype)(y))
        return conv(self.growth_rate, 3, padding=1, name="conv2")(y)


class DenseBlock(nn.Module):
    num_layers: int
    growth_rate: int
    bn_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for j in range(self.num_layers):
            y = DenseLayer(self.growth_rate, self.bn_size, self.dtype,
                           name=f"denselayer{j + 1}")(x, train)
            x = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
        return x


class Transition(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.relu(_batch_norm("norm", train, self.dtype)(x))
        x = Conv(self.features, 1, padding=0, use_bias=False, dtype=self.dtype,
                 kernel_init=_kaiming_fan_in, name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
    """torchvision's DenseNet; the defaults are DenseNet-121 (1024-d features)."""

    num_labels: int = 8
    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False):
        x = _to_network_input(x).astype(self.dtype)
        x = Conv(self.num_init_features, 7, strides=2, padding=3, use_bias=False,
                 dtype=self.dtype, kernel_init=_kaiming_fan_in, name="conv0")(x)
        x = nn.relu(_batch_norm("norm0", train, self.dtype)(x))
        x = _max_pool_3x3_s2(x)
        c = self.num_init_features
        for i, n in enumerate(self.block_config):
            x = DenseBlock(n, self.growth_rate, self.bn_size, self.dtype,
                           name=f"denseblock{i + 1}")(x, train)
            c += n * self.growth_rate
            if i != len(self.block_config) - 1:
                c //= 2
                x = Transition(c, self.dtype, name=f"transition{i + 1}")(x, train)
        x = nn.relu(_batch_norm("norm5", train, self.dtype)(x))
        feats = _pool(x)
        if features_only:
            return feats
        return Linear(self.num_labels, dtype=jnp.float32, name="classifier")(feats)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self(x, train=train, features_only=True)


def ResNet50(num_labels: int = 8, dtype: Any = jnp.float32) -> ResNet:  # noqa: N802
    return ResNet(num_labels=num_labels, stage_sizes=(3, 4, 6, 3), dtype=dtype)


def DenseNet121(num_labels: int = 8, dtype: Any = jnp.float32) -> DenseNet:  # noqa: N802
    return DenseNet(num_labels=num_labels, growth_rate=32, block_config=(6, 12, 24, 16),
                    num_init_features=64, dtype=dtype)


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


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
        if self.num_labels == len(CHEXPERT_LABELS):
            return CHEXPERT_LABELS
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


def abstract_variables(model: nn.Module, image_size: int = 64) -> dict:
    """Shapes of ``{'params', 'batch_stats'?}`` without computing anything (unboxed)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 1), jnp.float32)
    init = functools.partial(model.init, train=False)
    return nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), x))


def count_params(model: nn.Module) -> int:
    """Trainable parameters (the ``params`` collection; BatchNorm running stats excluded)."""
    leaves = jax.tree_util.tree_leaves(abstract_variables(model)["params"])
    return int(sum(math.prod(p.shape) for p in leaves))


# --------------------------------------------------------------------------------------
# torchvision-format weights
# --------------------------------------------------------------------------------------

_LEGACY_DENSE = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _torch_key_to_path(key: str) -> tuple[str, tuple[str, ...], str] | None:
    """'layer1.0.downsample.1.running_var' -> ('batch_stats', (layer1_0, downsample_1), 'var')."""
    key = _LEGACY_DENSE.sub(r"\1\2", key)
    parts = key.split(".")
    if parts and parts[0] in ("features", "module"):  # densenet's nn.Sequential, DataParallel
        parts = parts[1:]
    leaf = parts[-1]
    mods: list[str] = []
    for p in parts[:-1]:
        if p.isdigit() and mods:
            mods[-1] = f"{mods[-1]}_{p}"
        else:
            mods.append(p)
    if leaf == "num_batches_tracked":
        return None
    table = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
             "bias": ("params", "bias"), "weight": ("params", "weight")}
    if leaf not in table:
        return ("?", tuple(mods), leaf)
    col, name = table[leaf]
    return col, tuple(mods), name


def load_torchvision_state_dict(variables: Mapping, state_dict: Mapping[str, Any], *,
                                head: str = "auto") -> dict:
    """Copy a torchvision ResNet / DenseNet state dict into jaxmed variables.

    ``variables`` gives the target structure (``{'params', 'batch_stats'}``, from
    ``model.init``, or abstract from `abstract_variables` when the head is loaded too);
    ``state_dict`` maps torch keys to tensors or arrays. ``head``: "load", "skip", or "auto"
    (load when its shape fits, else keep the initial head and warn). Every other tensor must
    match a parameter and vice versa; mismatches raise naming keys.
    """
    if head not in ("auto", "load", "skip"):
        raise ValueError(f"head must be auto, load or skip; got {head!r}")
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(variables)))
    head_names = {"fc", "classifier", "head"}
    out = dict(flat)
    seen: set[tuple] = set()
    unexpected, wrong_shape = [], []
    for key, value in state_dict.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().float().numpy()
        value = np.asarray(value, dtype=np.float32)
        mapped = _torch_key_to_path(key)
        if mapped is None:
            continue
        col, mods, leaf = mapped
        if col == "?":
            unexpected.append(key)
            continue
        if leaf == "weight":
            if value.ndim == 4:
                value, leaf = value.transpose(2, 3, 1, 0), "kernel"
            elif value.ndim == 2:
                value, leaf = value.T, "kernel"
            else:
                leaf = "scale"
        path = (col, *mods, leaf)
        is_head = bool(mods) and mods[0] in head_names
        if is_head and head == "skip":
            continue
        if path not in flat:
            unexpected.append(key)
            continue
        if flat[path].shape != value.shape:
            if is_head and head == "auto":
                warnings.warn(f"torchvision head {key} has shape {value.shape}, the model's "
                              f"{flat[path].shape}: keeping the initial head", stacklevel=2)
                continue
            wrong_shape.append(f"{key}: {value.shape} vs {flat[path].shape}")
            continue
        out[path] = value
        seen.add(path)
    missing = [".".join(p) for p in flat
               if p not in seen and not (head != "load" and p[1] in head_names)]
    problems = []
    if unexpected:
        problems.append(f"keys with no matching parameter: {unexpected[:8]}")
    if wrong_shape:
        problems.append(f"shape mismatches: {wrong_shape[:8]}")
    if missing:
        problems.append(f"parameters missing from the state dict: {missing[:8]}")
    if problems:
        raise ValueError("load_torchvision_state_dict: " + "; ".join(problems))
    # leaves the state dict did not provide (a skipped head) are returned as given
    return traverse_util.unflatten_dict(
        {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in out.items()})


def _read_state_dict(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"init_from: {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


# --------------------------------------------------------------------------------------
# Images and labels
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Compiled functions (cached per model / step definition, so repeated runs reuse them)
# --------------------------------------------------------------------------------------


def _augment(key, x, cfg: ClassifierConfig):
    """x: (B, S, S, C) float in [0, 1]."""
    b, s = x.shape[0], x.shape[1]
    k_shift, k_flip, k_bright, k_contrast = jax.random.split(key, 4)
    p = int(round(cfg.translate * s))
    if p > 0:
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
        offs = jax.random.randint(k_shift, (b, 2), 0, 2 * p + 1)
        x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0),
                                                         (s, s, x.shape[3])))(xp, offs)
    if cfg.hflip:
        flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1], x)
    if cfg.contrast > 0:
        c = jax.random.uniform(k_contrast, (b, 1, 1, 1), minval=1 - cfg.contrast,
                               maxval=1 + cfg.contrast)
        mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * c + mean
    if cfg.brightness > 0:
        x = x + jax.random.uniform(k_bright, (b, 1, 1, 1), minval=-cfg.brightness,
                                   maxval=cfg.brightness)
    return jnp.clip(x, 0.0, 1.0)


def _model_key(cfg: ClassifierConfig):
    return (cfg.arch, cfg.num_labels, cfg.widths, cfg.dtype)


def _step_key(cfg: ClassifierConfig):
    return (*_model_key(cfg), cfg.weight_decay, cfg.grad_clip, cfg.augment, cfg.translate,
            cfg.brightness, cfg.contrast, cfg.hflip)


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


def _optimizer(cfg: ClassifierConfig) -> optax.GradientTransformation:
    def decay_mask(params):
        return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)

    # learning rate 1 here; the step multiplies by the scheduled lr (so that one compiled
    # step serves every schedule). AdamW's decay is then lr * wd * p, as in torch.
    tx = optax.adamw(1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
                     mask=decay_mask)
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx


@functools.lru_cache(maxsize=8)
def _train_step_fn(step_key) -> Callable:
    (arch, num_labels, widths, dtype, wd, clip, augment, translate, brightness, contrast,
     hflip) = step_key
    cfg = ClassifierConfig(arch=arch, num_labels=num_labels, widths=widths, dtype=dtype,
                           weight_decay=wd, grad_clip=clip, augment=augment,
                           translate=translate, brightness=brightness, contrast=contrast,
                           hflip=hflip)
    model = build_model(cfg)
    tx = _optimizer(cfg)

    def loss_fn(params, batch_stats, x, y, pos_weight, key):
        out, updates = model.apply(_variables(params, batch_stats), x, train=True,
                                   mutable=["batch_stats"])
        z = out.astype(jnp.float32)
        # BCE with logits and torch's pos_weight: -[pw y log s(z) + (1 - y) log(1 - s(z))]
        loss = pos_weight * y * jax.nn.softplus(-z) + (1.0 - y) * jax.nn.softplus(z)
        return jnp.mean(loss), updates.get("batch_stats", batch_stats)

    def step(state, x_u8, y, pos_weight, lr, key):
        key = jax.random.fold_in(key, state["step"])
        x = x_u8.astype(jnp.float32) / 255.0
        if cfg.augment:
            x = _augment(key, x, cfg)
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], x, y, pos_weight, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
        params = optax.apply_updates(state["params"], updates)
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": new_stats,
                     "opt_state": opt_state}
        return new_state, loss

    return jax.jit(step, donate_argnums=0)


def _batched(fn: Callable, variables, x_u8: np.ndarray, batch_size: int) -> np.ndarray:
    """Run ``fn(variables, batch)`` over x in fixed-size batches (last one padded)."""
    n = x_u8.shape[0]
    bs = min(batch_size, n)
    outs = []
    for s in range(0, n, bs):
        xb = x_u8[s:s + bs]
        m = xb.shape[0]
        if m < bs:
            xb = np.concatenate([xb, np.zeros((bs - m, *xb.shape[1:]), xb.dtype)])
        outs.append(np.asarray(fn(variables, xb))[:m])
    return np.concatenate(outs, axis=0)


# --------------------------------------------------------------------------------------
# The trained classifier
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def prng_key(seed: int) -> jax.Array:
    """The classifier's random key: XLA's RngBitGenerator ("rbg"), not threefry.

    Initialising a network draws one random tensor per parameter; with threefry each is an
    unrolled hash that XLA:CPU takes seconds to compile (2-3x the whole init with rbg).
    rbg streams are reproducible on one backend, not bit-identical across CPU / GPU / TPU.
    """
    return jax.random.key(int(seed), impl="rbg")


def init_variables(config: ClassifierConfig, key=None) -> dict:
    """Randomly initialised (or torchvision-loaded, per ``config.init_from``) variables."""
    model = build_model(config)
    key = prng_key(config.seed) if key is None else key
    x = jnp.zeros((1, config.image_size, config.image_size, 1), jnp.float32)
    v = jax.jit(functools.partial(model.init, train=False))(key, x)
    v = nn.meta.unbox(v)
    v = {k: v[k] for k in v}
    if config.init_from:
        v = load_torchvision_state_dict(v, _read_state_dict(config.init_from))
    return v


def _lr_at(config: ClassifierConfig, step: int, total: int) -> float:
    lr = config.lr
    if config.warmup_steps and step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return lr
    t = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _pos_weight(config: ClassifierConfig, y: np.ndarray) -> np.ndarray:
    if config.pos_weight == "none":
        return np.ones(y.shape[1], np.float32)
    n_pos = y.sum(axis=0)
    n_neg = y.shape[0] - n_pos
    pw = np.where(n_pos > 0, n_neg / np.maximum(n_pos, 1), 1.0)
    return np.clip(pw, 1.0 / config.pos_weight_max, config.pos_weight_max).astype(np.float32)


def _index_stream(n: int, batch_size: int, rng: np.random.Generator) -> Iterable[np.ndarray]:
    """Fixed-size batches over successive shuffles of range(n) (wrapping across epochs)."""
    buf = np.empty(0, np.int64)
    while True:
        while buf.size < batch_size:
            buf = np.concatenate([buf, rng.permutation(n)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def train_classifier(config: ClassifierConfig, train_images, train_labels, val_images=None,
                     val_labels=None, progress: bool = True, *,
                     value_range: str = "auto") -> TrainedClassifier:
    """Train a multi-label classifier; see the module docstring for what it does.

    With a validation set the returned weights are those of the evaluation with the best
    val macro AUROC (the val BCE decides when no val label has both classes).
    """
    x = prepare_images(train_images, config.image_size, value_range, name="train_images")
    y = validate_labels(train_labels, x.shape[0], config.num_labels, name="train_labels")
    has_val = val_images is not None or val_labels is not None
    if has_val:
        if val_images is None or val_labels is None:
            raise ValueError("give both val_images and val_labels, or neither")
        xv = prepare_images(val_images, config.image_size, value_range, name="val_images")
        yv = validate_labels(val_labels, xv.shape[0], config.num_labels, name="val_labels")

    n = x.shape[0]
    bs = int(config.batch_size)
    steps_per_epoch = max(1, math.ceil(n / bs))
    total = int(config.steps) if config.steps is not None else int(config.epochs) * steps_per_epoch
    eval_every = int(config.eval_every) or steps_per_epoch

    key = prng_key(config.seed)
    init_key, aug_key = jax.random.split(key)
    variables = init_variables(config, init_key)
    tx = _optimizer(config)
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "batch_stats": variables.get("batch_stats", {}),
             "opt_state": tx.init(variables["params"])}
    step_fn = _train_step_fn(_step_key(config))
    logits_fn, _ = _eval_fns(_model_key(config))
    pw = jnp.asarray(_pos_weight(config, y))
    batches = _index_stream(n, bs, np.random.default_rng(config.seed))

    history: list[dict] = []
    best = None  # (score, step, params, batch_stats)
    since_best = 0
    losses: list[jax.Array] = []
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"train {config.arch}", disable=not progress, leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    try:
        for it in range(total):
            idx = next(batches)
            lr = jnp.float32(_lr_at(config, it, total))
            state, loss = step_fn(state, x[idx], y[idx], pw, lr, aug_key)
            losses.append(loss)
            if bar is not None:
                bar.update(1)
            last = it == total - 1
            if (it + 1) % eval_every == 0 or last:
                row = {"step": it + 1, "train_loss": float(np.mean(jax.device_get(losses)))}
                losses = []
                if has_val:
                    v = _variables(state["params"], state["batch_stats"])
                    zv = _batched(logits_fn, v, xv, config.eval_batch_size).astype(np.float64)
                    pv = 1.0 / (1.0 + np.exp(-zv))
                    macro, _ = M.macro_auroc(yv, pv)
                    val_loss = float(np.mean(np.logaddexp(0, -zv) * yv
                                             + np.logaddexp(0, zv) * (1 - yv)))
                    row.update(val_macro_auroc=macro, val_loss=val_loss)
                    score = macro if np.isfinite(macro) else -val_loss
                    if best is None or score > best[0]:
                        best = (score, it + 1, jax.device_get(state["params"]),
                                jax.device_get(state["batch_stats"]))
                        since_best = 0
                    else:
                        since_best += 1
                history.append(row)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k != "step"})
                if has_val and config.patience and since_best >= config.patience:
                    break
    finally:
        if bar is not None:
            bar.close()

    if best is not None:
        params, stats, best_step = best[2], best[3], best[1]
    else:
        params = jax.device_get(state["params"])
        stats = jax.device_get(state["batch_stats"])
        best_step = None
    return TrainedClassifier(config, params, stats or {}, history, best_step)


# --------------------------------------------------------------------------------------
# Data regimes: real fractions vs synthetic vs both
# --------------------------------------------------------------------------------------


def subset_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of the rows in which every prefix is as label-covering as it can be.

    First one random positive of each label (rarest label first, skipping labels already
    covered), then the rest shuffled; a fraction's subset is a prefix, so subsets of one
    repeat are nested and every label keeps a positive once the prefix is long enough.
    """
    y = np.asarray(labels) > 0.5
    n = y.shape[0]
    chosen: list[int] = []
    covered = np.zeros(y.shape[1], bool)
    for k in np.argsort(y.sum(axis=0), kind="stable"):
        if covered[k] or not y[:, k].any():
            continue
        i = int(rng.choice(np.nonzero(y[:, k])[0]))
        chosen.append(i)
        covered |= y[i]
    rest = np.setdiff1d(np.arange(n), np.asarray(chosen, np.int64))
    return np.concatenate([np.asarray(chosen, np.int64), rng.permutation(rest)])


def _check_pair(pair, name: str, num_labels: int):
    if pair is None:
        return None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be an (images, labels) pair")
    images, labels = pair
    n = len(images)
    return images, validate_labels(labels, n, num_labels, name=f"{name} labels")


def run_regimes(real_train, synthetic, test, fractions: Sequence[float] = (
        0.01, 0.05, 0.10, 0.25, 0.5, 1.0), modes: Sequence[str] = (
        "real", "synthetic", "real+synthetic"), repeats: int = 1,
        seeds: Sequence[int] | None = None, config: ClassifierConfig | None = None, *,
        val=None, progress: bool = False, value_range: str = "auto") -> list[dict]:
    """Train one classifier per (repeat, mode, fraction) and score it on the real test set.

    ``real_train``, ``synthetic``, ``test`` and the optional ``val`` are (images, labels)
    pairs. Real subsets are prefixes of `subset_order` (seeded per repeat; nested across
    fractions). 'synthetic' trains on all synthetic images once per repeat and reports
    ``fraction=None``. With ``val`` the classifier keeps its best-on-val weights and the
    rows also carry F1 at per-label thresholds chosen on val (``f1_best``).

    Each row: fraction, mode, repeat, seed, n_real, n_synthetic, n_train, best_step, plus the
    `metrics.summarize` keys (macro_auroc, auroc, n_auroc_excluded, f1, macro_f1, ...).
    """
    config = config or ClassifierConfig()
    allowed = ("real", "synthetic", "real+synthetic")
    for m in modes:
        if m not in allowed:
            raise ValueError(f"unknown mode {m!r}; modes are {allowed}")
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"fractions must be in (0, 1]; got {f}")
    if seeds is None:
        seeds = [config.seed + r for r in range(repeats)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != repeats:
        raise ValueError(f"{len(seeds)} seeds for repeats={repeats}")
    L = config.num_labels
    real_train = _check_pair(real_train, "real_train", L)
    synthetic = _check_pair(synthetic, "synthetic", L)
    test = _check_pair(test, "test", L)
    val = _check_pair(val, "val", L)
    if test is None:
        raise ValueError("run_regimes needs a real test set")
    if real_train is None and any(m != "synthetic" for m in modes):
        raise ValueError("modes 'real' / 'real+synthetic' need real_train")
    if synthetic is None and any(m != "real" for m in modes):
        raise ValueError("modes 'synthetic' / 'real+synthetic' need synthetic data")

    size = config.image_size
    prep = functools.partial(prepare_images, image_size=size, value_range=value_range)
    test_x = prep(test[0], name="test images")
    real_x = prep(real_train[0], name="real_train images") if real_train is not None else None
    syn_x = prep(synthetic[0], name="synthetic images") if synthetic is not None else None
    val_x = prep(val[0], name="val images") if val is not None else None

    jobs = []
    for r, seed in enumerate(seeds):
        for mode in modes:
            for frac in ([None] if mode == "synthetic" else list(fractions)):
                jobs.append((r, seed, mode, frac))
    rows = []
    orders: dict[int, np.ndarray] = {}
    for r, seed, mode, frac in jobs:
        xs, ys, n_real, n_syn = [], [], 0, 0
        if mode != "synthetic":
            if r not in orders:
                orders[r] = subset_order(real_train[1], np.random.default_rng(seed))
            n_real = max(1, int(round(frac * real_x.shape[0])))
            idx = np.sort(orders[r][:n_real])
            xs.append(real_x[idx])
            ys.append(real_train[1][idx])
        if mode != "real":
            n_syn = syn_x.shape[0]
            xs.append(syn_x)
            ys.append(synthetic[1])
        cfg = config.replace(seed=seed)
        clf = train_classifier(cfg, np.concatenate(xs), np.concatenate(ys),
                               val_x if val is not None else None,
                               val[1] if val is not None else None, progress=progress)
        thresholds = None
        if val is not None:
            thresholds = M.best_thresholds(val[1], clf.predict_proba(val_x))
        summary = M.summarize(test[1], clf.predict_proba(test_x), cfg.labels,
                              thresholds=thresholds)
        row = {"fraction": frac, "mode": mode, "repeat": r, "seed": seed, "n_real": n_real,
               "n_synthetic": n_syn, "n_train": n_real + n_syn, "best_step": clf.best_step}
        row.update({k: v for k, v in summary.items() if k not in ("labels",)})
        row["n_test"] = row.pop("n")
        rows.append(row)
    return rows
