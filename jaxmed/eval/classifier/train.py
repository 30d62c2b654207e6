"""The classifier's training loop, `train_classifier`.

AdamW (decoupled weight decay on kernels only), cosine or constant learning rate, optional
class-balanced ``pos_weight``, augmentation by small random translations and brightness /
contrast jitter (no flips unless asked: anatomy is not mirror-symmetric), a fixed batch
shape (batches wrap around the shuffled data, so one compile serves every data size),
best-on-validation by macro AUROC with optional early stopping. Everything is a function of
``config.seed``.

This loop is separate from the diffusion fine-tuning's (`jaxmed.train` with
`jaxmed.optim.make_optimizer`) because its job differs: one small network trained from
scratch or from torchvision weights, BatchNorm statistics carried in the state, a BCE loss
on labels, and model selection on a validation set. Its optimizer is plain optax.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed.eval import metrics as M
from jaxmed.eval.classifier.config import ClassifierConfig, build_model
from jaxmed.eval.classifier.inputs import prepare_images, validate_labels
from jaxmed.eval.classifier.trained import (
    TrainedClassifier,
    _batched,
    _eval_fns,
    _model_key,
    _variables,
)
from jaxmed.eval.classifier.weights import _read_state_dict, load_torchvision_state_dict
from jaxmed.logging_utils import progress as progress_bar


def _augment(key, x, cfg: ClassifierConfig):
    """x: (B, S, S, C) float in [0, 1]."""
    b, s = x.shape[0], x.shape[1]
    k_shift, k_flip, k_bright, k_contrast = jax.random.split(key, 4)
    p = int(round(cfg.translate * s))
    if p > 0:
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
        offs = jax.random.randint(k_shift, (b, 2), 0, 2 * p + 1)
        x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0),
                                                         (s, s, x.shape[3])))(xp, offs)
    if cfg.hflip:
        flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1], x)
    if cfg.contrast > 0:
        c = jax.random.uniform(k_contrast, (b, 1, 1, 1), minval=1 - cfg.contrast,
                               maxval=1 + cfg.contrast)
        mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * c + mean
    if cfg.brightness > 0:
        x = x + jax.random.uniform(k_bright, (b, 1, 1, 1), minval=-cfg.brightness,
                                   maxval=cfg.brightness)
    return jnp.clip(x, 0.0, 1.0)


def _step_key(cfg: ClassifierConfig):
    return (*_model_key(cfg), cfg.weight_decay, cfg.grad_clip, cfg.augment, cfg.translate,
            cfg.brightness, cfg.contrast, cfg.hflip)


def _optimizer(cfg: ClassifierConfig) -> optax.GradientTransformation:
    def decay_mask(params):
        return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)

    # learning rate 1 here; the step multiplies by the scheduled lr (so that one compiled
    # step serves every schedule). AdamW's decay is then lr * wd * p, as in torch.
    tx = optax.adamw(1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
                     mask=decay_mask)
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx


@functools.lru_cache(maxsize=8)
def _train_step_fn(step_key) -> Callable:
    (arch, num_labels, widths, dtype, wd, clip, augment, translate, brightness, contrast,
     hflip) = step_key
    cfg = ClassifierConfig(arch=arch, num_labels=num_labels, widths=widths, dtype=dtype,
                           weight_decay=wd, grad_clip=clip, augment=augment,
                           translate=translate, brightness=brightness, contrast=contrast,
                           hflip=hflip)
    model = build_model(cfg)
    tx = _optimizer(cfg)

    def loss_fn(params, batch_stats, x, y, pos_weight, key):
        out, updates = model.apply(_variables(params, batch_stats), x, train=True,
                                   mutable=["batch_stats"])
        z = out.astype(jnp.float32)
        # BCE with logits and torch's pos_weight: -[pw y log s(z) + (1 - y) log(1 - s(z))]
        loss = pos_weight * y * jax.nn.softplus(-z) + (1.0 - y) * jax.nn.softplus(z)
        return jnp.mean(loss), updates.get("batch_stats", batch_stats)

    def step(state, x_u8, y, pos_weight, lr, key):
        key = jax.random.fold_in(key, state["step"])
        x = x_u8.astype(jnp.float32) / 255.0
        if cfg.augment:
            x = _augment(key, x, cfg)
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], x, y, pos_weight, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
        params = optax.apply_updates(state["params"], updates)
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": new_stats,
                     "opt_state": opt_state}
        return new_state, loss

    return jax.jit(step, donate_argnums=0)


def prng_key(seed: int) -> jax.Array:
    """The classifier's random key: XLA's RngBitGenerator ("rbg"), not threefry.

    Initialising a network draws one random tensor per parameter; with threefry each is an
    unrolled hash that XLA:CPU is slow to compile, so the init compiles much faster with rbg.
    rbg streams are reproducible on one backend, not bit-identical across CPU / GPU / TPU.
    """
    return jax.random.key(int(seed), impl="rbg")


@functools.lru_cache(maxsize=8)
def _init_fn(model_key) -> Callable:
    """The jitted initialiser of a network, one per architecture: a study initialises a
    classifier per regime and model, and a fresh jit of ``model.init`` recompiles each time."""
    arch, num_labels, widths, dtype = model_key
    model = build_model(ClassifierConfig(arch=arch, num_labels=num_labels, widths=widths,
                                         dtype=dtype))
    return jax.jit(functools.partial(model.init, train=False))


def init_variables(config: ClassifierConfig, key=None) -> dict:
    """Randomly initialised (or torchvision-loaded, per ``config.init_from``) variables."""
    key = prng_key(config.seed) if key is None else key
    x = jnp.zeros((1, config.image_size, config.image_size, 1), jnp.float32)
    v = _init_fn(_model_key(config))(key, x)
    v = nn.meta.unbox(v)
    v = {k: v[k] for k in v}
    if config.init_from:
        v = load_torchvision_state_dict(v, _read_state_dict(config.init_from))
    return v


def _lr_at(config: ClassifierConfig, step: int, total: int) -> float:
    lr = config.lr
    if config.warmup_steps and step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return lr
    t = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _pos_weight(config: ClassifierConfig, y: np.ndarray) -> np.ndarray:
    if config.pos_weight == "none":
        return np.ones(y.shape[1], np.float32)
    n_pos = y.sum(axis=0)
    n_neg = y.shape[0] - n_pos
    pw = np.where(n_pos > 0, n_neg / np.maximum(n_pos, 1), 1.0)
    return np.clip(pw, 1.0 / config.pos_weight_max, config.pos_weight_max).astype(np.float32)


def _index_stream(n: int, batch_size: int, rng: np.random.Generator) -> Iterable[np.ndarray]:
    """Fixed-size batches over successive shuffles of range(n) (wrapping across epochs)."""
    buf = np.empty(0, np.int64)
    while True:
        while buf.size < batch_size:
            buf = np.concatenate([buf, rng.permutation(n)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def train_classifier(config: ClassifierConfig, train_images, train_labels, val_images=None,
                     val_labels=None, progress: bool = True, *,
                     value_range: str = "auto") -> TrainedClassifier:
    """Train a multi-label classifier; see the module docstring for what it does.

    With a validation set the returned weights are those of the evaluation with the best
    val macro AUROC (the val BCE decides when no val label has both classes).
    """
    x = prepare_images(train_images, config.image_size, value_range, name="train_images")
    y = validate_labels(train_labels, x.shape[0], config.num_labels, name="train_labels")
    has_val = val_images is not None or val_labels is not None
    if has_val:
        if val_images is None or val_labels is None:
            raise ValueError("give both val_images and val_labels, or neither")
        xv = prepare_images(val_images, config.image_size, value_range, name="val_images")
        yv = validate_labels(val_labels, xv.shape[0], config.num_labels, name="val_labels")

    n = x.shape[0]
    bs = int(config.batch_size)
    steps_per_epoch = max(1, math.ceil(n / bs))
    total = int(config.steps) if config.steps is not None else int(config.epochs) * steps_per_epoch
    eval_every = int(config.eval_every) or steps_per_epoch

    key = prng_key(config.seed)
    init_key, aug_key = jax.random.split(key)
    variables = init_variables(config, init_key)
    tx = _optimizer(config)
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "batch_stats": variables.get("batch_stats", {}),
             "opt_state": tx.init(variables["params"])}
    step_fn = _train_step_fn(_step_key(config))
    logits_fn, _ = _eval_fns(_model_key(config))
    pw = jnp.asarray(_pos_weight(config, y))
    batches = _index_stream(n, bs, np.random.default_rng(config.seed))

    history: list[dict] = []
    best = None  # (score, step, params, batch_stats)
    since_best = 0
    losses: list[jax.Array] = []
    bar = progress_bar(total=total, desc=f"train {config.arch}", enabled=progress)
    try:
        for it in range(total):
            idx = next(batches)
            lr = jnp.float32(_lr_at(config, it, total))
            state, loss = step_fn(state, x[idx], y[idx], pw, lr, aug_key)
            losses.append(loss)
            bar.update(1)
            last = it == total - 1
            if (it + 1) % eval_every == 0 or last:
                row = {"step": it + 1, "train_loss": float(np.mean(jax.device_get(losses)))}
                losses = []
                if has_val:
                    v = _variables(state["params"], state["batch_stats"])
                    zv = _batched(logits_fn, v, xv, config.eval_batch_size).astype(np.float64)
                    pv = 1.0 / (1.0 + np.exp(-zv))
                    macro, _ = M.macro_auroc(yv, pv)
                    val_loss = float(np.mean(np.logaddexp(0, -zv) * yv
                                             + np.logaddexp(0, zv) * (1 - yv)))
                    row.update(val_macro_auroc=macro, val_loss=val_loss)
                    score = macro if np.isfinite(macro) else -val_loss
                    if best is None or score > best[0]:
                        best = (score, it + 1, jax.device_get(state["params"]),
                                jax.device_get(state["batch_stats"]))
                        since_best = 0
                    else:
                        since_best += 1
                history.append(row)
                bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k != "step"})
                if has_val and config.patience and since_best >= config.patience:
                    break
    finally:
        bar.close()

    if best is not None:
        params, stats, best_step = best[2], best[3], best[1]
    else:
        params = jax.device_get(state["params"])
        stats = jax.device_get(state["batch_stats"])
        best_step = None
    return TrainedClassifier(config, params, stats or {}, history, best_step)
