r"""The one training loop: any strategy, any model folder, 1 CPU to a TPU pod.

    python -m jaxmed.train --config configs/finetune.py:lora --workdir /tmp/lora \
        [--config.model.path=DIR] [--config.mesh.fsdp=8] [--config.train.max_steps=1000]

What happens: the model folder is read into float32 params; the strategy splits them into
a trainable tree (the only thing differentiated and with optimizer state) and a frozen tree;
both are placed on a ('data', 'fsdp', 'tensor') mesh by logical axis names; a jitted train
step (donated state, gradient accumulation by lax.scan, global-norm clipping, AdamW per
component learning rate, optional EMA, bf16 compute) runs over batches prefetched onto the
devices. Checkpoints (orbax) hold the trainable state and the data position, so a killed
run resumes exactly; a NaN / inf loss stops the run naming the step and keeps the last
good checkpoint. At the end the model is exported in diffusers layout (and LoRA / DoRA
adapters in peft format). The workdir holds config.json, metrics.jsonl, TensorBoard event
files, sample grids and export/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxmed import sharding, storage
from jaxmed.checkpoint import Checkpointer, TrainState, abstract_like
from jaxmed.cli import (
    enable_compilation_cache,
    main_guard,
    parse,
    setup_logging,
    start_distributed,
)
from jaxmed.data import prefetch_to_device
from jaxmed.diffusion.sampling import generate, make_sample_fn
from jaxmed.errors import UserError
from jaxmed.files import atomic_write, save_image
from jaxmed.images import grid
from jaxmed.logging_utils import MetricWriter, Throughput, progress
from jaxmed.losses import OBJECTIVES, autoencoder_loss, diffusion_loss
from jaxmed.models import weights
from jaxmed.models.sd import StableDiffusion
from jaxmed.optim import Optimizer, make_optimizer
from jaxmed.strategies import build_strategy, count
from jaxmed.strategies.base import Strategy
from jaxmed.train_data import (  # noqa: F401 - cache_use: public here
    MODEL_INPUTS,
    TrainInputs,
    cache_use,
    read_records,
)

log = logging.getLogger("jaxmed.train")


# ---------------------------------------------------------------------------------------
# The train step


def make_train_step(sd: StableDiffusion, strategy: Strategy, tx: Optimizer,
                    config: ml_collections.ConfigDict, platform: str | None = None):
    """``step(state, frozen, batch) -> (state, metrics)``; batch leading dim = the global
    batch of one optimizer step (micro-batch x grad_accum). ``platform``: the platform the
    step is compiled for (its mesh's devices'; default: jax's default backend)."""
    platform = platform or jax.default_backend()
    accum = int(config.optim.grad_accum)
    prediction_type = config.model.prediction_type or sd.prediction_type
    base_rng = jax.random.PRNGKey(config.seed)
    ema_decay = float(config.train.ema_decay)

    objective = config.train.objective
    if objective not in OBJECTIVES:
        raise ValueError(f"train.objective={objective!r}: choose one of {OBJECTIVES}")
    if objective == "autoencoder" and set(strategy.trains) != {"vae"}:
        raise ValueError("train.objective=autoencoder trains the VAE alone: use the 'vae' "
                         f"strategy, not {strategy.name!r}")

    def loss_fn(trainable, frozen, micro, rng):
        if objective == "autoencoder":
            return autoencoder_loss(sd, strategy, trainable, frozen, micro, rng,
                                    kl_weight=config.train.kl_weight)
        return diffusion_loss(sd, strategy, trainable, frozen, micro, rng,
                              prediction_type=prediction_type,
                              vae_loss_weight=config.train.vae_loss_weight,
                              noise_offset=config.train.noise_offset)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen: Any, batch: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(base_rng, state.step)
        # (G, ...) -> (G/accum, accum, ...) -> (accum, G/accum, ...): each device's shard of
        # the batch axis splits into whole micro-batch rows, so no data moves.
        micro = {k: jnp.swapaxes(v.reshape((-1, accum) + v.shape[1:]), 0, 1)
                 for k, v in batch.items() if hasattr(v, "shape") and k not in ("index",)}

        def body(carry, xs):
            g_acc, l_acc, aux_acc = carry
            i, mb = xs
            (loss, aux), g = grad_fn(state.trainable, frozen, mb, jax.random.fold_in(rng, i))
            g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
            aux_acc = jax.tree_util.tree_map(jnp.add, aux_acc, aux)
            return (g_acc, l_acc + loss, aux_acc), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
        aux0 = jax.tree_util.tree_map(
            jnp.zeros_like, jax.eval_shape(loss_fn, state.trainable, frozen,
                                           jax.tree_util.tree_map(lambda v: v[0], micro),
                                           rng)[1])
        # XLA:CPU runs convolution weight gradients inside a while loop many times slower
        # than unrolled (a length-1 scan stays a loop even with unroll=True; figures in
        # bench/bench_train.py), so on CPU the accumulation is a Python loop (same
        # arithmetic); on accelerators it stays a lax.scan (one compiled body: less compile
        # time and memory).
        carry = (zeros, jnp.zeros(()), aux0)
        if platform == "cpu":
            for i in range(accum):
                carry, _ = body(carry, (jnp.asarray(i, jnp.int32),
                                        jax.tree_util.tree_map(lambda v, i=i: v[i], micro)))
        else:
            carry, _ = jax.lax.scan(body, carry, (jnp.arange(accum, dtype=jnp.int32), micro))
        grads, loss, aux = carry
        grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
        loss = loss / accum
        aux = {k: v / accum for k, v in aux.items()}
        gnorm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        # A non-finite step changes nothing but the step counter (and bad_step): params and
        # optimizer state stay the last good ones (tx.apply guards them), the EMA too.
        trainable, opt_state = tx.apply(grads, state.opt_state, state.trainable, ok)
        ema = state.ema
        if ema_decay > 0:
            # Warm-up (1 + t) / (10 + t): early on the EMA follows the weights instead of
            # staying near the random or base start.
            t = state.step.astype(jnp.float32)
            d = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
            ema = jax.tree_util.tree_map(lambda e, p: jnp.where(ok, d * e + (1 - d) * p, e),
                                         state.ema, trainable)
        new_state = TrainState(
            step=state.step + 1,
            trainable=trainable,
            opt_state=opt_state,
            ema=ema,
            bad_step=jnp.where((state.bad_step < 0) & ~ok, state.step, state.bad_step),
        )
        metrics = {"loss": loss, "grad_norm": gnorm, **aux}
        return new_state, metrics

    return step


# ---------------------------------------------------------------------------------------
# Placement


def opt_state_shardings(tx: Optimizer, trainable: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for ``tx.init(trainable)`` (``trainable``: arrays or ShapeDtypeStructs
    with shardings): a leaf that mirrors a trainable leaf (Adam's moments: the same path
    suffix and shape) is sharded like it, so fsdp shards the moments with the weights; the
    rest (counts) is replicated on the mesh."""
    by_path = {path: (leaf.shape, leaf.sharding)
               for path, leaf in jax.tree_util.tree_leaves_with_path(trainable)}
    repl = sharding.replicated(mesh)

    def pick(path, leaf):
        for i in range(len(path)):
            hit = by_path.get(tuple(path[i:]))
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return repl

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, trainable))


def state_shardings(tx: Optimizer, trainable: Any, mesh: jax.sharding.Mesh,
                    ema: bool) -> TrainState:
    """The TrainState's shardings: weights (and EMA) as placed, moments like their weights,
    counters replicated."""
    repl = sharding.replicated(mesh)
    t_sh = jax.tree_util.tree_map(lambda x: x.sharding, trainable)
    return TrainState(step=repl, trainable=t_sh,
                      opt_state=opt_state_shardings(tx, trainable, mesh),
                      ema=t_sh if ema else None, bad_step=repl)


def jit_train_step(sd: StableDiffusion, strategy: Strategy, tx: Optimizer,
                   config: ml_collections.ConfigDict, state_sh: TrainState,
                   mesh: jax.sharding.Mesh):
    """The step `jaxmed.train` runs (and `jaxmed.plan` compiles): state donated, state and
    metrics placed on ``mesh``; compiled for the platform of the mesh's devices."""
    platform = next(iter(mesh.devices.flat)).platform
    step_fn = make_train_step(sd, strategy, tx, config, platform=platform)
    effort = float(config.train.get("compile_effort", 0.0))
    if not -1.0 <= effort <= 1.0:
        raise ValueError(f"train.compile_effort={effort}: must lie in [-1, 1]")
    # Only a non-default effort is passed, so the default keeps XLA's own compile options
    # (and their persistent-cache keys).
    options = {"exec_time_optimization_effort": effort} if effort else None
    return jax.jit(step_fn, donate_argnums=(0,),
                   out_shardings=(state_sh, sharding.replicated(mesh)),
                   compiler_options=options)


class Trainer:
    """Everything a run needs, built from a config; `run()` trains to the end."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
                 sd: StableDiffusion | None = None, params: dict | None = None,
                 records=None, devices=None):
        self.config = config
        self.workdir = storage.absolute(workdir)  # a gs:// URL stays one (jaxmed.storage)
        storage.makedirs(self.workdir)
        self.is_main = jax.process_index() == 0
        self.strategy = build_strategy(config.strategy)
        # The data first: a wrong path fails before a large model is read. The phantom and
        # the caches are written image by image: host-local beside a URL workdir.
        local = storage.local_twin(self.workdir)
        if records is None:
            records = read_records(config, local, self.is_main)
        if sd is None:
            sd, params = StableDiffusion.load(
                config.model.path, dtype=config.model.dtype, remat=config.model.remat,
                attention=config.model.get("attention", "auto"),
                variant=config.model.variant or None, allow_pickle=config.model.allow_pickle)
        self.sd, host_params = sd, params
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                                       devices=devices)
        specs = sharding.param_specs(sd.abstract_variables(), self.mesh)
        params = sharding.put(host_params, sharding.tree_shardings(host_params, self.mesh, specs))
        rng = jax.random.PRNGKey(config.seed)
        abs_t, abs_f = jax.eval_shape(self.strategy.init, params, rng)
        self.t_shardings = sharding.tree_shardings(abs_t, self.mesh, specs)
        self.f_shardings = sharding.tree_shardings(abs_f, self.mesh, specs)
        trainable, self.frozen = jax.jit(
            self.strategy.init, out_shardings=(self.t_shardings, self.f_shardings))(params, rng)
        del params
        self.n_trainable = count(trainable)

        # batch geometry
        replicas = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.per_device_batch = config.train.per_device_batch or self.strategy.per_device_batch
        self.accum = int(config.optim.grad_accum)
        self.micro_batch = self.per_device_batch * replicas
        self.global_batch = self.micro_batch * self.accum
        self.inputs = TrainInputs(config, local, sd, self.strategy, host_params,
                                  self.global_batch, records=records, is_main=self.is_main)
        self.records = self.inputs.records
        self.latent_cache, self.text_cache = self.inputs.latent_cache, self.inputs.text_cache
        self.steps_per_epoch = len(self.records) // self.global_batch
        if self.steps_per_epoch < 1:
            raise UserError(
                f"{len(self.records)} training images are fewer than one optimizer step's "
                f"batch of {self.global_batch} (per-device {self.per_device_batch} x "
                f"{replicas} replicas x grad_accum {self.accum}); lower train.per_device_batch "
                "or optim.grad_accum, or add data")
        t = config.train
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * self.steps_per_epoch
        c = config.checkpoint
        self.ckpt_every = c.every_steps or max(1, c.every_epochs * self.steps_per_epoch)

        self.tx = make_optimizer(self.strategy, trainable, config.optim)
        ema_on = config.train.ema_decay > 0
        self.state_shardings = state_shardings(self.tx, trainable, self.mesh, ema_on)
        opt_state = jax.jit(self.tx.init,
                            out_shardings=self.state_shardings.opt_state)(trainable)
        # A copy: the EMA must not share (donated) buffers with the weights.
        ema = jax.tree_util.tree_map(jnp.copy, trainable) if ema_on else None
        self.state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                                opt_state=opt_state, ema=ema,
                                bad_step=jnp.full((), -1, jnp.int32))
        self.state = jax.device_put(self.state, self.state_shardings)
        self.train_step = jit_train_step(self.sd, self.strategy, self.tx, config,
                                         self.state_shardings, self.mesh)
        self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                         keep=c.keep, async_save=c.async_save)
        self.data_position = {"epoch": 0, "step": 0}

    def make_batches(self, num_steps: int | None = None):
        """The training batches from the run's data position (`TrainInputs.batches`)."""
        return self.inputs.batches(self.data_position, num_steps)

    # -- resume
    def maybe_restore(self) -> int:
        step = self.checkpointer.latest_step()
        if step is None:
            return 0
        self.state, data_state = self.checkpointer.restore(step, abstract_like(self.state))
        self.data_position = {"epoch": int(data_state["epoch"]), "step": int(data_state["step"])}
        log.info("resumed from %s at step %d (epoch %d, batch %d)",
                 self.checkpointer.directory, step, self.data_position["epoch"],
                 self.data_position["step"])
        return step

    def exported_params(self) -> dict:
        """Plain params of the current (EMA if kept) trainable state, on the host. A global
        computation: with several processes every one must call it (each gets them all)."""
        trainable = self.state.ema if self.state.ema is not None else self.state.trainable
        merged = jax.jit(self.strategy.export)(trainable, self.frozen)
        return sharding.to_host(merged)

    # -- the loop
    def run(self) -> dict:
        """Train to ``total_steps`` (resuming if a checkpoint exists), export, summarise."""
        start = self.maybe_restore()
        self._banner(start)
        # Outside the run's mesh context: the latent cache encodes what the run reads on
        # this process's own devices.
        batches = self.make_batches(self.total_steps - start)
        # Every jitted function first called inside (the step, sampling, export) is traced
        # with the activations' logical sharding constraints in force.
        with sharding.activation_sharding(self.mesh):
            return self._run(start, batches)

    def _run(self, start: int, batches) -> dict:
        cfg = self.config
        writer = MetricWriter(self.workdir, tensorboard=cfg.log.tensorboard and self.is_main,
                              enabled=self.is_main)
        if self.is_main:
            atomic_write(os.path.join(self.workdir, "config.json"),
                         json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str))
        start_epoch, start_pos = self.data_position["epoch"], self.data_position["step"]
        self._throughput = tp = Throughput(self.global_batch, start)
        pending = None  # metrics of the previous step, read one step late (keeps dispatch async)
        last_saved = start
        bar = progress(total=self.total_steps, initial=start, desc=f"train {self.strategy.name}",
                       enabled=cfg.log.progress and self.is_main)
        step = start
        try:
            it = prefetch_to_device(self._numeric(batches), size=2,
                                    sharding=self._batch_sharding_fn())
            t_last = time.perf_counter()
            for step in range(start, self.total_steps):
                batch = next(it)
                self.state, metrics = self.train_step(self.state, self.frozen, batch)
                if pending is not None:
                    self._report(*pending, writer, bar)
                now = time.perf_counter()
                img_s = self.global_batch / max(now - t_last, 1e-9)
                t_last = now
                pending = (step + 1, metrics, img_s)
                done = step + 1
                # One batch per optimizer step; the iterator itself runs ahead (prefetch).
                self.data_position = {**batches.state_dict(), "epoch": start_epoch + (
                    start_pos + done - start) // batches.steps_per_epoch, "step": (
                    start_pos + done - start) % batches.steps_per_epoch}
                if done % self.ckpt_every == 0 or done == self.total_steps:
                    self._report(*pending, writer, bar)
                    pending = None
                    self._check_finite()
                    self.checkpointer.save(done, self.state, self.data_position)
                    last_saved = done
                    if self._sample_due(done):
                        self.sample_grid(done)
                elif self._sample_due(done):
                    self.sample_grid(done)
                bar.update(1)
            if pending is not None:
                self._report(*pending, writer, bar)
            self._check_finite()
        finally:
            bar.close()
            batches.close()
            self.checkpointer.wait()
            writer.close()
        speed = tp.summary(self.total_steps)
        # Every process joins the export's global computations; process 0 alone writes.
        export = self.export()
        self.checkpointer.close()
        skipped = int(batches.num_skipped)
        if jax.process_count() > 1:  # each process counts the skips of its own share
            skipped = int(multihost_utils.process_allgather(
                np.asarray([skipped], np.int64), tiled=True).sum())
        summary = {
            "strategy": self.strategy.name, "steps": int(self.total_steps),
            "resumed_from": int(start), "trainable_params": int(self.n_trainable),
            **speed, "final_loss": self.last_loss, "export": export, "last_checkpoint": last_saved,
            "skipped_images": skipped,
        }
        if self.is_main:
            atomic_write(os.path.join(self.workdir, "summary.json"),
                         json.dumps(summary, indent=2))
            print(f"[jaxmed.train] {self.strategy.name}: {summary['steps'] - start} steps, "
                  f"{tp.line(self.total_steps)}; final loss {self.last_loss:.4f}, "
                  f"{self.n_trainable:,} trainable params, export {export}", flush=True)
        return summary

    last_loss = float("nan")

    def _numeric(self, batches) -> Iterator[dict]:
        return self.inputs.numeric(batches)

    def _batch_sharding_fn(self):
        return {k: sharding.batch_sharding(self.mesh, nd) for k, nd in MODEL_INPUTS.items()}

    def _report(self, step: int, metrics: Mapping, img_s: float, writer, bar) -> None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self._throughput.step_read(step)
        self.last_loss = m["loss"]
        if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
            self._check_finite()
        bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{img_s:.1f}")
        if step % max(1, self.config.log.every_steps) == 0 or step == self.total_steps:
            writer.write(step, {**m, "images_per_second": img_s})

    def _check_finite(self) -> None:
        bad = int(jax.device_get(self.state.bad_step))
        if bad >= 0:
            last = self.checkpointer.latest_step()
            kept = f"step {last}" if last is not None else "none (none saved yet)"
            raise FloatingPointError(
                f"training stopped: the loss or gradient became NaN/inf at step {bad + 1} "
                f"(strategy {self.strategy.name}). The update was not applied; the last good "
                f"checkpoint is {kept} in {self.checkpointer.directory}. Lower the learning "
                "rate, use float32 compute, or check the data for corrupt images.")

    def _sample_due(self, step: int) -> bool:
        every = self.config.log.sample_every_steps
        if every < 0:
            return False
        if every == 0:
            return step % self.ckpt_every == 0 or step == self.total_steps
        return step % every == 0

    def sample_grid(self, step: int) -> str | None:
        """Sample the validation prompts with the current weights; write a PNG grid."""
        cfg = self.config.log
        if not hasattr(self, "_sample_fn"):
            self._sample_fn = make_sample_fn(
                self.sd, sampler=cfg.sample_sampler, num_steps=cfg.sample_steps,
                guidance_scale=cfg.guidance_scale, height=self.config.data.resolution,
                seed=self.config.seed)
        params = jax.jit(self.strategy.export)(
            self.state.ema if self.state.ema is not None else self.state.trainable, self.frozen)
        prompts = list(cfg.sample_prompts)
        if jax.process_count() > 1:
            # The sampler is not laid out over a mesh spanning processes: gather the weights
            # (every process joins) and let process 0 sample alone, its activations laid
            # out over a mesh of its own devices (not the run's global one).
            params = sharding.to_host(params)
            if not self.is_main:
                return None
            local = sharding.make_mesh(-1, 1, 1, devices=jax.local_devices())
            # Set even on a one-device local mesh: it must replace the run's global mesh
            # context (activation_sharding would enter nothing there).
            with jax.set_mesh(local), sharding.axis_rules():
                images = generate(self.sd, params, prompts, fn=self._sample_fn)
        else:
            images = generate(self.sd, params, prompts, fn=self._sample_fn)
        if not self.is_main:
            return None
        return save_image(grid(images, prompts),
                          os.path.join(self.workdir, "samples", f"step_{step:07d}.png"))

    def export(self) -> str:
        """diffusers folder (+ peft adapter) of the trained model under workdir/export.
        Every process must call it (the weights are gathered from all); process 0 writes."""
        out = os.path.join(self.workdir, "export")
        if self.config.export.diffusers:
            params = self.exported_params()
            if self.is_main:
                with storage.staged_dir(out) as folder:  # a local folder, uploaded to a URL
                    weights.save_pipeline(folder, self.sd.configs, params,
                                          self.sd.scheduler_config, self.sd.tokenizer)
            del params
        if self.config.export.adapters and hasattr(self.strategy, "save_peft"):
            trainable = self.state.ema if self.state.ema is not None else self.state.trainable
            trainable = sharding.to_host(trainable)
            if self.is_main:
                with storage.staged_dir(os.path.join(out, "adapter")) as folder:
                    self.strategy.save_peft(trainable, folder, base_model=self.sd.path)
        if jax.process_count() > 1:  # the export is complete before any process goes on
            multihost_utils.sync_global_devices("jaxmed.train export written")
        return out

    def _banner(self, start: int) -> None:
        if not self.is_main:
            return
        m = self.mesh.shape
        print(f"[jaxmed.train] strategy {self.strategy.name} ({self.strategy.description}); "
              f"{self.n_trainable:,} trainable params; mesh data={m['data']} fsdp={m['fsdp']} "
              f"tensor={m['tensor']} on {jax.device_count()} {jax.devices()[0].platform} "
              f"device(s); batch {self.global_batch} = {self.per_device_batch}/device x "
              f"{m['data'] * m['fsdp']} x accum {self.accum}; {len(self.records)} images, "
              f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps"
              + (f"; resuming at step {start}" if start else ""), flush=True)


def train(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict:
    return Trainer(config, workdir, **kwargs).run()


def main(argv=None) -> int:
    return main_guard(_main, argv)


def _main(argv: list[str]) -> int:
    setup_logging()
    config, args = parse(argv, "python -m jaxmed.train", __doc__.split("\n\n")[0])
    storage.require_local(config.cache.dir, "--config.cache.dir")  # before any loading
    enable_compilation_cache()  # first: it tunes malloc before jax starts its backend
    start_distributed()  # $JAXMED_DISTRIBUTED=1: one of several processes
    train(config, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
