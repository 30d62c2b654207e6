"""jaxmed's command-line tools as Python functions, for a notebook kernel or a script.

    from jaxmed import api
    api.setup()                                   # compilation cache; prints nothing
    out = api.study("configs/study.py:demo", "runs/demo", {"finetune.max_steps": 120})
    summary = api.train("configs/finetune.py:lora", "runs/lora", {"train.max_steps": 50})
    png = api.sample("runs/lora", "runs/lora/grid.png",
                     prompts=["Chest X-ray showing Edema"], num=4)
    info = api.sample("runs/lora", "runs/lora/synth", combinations="combos.csv")

Each function takes what its command takes: a config spec (``file.py[:arg]``, the same
files and presets as ``--config``) or a ConfigDict, and overrides as a mapping of dotted
keys (``{"train.max_steps": 50}``, the same keys and checks as ``--config.train.max_steps``),
and returns what the command prints: the run's summary, the study's output paths, the
grid's path or the synthesis summary.

Why functions and not ``!python -m jaxmed...`` in a notebook: the kernel that imported jax
holds the accelerator (a TPU admits one process; on a GPU the kernel has reserved most of
its memory), so a subprocess would find none. Why `setup` and not the tools' own start:
the tools tune the process's malloc (`jaxmed.hostmem`), a setting made for one short-lived
command's process that would keep a long-lived kernel's peak heap (Colab has ~12 GB of RAM).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from jaxmed import sample as sample_mod
from jaxmed import sharding
from jaxmed import study as study_mod
from jaxmed import train as train_mod
from jaxmed.checkpoint import load_for_sampling
from jaxmed.cli import (
    ConfigError,
    check_workdir,
    load_config,
    set_override,
    use_compilation_cache,
)
from jaxmed.data.combinations import read_combinations
from jaxmed.data.labels import LABELS

Overrides = Mapping[str, Any] | Sequence[str] | None


def setup(compilation_cache: bool = True) -> dict:
    """Ready this process for jaxmed: the persistent compilation cache (as the tools use
    it), nothing process-wide beyond that. Returns what jax runs on: platform, device kind,
    device and process counts, and the cache folder ('' when off)."""
    cache = use_compilation_cache() if compilation_cache else ""
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "processes": jax.process_count(), "compilation_cache": cache}


def config(spec: str | ml_collections.ConfigDict,
           overrides: Overrides = None) -> ml_collections.ConfigDict:
    """A locked config: ``spec`` is ``path/file.py[:arg]`` or a ConfigDict (copied, never
    changed); ``overrides`` a mapping ``{"a.b": value}`` or ``["a.b=value", ...]``. A string
    value is parsed as on the command line (``"3"`` is 3, ``"/data"`` a string); any other
    value is taken as it is. Unknown keys and wrong types raise `jaxmed.cli.ConfigError`."""
    if isinstance(spec, ml_collections.ConfigDict):
        cfg = copy.deepcopy(spec)  # keeps typed None fields (FieldReference) typed
        cfg.lock()
    else:
        cfg = load_config(spec)
    if isinstance(overrides, str):
        raise ConfigError(f"overrides {overrides!r}: give a mapping or a list of 'a.b=v'")
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for o in overrides or ():
            if "=" not in o:
                raise ConfigError(f"override {o!r}: expected 'a.b=value'")
            items.append(o.removeprefix("--config.").split("=", 1))
    for key, value in items:
        set_override(cfg, key, value if isinstance(value, str) else repr(value))
    return cfg


def train(spec: str | ml_collections.ConfigDict, workdir: str,
          overrides: Overrides = None) -> dict:
    """`python -m jaxmed.train --config SPEC --workdir WORKDIR [overrides]`: trains to the
    end (resuming from the workdir's checkpoint), exports, returns the run's summary."""
    check_workdir(workdir, "jaxmed.train")
    setup()
    return train_mod.train(config(spec, overrides), workdir)


def study(spec: str | ml_collections.ConfigDict, workdir: str,
          overrides: Overrides = None) -> dict:
    """`python -m jaxmed.study --config SPEC --workdir WORKDIR [overrides]`: every model
    the preset names (finished ones skipped), then results.md / .csv and the plots; returns
    their paths (``md``, ``csv``, ``plots``) and the three findings."""
    check_workdir(workdir, "jaxmed.study", url_ok=False)
    setup()
    return study_mod.run_study(config(spec, overrides), workdir)


def sample(model: str, out: str, *, prompts: Sequence[str] | None = None,
           combinations: str | None = None, num: int = 4, sampler: str = "pndm",
           steps: int = 50, guidance: float = 7.5, seed: int = 42, batch_size: int = 8,
           resolution: int | None = None, micro_batch: int | None = 1,
           negative_prompt: str = "", grayscale: bool = False, eta: float = 0.0,
           dtype: str = "float32", label_columns: Sequence[str] = LABELS,
           progress: bool = True) -> str | dict:
    """`python -m jaxmed.sample`: ``model`` is a diffusers folder, ``jaxmed:tiny-sd`` or a
    training workdir. With ``prompts``: ``num`` images of each as one grid PNG at ``out``;
    returns its path. With ``combinations`` (a CSV): the study's synthesis into the folder
    ``out`` (resumable); returns its summary."""
    if (prompts is None) == (combinations is None):
        raise ValueError("sample: give prompts=[...] or combinations=CSV, not both or none")
    setup()
    sd, params = load_for_sampling(model, dtype=dtype)
    mesh = sharding.make_mesh()
    if prompts is not None:
        return sample_mod.prompt_grid(
            sd, params, list(prompts), out, num=num, batch_size=batch_size, sampler=sampler,
            steps=steps, guidance=guidance, seed=seed, eta=eta, resolution=resolution,
            mesh=mesh, micro_batch=micro_batch, negative_prompt=negative_prompt,
            grayscale=grayscale)
    return sample_mod.synthesize(
        sd, params, read_combinations(combinations, tuple(label_columns)), out,
        batch_size=batch_size, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
        resolution=resolution, mesh=mesh, micro_batch=micro_batch, progress=progress,
        grayscale=grayscale, label_columns=tuple(label_columns),
        negative_prompt=negative_prompt, eta=eta,
        model_id=os.path.abspath(model) if os.path.exists(model) else model)
