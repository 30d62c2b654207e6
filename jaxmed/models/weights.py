"""Diffusers-layout folders <-> jaxmed Flax params, with safetensors and no torch.

A Stable Diffusion folder (`SD15_HUB_ID` on the hub, or what
``StableDiffusionPipeline.save_pretrained`` writes) looks like::

    model_index.json
    unet/          config.json  diffusion_pytorch_model[.fp16].safetensors
                   (or diffusion_pytorch_model[.fp16]-0000k-of-0000n.safetensors
                    + diffusion_pytorch_model.safetensors.index[.fp16].json)
    vae/           config.json  diffusion_pytorch_model[.fp16].safetensors
    text_encoder/  config.json  model[.fp16].safetensors (or sharded, as above)
    tokenizer/     vocab.json merges.txt | tokenizer.json, tokenizer_config.json ...
    scheduler/     scheduler_config.json

`load_component` / `load_pipeline` read such a folder into float32 Flax params;
`save_component` / `save_pipeline` write params back so that PyTorch diffusers and
transformers load jaxmed's output unchanged. Pickled ``.bin`` weights are read only with
``allow_pickle=True`` (unpickling runs code from the file).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy

from jaxmed.files import atomic_path, write_json
from jaxmed.models import clip_text, convert, unet, vae
from jaxmed.models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.1"  # written into configs; diffusers only warns on a mismatch
MODEL_INDEX = "model_index.json"


class MissingComponentError(FileNotFoundError):
    """A component folder, its config or its weights are absent."""


@dataclass(frozen=True)
class ComponentSpec:
    """How one component of the pipeline is stored and which jaxmed model reads it."""

    name: str
    library: str
    class_name: str
    weights_base: str  # file stem of the weights, before [.variant].safetensors
    config_name: str = "config.json"
    module: ModuleType | None = None  # jaxmed module holding Config / abstract_params
    config_cls: str = ""
    ignore_unexpected: tuple[str, ...] = ()
    key_fixer: str | None = None  # function in `module` renaming legacy keys

    def config_from_dict(self, d: Mapping[str, Any]):
        return getattr(self.module, self.config_cls).from_dict(d)

    def abstract_params(self, config):
        return self.module.abstract_params(config)

    def fix_key(self) -> Callable[[str], str]:
        return getattr(self.module, self.key_fixer) if self.key_fixer else (lambda k: k)


COMPONENTS: dict[str, ComponentSpec] = {
    "unet": ComponentSpec(
        "unet", "diffusers", "UNet2DConditionModel", "diffusion_pytorch_model",
        module=unet, config_cls="UNetConfig",
    ),
    "vae": ComponentSpec(
        "vae", "diffusers", "AutoencoderKL", "diffusion_pytorch_model",
        module=vae, config_cls="VAEConfig", key_fixer="legacy_vae_key",
    ),
    "text_encoder": ComponentSpec(
        "text_encoder", "transformers", "CLIPTextModel", "model",
        module=clip_text, config_cls="CLIPTextConfig",
        ignore_unexpected=(r"position_ids$",), key_fixer="clip_text_key",
    ),
}
MODEL_COMPONENTS = tuple(COMPONENTS)


def _spec(name: str) -> ComponentSpec:
    try:
        return COMPONENTS[name]
    except KeyError:
        raise ValueError(
            f"unknown component {name!r}; jaxmed reads {sorted(COMPONENTS)}"
        ) from None


def _add_variant(filename: str, variant: str | None) -> str:
    """diffusers' / transformers' naming: 'a.safetensors' + 'fp16' -> 'a.fp16.safetensors'."""
    if not variant:
        return filename
    parts = filename.split(".")
    return ".".join(parts[:-1] + [variant] + parts[-1:])


# ---------------------------------------------------------------------------------------
# Reading tensors


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays (memory-mapped where the format allows)."""
    try:
        return safetensors.numpy.load_file(path)
    except Exception as err:  # safetensors.numpy has no bfloat16: read those by the spec
        if "BF16" not in str(err) and "bf16" not in str(err).lower():
            raise _corrupt(path, err) from err
    return _read_safetensors_raw(path)


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
    # Format: u64 little-endian header size, JSON header {name: {dtype, shape,
    # data_offsets}}, then the raw little-endian buffer.
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        buf = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dt = np.dtype(_ST_DTYPES[info["dtype"]])
            out[name] = np.frombuffer(buf[start:end], dtype=dt).reshape(info["shape"])
        return out
    except Exception as err:
        raise _corrupt(path, err) from err


def _corrupt(path: str, err: Exception) -> Exception:
    return ValueError(
        f"{path}: could not read this safetensors file ({err}); it is corrupt or truncated — "
        "download it again"
    )


def _read_bin(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    if not allow_pickle:
        raise MissingComponentError(
            f"{path}: only a pickled PyTorch .bin checkpoint is here. Unpickling can run code "
            "from the file, so jaxmed does not read it by default: pass allow_pickle=True "
            "(config: model.allow_pickle=True) if you trust it, or convert it to safetensors."
        )
    import torch  # only for this opt-in path

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def find_weight_files(
    component_dir: str, base: str, variant: str | None = None
) -> tuple[list[str], str]:
    """The weight files of one component: (files, kind) with kind 'safetensors' or 'bin'.

    Sharded checkpoints are found through their index json. With ``variant`` (e.g. 'fp16')
    only that variant is accepted; without, the plain files are preferred and a lone
    variant is used with a log line.
    """
    present = set(os.listdir(component_dir))
    # variants present: a.fp16.safetensors, or sharded with a.safetensors.index.fp16.json
    pattern = re.compile(rf"{re.escape(base)}(?:\.(\w+)\.safetensors|\.safetensors\.index\."
                         rf"(\w+)\.json)$")
    variants = [variant] if variant else [None] + sorted(
        {m.group(1) or m.group(2) for f in present if (m := pattern.match(f))}
    )
    for v in variants:
        for ext, kind in ((".safetensors", "safetensors"), (".bin", "bin")):
            index = _add_variant(f"{base}{ext}.index.json", v)
            if index in present:
                with open(os.path.join(component_dir, index)) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
                missing = [x for x in files if x not in present]
                if missing:
                    raise MissingComponentError(
                        f"{os.path.join(component_dir, index)} lists shard(s) {missing} that are "
                        "not in the folder; the download is incomplete"
                    )
                return [os.path.join(component_dir, x) for x in files], kind
            single = _add_variant(f"{base}{ext}", v)
            if single in present:
                if v and not variant:
                    log.info("%s: using the %r variant weights (%s)", component_dir, v, single)
                return [os.path.join(component_dir, single)], kind
    raise MissingComponentError(
        f"{component_dir}: no weights named {_add_variant(base + '.safetensors', variant)} "
        f"(or sharded, or .bin) here; files present: {sorted(present)}"
        + ("" if variant else "; for half-precision-only repos pass variant='fp16'")
    )


def read_state_dict(
    component_dir: str, base: str, *, variant: str | None = None, allow_pickle: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a component and, for error messages, the file each key came from."""
    files, kind = find_weight_files(component_dir, base, variant)
    state: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for path in files:
        part = read_safetensors(path) if kind == "safetensors" else _read_bin(path, allow_pickle)
        state.update(part)
        source.update(dict.fromkeys(part, path))
    return state, source


def read_config(component_dir: str, config_name: str = "config.json") -> dict:
    path = os.path.join(component_dir, config_name)
    if not os.path.isfile(path):
        raise MissingComponentError(
            f"{path} is missing: every component folder needs its {config_name}"
        )
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


# ---------------------------------------------------------------------------------------
# Components and pipelines


def component_dir(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isdir(path):
        raise MissingComponentError(
            f"{folder} has no {name}/ folder; a diffusers Stable Diffusion folder holds "
            f"model_index.json and {', '.join(MODEL_COMPONENTS)}, tokenizer, scheduler "
            "(found: " + ", ".join(sorted(os.listdir(folder))) + ")"
        )
    return path


def load_component(
    folder: str,
    name: str,
    *,
    variant: str | None = None,
    allow_pickle: bool = False,
    dtype: Any = np.float32,
) -> tuple[Any, dict]:
    """(config, params) of component ``name`` ('unet', 'vae', 'text_encoder') of ``folder``.

    ``folder`` may also be the component folder itself. Weights are checked key by key and
    shape by shape against the model built from config.json.
    """
    spec = _spec(name)
    cdir = folder if os.path.isfile(os.path.join(folder, spec.config_name)) and not \
        os.path.isdir(os.path.join(folder, name)) else component_dir(folder, name)
    config_path = os.path.join(cdir, spec.config_name)
    try:
        config = spec.config_from_dict(read_config(cdir, spec.config_name))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{config_path}: {err}") from err
    state, source = read_state_dict(cdir, spec.weights_base, variant=variant,
                                    allow_pickle=allow_pickle)
    fix = spec.fix_key()
    state = {fix(k): v for k, v in state.items()}
    source = {fix(k): v for k, v in source.items()}
    params = convert.state_dict_to_params(
        state, spec.abstract_params(config), source=source,
        ignore_unexpected=spec.ignore_unexpected, dtype=dtype,
    )
    return config, params


def save_component(
    folder: str,
    name: str,
    config: Any,
    params: Mapping,
    *,
    variant: str | None = None,
    dtype: Any = None,
    max_shard_size: int | None = None,
) -> str:
    """Write ``params`` as ``folder/name/`` in diffusers / transformers layout.

    ``dtype`` (e.g. np.float16 for an fp16 variant) casts floating tensors; with
    ``max_shard_size`` bytes, weights are split into shards with an index json.
    """
    spec = _spec(name)
    out = os.path.join(folder, name)
    os.makedirs(out, exist_ok=True)
    cfg = dict(config.to_dict())
    if spec.library == "diffusers":
        cfg = {"_class_name": spec.class_name, "_diffusers_version": DIFFUSERS_VERSION, **cfg}
    write_json(os.path.join(out, spec.config_name), cfg)
    state = convert.params_to_state_dict(params)
    if dtype is not None:
        state = {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v
                 for k, v in state.items()}
    write_safetensors_sharded(out, spec.weights_base, state, variant=variant,
                              max_shard_size=max_shard_size)
    return out


def write_safetensors_sharded(
    out: str,
    base: str,
    state: Mapping[str, np.ndarray],
    *,
    variant: str | None = None,
    max_shard_size: int | None = None,
) -> list[str]:
    """Write a state dict the way diffusers / transformers do (``format: pt`` metadata)."""
    state = {k: np.ascontiguousarray(v) for k, v in state.items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k, v in state.items():
        if max_shard_size and shards[-1] and size + v.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        path = os.path.join(out, _add_variant(f"{base}.safetensors", variant))
        with atomic_path(path) as tmp:
            safetensors.numpy.save_file(shards[0], tmp, metadata=meta)
        return [path]
    n = len(shards)
    weight_map, paths = {}, []
    for i, shard in enumerate(shards, 1):
        fname = _add_variant(f"{base}.safetensors", variant).replace(
            ".safetensors", f"-{i:05d}-of-{n:05d}.safetensors"
        )
        path = os.path.join(out, fname)
        with atomic_path(path) as tmp:
            safetensors.numpy.save_file(shard, tmp, metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
        paths.append(path)
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in state.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    write_json(os.path.join(out, _add_variant(f"{base}.safetensors.index.json", variant)), index)
    return paths


@dataclass
class Pipeline:
    """Everything jaxmed needs from a Stable Diffusion folder, as configs + Flax params."""

    configs: dict[str, Any]
    params: dict[str, dict]
    scheduler_config: dict
    tokenizer: Any = None
    model_index: dict = field(default_factory=dict)
    path: str = ""


def load_pipeline(
    folder: str,
    *,
    components: tuple[str, ...] = MODEL_COMPONENTS,
    variant: str | None = None,
    allow_pickle: bool = False,
    tokenizer: bool = True,
) -> Pipeline:
    """Read a diffusers Stable Diffusion folder (local path, or a hub id when online)."""
    folder = resolve_model_path(folder)
    index_path = os.path.join(folder, MODEL_INDEX)
    model_index = {}
    if os.path.isfile(index_path):
        with open(index_path) as f:
            model_index = json.load(f)
    else:
        log.warning("%s has no %s; reading its component folders directly", folder, MODEL_INDEX)
    configs, params = {}, {}
    for name in components:
        configs[name], params[name] = load_component(
            folder, name, variant=variant, allow_pickle=allow_pickle
        )
    sched_dir = component_dir(folder, "scheduler")
    scheduler_config = read_config(sched_dir, "scheduler_config.json")
    tok = None
    if tokenizer:
        tok = load_tokenizer(component_dir(folder, "tokenizer"))
    return Pipeline(configs, params, scheduler_config, tok, model_index, folder)


def save_pipeline(
    folder: str,
    configs: Mapping[str, Any],
    params: Mapping[str, Mapping],
    scheduler_config: Mapping[str, Any],
    tokenizer: Any = None,
    *,
    scheduler_class: str | None = None,
    variant: str | None = None,
    dtype: Any = None,
    max_shard_size: int | None = None,
) -> str:
    """Write a complete StableDiffusionPipeline folder that diffusers loads unchanged."""
    os.makedirs(folder, exist_ok=True)
    for name in configs:
        save_component(folder, name, configs[name], params[name], variant=variant,
                       dtype=dtype, max_shard_size=max_shard_size)
    sched = dict(scheduler_config)
    scheduler_class = scheduler_class or sched.get("_class_name", "PNDMScheduler")
    sched.setdefault("_class_name", scheduler_class)
    sched.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), sched)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "image_encoder": [None, None],
    }
    for name in configs:
        index[name] = [COMPONENTS[name].library, COMPONENTS[name].class_name]
    if tokenizer is not None:
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    write_json(os.path.join(folder, MODEL_INDEX), dict(sorted(index.items())))
    return folder


# SD 1.5's hub home since runwayml's repository was withdrawn (the study used runwayml's).
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# What a hub download fetches: the diffusers components jaxmed reads, in the default
# precision only. SD repositories also hold single-file checkpoints at the root
# (v1-5-pruned*.safetensors / .ckpt, 4-7 GB each), fp16 / non_ema variants and the safety
# checker; matching "*.safetensors" fetched all of them (~15 GB instead of ~2.7 GB).
HUB_ALLOW_PATTERNS: tuple[str, ...] = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    *(f"{c}/config.json" for c in ("unet", "vae", "text_encoder")),
    *(f"{c}/diffusion_pytorch_model{s}" for c in ("unet", "vae") for s in (
        ".safetensors", "-*-of-*.safetensors", ".safetensors.index.json")),
    *(f"text_encoder/model{s}" for s in (
        ".safetensors", "-*-of-*.safetensors", ".safetensors.index.json")),
)


def resolve_model_path(path: str) -> str:
    """A local folder as is; otherwise a hub id (e.g. `SD15_HUB_ID`), downloaded with
    huggingface_hub where the machine has network (only `HUB_ALLOW_PATTERNS`)."""
    if os.path.isdir(path):
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.exists(path):
        try:
            from huggingface_hub import snapshot_download  # only to download: optional

            return snapshot_download(path, allow_patterns=list(HUB_ALLOW_PATTERNS))
        except Exception as err:
            raise MissingComponentError(
                f"{path!r} is not a local folder and could not be downloaded from the "
                f"Hugging Face hub ({type(err).__name__}: {err}). Download it where you have "
                f"network (e.g. `hf download {path} --local-dir DIR --include "
                f"{' '.join(map(shlex.quote, HUB_ALLOW_PATTERNS))}`) and pass that folder."
            ) from err
    raise MissingComponentError(f"model folder {path!r} does not exist")
