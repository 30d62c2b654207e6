"""torchvision-format weights for the ResNet / DenseNet networks.

ImageNet weights or chest X-ray ones (such as a CheXpert DenseNet-121), as a torchvision
state dict (``.pth`` / ``.pt``, read with torch) or ``.safetensors`` (read without torch).
torch's module paths map onto ours by name (``layer1.0.downsample.1`` ->
``layer1_0/downsample_1``), OIHW kernels become HWIO and BatchNorm's running statistics go
to ``batch_stats``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

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
        return load_file(path)
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd
