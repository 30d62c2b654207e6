"""``model.attention``: each accelerator attention path against the einsum reference on
this CPU (`jax.nn.dot_product_attention` with XLA's implementation; the Pallas TPU flash
kernel in TPU interpret mode), values and gradients, at SD's head dims (40, 80, and 160,
which the kernel gets padded to 256) and at sequence lengths its 128-wide blocks do not
divide (64 queries, 77 text keys: the padded keys must be masked out, or the outputs would
differ). Then the choice by platform: the TPU flash kernel is a Mosaic custom call in a
TPU program and absent from a CPU one, and a tiny UNet training step with
``model.attention=flash`` compiles for a TPU topology (libtpu's deviceless compile)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxmed import plan, plan_topologies, sharding
from jaxmed.cli import load_config, set_override
from jaxmed.kernels import dispatch, dot_product, reference, tpu_flash
from jaxmed.models import sd as sd_module

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
TPU_CALL = "tpu_custom_call"
# (query tokens, key tokens, heads, head dim)
SHAPES = [(64, 64, 2, 40), (256, 77, 2, 80), (64, 77, 1, 160), (256, 256, 1, 40)]
# float32: within 1e-5 of the einsum. bfloat16: the einsum rounds its softmax weights to
# bfloat16 before the second matmul, so it is itself off a float32 truth (computed from the
# same bfloat16 inputs) by up to a few 1e-3; a path passes when its own distance from that
# truth is at most the einsum's + 1e-3, and it is within 1e-3 of the einsum on average.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = 1e-3


def _qkv(lq, lk, heads, d, dtype, batch=2):
    keys = jax.random.split(jax.random.PRNGKey(lq * 1000 + lk + d), 3)
    shapes = [(batch, lq, heads * d), (batch, lk, heads * d), (batch, lk, heads * d)]
    return [jax.random.normal(key, s, jnp.float32).astype(dtype) for key, s in zip(keys, shapes)]


def _close(out, q, k, v, heads, **kw):
    ref = reference.attention(q, k, v, heads, **kw)
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if q.dtype == jnp.float32:
        np.testing.assert_allclose(out32, ref32, **FP32_TOL)
        return
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    truth = np.asarray(reference.attention(*f32, heads, **kw))
    assert np.max(np.abs(out32 - truth)) <= np.max(np.abs(ref32 - truth)) + BF16_TOL
    assert np.mean(np.abs(out32 - ref32)) <= BF16_TOL


def _flash(q, k, v, heads):
    with pltpu.force_tpu_interpret_mode():
        return jax.jit(lambda q, k, v: tpu_flash.attention(q, k, v, heads))(q, k, v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "q{}k{}h{}d{}".format(*s))
def test_dot_product_equals_einsum(shape, dtype):
    lq, lk, heads, d = shape
    q, k, v = _qkv(lq, lk, heads, d, dtype)
    out = jax.jit(lambda q, k, v: dot_product.attention(q, k, v, heads))(q, k, v)
    assert out.dtype == dtype
    _close(out, q, k, v, heads)


def test_dot_product_with_a_mask_equals_einsum():
    q, k, v = _qkv(77, 77, 2, 40, jnp.float32)
    mask = jnp.tril(jnp.ones((77, 77), bool))[None, None]
    out = dot_product.attention(q, k, v, 2, mask=mask)
    _close(out, q, k, v, 2, mask=mask)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "q{}k{}h{}d{}".format(*s))
def test_tpu_flash_in_interpret_mode_equals_einsum(shape, dtype):
    lq, lk, heads, d = shape
    q, k, v = _qkv(lq, lk, heads, d, dtype)
    out = _flash(q, k, v, heads)
    assert out.shape == q.shape and out.dtype == dtype
    _close(out, q, k, v, heads)


def test_tpu_flash_masks_its_padded_keys():
    """77 keys padded to 128 with zeros: attended, they would add exp(0) weights to every
    row. A single key makes it stark: the output must be that key's value exactly."""
    q, k, v = _qkv(64, 1, 1, 40, jnp.float32)
    out = _flash(q, k, v, 1)
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(v, out.shape), atol=1e-6)


def _grads(fn, q, k, v, heads):
    w = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, heads).astype(jnp.float32) * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("shape", [(64, 77, 2, 40), (256, 256, 2, 80), (64, 64, 1, 160)],
                         ids=lambda s: "q{}k{}h{}d{}".format(*s))
def test_gradients_equal_einsum_fp32(shape):
    lq, lk, heads, d = shape
    q, k, v = _qkv(lq, lk, heads, d, jnp.float32)
    want = _grads(reference.attention, q, k, v, heads)
    with pltpu.force_tpu_interpret_mode():
        flash = _grads(tpu_flash.attention, q, k, v, heads)
    dot = _grads(dot_product.attention, q, k, v, heads)
    for name, got in (("flash", flash), ("dot_product", dot)):
        for g, r, arg in zip(got, want, "qkv"):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5,
                                       err_msg=f"{name} d{arg}")


# ----------------------------------------------------------------------------------------
# The choice


def test_unknown_choice_is_refused():
    q, k, v = _qkv(16, 16, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="model.attention"):
        dispatch.attention(q, k, v, 2, impl="splash")
    cfgs = {"unet": None, "vae": None, "text_encoder": None}
    with pytest.raises(ValueError, match="model.attention"):
        sd_module.StableDiffusion.from_configs(cfgs, {}, attention="splash")


def test_on_cpu_flash_and_auto_are_the_cpu_choice_and_einsum_the_reference():
    """On CPU, ``flash`` (a TPU kernel) is what ``auto`` runs, bit for bit; ``einsum`` is
    the reference, bit for bit; no TPU custom call reaches a CPU program."""
    for lq, lk, heads, d in [(1024, 1024, 8, 40), (256, 77, 8, 40), (16, 16, 2, 8)]:
        q, k, v = _qkv(lq, lk, heads, d, jnp.float32, batch=1)
        run = {impl: jax.jit(lambda q, k, v, impl=impl, heads=heads: dispatch.attention(
            q, k, v, heads, impl=impl)) for impl in dispatch.ATTENTION}
        for impl, f in run.items():
            assert TPU_CALL not in f.lower(q, k, v).as_text(), impl
        out = {impl: np.asarray(f(q, k, v)) for impl, f in run.items()}
        np.testing.assert_array_equal(out["flash"], out["auto"])
        np.testing.assert_array_equal(out["einsum"],
                                      np.asarray(jax.jit(reference.attention, static_argnums=3)(
                                          q, k, v, heads)))


def _exported(f, platform, *args) -> str:
    return jax.export.export(jax.jit(f), platforms=[platform])(*args).mlir_module()


@pytest.mark.parametrize("impl,platform,has_kernel", [
    ("auto", "tpu", True), ("flash", "tpu", True), ("einsum", "tpu", False),
    ("dot_product", "tpu", False), ("auto", "cuda", False), ("flash", "cuda", False)])
def test_tpu_kernel_only_where_chosen_for_tpu(impl, platform, has_kernel):
    q = jax.ShapeDtypeStruct((2, 4096, 320), jnp.bfloat16)  # SD 1.5's 64x64 level
    k = jax.ShapeDtypeStruct((2, 77, 320), jnp.bfloat16)

    def attn(q, k):
        return dispatch.attention(q, q, q, 8, impl=impl) + dispatch.attention(q, k, k, 8,
                                                                             impl=impl)

    text = _exported(attn, platform, q, k)
    assert (TPU_CALL in text) == has_kernel
    assert "jaxmed_" not in text


def test_tpu_v2_v3_fall_back_to_einsum(monkeypatch):
    monkeypatch.setattr(tpu_flash, "_device_kinds", lambda: ["TPU v3"])
    q = jax.ShapeDtypeStruct((2, 256, 320), jnp.float32)
    text = _exported(lambda q: dispatch.attention(q, q, q, 8, impl="flash"), "tpu", q)
    assert TPU_CALL not in text and "stablehlo.dot_general" in text


# ----------------------------------------------------------------------------------------
# A training step compiled for a TPU topology


def _tiny_unet_config(attention):
    config = load_config("configs/finetune.py:unet")
    for key, value in {"model.path": "random:test@32", "data.resolution": "32",
                       "optim.grad_accum": "1", "train.per_device_batch": "1",
                       "model.attention": attention}.items():
        set_override(config, key, value)
    return config


def _lowered(config, topology):
    topo = plan_topologies.get(topology)
    step = plan.make_step(config, topo, plan_topologies.devices(topo))
    with sharding.activation_sharding(step.mesh):
        return step, step.jitted.trace(*step.args).lower()


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed, so no TPU topology can "
                    "be compiled for (pip install 'jaxmed[tpu-plan]')")
def test_tiny_unet_step_with_flash_compiles_for_tpu():
    config = _tiny_unet_config("flash")
    _, lowered = _lowered(config, "v5e-8")
    assert TPU_CALL in lowered.as_text()
    report = plan.run(config, "v5e-8", quiet=True)
    assert report["attention"] == "flash"
    result = report["result"]
    assert result["status"] == "ok", result.get("message")
    memory = result["memory_bytes"]
    assert memory["arguments"] > 0 and memory["temporaries"] > 0


def test_tiny_unet_step_with_flash_for_cpu_holds_no_tpu_kernel():
    _, lowered = _lowered(_tiny_unet_config("flash"), "cpu")
    assert TPU_CALL not in lowered.as_text()
