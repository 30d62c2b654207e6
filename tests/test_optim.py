"""jaxmed.optim's `Optimizer.apply` (the train step's update) against optax's own
clip_by_global_norm + adamw, on both of its paths: the in-place C++ AdamW of cpu_adamw.cc
(CPU, float32) and optax's update + apply_updates (elsewhere, or with JAXMED_CPU_ADAMW=0).
Also: a non-finite step changes nothing, the kernel is really called (and not for bf16),
the update happens in place, bad kernel input, and the fallback when no compiler exists."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmed import optim
from jaxmed.cli import load_config
from jaxmed.kernels import cpu_adamw
from tests.helpers import kernel_without_compiler

needs_kernel = pytest.mark.skipif(not cpu_adamw.available(),
                                  reason="no C++ compiler: the kernel cannot be built here")


def _cfg(**kw):
    cfg = load_config("configs/finetune.py:lora").optim
    with cfg.unlocked():
        cfg.update(kw)
    return cfg


# Two components with their own learning rates; "a" holds an adapter leaf. Leaf sizes: a
# few elements, one not a multiple of the vector width, one spread over three threads' chunks
# of 32768 with a partial last one.
LRS = {"unet": 1e-2, "text": 3e-3}


def _params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    mk = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    return {"unet": {"w": mk(257, 300), "b": mk(7), "a": mk(3, 5)}, "text": {"w": mk(33, 9)}}


def _strategy(adapters=("a",)):
    return types.SimpleNamespace(
        name="test", learning_rates=lambda: dict(LRS),
        lr_labels=lambda t: {c: jax.tree_util.tree_map(lambda _, c=c: c, s) for c, s in t.items()},
        adapter_mask=lambda t: {c: {k: k in adapters for k in s} for c, s in t.items()})


def _reference(cfg, params, adapters):
    """optax's own chain: clipping (over the non-adapter leaves when clip_adapters=False),
    then adamw per component with its warm-up schedule."""
    def adamw(lr):
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, cfg.warmup_steps),
                                      optax.constant_schedule(lr)], [cfg.warmup_steps])
        return optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay)

    labels = _strategy().lr_labels(params)
    clip = optax.clip_by_global_norm(cfg.clip_norm)
    if not cfg.clip_adapters:
        clip = optax.masked(clip, {c: {k: k not in adapters for k in s}
                                   for c, s in params.items()})
    return optax.chain(clip, optax.multi_transform({c: adamw(lr) for c, lr in LRS.items()},
                                                   labels))


def _grads(params, i):
    return jax.tree_util.tree_map(lambda x: jnp.sin(x * (i + 1)) * 3, params)


def _moments(state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return [x for x in jax.tree_util.tree_leaves(state, is_leaf=is_adam) if is_adam(x)]


@pytest.fixture(params=["kernel", "optax"])
def path(request, monkeypatch):
    if request.param == "kernel" and not cpu_adamw.available():
        pytest.skip("no C++ compiler: the kernel cannot be built here")
    if request.param == "optax":
        monkeypatch.setenv("JAXMED_CPU_ADAMW", "0")
    return request.param


# Clipping over every leaf; over the non-adapters; over none (every leaf an adapter, the
# authors' LoRA setting).
@pytest.mark.parametrize("clip_adapters,adapters", [(True, ("a",)), (False, ("a",)),
                                                    (False, ("a", "b", "w"))])
def test_apply_equals_optax_adamw(path, clip_adapters, adapters):
    cfg = _cfg(clip_norm=1.0, warmup_steps=2, weight_decay=0.01, clip_adapters=clip_adapters)
    params = _params()
    tx = optim.make_optimizer(_strategy(adapters), params, cfg)
    ref = _reference(cfg, params, adapters)
    apply = jax.jit(tx.apply)
    assert ("jaxmed_adamw" in apply.lower(params, tx.init(params), params, True).as_text()) == (
        path == "kernel")
    p, s, p_ref, s_ref = params, tx.init(params), params, ref.init(params)
    for i in range(4):  # warm-up, then the constant rate
        g = _grads(p_ref, i)  # one gradient for both: only the optimizers differ
        p, s = apply(g, s, p, True)
        u, s_ref = ref.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        # float32 rounding (the kernel may contract a * b + c into one fma): measured <= 3e-7
        for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(p_ref)):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    ours, theirs = _moments(s), _moments(s_ref)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert int(a.count) == int(b.count) == 4
        for x, y in zip(jax.tree_util.tree_leaves((a.mu, a.nu)),
                        jax.tree_util.tree_leaves((b.mu, b.nu))):
            # cancellation leaves some moments far below the leaf's scale: measured <= 7e-8
            np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-6 * float(np.abs(y).max()))
    # the schedule counts (the only other arrays in the state) advanced alike
    counts = lambda st: sorted(int(x) for x in jax.tree_util.tree_leaves(st) if x.ndim == 0)  # noqa: E731
    assert counts(s) == counts(s_ref)


def test_non_finite_step_changes_nothing(path):
    params = _params()
    tx = optim.make_optimizer(_strategy(), params, _cfg(warmup_steps=2))
    apply = jax.jit(tx.apply)
    p, s = apply(_grads(params, 0), tx.init(params), params, True)
    bad = jax.tree_util.tree_map(lambda x: x * jnp.nan, p)
    p2, s2 = apply(bad, s, p, False)
    for a, b in zip(jax.tree_util.tree_leaves((p2, s2)), jax.tree_util.tree_leaves((p, s))):
        np.testing.assert_array_equal(a, b)


@needs_kernel
def test_bf16_params_take_optax():
    params = _params(jnp.bfloat16)
    tx = optim.make_optimizer(_strategy(), params, _cfg())
    hlo = jax.jit(tx.apply).lower(params, tx.init(params), params, True).as_text()
    assert "jaxmed_adamw" not in hlo


@needs_kernel
def test_updates_in_place():
    """Donated params and state (in the order they come back, as in the train step's
    TrainState): XLA honours the kernel's output aliases, so the compiled update holds no
    copy of params or moments (a 4 MB leaf; measured 196 bytes of temporaries)."""
    params = {"unet": {"w": jnp.zeros((1024, 1024), jnp.float32)}}
    strategy = types.SimpleNamespace(
        name="test", learning_rates=lambda: {"unet": 1e-3},
        lr_labels=_strategy().lr_labels, adapter_mask=_strategy().adapter_mask)
    tx = optim.make_optimizer(strategy, params, _cfg())
    step = jax.jit(lambda p, s, g: tx.apply(g, s, p, True), donate_argnums=(0, 1))
    compiled = step.lower(params, jax.eval_shape(tx.init, params), params).compile()
    assert "jaxmed_adamw" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * 1024 * 1024 // 4


@needs_kernel
def test_kernel_rejects_bad_input():
    coef = cpu_adamw.coefficients(**{k: 1.0 for k in cpu_adamw.COEFS})
    x = jnp.ones((4, 4), jnp.float32)
    with pytest.raises(Exception, match="p, g, mu and nu must have one shape"):
        jax.block_until_ready(jax.jit(cpu_adamw.step)(x, jnp.ones((3,)), x, x, coef))
    with pytest.raises(Exception, match="coefficient vector must hold 11"):
        jax.block_until_ready(jax.jit(cpu_adamw.step)(x, x, x, x, coef[:5]))
    with pytest.raises(ValueError, match=r"missing \['ok'\], unknown \['lr'\]"):
        cpu_adamw.coefficients(**{k: 1.0 for k in cpu_adamw.COEFS if k != "ok"}, lr=1.0)


def test_without_compiler_falls_back_to_optax(monkeypatch, tmp_path, caplog):
    text = kernel_without_compiler(cpu_adamw.KERNEL, monkeypatch, tmp_path, caplog)
    assert "optax's update" in text
    params = _params()
    tx = optim.make_optimizer(_strategy(), params, _cfg())
    apply = jax.jit(tx.apply)
    assert "jaxmed_adamw" not in apply.lower(params, tx.init(params), params, True).as_text()
    p, _ = apply(_grads(params, 0), tx.init(params), params, True)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(p))
