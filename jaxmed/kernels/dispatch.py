"""Which implementation runs each op the models and the optimizer call: a CPU path (a C++
kernel, or jnp arranged for XLA:CPU) where the computation is lowered for CPU and the path
applies, XLA's own op (`kernels.reference`) everywhere else; for attention, also the
accelerator kernels (`dot_product` on GPU, `tpu_flash` on TPU) that ``model.attention``
selects (`attention`).

The platform is the one being compiled for, not the host's: each choice is a
`jax.lax.platform_dependent` whose branches are both traced, and lowering emits only the
branch of the platform it lowers for. So a CPU host compiling for TPU or GPU (jax.export,
AOT compiles for a TPU topology) never emits a CPU custom call, and a CPU compile is what
it was. Where the CPU path is the reference itself, there is no branch.

Every rule decides per example (shapes without the batch, dtypes), never on the batch size:
an image comes out bit for bit the same however its batch is split over devices or
micro-batches. Each kernel's own switch (``JAXMED_CPU_ATTENTION``, ``_CONV``, ``_DENSE``,
``_ADAMW`` = 0) and a missing compiler leave the CPU branch on its jnp path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from jaxmed.kernels import (
    build,
    cpu_adamw,
    cpu_attention,
    cpu_conv,
    cpu_dense,
    cpu_jnp,
    dot_product,
    reference,
    tpu_flash,
)

T = TypeVar("T")

# CPU attention, in logits elements per example (heads x Lq x Lk): above KERNEL_ELEMS the
# C++ kernel can pay for its call; above BLOCK_ELEMS XLA's attention runs block by block.
KERNEL_ELEMS = 1 << 16
BLOCK_ELEMS = 1 << 18
# XLA:CPU, 3x3 SAME convolutions on maps of at most this many pixels (the medium UNet's
# 4x4) run as plain matmuls (im2col): too few pixels for Winograd's transforms to pay.
IM2COL_PIXELS = 4 * 4


def on_cpu(cpu: Callable[..., T], default: Callable[..., T], *args: Any) -> T:
    """``cpu(*args)`` where the computation is lowered for CPU, ``default(*args)`` for any
    other platform; both must return the same shapes and dtypes."""
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) @ w (K, N); on CPU, float32, the weight gradient by `cpu_dense`."""
    if cpu_dense.applies(x, w):
        return on_cpu(cpu_dense.matmul, reference.matmul, x, w)
    return reference.matmul(x, w)


def weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """x (M, K)^T @ dy (M, N) -> (K, N) (a dense layer's weight gradient); on CPU, float32
    with N a multiple of 16, by `cpu_dense`'s kernel, which reads both in place."""
    if (x.dtype == jnp.float32 and dy.dtype == jnp.float32
            and cpu_dense.wins(*x.shape, dy.shape[1]) and cpu_dense.available()):
        return on_cpu(cpu_dense.wgrad, reference.weight_grad, x, dy)
    return reference.weight_grad(x, dy)


def conv(x: jax.Array, w: jax.Array, strides: int = 1,
         padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))) -> jax.Array:
    """2-D convolution of x (N, H, W, Ci) with w (kh, kw, Ci, Co), NHWC x HWIO, explicit
    padding pairs. A 1x1 convolution is a `matmul` (XLA runs dots faster than convs); a
    float32 3x3 stride-1 SAME one is `conv3x3`."""
    if w.shape[:2] == (1, 1) and strides == 1 and padding == ((0, 0), (0, 0)):
        return matmul(x, w[0, 0])
    if w.shape[:2] == (3, 3) and strides == 1 and padding == ((1, 1), (1, 1)) and x.ndim == 4:
        return conv3x3(x, w)
    return reference.conv(x, w, strides, padding)


def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """SAME-padded, stride-1 conv of x (N, H, W, Ci) with w (3, 3, Ci, Co); on CPU in float32
    by im2col on the smallest maps, else by the Winograd kernel where `cpu_conv.wins`."""
    ref = functools.partial(reference.conv, strides=1, padding=((1, 1), (1, 1)))
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return ref(x, w)
    n, h, wd, cin = x.shape
    if h * wd <= IM2COL_PIXELS:
        return on_cpu(cpu_jnp.im2col_conv3x3, ref, x, w)
    if cpu_conv.wins(h, wd, cin, w.shape[3]) and cpu_conv.available():
        return on_cpu(cpu_conv.conv3x3, ref, x, w)
    return ref(x, w)


def _attention_kernel_wins(elems: int, lk: int, d: int) -> bool:
    """Where the C++ kernel beat XLA's attention (fwd + bwd): above KERNEL_ELEMS always for
    head dims <= 8; for wider heads only past BLOCK_ELEMS and with >= 256 keys (its loops
    run along the keys once per head dim, so SD's 77-key cross-attention with d=40 stays
    on XLA's matmuls)."""
    if d <= 8:
        return True
    return elems > BLOCK_ELEMS and lk >= 256


# `model.attention`: which attention the models run off CPU (CPU keeps its own choice
# under "auto"; see `attention`).
ATTENTION = ("auto", "einsum", "dot_product", "flash")


def _cpu_attention(q: jax.Array, k: jax.Array, heads: int, mask: jax.Array | None,
                   upcast: bool) -> Callable[..., jax.Array] | None:
    """The CPU path for these shapes (C++ kernel or blocked jnp), or None for the
    reference: unmasked attention over more than KERNEL_ELEMS logits per example runs on
    the C++ kernel where it wins (always in float32), else blocked above BLOCK_ELEMS."""
    lq, c = q.shape[1:]
    lk = k.shape[1]
    elems = heads * lq * lk
    if mask is not None or elems <= KERNEL_ELEMS:
        return None
    if _attention_kernel_wins(elems, lk, c // heads) and cpu_attention.available():
        return functools.partial(cpu_attention.multi_head, heads=heads)
    if elems > BLOCK_ELEMS:
        return functools.partial(cpu_jnp.blocked_attention, heads=heads, upcast=upcast)
    return None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *,
              mask: jax.Array | None = None, upcast: bool = True,
              impl: str = "auto") -> jax.Array:
    """Multi-head scaled dot-product attention on (B, L, C) tensors; returns (B, Lq, C).

    ``mask`` is boolean, broadcastable to (B, heads, Lq, Lk), True where attending is
    allowed. Logits and softmax run in float32 when ``upcast`` (SD's ``upcast_attention``;
    always safe, and what torch's SDPA does for fp16 on CPU).

    ``impl`` (`ATTENTION`, the config's ``model.attention``): ``einsum`` is
    `reference.attention` on every platform; ``dot_product`` is `jax.nn.dot_product_attention`
    on every platform (cuDNN's flash kernel on GPU where it applies); ``flash`` is the Pallas
    kernel on TPU (`tpu_flash`; the einsum on TPU v2/v3, for masked attention, or where
    Pallas is missing) and what ``auto`` picks elsewhere. ``auto`` picks per platform
    compiled for: on CPU the CPU path (`_cpu_attention`), on GPU ``dot_product``, on TPU
    ``flash``.
    """
    if impl not in ATTENTION:
        raise ValueError(f"model.attention={impl!r}: choose one of {list(ATTENTION)}")
    ref = functools.partial(reference.attention, heads=heads, mask=mask, upcast=upcast)
    if impl == "einsum":
        return ref(q, k, v)
    if impl == "dot_product":
        xla = functools.partial(dot_product.attention, heads=heads, mask=mask, upcast=upcast)
        gpu = functools.partial(dot_product.gpu_attention, heads=heads, mask=mask,
                                upcast=upcast)
        return jax.lax.platform_dependent(q, k, v, cuda=gpu, rocm=gpu, default=xla)
    cpu = _cpu_attention(q, k, heads, mask, upcast) or ref
    gpu = functools.partial(dot_product.gpu_attention, heads=heads, mask=mask, upcast=upcast)
    tpu = ref
    if mask is None and tpu_flash.supported():
        tpu = functools.partial(tpu_flash.attention, heads=heads, upcast=upcast)
    return jax.lax.platform_dependent(q, k, v, cpu=cpu, cuda=gpu, rocm=gpu, tpu=tpu,
                                      default=ref)


def adamw(kernel: Callable[..., T], reference_update: Callable[..., T], params: Any,
          *args: Any) -> T:
    """``kernel(*args)`` (the optimizer's update by `cpu_adamw`, one in-place pass per leaf)
    where lowered for CPU with every leaf of ``params`` float32 and the kernel built, else
    ``reference_update(*args)`` (optax's); both return the same tree."""
    if (all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
            and cpu_adamw.available()):
        return on_cpu(kernel, reference_update, *args)
    return reference_update(*args)


def prebuild_cpu_kernels() -> list:
    """Start building every C++ CPU kernel in background threads (`build.prebuild`): a
    command line calls this first, so a cold run's kernel builds overlap its other work."""
    return build.prebuild([m.KERNEL for m in (cpu_adamw, cpu_attention, cpu_conv, cpu_dense)])
