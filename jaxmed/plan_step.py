"""The steps `jaxmed.plan` compiles, built without weights: the model from its
configuration, parameters as `jax.ShapeDtypeStruct`s (``jax.eval_shape`` of the init) placed
by `jaxmed.sharding`'s rules, and the function `jaxmed.train` (or `jaxmed.sample`) jits."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxmed import inspect, sharding, train
from jaxmed.models import tiny, weights
from jaxmed.models.sd import StableDiffusion, resolve
from jaxmed.optim import make_optimizer
from jaxmed.sample import make_sample_fn


class PlanError(ValueError):
    """A plan that cannot be made as asked (bad flag, unknown model); one line for the user."""


# ---------------------------------------------------------------------------------------
# The model, without weights


def model_configs(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(component configs, scheduler config) for ``config.model``, reading no weights."""
    arch, path = config.model.get("arch", "") or "", config.model.path
    if arch:
        return inspect.arch_configs(arch), tiny.SD15_SCHEDULER
    if path.startswith("random:"):
        name, _, res = path[len("random:"):].partition("@")
        return tiny.configs(name, int(res or 128)), tiny.SD15_SCHEDULER
    configs = inspect.folder_configs(path)
    folder = resolve(path)
    sched = tiny.SD15_SCHEDULER
    if os.path.isdir(os.path.join(folder, "scheduler")):
        sched = weights.read_config(os.path.join(folder, "scheduler"), "scheduler_config.json")
    return configs, sched


def abstract_model(config: ml_collections.ConfigDict) -> StableDiffusion:
    configs, sched = model_configs(config)
    return StableDiffusion.from_configs(configs, sched, None, dtype=config.model.dtype,
                                        remat=config.model.remat, path=config.model.path)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------------------
# MIRROR of `jaxmed.train.Trainer.__init__`'s placement, state and jit, without weights.
# Keep in step with train.py until train.py offers this itself (a function returning the
# jitted step and its abstract, sharded arguments for a config and a mesh, which Trainer
# would then use too); swap `abstract_train_step` for it then.


@dataclasses.dataclass
class Step:
    """A jitted function and abstract arguments to lower it with."""

    jitted: Any
    args: tuple
    per_device_batch: int
    accum: int
    replicas: int
    images: int  # images one call processes (the global batch of one optimizer step)
    notes: dict
    what: str = "train"  # or "sample"


def abstract_train_step(config: ml_collections.ConfigDict, sd: StableDiffusion,
                        mesh: jax.sharding.Mesh) -> Step:
    strategy = train.build_strategy(config.strategy)
    boxed = sd.abstract_variables()
    specs = sharding.param_specs(boxed, mesh)
    params = nn.meta.unbox(boxed)
    rng = jax.random.PRNGKey(config.seed)
    abs_t, abs_f = jax.eval_shape(strategy.init, params, rng)
    t_sh = sharding.tree_shardings(abs_t, mesh, specs)
    f_sh = sharding.tree_shardings(abs_f, mesh, specs)
    tx = make_optimizer(strategy, abs_t, config.optim)
    # Trainer runs jax.jit(tx.init) on the placed trainable tree: the compiler's choice of
    # output shardings is the optimizer state's placement, except for leaves made outside
    # the mesh (the counts), which Trainer replicates on it.
    opt_abs = jax.eval_shape(tx.init, abs_t)
    opt_sh = jax.jit(tx.init).lower(_abstract(abs_t, t_sh)).compile().output_shardings
    repl = sharding.replicated(mesh)
    mesh_devices = set(mesh.devices.flat)
    opt_sh = jax.tree_util.tree_map(
        lambda s: s if s.device_set == mesh_devices else repl, opt_sh)
    ema = config.train.ema_decay > 0
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
    state = train.TrainState(step=scalar, trainable=_abstract(abs_t, t_sh),
                             opt_state=_abstract(opt_abs, opt_sh),
                             ema=_abstract(abs_t, t_sh) if ema else None, bad_step=scalar)
    state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
    frozen = _abstract(abs_f, f_sh)

    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    per_device = int(config.train.per_device_batch or strategy.per_device_batch)
    accum = int(config.optim.grad_accum)
    global_batch = per_device * replicas * accum
    batch = {k: jax.ShapeDtypeStruct(s, dt, sharding=sharding.batch_sharding(mesh, len(s)))
             for k, (s, dt) in _train_batch(config, sd, strategy, global_batch).items()}
    step_fn = train.make_train_step(sd, strategy, tx, config)
    jitted = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_sh, repl))
    n_t = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abs_t))
    return Step(jitted, (state, frozen, batch), per_device, accum, replicas, global_batch,
                {"strategy": strategy.name, "trainable_params": int(n_t),
                 "batch": {k: list(v.shape) for k, v in batch.items()}})


def _train_batch(config, sd: StableDiffusion, strategy, n: int) -> dict:
    """Shapes of one optimizer step's batch, by Trainer's cache rules (cached latents when
    the VAE is frozen, cached text context when the text encoder is)."""
    c, trains = config.cache, strategy.trains
    for key in ("latents", "text"):
        if c[key] not in ("auto", "on", "off"):
            raise PlanError(f"cache.{key}={c[key]!r}: choose auto, on or off")
    use_lat = c.latents == "on" or (c.latents == "auto" and "vae" not in trains)
    use_txt = c.text == "on" or (c.text == "auto" and "text_encoder" not in trains)
    res, f = int(config.data.resolution), sd.vae_scale
    tokens = sd.text_encoder.config.max_position_embeddings
    out = {}
    if use_lat:
        lat = (n, res // f, res // f, sd.vae.config.latent_channels)
        out["latent_mean"] = out["latent_logvar"] = (lat, jnp.float32)
    else:
        out["image"] = ((n, res, res, 3), jnp.float32)
    if use_txt:
        out["context"] = ((n, tokens, sd.text_encoder.config.hidden_size), jnp.float32)
    else:
        out["input_ids"] = ((n, tokens), jnp.int32)
    return out


# END MIRROR
# ---------------------------------------------------------------------------------------


def abstract_sample_step(config: ml_collections.ConfigDict, sd: StableDiffusion,
                         mesh: jax.sharding.Mesh, num_steps: int) -> Step:
    """`make_sample_fn`'s jitted loop as `jaxmed.sample` runs it on a mesh: parameters
    replicated, the batch sharded; per-chip batch from ``config.train.per_device_batch``."""
    strategy = train.build_strategy(config.strategy)
    log = config.log
    fn = make_sample_fn(sd, sampler=log.sample_sampler, num_steps=num_steps,
                        guidance_scale=log.guidance_scale, height=config.data.resolution,
                        seed=config.seed, mesh=mesh)
    params = nn.meta.unbox(sd.abstract_variables())
    per_device = int(config.train.per_device_batch or strategy.per_device_batch)
    n = per_device * fn.replicas
    tokens = sd.text_encoder.config.max_position_embeddings
    ids = jax.ShapeDtypeStruct((n, tokens), jnp.int32)
    args = (params, ids, ids, jax.ShapeDtypeStruct((n,), jnp.int32))
    return Step(fn.jitted, args, per_device, 1, fn.replicas, n,
                {"sampler": log.sample_sampler, "steps": num_steps,
                 "guidance_scale": log.guidance_scale}, what="sample")
