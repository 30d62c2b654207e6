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

from jaxmed import counts, sharding, train
from jaxmed.checkpoint import TrainState
from jaxmed.diffusion.sampling import make_sample_fn
from jaxmed.models import tiny, weights
from jaxmed.models.sd import StableDiffusion, resolve
from jaxmed.optim import make_optimizer
from jaxmed.strategies import build_strategy


class PlanError(ValueError):
    """A plan that cannot be made as asked (bad flag, unknown model); one line for the user."""


# ---------------------------------------------------------------------------------------
# The model, without weights


def model_configs(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(component configs, scheduler config) for ``config.model``, reading no weights."""
    arch, path = config.model.get("arch", "") or "", config.model.path
    if arch:
        return counts.arch_configs(arch), tiny.SD15_SCHEDULER
    if path.startswith("random:"):
        name, _, res = path[len("random:"):].partition("@")
        return tiny.configs(name, int(res or 128)), tiny.SD15_SCHEDULER
    configs = counts.folder_configs(path)
    folder = resolve(path)
    sched = tiny.SD15_SCHEDULER
    if os.path.isdir(os.path.join(folder, "scheduler")):
        sched = weights.read_config(os.path.join(folder, "scheduler"), "scheduler_config.json")
    return configs, sched


def abstract_model(config: ml_collections.ConfigDict) -> StableDiffusion:
    configs, sched = model_configs(config)
    return StableDiffusion.from_configs(configs, sched, None, dtype=config.model.dtype,
                                        remat=config.model.remat,
                                        attention=config.model.get("attention", "auto"),
                                        path=config.model.path)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------------------
# The steps


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
    mesh: jax.sharding.Mesh
    what: str = "train"  # or "sample"


def abstract_train_step(config: ml_collections.ConfigDict, sd: StableDiffusion,
                        mesh: jax.sharding.Mesh) -> Step:
    strategy = build_strategy(config.strategy)
    boxed = sd.abstract_variables()
    specs = sharding.param_specs(boxed, mesh)
    params = nn.meta.unbox(boxed)
    rng = jax.random.PRNGKey(config.seed)
    abs_t, abs_f = jax.eval_shape(strategy.init, params, rng)
    t_sh = sharding.tree_shardings(abs_t, mesh, specs)
    f_sh = sharding.tree_shardings(abs_f, mesh, specs)
    tx = make_optimizer(strategy, abs_t, config.optim)
    trainable = _abstract(abs_t, t_sh)
    state_sh = train.state_shardings(tx, trainable, mesh, config.train.ema_decay > 0)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=state_sh.step)
    state = TrainState(step=scalar, trainable=trainable,
                       opt_state=_abstract(jax.eval_shape(tx.init, abs_t), state_sh.opt_state),
                       ema=trainable if state_sh.ema is not None else None, bad_step=scalar)
    frozen = _abstract(abs_f, f_sh)

    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    per_device = int(config.train.per_device_batch or strategy.per_device_batch)
    accum = int(config.optim.grad_accum)
    global_batch = per_device * replicas * accum
    batch = {k: jax.ShapeDtypeStruct(s, dt, sharding=sharding.batch_sharding(mesh, len(s)))
             for k, (s, dt) in _train_batch(config, sd, strategy, global_batch).items()}
    jitted = train.jit_train_step(sd, strategy, tx, config, state_sh, mesh)
    n_t = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abs_t))
    return Step(jitted, (state, frozen, batch), per_device, accum, replicas, global_batch,
                {"strategy": strategy.name, "trainable_params": int(n_t),
                 "batch": {k: list(v.shape) for k, v in batch.items()}}, mesh)


def _train_batch(config, sd: StableDiffusion, strategy, n: int) -> dict:
    """Shapes of one optimizer step's batch, by Trainer's cache rules (cached latents when
    the VAE is frozen, cached text context when the text encoder is)."""
    try:
        use_lat, use_txt = train.cache_use(config, strategy)
    except ValueError as e:
        raise PlanError(str(e)) from None
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


# ---------------------------------------------------------------------------------------


def abstract_sample_step(config: ml_collections.ConfigDict, sd: StableDiffusion,
                         mesh: jax.sharding.Mesh, num_steps: int) -> Step:
    """`make_sample_fn`'s jitted loop as `jaxmed.sample` runs it on a mesh: parameters
    replicated, the batch sharded; per-chip batch from ``config.train.per_device_batch``."""
    strategy = build_strategy(config.strategy)
    log = config.log
    fn = make_sample_fn(sd, sampler=log.sample_sampler, num_steps=num_steps,
                        guidance_scale=log.guidance_scale, height=config.data.resolution,
                        seed=config.seed, mesh=mesh)
    params = nn.meta.unbox(sd.abstract_variables())
    per_device = int(config.train.per_device_batch or strategy.per_device_batch)
    n = per_device * fn.replicas
    tokens = sd.text_encoder.config.max_position_embeddings
    ids = jax.ShapeDtypeStruct((n, tokens), jnp.int32)
    args = (params, ids, ids, jax.ShapeDtypeStruct((n,), jnp.int32),
            jax.ShapeDtypeStruct((n, *fn.latent_shape), jnp.float32))
    return Step(fn.jitted, args, per_device, 1, fn.replicas, n,
                {"sampler": log.sample_sampler, "steps": num_steps,
                 "guidance_scale": log.guidance_scale}, mesh, what="sample")
