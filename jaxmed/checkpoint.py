"""Training checkpoints with orbax (every N steps and at the end, keep K, resume the latest),
the `TrainState` they hold, and loading a trained run back for sampling.

A checkpoint holds the trainable tree, the optimizer state, the EMA (if any), the step and
the data position (epoch, step within the epoch) — never the frozen base weights, which are
re-read from the model folder on resume, so a LoRA checkpoint is a few MB, not GBs. orbax
writes into a temporary folder and renames it when complete, so a run killed mid-save
resumes from the previous checkpoint, never from a half-written one.

`load_for_sampling` turns a diffusers folder or a training workdir (its export/, else its
latest checkpoint on the config's base model and strategy) into a model and plain params.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import struct

from jaxmed import storage
from jaxmed.models.sd import BUNDLED, StableDiffusion
from jaxmed.optim import make_optimizer
from jaxmed.strategies import build_strategy

log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
    """What a training step updates and a checkpoint holds (never the frozen tree)."""

    step: jax.Array
    trainable: Any
    opt_state: Any
    ema: Any
    bad_step: jax.Array  # first step whose loss or gradient was not finite; -1 if none


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        # A storage URL (gs://...) goes to orbax as given: it writes there through epath
        # and tensorstore, and every host of a pod sees the same checkpoints.
        self.directory = storage.absolute(directory)
        storage.makedirs(self.directory)
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        return self._mngr.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore onto ``abstract_state``'s shapes, dtypes and shardings."""
        try:
            out = self._mngr.restore(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:
            raise RuntimeError(
                f"{self.directory}/{step}: could not restore this checkpoint onto the model "
                f"and strategy of the current config ({type(err).__name__}: {err}). Was it "
                "written by a run with another strategy or model? Use a fresh --workdir or "
                "the config that wrote it."
            ) from err
        return out["state"], dict(out["data"])

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays, as a restore target."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


# ---------------------------------------------------------------------------------------
# Loading a model: a diffusers folder or a jaxmed training workdir


def load_for_sampling(path: str, *, dtype: str = "float32") -> tuple[StableDiffusion, dict]:
    """(sd, plain params) from a diffusers folder (or bundled name) or a training workdir.

    A workdir (it holds ``config.json`` and ``checkpoints/``) is read from its ``export/``
    diffusers folder when present; otherwise its latest checkpoint is restored onto the
    config's base model and strategy, and the adapters folded in (``Strategy.export``).
    """
    if path in BUNDLED or os.path.isfile(os.path.join(path, "model_index.json")):
        return StableDiffusion.load(path, dtype=dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path}: no such folder")
    export = os.path.join(path, "export")
    if os.path.isfile(os.path.join(export, "model_index.json")):
        return StableDiffusion.load(export, dtype=dtype)
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
            os.path.join(path, "checkpoints")):
        return restore_run(path, dtype=dtype)
    raise FileNotFoundError(
        f"--model {path} is neither a diffusers folder (no model_index.json) nor a jaxmed "
        "training workdir (config.json + checkpoints/ or export/)")


def restore_run(workdir: str, *, dtype: str = "float32", step: int | None = None,
                base: tuple[StableDiffusion, dict] | None = None
                ) -> tuple[StableDiffusion, dict]:
    """Base model + strategy from config.json, the latest checkpoint's trainable (or EMA)
    tree restored onto one device, adapters folded in: what `Trainer.exported_params` gives,
    without building the data pipeline or the caches. ``step``: that kept checkpoint instead
    of the latest; ``base``: the config's base model (sd, params), already loaded."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        if step is None:
            step = ckpt.latest_step()
        elif int(step) not in ckpt.all_steps():
            raise FileNotFoundError(f"{workdir}/checkpoints holds no step {step} (kept: "
                                    f"{ckpt.all_steps()})")
        if step is None:
            raise FileNotFoundError(
                f"training workdir {workdir} has no export/ and no finished checkpoint; "
                "train further or point --model at a diffusers folder")
        try:
            sd, params = base if base is not None else StableDiffusion.load(
                config.model.path, dtype=dtype, variant=config.model.get("variant") or None,
                allow_pickle=bool(config.model.get("allow_pickle", False)))
            strategy = build_strategy(config.strategy)
            rng = jax.random.PRNGKey(config.seed)
            trainable, frozen = jax.jit(strategy.init)(params, rng)
            tx = make_optimizer(strategy, trainable, config.optim)
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            to_abs = lambda t: jax.tree_util.tree_map(  # noqa: E731
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), t)
            abs_t = to_abs(trainable)
            scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=dev)
            target = TrainState(
                step=scalar, trainable=abs_t, opt_state=to_abs(jax.eval_shape(tx.init, trainable)),
                ema=abs_t if config.train.ema_decay > 0 else None, bad_step=scalar)
            del trainable
            state, _ = ckpt.restore(step, target)
            keep = state.ema if state.ema is not None else state.trainable
            params = jax.device_get(jax.jit(strategy.export)(keep, frozen))
        except Exception as err:
            raise RuntimeError(
                f"could not rebuild the model of training workdir {workdir} from config.json "
                f"and checkpoint {step} ({type(err).__name__}: {err}). Export it to a "
                "diffusers folder (a finished training run writes export/) and pass that "
                "folder as --model.") from err
    finally:
        ckpt.close()
    log.info("restored %s checkpoint %d (strategy %s)", workdir, step, strategy.name)
    return sd, params
