"""jaxmed.kernels.dispatch chooses by the platform being compiled for, not by the host:
lowered for TPU or CUDA on this CPU machine (jax.export, no accelerator or libtpu needed),
a tiny UNet's forward + backward pass, a convolution, an attention and the optimizer's
update hold no jaxmed custom call; lowered for CPU they do (where the kernels build). The
CPU compile keeps no conditional, and a host whose default backend is an accelerator never
builds a kernel."""

import types

import jax
import jax.numpy as jnp
import pytest

from jaxmed import optim
from jaxmed.cli import load_config
from jaxmed.kernels import cpu_adamw, cpu_attention, cpu_conv, cpu_dense, dispatch
from jaxmed.models import layers, tiny
from jaxmed.models.unet import UNet2DConditionModel, abstract_params, dummy_inputs

ACCELERATORS = ["tpu", "cuda"]
ALL_KERNELS = (cpu_attention, cpu_conv, cpu_dense, cpu_adamw)


def _exported(f, platform, *args) -> str:
    return jax.export.export(jax.jit(f), platforms=[platform])(*args).mlir_module()


def _cpu(f, *args) -> str:
    return jax.jit(f).lower(*args).as_text()


def _unet_loss(remat=False):
    """The tiny test UNet (32, 64) at a 16x16 latent: its self-attention (4 heads of 8,
    256 tokens), 3x3 convs and dense layers are all where the CPU kernels apply."""
    cfg = tiny.configs("test", image_size=64)["unet"]
    model = UNet2DConditionModel(cfg, remat=remat)
    sample, t, ctx = dummy_inputs(cfg, batch=2, height=16, width=16)

    def loss(params, sample):
        out = model.apply({"params": params}, sample, t, ctx)
        return jnp.mean(jnp.square(out))

    return jax.grad(loss), abstract_params(cfg), jax.ShapeDtypeStruct(sample.shape, jnp.float32)


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("platform", ACCELERATORS)
def test_unet_forward_and_backward_for_an_accelerator_holds_no_cpu_kernel(platform, remat):
    grad, params, sample = _unet_loss(remat)
    text = _exported(grad, platform, params, sample)
    assert "jaxmed_" not in text
    assert "stablehlo.convolution" in text  # XLA's own ops instead


def test_unet_forward_and_backward_for_cpu_uses_the_kernels():
    if not all(k.available() for k in (cpu_attention, cpu_conv, cpu_dense)):
        pytest.skip("no C++ compiler: the kernels cannot be built here")
    grad, params, sample = _unet_loss()
    text = _cpu(grad, params, sample)
    for target in ("jaxmed_attention_fwd", "jaxmed_attention_bwd", "jaxmed_winograd_conv",
                   "jaxmed_winograd_wgrad", "jaxmed_dense_wgrad"):
        assert target in text, target


def _ops():
    """(name, function, abstract args, the custom call it makes on CPU, its kernel)."""
    f32 = jnp.float32
    x = jax.ShapeDtypeStruct((2, 16, 16, 32), f32)
    w = jax.ShapeDtypeStruct((3, 3, 32, 48), f32)
    q = jax.ShapeDtypeStruct((2, 400, 32), f32)
    small = jax.ShapeDtypeStruct((2, 4, 4, 32), f32)
    a = jax.ShapeDtypeStruct((64, 48), f32)
    b = jax.ShapeDtypeStruct((48, 32), f32)

    def conv(x, w):
        return jnp.sum(dispatch.conv(x, w) ** 2)

    def attention(q):
        return jnp.sum(layers.attention(q, q, q, 4) ** 2)

    def matmul(a, b):
        return jnp.sum(dispatch.matmul(a, b) ** 2)

    return [
        ("conv", jax.grad(conv, argnums=(0, 1)), (x, w), "jaxmed_winograd", cpu_conv),
        ("im2col", jax.grad(conv, argnums=(0, 1)), (small, w), "jaxmed_dense_wgrad", cpu_dense),
        ("attention", jax.grad(attention), (q,), "jaxmed_attention", cpu_attention),
        ("matmul", jax.grad(matmul, argnums=(0, 1)), (a, b), "jaxmed_dense_wgrad", cpu_dense),
    ]


@pytest.mark.parametrize("platform", ACCELERATORS)
@pytest.mark.parametrize("op", [o[0] for o in _ops()])
def test_ops_follow_the_platform_compiled_for(op, platform):
    _, f, args, target, kernel = next(o for o in _ops() if o[0] == op)
    assert "jaxmed_" not in _exported(f, platform, *args)
    if kernel.available():
        assert target in _cpu(f, *args)


def test_im2col_and_blocked_attention_are_cpu_only():
    """The jnp paths arranged for XLA:CPU (no custom call) are not taken for accelerators
    either: a 4x4 map keeps XLA's convolution, attention keeps its einsums (no loop)."""
    x = jax.ShapeDtypeStruct((2, 4, 4, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 32, 48), jnp.float32)
    assert "stablehlo.convolution" in _exported(dispatch.conv, "tpu", x, w)
    assert "stablehlo.convolution" not in _cpu(dispatch.conv, x, w)
    q = jax.ShapeDtypeStruct((2, 1024, 320), jnp.float32)  # 8 heads of 40: blocked on CPU
    k = jax.ShapeDtypeStruct((2, 77, 320), jnp.float32)

    def attn(q, k):
        return dispatch.attention(q, q, q, 8) + dispatch.attention(q, k, k, 8)

    assert "stablehlo.while" not in _exported(attn, "tpu", q, k)


def _optimizer():
    params = {"unet": {"w": jnp.ones((64, 48), jnp.float32), "b": jnp.ones((48,), jnp.float32)}}
    strategy = types.SimpleNamespace(
        name="test", learning_rates=lambda: {"unet": 1e-3},
        lr_labels=lambda t: jax.tree_util.tree_map(lambda _: "unet", t),
        adapter_mask=lambda t: jax.tree_util.tree_map(lambda _: False, t))
    tx = optim.make_optimizer(strategy, params, load_config("configs/finetune.py:lora").optim)
    return tx.apply, (params, jax.eval_shape(tx.init, params), params, True)


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_optimizer_update_follows_the_platform_compiled_for(platform):
    apply, args = _optimizer()
    assert "jaxmed_" not in _exported(apply, platform, *args)
    if cpu_adamw.available():
        assert "jaxmed_adamw" in _cpu(apply, *args)


def test_cpu_compile_keeps_no_conditional():
    """Lowered for CPU alone, the platform choice is resolved before XLA compiles: the
    compiled step is the kernel path itself, no runtime branch."""
    if not cpu_attention.available():
        pytest.skip("no C++ compiler: the kernel cannot be built here")
    q = jnp.ones((2, 400, 32), jnp.float32)
    f = jax.jit(jax.grad(lambda q: jnp.sum(layers.attention(q, q, q, 4) ** 2)))
    hlo = f.lower(q).compile().as_text()
    assert " conditional(" not in hlo and "jaxmed_attention_bwd" in hlo


def test_accelerator_host_builds_no_kernel(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    for kernel in ALL_KERNELS:
        assert not kernel.available()
