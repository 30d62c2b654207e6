"""peft's on-disk format for jaxmed's LoRA / DoRA adapters.

`save` / `load` write and read what ``PeftModel.save_pretrained`` writes for a peft-wrapped
diffusers UNet or transformers CLIPTextModel: ``adapter_config.json`` +
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (r, in),
``...lora_B.weight`` (out, r) and, for DoRA, ``base_model.model.<module>.lora_magnitude_vector``
(out,). The UNet's adapter is the folder itself; text-encoder adapters go to its
``text_encoder/`` subfolder, keyed by transformers 5's CLIPTextModel module names
(``encoder.layers.N...``: 5.x dropped 4.x's ``text_model.`` level; `load` reads both).
Loading in PyTorch: ``PeftModel.from_pretrained(unet, folder)``, or
``inject_adapter_in_model(LoraConfig(**cfg), unet)`` then
``set_peft_model_state_dict(unet, load_file(folder/adapter_model.safetensors))``.

The functions take a `jaxmed.strategies.lora.LoraStrategy` (or its DoRA subclass), which
calls them as its ``save_peft`` / ``load_peft`` methods.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxmed.files import atomic_write, write_json
from jaxmed.models.weights import read_safetensors, write_safetensors_sharded
from jaxmed.strategies.adapters import adapter_table, get_path
from jaxmed.strategies.base import Params, StrategyError, describe_names, module_of, unflatten

# peft's names for the adapter weights; jaxmed's trainable tree uses them as leaf names.
LEAVES = ("lora_A", "lora_B", "lora_magnitude_vector")

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix (accepted with or without)
# Where each component's adapter lives inside the folder `save` writes.
PEFT_SUBFOLDER = {"unet": "", "text_encoder": "text_encoder"}
_PEFT_LIBRARY = {
    "unet": ("UNet2DConditionModel", "diffusers.models.unets.unet_2d_condition"),
    "text_encoder": ("CLIPTextModel", "transformers.models.clip.modeling_clip"),
}


class PeftFormatError(ValueError):
    """An adapter folder is not a peft LoRA / DoRA adapter this strategy can load."""


def adapter_config(strategy, component: str = "unet", base_model: str = "") -> dict[str, Any]:
    """The ``adapter_config.json`` peft writes for this adapter (peft LoraConfig fields)."""
    targets = strategy.component_targets().get(component)
    if targets is None:
        raise StrategyError(f"{strategy.name}: no adapter on the {component}")
    cls, lib = _PEFT_LIBRARY[component]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": {"base_model_class": cls, "parent_library": lib},
        "base_model_name_or_path": base_model or None,
        "revision": None,
        "inference_mode": True,
        "r": strategy.rank,
        "lora_alpha": strategy.alpha,
        "lora_dropout": strategy.dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": strategy.use_dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def state_dict(trainable: Params, component: str = "unet") -> dict[str, np.ndarray]:
    """{peft key: float32 array in PyTorch layout} for one component's adapters."""
    state = {}
    for m, entry in sorted(adapter_table(trainable.get(component, {}), LEAVES).items()):
        name = PEFT_PREFIX + _peft_module_name(component, module_of(m + ("kernel",)))
        state[f"{name}.lora_A.weight"] = np.asarray(entry["lora_A"]["kernel"], np.float32).T
        state[f"{name}.lora_B.weight"] = np.asarray(entry["lora_B"]["kernel"], np.float32).T
        if "lora_magnitude_vector" in entry:
            state[f"{name}.lora_magnitude_vector"] = np.asarray(
                entry["lora_magnitude_vector"], np.float32)
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def save(strategy, trainable: Params, out_dir: str, base_model: str = "") -> list[str]:
    """Write the adapters in peft's format: the UNet's in ``out_dir``, the text encoder's
    in ``out_dir/text_encoder``. Returns the folders written."""
    written = []
    for comp in strategy.component_targets():
        if comp not in trainable:
            continue
        sub = PEFT_SUBFOLDER[comp]
        folder = os.path.join(out_dir, sub) if sub else out_dir
        os.makedirs(folder, exist_ok=True)
        write_safetensors_sharded(folder, PEFT_WEIGHTS[: -len(".safetensors")],
                                  state_dict(trainable, comp))
        write_json(os.path.join(folder, PEFT_CONFIG), adapter_config(strategy, comp, base_model))
        atomic_write(os.path.join(folder, "README.md"), _README.format(
            what="DoRA" if strategy.use_dora else "LoRA", comp=comp,
            cls=_PEFT_LIBRARY[comp][0], r=strategy.rank, a=strategy.alpha))
        written.append(folder)
    return written


def load(strategy, folder: str, params: Params) -> Params:
    """The trainable tree of a peft adapter folder (as `save` or peft's ``save_pretrained``
    write it) for this strategy and these (possibly abstract) params. Every key is checked
    against the modules this strategy targets."""
    trainable = {}
    for comp, modules in strategy.target_modules(params).items():
        sub = os.path.join(folder, PEFT_SUBFOLDER[comp])
        cfg_path, w_path = os.path.join(sub, PEFT_CONFIG), os.path.join(sub, PEFT_WEIGHTS)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise PeftFormatError(f"{p} not found: {strategy.name} adapts the {comp}, "
                                      f"whose peft adapter belongs in {sub}")
        with open(cfg_path) as f:
            cfg = json.load(f)
        check_config(strategy, cfg, cfg_path)
        state = {_jaxmed_module_key(comp, k): v for k, v in read_safetensors(w_path).items()}
        flat, used = {}, set()
        for m in modules:
            name = module_of(m + ("kernel",))
            d_in, d_out = get_path(params[comp], m)["kernel"].shape
            want = {"lora_A": (f"{name}.lora_A.weight", (strategy.rank, d_in)),
                    "lora_B": (f"{name}.lora_B.weight", (d_out, strategy.rank))}
            if strategy.use_dora:
                want["lora_magnitude_vector"] = (f"{name}.lora_magnitude_vector", (d_out,))
            for leaf, (key, shape) in want.items():
                if key not in state:
                    raise PeftFormatError(
                        f"{w_path}: no {key!r}; {strategy.name} targets {len(modules)} "
                        f"modules of the {comp} and expects its keys (keys found: "
                        f"{describe_names(sorted(state), 2)})")
                v = np.asarray(state[key], np.float32)
                if v.shape != shape:
                    raise PeftFormatError(f"{w_path}: {key!r} has shape {v.shape}, "
                                          f"expected {shape} (rank {strategy.rank})")
                used.add(key)
                if leaf == "lora_magnitude_vector":
                    flat[m + (leaf,)] = jnp.asarray(v)
                else:
                    flat[m + (leaf, "kernel")] = jnp.asarray(v.T)
        extra = sorted(set(state) - used)
        if extra:
            raise PeftFormatError(
                f"{w_path}: {len(extra)} key(s) match no module {strategy.name} targets with "
                f"{strategy.component_targets()[comp]!r}, e.g. {extra[:3]}")
        trainable[comp] = unflatten(flat)
    return trainable


def check_config(strategy, cfg: Mapping[str, Any], path: str) -> None:
    """PeftFormatError unless ``cfg`` (an adapter_config.json) describes ``strategy``'s
    adapter: a LoRA (or DoRA) of the same rank and alpha, with no option jaxmed lacks."""
    def bad(what):
        raise PeftFormatError(f"{path}: {what}; build the strategy to match it (e.g. "
                              f"--config.strategy.rank=...) or use another adapter")
    if cfg.get("peft_type") != "LORA":
        bad(f"peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    if bool(cfg.get("use_dora", False)) != strategy.use_dora:
        bad(f"use_dora={cfg.get('use_dora')} but strategy {strategy.name!r} has "
            f"use_dora={strategy.use_dora}")
    if int(cfg.get("r", -1)) != strategy.rank:
        bad(f"r={cfg.get('r')} but the strategy's rank is {strategy.rank}")
    if float(cfg.get("lora_alpha", -1)) != float(strategy.alpha):
        bad(f"lora_alpha={cfg.get('lora_alpha')} but the strategy's alpha is {strategy.alpha}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if cfg.get(key):
            bad(f"{key}=true is not supported by jaxmed")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            bad(f"a per-module {key} is not supported by jaxmed")
    if cfg.get("bias", "none") != "none":
        bad(f"bias={cfg.get('bias')!r}: jaxmed's LoRA trains no biases")


_README = """# {what} adapter for a Stable Diffusion {comp} (written by jaxmed)

peft format (r={r}, lora_alpha={a}). Load it onto the PyTorch model with

    from peft import PeftModel
    model = PeftModel.from_pretrained({cls}.from_pretrained(BASE, subfolder="{comp}"), FOLDER)
"""


def _peft_module_name(component: str, name: str) -> str:
    """jaxmed's module name -> the PyTorch model's. transformers 5's CLIPTextModel has no
    ``text_model`` submodule (4.x had one): peft keys follow the installed, current layout."""
    if component == "text_encoder" and name.startswith("text_model."):
        return name[len("text_model."):]
    return name


def _jaxmed_module_key(component: str, key: str) -> str:
    """A peft key (with or without PeftModel's prefix; for the text encoder with or without
    transformers 4's ``text_model.``) -> ``<jaxmed module name>.<leaf>``."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    if component == "text_encoder" and not key.startswith("text_model."):
        key = "text_model." + key
    return key
