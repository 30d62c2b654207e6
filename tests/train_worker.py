"""Subprocess entry for tests that need a fresh process: simulated multi-device meshes
(XLA_FLAGS must be set before jax starts) and kill-and-resume runs.

    python tests/train_worker.py run STRATEGY MODEL CSV WORKDIR [key=value ...]
    python tests/train_worker.py sharded STRATEGY MODEL CSV OUT.npz
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.environ.get(
    "JAXMED_COMPILATION_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

from jaxmed import train  # noqa: E402
from jaxmed.cli import load_config, set_override  # noqa: E402
from jaxmed.strategies.base import flatten  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def config(strategy: str, model: str, csv: str, **overrides):
    c = load_config(os.path.join(HERE, "..", "configs", "finetune.py") + ":" + strategy)
    base = {
        "model.path": model, "data.kind": "chexpert", "data.csv": csv, "data.resolution": 32,
        "data.workers": 2, "train.per_device_batch": 2, "optim.grad_accum": 2,
        "log.sample_every_steps": -1, "log.tensorboard": False, "log.progress": False,
        "export.diffusers": False, "export.adapters": False, "checkpoint.async_save": False,
    }
    base.update(overrides)
    for k, v in base.items():
        set_override(c, k, str(v))
    return c


def main(argv):
    mode, strategy, model, csv, out = argv[:5]
    overrides = dict(a.split("=", 1) for a in argv[5:])
    if mode == "run":
        train.train(config(strategy, model, csv, **overrides), out)
        return 0
    if mode == "sharded":
        # The same 3 steps on 1 device and on a data=2 x fsdp=4 mesh of 8 CPU devices;
        # the global batch (8 per micro-step) is the same in both.
        devs = jax.devices()
        assert len(devs) == 8, f"expected 8 simulated devices, got {len(devs)}"
        results = {}
        for name, devices, mesh, per_dev in (("single", devs[:1], (1, 1), 8),
                                             ("sharded", devs, (2, 4), 1)):
            c = config(strategy, model, csv, **{"train.max_steps": 3, "optim.grad_accum": 2,
                                                "train.per_device_batch": per_dev,
                                                "mesh.data": mesh[0], "mesh.fsdp": mesh[1],
                                                **overrides})
            wd = out + f".{name}.wd"
            trainer = train.Trainer(c, wd, devices=devices)
            summary = trainer.run()
            flat = flatten(jax.device_get(trainer.state.trainable))
            for path, v in flat.items():
                results[f"{name}/params/" + "/".join(path)] = np.asarray(v)
            results[f"{name}/loss"] = np.asarray(summary["final_loss"])
            if name == "sharded":
                specs = {"/".join(p): str(x.sharding.spec) for p, x in
                         flatten(trainer.state.trainable).items()}
                fspecs = {"/".join(p): str(x.sharding.spec) for p, x in
                          flatten(trainer.frozen).items()}
                n_sharded = sum("fsdp" in s for s in specs.values())
                n_frozen_sharded = sum("fsdp" in s for s in fspecs.values())
                results["sharded/n_trainable_sharded"] = np.asarray(n_sharded)
                results["sharded/n_frozen_sharded"] = np.asarray(n_frozen_sharded)
                # Adam's moments after the run: sharded over fsdp like their weights.
                n_opt_sharded = sum("fsdp" in str(x.sharding.spec) for x in
                                    jax.tree_util.tree_leaves(trainer.state.opt_state))
                results["sharded/n_opt_sharded"] = np.asarray(n_opt_sharded)
                results["sharded/n_devices_of_a_param"] = np.asarray(max(
                    len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(trainer.frozen)))
        np.savez(out, **results)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
