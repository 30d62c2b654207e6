"""The fine-tuning optimizer: global-norm clipping, then AdamW per component (its own
learning rate and optional warm-up), as in the study's diffusers scripts.

`make_optimizer` returns an `Optimizer`: optax's ``init`` / ``update`` (state and results of
``optax.chain(optax.clip_by_global_norm, optax.adamw)`` per component) plus ``apply``, the
whole step ``(grads, state, params, ok) -> (params, state)`` that the train step calls. A
step with ``ok`` False (a non-finite loss or gradient) leaves params and state as they were.
Compiled for CPU with float32 params, ``apply`` updates each leaf in place with one C++ pass
(kernels.cpu_adamw); for any other platform or dtype it is optax's update followed by
``optax.apply_updates`` (kernels.dispatch.adamw chooses, by the platform compiled for).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxmed.kernels import cpu_adamw, dispatch
from jaxmed.strategies.base import Strategy


class Optimizer(NamedTuple):
    """optax-compatible ``init`` / ``update``, plus ``apply(grads, state, params, ok) ->
    (params, state)``: update and apply in one, unchanged where ``ok`` is False."""

    init: optax.TransformInitFn
    update: optax.TransformUpdateExtraArgsFn
    apply: Callable[..., tuple[Any, Any]]


def scale_by_adam_guarded(b1: float, b2: float, eps: float
                          ) -> optax.GradientTransformationExtraArgs:
    """optax.scale_by_adam (same arithmetic, same state) whose update takes the extra
    argument ``ok``: when it is False the count and moments stay as they were.

    Guarding here rather than selecting old-or-new over the whole state afterwards lets the
    moments be updated in place and then read by the parameter update
    (optimization_barrier: otherwise XLA recomputes them inside the parameter update from
    the old moments, which it must first copy)."""
    init = optax.scale_by_adam(b1=b1, b2=b2, eps=eps).init

    def update(updates, state, params=None, *, ok=True, **extra_args):
        del params, extra_args
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)

        def keep(new, old):
            return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)

        mu, nu, count = keep(mu, state.mu), keep(nu, state.nu), keep(count, state.count)
        mu, nu = jax.lax.optimization_barrier((mu, nu))
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        updates = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init, update)


def clip_factor(grads: Any, max_norm: float) -> jax.Array:
    """The scalar that clips ``grads`` to global norm ``max_norm`` (optax's rule)."""
    g_norm = optax.tree.norm(grads)
    return jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm (same state, same result to float32 rounding) with the
    clipping as one scalar factor per step: XLA then folds ``g * factor`` into the moment
    updates, where optax's per-element ``g / norm`` (a divide, which XLA will not duplicate
    into the two consumers) is written out as a clipped copy of every gradient first:
    one pass over the gradients less."""

    def update(updates, state, params=None):
        del params
        factor = clip_factor(updates, max_norm)
        return jax.tree_util.tree_map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(strategy: Strategy, trainable: Any, cfg: ml_collections.ConfigDict,
                   lrs: Mapping[str, float] | None = None) -> Optimizer:
    """AdamW per component (its own constant lr, optional warmup), after global-norm
    clipping over every trainable leaf (or, with clip_adapters=False as in the authors'
    code, over the non-adapter leaves only)."""
    lrs = dict(lrs or strategy.learning_rates())
    labels = strategy.lr_labels(trainable)
    used = set(jax.tree_util.tree_leaves(labels))
    missing = used - set(lrs)
    if missing:
        raise ValueError(f"strategy {strategy.name!r} trains {sorted(missing)} but has no "
                         f"learning rate for it (have {lrs})")

    def learning_rate(lr: float) -> optax.GradientTransformation:
        if not cfg.warmup_steps:
            return optax.scale_by_learning_rate(lr)
        return optax.scale_by_learning_rate(optax.join_schedules(
            [optax.linear_schedule(0.0, lr, cfg.warmup_steps), optax.constant_schedule(lr)],
            [cfg.warmup_steps]))

    # optax.adamw's chain, with the non-finite-step guard inside the moment update.
    lr_txs = {c: learning_rate(lrs[c]) for c in used}
    tx = optax.multi_transform(
        {c: optax.chain(scale_by_adam_guarded(cfg.b1, cfg.b2, cfg.eps),
                        optax.add_decayed_weights(cfg.weight_decay), lr_txs[c])
         for c in used}, labels)
    clipped = None  # which leaves the clipping covers (None: no clipping stage)
    if cfg.clip_norm and cfg.clip_norm > 0:
        clipped = jax.tree_util.tree_map(lambda _: True, trainable)
        clip = clip_by_global_norm(cfg.clip_norm)
        if not cfg.clip_adapters:
            clipped = jax.tree_util.tree_map(lambda a: not a, strategy.adapter_mask(trainable))
            clip = (optax.masked(clip, clipped) if any(jax.tree_util.tree_leaves(clipped))
                    else optax.identity())
        tx = optax.chain(clip, tx)

    def apply(grads, state, params, ok):
        return dispatch.adamw(_apply_fused, _apply_optax, params, grads, state, params, ok)

    def _apply_optax(grads, state, params, ok):
        updates, new = tx.update(grads, state, params, ok=ok)
        params_new = optax.apply_updates(params, updates)
        # Adam's count and moments are guarded inside; the rest (schedule counts) here.
        is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
        return (jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), params_new, params),
                jax.tree_util.tree_map(lambda a, b: a if is_adam(a) else jnp.where(ok, a, b),
                                       new, state, is_leaf=is_adam))

    def _apply_fused(grads, state, params, ok):
        g_leaves, treedef = jax.tree_util.tree_flatten(grads)
        p_leaves = treedef.flatten_up_to(params)
        label_leaves = treedef.flatten_up_to(labels)
        # The state is as built above: ([clip state,] multi_transform state); per component
        # a masked chain of (Adam, weight decay, learning rate) states.
        if clipped is None:
            clip_state, inner, on = None, state, [False] * len(g_leaves)
        else:
            clip_state, inner = state
            on = treedef.flatten_up_to(clipped)
        factor = (clip_factor([g for g, c in zip(g_leaves, on) if c], cfg.clip_norm)
                  if any(on) else jnp.ones((), jnp.float32))
        ok = jnp.asarray(ok)
        okf = ok.astype(jnp.float32)
        out_p = list(p_leaves)
        states = {}
        for c, masked in inner.inner_states.items():
            adam, decay_state, lr_state = masked.inner_state
            count = jnp.where(ok, optax.safe_increment(adam.count), adam.count)
            neg_lr, lr_new = lr_txs[c].update(jnp.ones((), jnp.float32), lr_state)
            lr_new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), lr_new, lr_state)
            coef = {s: cpu_adamw.coefficients(
                scale=factor if s else 1.0, one_minus_b1=1 - cfg.b1, b1=cfg.b1,
                one_minus_b2=1 - cfg.b2, b2=cfg.b2, bias1=1 - cfg.b1 ** count,
                bias2=1 - cfg.b2 ** count, eps=cfg.eps, decay=cfg.weight_decay,
                neg_lr=neg_lr, ok=okf) for s in (False, True)}
            mu, mu_def = jax.tree_util.tree_flatten(adam.mu)
            nu = jax.tree_util.tree_leaves(adam.nu)
            mine = [i for i, lab in enumerate(label_leaves) if lab == c]
            for j, i in enumerate(mine):
                out_p[i], mu[j], nu[j] = cpu_adamw.step(p_leaves[i], g_leaves[i], mu[j], nu[j],
                                                        coef[on[i]])
            adam = optax.ScaleByAdamState(count=count, mu=mu_def.unflatten(mu),
                                          nu=mu_def.unflatten(nu))
            states[c] = masked._replace(inner_state=(adam, decay_state, lr_new))
        inner = inner._replace(inner_states=states)
        return treedef.unflatten(out_p), (inner if clipped is None else (clip_state, inner))

    return Optimizer(tx.init, tx.update, apply)
