r"""What a strategy trains, without weights: parameter counts and optimizer-state bytes.

    python -m jaxmed.counts --config configs/finetune.py:lora --config.model.arch=sd15
    python -m jaxmed.counts --config configs/finetune.py:dora --config.strategy.rank=4 \
        --config.model.arch=sd15 --json
    python -m jaxmed.counts --list

Everything is abstract (``jax.eval_shape``): the model is built from its architecture
(``config.model.arch``: sd15 | sd21 | test | tiny, or "" to read the three config.json files
under ``config.model.path``), the strategy splits the abstract parameter tree, and the
optimizer of `jaxmed.optim.make_optimizer` is initialised abstractly. Per component it prints
total parameters, trainable parameters, % trainable, frozen parameters (for SVDiff the frozen
tree also holds the SVD factors) and the optimizer-state bytes (AdamW: two float32 moments per
trainable parameter, plus step counts).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from jaxmed import strategies
from jaxmed.cli import main_guard, parse, set_override
from jaxmed.models import clip_text, tiny, unet, vae, weights
from jaxmed.models.sd import resolve
from jaxmed.optim import make_optimizer
from jaxmed.strategies.base import COMPONENTS, count, nbytes

ARCHS = ("sd15", "sd21", "test", "tiny")
# Hub ids whose architecture is built in, used when ``model.path`` is not a local folder.
KNOWN_MODELS = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-2-1-base": "sd21",
}


def arch_configs(arch: str) -> dict[str, Any]:
    """Model configs (jaxmed config objects) of a built-in architecture."""
    if arch in ("test", "tiny"):
        return tiny.configs(arch)
    if arch == "sd15":
        u, t = unet.SD15_UNET_CONFIG, clip_text.SD15_TEXT_CONFIG
    elif arch == "sd21":
        u, t = unet.SD21_UNET_CONFIG, clip_text.SD21_TEXT_CONFIG
    else:
        raise ValueError(f"model.arch={arch!r}: choose one of {', '.join(ARCHS)}, or \"\" to "
                         "read the config.json files under model.path")
    # SD 2.x's VAE is SD 1.5's (only its sample_size differs, which holds no parameters).
    return {"unet": unet.UNetConfig.from_dict(u),
            "vae": vae.VAEConfig.from_dict(vae.SD15_VAE_CONFIG),
            "text_encoder": clip_text.CLIPTextConfig.from_dict(t)}


def folder_configs(path: str) -> dict[str, Any]:
    """Model configs read from a diffusers folder's config.json files (no weights read)."""
    folder = resolve(path)
    if not os.path.isdir(folder):
        known = KNOWN_MODELS.get(path)
        if known:
            return arch_configs(known)
        raise FileNotFoundError(
            f"model.path={path!r} is not a local folder; give one, or an architecture with "
            f"--config.model.arch={{{','.join(ARCHS)}}}")
    out = {}
    for name, spec in weights.COMPONENTS.items():
        cdir = weights.component_dir(folder, name)
        out[name] = spec.config_from_dict(weights.read_config(cdir, spec.config_name))
    return out


def abstract_params(configs: Mapping[str, Any]) -> dict[str, Any]:
    """{component: ShapeDtypeStruct tree} of the three models."""
    return {name: weights.COMPONENTS[name].abstract_params(cfg) for name, cfg in configs.items()}


def _component_of(path) -> str | None:
    for k in path:
        key = getattr(k, "key", None)
        if key in COMPONENTS:
            return key
    return None


def count_table(strategy: strategies.Strategy, params: Mapping[str, Any],
                optim: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """Per component and in total: params, trainable, frozen, % trainable, bytes of the
    trainable tree and of the optimizer state. ``params`` may be abstract."""
    trainable, frozen = strategy.abstract(dict(params))
    opt_bytes = dict.fromkeys(COMPONENTS, 0)
    other = 0
    if optim is not None and jax.tree_util.tree_leaves(trainable):
        tx = make_optimizer(strategy, trainable, optim)
        state = jax.eval_shape(tx.init, trainable)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state):
            b = nbytes(leaf)
            c = _component_of(path)
            if c is None:
                other += b
            else:
                opt_bytes[c] += b
    rows = {}
    for c in COMPONENTS:
        if c not in params:
            continue
        total, n = count(params[c]), count(trainable.get(c, {}))
        rows[c] = {
            "total": total,
            "trainable": n,
            "percent_trainable": 100.0 * n / total if total else 0.0,
            "frozen": count(frozen.get(c, {})),
            "trainable_bytes": nbytes(trainable.get(c, {})),
            "optimizer_state_bytes": opt_bytes[c],
        }
    tot = {k: sum(r[k] for r in rows.values())
           for k in ("total", "trainable", "frozen", "trainable_bytes", "optimizer_state_bytes")}
    tot["optimizer_state_bytes"] += other
    tot["percent_trainable"] = 100.0 * tot["trainable"] / tot["total"] if tot["total"] else 0.0
    return {"strategy": strategy.name, "description": strategy.description,
            "learning_rates": strategy.learning_rates(), "components": rows, "total": tot}


def report(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`count_table` for a finetune config (strategy, model.arch / model.path, optim)."""
    arch = config.model.get("arch", "") or ""
    configs = arch_configs(arch) if arch else folder_configs(config.model.path)
    strategy = strategies.build_strategy(config.strategy)
    out = count_table(strategy, abstract_params(configs), config.optim)
    out["model"] = arch or config.model.path
    return out


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def format_table(rep: Mapping[str, Any]) -> str:
    lines = [f"strategy {rep['strategy']}: {rep['description']}",
             f"model {rep.get('model', '?')}; learning rates {rep['learning_rates']}"]
    head = ("component", "total params", "trainable", "% trainable", "frozen params",
            "optimizer state")
    rows = [head]
    for name, r in [*rep["components"].items(), ("total", rep["total"])]:
        rows.append((name, f"{r['total']:,}", f"{r['trainable']:,}",
                     f"{r['percent_trainable']:.4f}%", f"{r['frozen']:,}",
                     f"{r['optimizer_state_bytes']:,} B ({_bytes(r['optimizer_state_bytes'])})"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    fmt = lambda row: "  ".join(
        (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(row, widths)))
    lines += [fmt(rows[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows[1:-1]]
    lines += ["  ".join("-" * w for w in widths), fmt(rows[-1])]
    return "\n".join(lines)


def list_strategies() -> str:
    lines = []
    for name in strategies.names():
        s = strategies.get(name)
        tag = "study" if name in strategies.STUDY else "extra"
        opts = ", ".join(f"{k}={v!r}" for k, v in strategies.options(name).items())
        lines.append(f"{name:14s} [{tag}] {s.description}\n{'':14s} options: {opts}")
    return "\n".join(lines)


def _pop_arch(argv: list[str]) -> tuple[list[str], str | None]:
    """Take ``--config.model.arch`` out of argv (the field may not be in the config yet)."""
    out, arch, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config.model.arch="):
            arch = a.split("=", 1)[1]
        elif a == "--config.model.arch" and i + 1 < len(argv):
            arch = argv[i + 1]
            i += 1
        else:
            out.append(a)
        i += 1
    return out, arch


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: a config or strategy error is one ``error:`` line, exit 2
    (`jaxmed.cli.main_guard`)."""
    return main_guard(_main, argv)


def _main(argv: list[str]) -> int:
    if "--list" in argv:
        print(list_strategies())
        return 0
    argv, arch = _pop_arch(argv)
    config, args = parse(
        argv, "python -m jaxmed.counts", __doc__.split("\n\n")[0],
        workdir_required=False,
        extra=[("--json", {"action": "store_true", "help": "print JSON, not a table"}),
               ("--list", {"action": "store_true", "help": "list the strategies"})])
    if arch is not None:
        if "arch" in config.model:
            set_override(config, "model.arch", arch)
        else:
            with config.unlocked():
                config.model.arch = arch
    rep = report(config)
    print(json.dumps(rep, indent=2) if args.json else format_table(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
