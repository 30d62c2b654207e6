"""The optimizer over each strategy's trainable tree: only the intended leaves move,
optimizer state only for trainable leaves, the guarded AdamW equals optax's, and gradient
clipping covers adapters unless optim.clip_adapters=False.

Uses the small text encoder + UNet of tests.helpers (`TinyTextUNet`, the `tiny` fixture).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmed import strategies
from jaxmed.optim import make_optimizer
from jaxmed.strategies.base import leaf_kind, module_of
from tests.helpers import TARGETS, leaves_of, optim_config

# ---------------------------------------------------------------------------------------
# Optimizer steps: only the intended leaves move; optimizer state only for trainable leaves


def _expected_moved(name, params):
    out = set()
    for key, v in leaves_of(params).items():
        comp, path = key[0], key[1:]
        if comp != "unet":
            continue
        mod = module_of(path)
        kind = leaf_kind(path, v)
        if (name == "unet"
                or (name == "bitfit" and path[-1] == "bias")
                or (name == "difffit" and kind in ("linear", "conv"))
                or (name == "lora" and kind == "linear"
                    and any(mod == t or mod.endswith("." + t) for t in TARGETS))
                or (name == "attn" and any(mod == t or mod.endswith("." + t) for t in TARGETS))):
            out.add(key)
    return out


@pytest.mark.parametrize("name", ["unet", "bitfit", "lora", "attn", "difffit"])
def test_steps_move_only_intended_leaves(tiny, name):
    s = strategies.get(name)
    tr0, fr = s.init(tiny.params, jax.random.PRNGKey(0))
    fr_before = jax.tree_util.tree_map(np.array, jax.device_get(fr))
    tx = make_optimizer(s, tr0, optim_config())
    opt = tx.init(tr0)
    # optimizer state: two moments per trainable leaf, nothing else but step counts
    arrays = [x for x in jax.tree_util.tree_leaves(opt) if x.ndim > 0]
    n_leaves = len(jax.tree_util.tree_leaves(tr0))
    assert len(arrays) == 2 * n_leaves
    assert sum(x.size for x in arrays) == 2 * strategies.count(tr0)
    assert sum(x.size for x in jax.tree_util.tree_leaves(opt) if x.ndim == 0) == 1

    @jax.jit
    def update(g, opt, tr):
        u, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, u), opt

    tr = tr0
    for _ in range(3):
        _, _, g = tiny.run(name, s, tr, fr)
        assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(tr0)
        tr, opt = update(g, opt, tr)

    # the frozen tree is untouched, bit for bit
    for k, v in leaves_of(fr_before).items():
        assert np.array_equal(v, np.asarray(leaves_of(fr)[k])), k
    # every trainable leaf moved
    before, after = leaves_of(tr0), leaves_of(tr)
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    # in the effective (exported) weights, exactly the intended leaves moved
    eff = leaves_of(jax.device_get(s.export(tr, fr)))
    orig = leaves_of(tiny.params)
    assert set(eff) == set(orig)
    moved = {k for k in orig if not np.array_equal(eff[k], orig[k])}
    assert moved == _expected_moved(name, tiny.params)
    if name == "bitfit":
        assert moved == {k for k in orig if k[0] == "unet" and k[-1] == "bias"}
        assert set(before) == moved


def test_guarded_adamw_equals_optax_and_skips_bad_steps():
    """make_optimizer's AdamW (guard inside the moment update) against optax.adamw with
    the same clipping and warm-up, over 3 steps; then a step with ok=False changes nothing."""
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal((7,)), jnp.float32)}
    s = strategies.get("unet")
    cfg = optim_config(clip_norm=1.0, warmup_steps=2, weight_decay=0.01)
    lr = 1e-2
    ours = make_optimizer(s, {"unet": params}, cfg, lrs={"unet": lr})
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, 2),
                                  optax.constant_schedule(lr)], [2])
    ref = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.01))
    p_ours, p_ref = {"unet": params}, params
    o_ours, o_ref = ours.init(p_ours), ref.init(p_ref)
    step_ours = jax.jit(lambda g, o, p, ok: ours.update(g, o, p, ok=ok))
    for i in range(3):
        g = jax.tree_util.tree_map(lambda x, f=i + 1: jnp.sin(x * f) * 3, p_ref)
        u, o_ours = step_ours({"unet": g}, o_ours, p_ours, True)
        p_ours = optax.apply_updates(p_ours, u)
        u, o_ref = ref.update(g, o_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        for k in params:
            np.testing.assert_allclose(p_ours["unet"][k], p_ref[k], rtol=1e-6, atol=1e-7)
    g = jax.tree_util.tree_map(lambda x: x * jnp.nan, p_ref)
    _, o_bad = step_ours({"unet": g}, o_ours, p_ours, False)

    def adam_states(opt_state):
        is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
        return [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(x)]

    adam, adam_before = adam_states(o_bad), adam_states(o_ours)
    assert len(adam) == 1 and int(adam[0].count) == 3
    for a, b in zip(jax.tree_util.tree_leaves(adam), jax.tree_util.tree_leaves(adam_before)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------
# Gradient clipping covers adapters unless optim.clip_adapters=False


@pytest.mark.parametrize("name", ["lora", "difffit-orig"])
def test_clip_adapters_switch(tiny, name):
    s = strategies.get(name)
    tr, _ = s.init(tiny.params, jax.random.PRNGKey(0))
    grads = jax.tree_util.tree_map(lambda v: jnp.full(v.shape, 10.0), tr)
    adapters = s.adapter_mask(tr)

    def norms(clip_adapters):
        # b1 = b2 = 0 and a huge eps make AdamW a plain scaled SGD: update = -g / eps.
        cfg = optim_config(b1=0.0, b2=0.0, eps=1e6, weight_decay=0.0, clip_norm=1.0,
                     clip_adapters=clip_adapters)
        tx = make_optimizer(s, tr, cfg, lrs={"unet": 1.0})
        u, _ = jax.jit(tx.update)(grads, tx.init(tr), tr)
        u = jax.tree_util.tree_map(lambda x: -x * 1e6, u)  # back to the (clipped) gradient
        pick = lambda tree, want: [x for x, a in zip(jax.tree_util.tree_leaves(tree),
                                                     jax.tree_util.tree_leaves(adapters))
                                   if a == want]
        return (float(optax.tree.norm(pick(u, True))),
                float(optax.tree.norm(pick(u, False))),
                float(optax.tree.norm(u)))

    g_ad = float(optax.tree.norm([x for x, a in zip(jax.tree_util.tree_leaves(grads),
                                                      jax.tree_util.tree_leaves(adapters))
                                    if a]))
    g_rest = float(optax.tree.norm([x for x, a in zip(jax.tree_util.tree_leaves(grads),
                                                        jax.tree_util.tree_leaves(adapters))
                                      if not a]))
    ad, rest, total = norms(True)
    assert total == pytest.approx(1.0, rel=1e-3)  # everything clipped together
    ad, rest, total = norms(False)
    assert ad == pytest.approx(g_ad, rel=1e-3)  # adapters pass unclipped
    if g_rest:
        assert rest == pytest.approx(1.0, rel=1e-3)  # the rest is clipped on its own
    else:
        assert name == "lora"
