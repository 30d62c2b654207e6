"""PyTorch state-dict keys <-> jaxmed Flax parameter paths.

jaxmed's modules are named like diffusers' / transformers' attributes (see
`jaxmed.models.layers`), so the mapping is mechanical: list entries ``name_N`` become
``name.N``, ``kernel`` / ``scale`` / ``embedding`` become ``weight``, and kernels are
transposed between PyTorch's (out, in[, kh, kw]) and Flax's (in, out) / HWIO layouts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

# Attributes that are nn.ModuleList / nn.Sequential in the PyTorch models.
LIST_NAMES = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "transformer_blocks",
        "downsamplers",
        "upsamplers",
        "to_out",
        "net",
        "layers",
    }
)
_LIST_RE = re.compile(r"^(?P<name>[A-Za-z_]+?)_(?P<idx>\d+)$")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class WeightMismatchError(ValueError):
    """A checkpoint tensor does not fit the model built from its config."""


def path_to_key(path: tuple[str, ...]) -> str:
    """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'.

    Inverse of the naming convention in `jaxmed.models.layers`.
    """
    parts = []
    for p in path[:-1]:
        m = _LIST_RE.match(p)
        if m and m.group("name") in LIST_NAMES:
            parts += [m.group("name"), m.group("idx")]
        else:
            parts.append(p)
    leaf = path[-1]
    parts.append(_LEAF_TO_TORCH.get(leaf, leaf))
    return ".".join(parts)


def module_name(path: tuple[str, ...]) -> str:
    """The PyTorch module name of a parameter path (its key without the leaf): what peft
    target patterns and jaxmed strategy patterns are matched against."""
    return path_to_key(path).rsplit(".", 1)[0]


def to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 2:
            return np.ascontiguousarray(value.T)
        if value.ndim == 4:
            return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    return value


def to_flax_layout(path: tuple[str, ...], value: np.ndarray, want_ndim: int) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 4 and want_ndim == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # 1x1 conv stored for a Linear (old VAE attention)
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(2, 3, 1, 0)
    return value


def params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params -> {torch key: numpy array in PyTorch layout}."""
    flat = traverse_util.flatten_dict(_unfreeze(params))
    return {path_to_key(p): to_torch_layout(p, np.asarray(v)) for p, v in flat.items()}


def state_dict_to_params(
    state: Mapping[str, np.ndarray],
    target: Any,
    *,
    source: str | Mapping[str, str] = "checkpoint",
    ignore_unexpected: tuple[str, ...] = (),
    dtype: Any = np.float32,
) -> dict:
    """Build a Flax param tree shaped like ``target`` (params or ShapeDtypeStructs).

    ``source`` names where each key came from (a file, or a mapping key -> file) so every
    error says which file and which key to look at. Raises WeightMismatchError on missing
    keys, unexpected keys (unless matched by a regex in ``ignore_unexpected``) and shapes
    that disagree with the config.
    """

    def where(key: str) -> str:
        return source.get(key, "checkpoint") if isinstance(source, Mapping) else source

    flat_target = traverse_util.flatten_dict(_unfreeze(target))
    out: dict[tuple[str, ...], np.ndarray] = {}
    missing = []
    used = set()
    for path, leaf in flat_target.items():
        key = path_to_key(path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        value = to_flax_layout(path, np.asarray(state[key]), len(leaf.shape))
        if tuple(value.shape) != tuple(leaf.shape):
            expected = to_torch_layout(path, np.zeros(leaf.shape)).shape
            raise WeightMismatchError(
                f"{where(key)}: weight {key!r} has shape {tuple(np.shape(state[key]))} but the "
                f"model built from its config.json expects {expected}; "
                "the config and the weights belong to different models"
            )
        out[path] = value.astype(dtype)
    if missing:
        raise WeightMismatchError(
            f"{where(missing[0])}: {len(missing)} weight(s) that the config requires are missing, "
            f"e.g. {missing[:5]}; is this the right component folder / checkpoint?"
        )
    unexpected = [
        k for k in state if k not in used and not any(re.search(p, k) for p in ignore_unexpected)
    ]
    if unexpected:
        raise WeightMismatchError(
            f"{where(unexpected[0])}: {len(unexpected)} weight(s) not used by the model built from "
            f"config.json, e.g. {unexpected[:5]}; the config does not match these weights"
        )
    return traverse_util.unflatten_dict(out)


def _unfreeze(tree: Any) -> Any:
    """Plain nested dicts of arrays: unboxes logical-partitioning metadata, unfreezes."""
    tree = nn.meta.unbox(tree)
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return jax.tree_util.tree_map(lambda x: x, tree)
