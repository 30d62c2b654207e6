"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024), exactly as peft computes them.

For a targeted Linear ``y = x W + b`` (W stored (in, out)) with rank r and scaling s = alpha/r:

* LoRA: ``y + s * (dropout(x) A) B`` with A (in, r) kaiming-uniform and B (r, out) zero.
* DoRA: a magnitude m (out,) initialised to the column norms of W, and
  ``y + (m/n - 1) * x' W + (m/n) * s * (x' A) B`` with ``x' = dropout(x)`` and
  ``n = ||W + s A B||`` per output unit, held constant in the backward pass (peft's
  ``weight_norm.detach()``, DoRA section 4.3). With dropout 0 this is x (m/n)(W + sAB) + b.

The branches are added unmerged by intercepting the targeted Linear modules while a component
runs, so the frozen W gets no weight gradient and LoRA dropout behaves as in peft.
`export` folds them into plain weights.

`save_peft` / `load_peft` write and read peft's on-disk format (what
``PeftModel.save_pretrained`` writes for a peft-wrapped diffusers UNet or transformers
CLIPTextModel): ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r) and, for
DoRA, ``base_model.model.<module>.lora_magnitude_vector`` (out,). The UNet's adapter is the
folder itself; text-encoder adapters go to its ``text_encoder/`` subfolder, keyed by
transformers 5's CLIPTextModel module names (``encoder.layers.N...``: 5.x dropped 4.x's
``text_model.`` level; `load_peft` reads both). Loading in PyTorch:
``PeftModel.from_pretrained(unet, folder)``, or ``inject_adapter_in_model(LoraConfig(**cfg),
unet)`` then ``set_peft_model_state_dict(unet, load_file(folder/adapter_model.safetensors))``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.models.layers import Linear, torch_default_init
from jaxmed.strategies.base import (
    COMPONENTS,
    Params,
    Strategy,
    StrategyError,
    describe_names,
    flatten,
    match_targets,
    module_of,
    unflatten,
)

STUDY_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_ADAPTER_LEAVES = ("lora_A", "lora_B", "lora_magnitude_vector")

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix (accepted with or without)
# Where each component's adapter lives inside the folder save_peft writes.
PEFT_SUBFOLDER = {"unet": "", "text_encoder": "text_encoder"}
_PEFT_LIBRARY = {
    "unet": ("UNet2DConditionModel", "diffusers.models.unets.unet_2d_condition"),
    "text_encoder": ("CLIPTextModel", "transformers.models.clip.modeling_clip"),
}


class PeftFormatError(ValueError):
    """An adapter folder is not a peft LoRA / DoRA adapter this strategy can load."""


@dataclasses.dataclass(frozen=True)
class LoraStrategy(Strategy):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = STUDY_TARGETS
    text_targets: tuple[str, ...] | str = ()
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def _component_targets(self) -> dict[str, tuple[str, ...] | str]:
        out = {}
        if self.targets:
            out["unet"] = self.targets
        if self.text_targets:
            out["text_encoder"] = self.text_targets
        return out

    def target_modules(self, params: Params) -> dict[str, list[tuple[str, ...]]]:
        """Module paths (per component) that get an adapter; errors if a pattern matches
        nothing or matches a layer that is not a Linear."""
        found = {}
        for comp, patterns in self._component_targets().items():
            if comp not in params:
                raise StrategyError(
                    f"{self.name}: targets on {comp!r} but the parameter tree has only "
                    f"{sorted(params)}"
                )
            kernels = {p[:-1]: v for p, v in flatten(params[comp]).items() if p[-1] == "kernel"}
            hits = sorted(m for m in kernels if match_targets(patterns, module_of(m + ("kernel",))))
            if not hits:
                names = sorted(module_of(m + ("kernel",)) for m in kernels)
                raise StrategyError(
                    f"{self.name}: target pattern {patterns!r} matches no layer of the {comp}. "
                    f"It is matched (as peft does: exact name or dotted suffix for a list, full "
                    f"regex for a string) against the {len(names)} names of its Linear / Conv "
                    f"modules, such as {describe_names(names)}"
                )
            convs = [module_of(m + ("kernel",)) for m in hits if len(kernels[m].shape) != 2]
            if convs:
                raise StrategyError(
                    f"{self.name}: target pattern {patterns!r} matches convolution layers "
                    f"{convs[:3]}; jaxmed's LoRA/DoRA adapt Linear layers only"
                )
            found[comp] = hits
        return found

    def init(self, params: Params, rng: jax.Array) -> tuple[Params, Params]:
        trainable = {}
        for comp, modules in self.target_modules(params).items():
            flat = {}
            comp_rng = jax.random.fold_in(rng, COMPONENTS.index(comp))
            for i, m in enumerate(modules):
                kernel = _get(params[comp], m)["kernel"]
                d_in, d_out = kernel.shape
                a = torch_default_init(jax.random.fold_in(comp_rng, i), (d_in, self.rank),
                                       jnp.float32)
                flat[m + ("lora_A", "kernel")] = a
                flat[m + ("lora_B", "kernel")] = jnp.zeros((self.rank, d_out), jnp.float32)
                if self.use_dora:
                    flat[m + ("lora_magnitude_vector",)] = jnp.linalg.norm(kernel, axis=0)
            trainable[comp] = unflatten(flat)
        return trainable, params

    def combine(self, trainable: Params, frozen: Params) -> Params:
        return frozen  # branches are added by `intercept`

    def adapter_mask(self, trainable: Params) -> Params:
        return jax.tree_util.tree_map(lambda _: True, trainable)

    @contextlib.contextmanager
    def intercept(
        self, component: str, trainable: Params, frozen: Params, *, rng=None, train=False
    ) -> Iterator[None]:
        table = _adapter_table(trainable.get(component, {}))
        if not table:
            yield
            return
        index = {m: i for i, m in enumerate(sorted(table))}
        use_dropout = train and self.dropout > 0.0
        if use_dropout and rng is None:
            raise ValueError(f"{self.name}: LoRA dropout in training needs an rng")
        if use_dropout:  # independent masks per component and per layer
            rng = jax.random.fold_in(rng, COMPONENTS.index(component))

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, Linear):
                return next_fun(*args, **kwargs)
            entry = table.get(tuple(mod.path))
            if entry is None:
                return next_fun(*args, **kwargs)
            x = args[0]
            y = next_fun(*args, **kwargs)
            dt = y.dtype
            xd = x
            if use_dropout:
                keep = jax.random.bernoulli(
                    jax.random.fold_in(rng, index[tuple(mod.path)]), 1.0 - self.dropout, x.shape
                )
                xd = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
            a = entry["lora_A"]["kernel"].astype(dt)
            b = entry["lora_B"]["kernel"].astype(dt)
            lora = jnp.dot(jnp.dot(xd.astype(dt), a), b) * self.scaling
            if "lora_magnitude_vector" not in entry:
                return y + lora
            base = _get(frozen[component], tuple(mod.path))
            w = base["kernel"]
            norm = jax.lax.stop_gradient(_column_norm(w, entry, self.scaling))
            mag = (entry["lora_magnitude_vector"] / norm).astype(dt)
            if use_dropout:
                base_out = jnp.dot(xd.astype(dt), w.astype(dt))
            else:
                base_out = y - base["bias"].astype(dt) if "bias" in base else y
            return y + (mag - 1.0) * base_out + mag * lora

        with nn.intercept_methods(interceptor):
            yield

    def export(self, trainable: Params, frozen: Params) -> Params:
        out = {c: v for c, v in frozen.items()}
        for comp, sub in trainable.items():
            flat = flatten(frozen[comp])
            for m, entry in _adapter_table(sub).items():
                w = flat[m + ("kernel",)]
                merged = w + self.scaling * entry["lora_A"]["kernel"] @ entry["lora_B"]["kernel"]
                if "lora_magnitude_vector" in entry:
                    merged = merged * (entry["lora_magnitude_vector"] / _column_norm(
                        w, entry, self.scaling))
                flat[m + ("kernel",)] = merged
            out[comp] = unflatten(flat)
        return out

    # -- peft's on-disk format

    def peft_config(self, component: str = "unet", base_model: str = "") -> dict[str, Any]:
        """The ``adapter_config.json`` peft writes for this adapter (peft LoraConfig fields)."""
        targets = self._component_targets().get(component)
        if targets is None:
            raise StrategyError(f"{self.name}: no adapter on the {component}")
        cls, lib = _PEFT_LIBRARY[component]
        return {
            "peft_type": "LORA",
            "task_type": None,
            "auto_mapping": {"base_model_class": cls, "parent_library": lib},
            "base_model_name_or_path": base_model or None,
            "revision": None,
            "inference_mode": True,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) else list(targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": self.use_dora,
            "init_lora_weights": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    def peft_state_dict(self, trainable: Params, component: str = "unet") -> dict[str, np.ndarray]:
        """{peft key: float32 array in PyTorch layout} for one component's adapters."""
        state = {}
        for m, entry in sorted(_adapter_table(trainable.get(component, {})).items()):
            name = PEFT_PREFIX + _peft_module_name(component, module_of(m + ("kernel",)))
            state[f"{name}.lora_A.weight"] = np.asarray(entry["lora_A"]["kernel"], np.float32).T
            state[f"{name}.lora_B.weight"] = np.asarray(entry["lora_B"]["kernel"], np.float32).T
            if "lora_magnitude_vector" in entry:
                state[f"{name}.lora_magnitude_vector"] = np.asarray(
                    entry["lora_magnitude_vector"], np.float32)
        return {k: np.ascontiguousarray(v) for k, v in state.items()}

    def save_peft(self, trainable: Params, out_dir: str, base_model: str = "") -> list[str]:
        """Write the adapters in peft's format: the UNet's in ``out_dir``, the text encoder's
        in ``out_dir/text_encoder``. Returns the folders written."""
        from jaxmed.models.weights import write_safetensors_sharded

        written = []
        for comp in self._component_targets():
            if comp not in trainable:
                continue
            sub = PEFT_SUBFOLDER[comp]
            folder = os.path.join(out_dir, sub) if sub else out_dir
            os.makedirs(folder, exist_ok=True)
            write_safetensors_sharded(folder, PEFT_WEIGHTS[: -len(".safetensors")],
                                      self.peft_state_dict(trainable, comp))
            _write_json(os.path.join(folder, PEFT_CONFIG), self.peft_config(comp, base_model))
            with open(os.path.join(folder, "README.md"), "w") as f:
                f.write(_README.format(what="DoRA" if self.use_dora else "LoRA", comp=comp,
                                       cls=_PEFT_LIBRARY[comp][0], r=self.rank, a=self.alpha))
            written.append(folder)
        return written

    def load_peft(self, folder: str, params: Params) -> Params:
        """The trainable tree of a peft adapter folder (as `save_peft` or peft's
        ``save_pretrained`` write it) for this strategy and these (possibly abstract) params.
        Every key is checked against the modules this strategy targets."""
        from jaxmed.models.weights import read_safetensors

        trainable = {}
        for comp, modules in self.target_modules(params).items():
            sub = os.path.join(folder, PEFT_SUBFOLDER[comp])
            cfg_path, w_path = os.path.join(sub, PEFT_CONFIG), os.path.join(sub, PEFT_WEIGHTS)
            for p in (cfg_path, w_path):
                if not os.path.isfile(p):
                    raise PeftFormatError(f"{p} not found: {self.name} adapts the {comp}, whose "
                                          f"peft adapter belongs in {sub}")
            with open(cfg_path) as f:
                cfg = json.load(f)
            self._check_peft_config(cfg, cfg_path)
            state = {_jaxmed_module_key(comp, k): v for k, v in read_safetensors(w_path).items()}
            flat, used = {}, set()
            comp_params = params[comp]
            for m in modules:
                name = module_of(m + ("kernel",))
                d_in, d_out = _get(comp_params, m)["kernel"].shape
                want = {"lora_A": (f"{name}.lora_A.weight", (self.rank, d_in)),
                        "lora_B": (f"{name}.lora_B.weight", (d_out, self.rank))}
                if self.use_dora:
                    want["lora_magnitude_vector"] = (f"{name}.lora_magnitude_vector", (d_out,))
                for leaf, (key, shape) in want.items():
                    if key not in state:
                        raise PeftFormatError(
                            f"{w_path}: no {key!r}; {self.name} targets {len(modules)} "
                            f"modules of the {comp} and expects its keys (keys found: "
                            f"{describe_names(sorted(state), 2)})")
                    v = np.asarray(state[key], np.float32)
                    if v.shape != shape:
                        raise PeftFormatError(f"{w_path}: {key!r} has shape {v.shape}, "
                                              f"expected {shape} (rank {self.rank})")
                    used.add(key)
                    if leaf == "lora_magnitude_vector":
                        flat[m + (leaf,)] = jnp.asarray(v)
                    else:
                        flat[m + (leaf, "kernel")] = jnp.asarray(v.T)
            extra = sorted(set(state) - used)
            if extra:
                raise PeftFormatError(
                    f"{w_path}: {len(extra)} key(s) match no module {self.name} targets with "
                    f"{self._component_targets()[comp]!r}, e.g. {extra[:3]}")
            trainable[comp] = unflatten(flat)
        return trainable

    def _check_peft_config(self, cfg: Mapping[str, Any], path: str) -> None:
        def bad(what):
            raise PeftFormatError(f"{path}: {what}; build the strategy to match it (e.g. "
                                  f"--config.strategy.rank=...) or use another adapter")
        if cfg.get("peft_type") != "LORA":
            bad(f"peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
        if bool(cfg.get("use_dora", False)) != self.use_dora:
            bad(f"use_dora={cfg.get('use_dora')} but strategy {self.name!r} has "
                f"use_dora={self.use_dora}")
        if int(cfg.get("r", -1)) != self.rank:
            bad(f"r={cfg.get('r')} but the strategy's rank is {self.rank}")
        if float(cfg.get("lora_alpha", -1)) != float(self.alpha):
            bad(f"lora_alpha={cfg.get('lora_alpha')} but the strategy's alpha is {self.alpha}")
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


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _column_norm(w: jax.Array, entry: dict, scaling: float) -> jax.Array:
    """||W + s A B|| per output unit (axis 0 of the (in, out) kernel), as peft's weight norm."""
    delta = entry["lora_A"]["kernel"] @ entry["lora_B"]["kernel"]
    return jnp.linalg.norm(w + scaling * delta, axis=0)


def _get(tree: dict, path: tuple[str, ...]) -> dict:
    for p in path:
        tree = tree[p]
    return tree


def _adapter_table(sub: Params) -> dict[tuple[str, ...], dict]:
    """{module path: {'lora_A': .., 'lora_B': .., ['lora_magnitude_vector': ..]}}."""
    table: dict[tuple[str, ...], dict] = {}
    for path, v in flatten(sub).items():
        for i, p in enumerate(path):
            if p in _ADAPTER_LEAVES:
                entry = table.setdefault(path[:i], {})
                if p == "lora_magnitude_vector":
                    entry[p] = v
                else:
                    entry.setdefault(p, {})[path[-1]] = v
                break
    return table


def lora(rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=STUDY_TARGETS,
         text_targets=(), lr: float = 1e-4, text_lr: float | None = None) -> LoraStrategy:
    return _make("lora", rank, alpha, dropout, targets, text_targets, lr, text_lr, False, 4)


def dora(rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=STUDY_TARGETS,
         text_targets=(), lr: float = 1e-4, text_lr: float | None = None) -> LoraStrategy:
    return _make("dora", rank, alpha, dropout, targets, text_targets, lr, text_lr, True, 8)


def _make(name, rank, alpha, dropout, targets, text_targets, lr, text_lr, use_dora, batch):
    if rank < 1:
        raise StrategyError(f"{name}: rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise StrategyError(f"{name}: dropout must be in [0, 1), got {dropout}")
    targets = targets if isinstance(targets, str) else tuple(targets)
    text_targets = text_targets if isinstance(text_targets, str) else tuple(text_targets)
    if not targets and not text_targets:
        raise StrategyError(f"{name}: no targets (targets and text_targets are both empty); "
                            f"the study's are targets={STUDY_TARGETS}")
    lrs = [("unet", lr)] if targets else []
    if text_targets:
        lrs.append(("text_encoder", text_lr if text_lr is not None else lr))
    trains = tuple(c for c, _ in lrs)
    what = "DoRA" if use_dora else "LoRA"
    return LoraStrategy(
        name=name,
        description=f"{what} r={rank} alpha={alpha} dropout={dropout} on {targets}"
        + (f" + text {text_targets}" if text_targets else ""),
        trains=trains, lrs=tuple(lrs), per_device_batch=batch, rank=rank, alpha=alpha,
        dropout=dropout, targets=targets, text_targets=text_targets, use_dora=use_dora,
    )
