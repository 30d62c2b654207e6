"""3x3 convolutions for XLA:CPU by Winograd F(2x2, 3x3), as XLA FFI custom calls (cpu_conv.cc).

XLA:CPU's direct convolutions reach about half of oneDNN's speed on the UNet's 16x16 and
32x32 feature maps, where the train step spends most of its time; Winograd's F(2x2, 3x3)
does the same work with 2.25x fewer multiplies. Results agree with `lax.conv` to float32
rounding (about 1e-6 relative), and an example's output does not depend on the batch it
is in (the kernel's order of summation is the same for every tile).

Compiled on first use (see kernels.build). Without a compiler, or with
``JAXMED_CPU_CONV=0``, jaxmed uses XLA's convolution. Chosen by `kernels.dispatch` only where
a computation is lowered for CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.kernels.build import Kernel

_FILTER, _CONV, _WGRAD = "jaxmed_winograd_filter", "jaxmed_winograd_conv", "jaxmed_winograd_wgrad"
_CONV_FILTER = "jaxmed_winograd_conv_filter"
KERNEL = Kernel("cpu_conv.cc", {_FILTER: "JaxmedWinogradFilter", _CONV: "JaxmedWinogradConv",
                                _WGRAD: "JaxmedWinogradWgrad",
                                _CONV_FILTER: "JaxmedWinogradConvFilter"},
                switch="JAXMED_CPU_CONV", fallback="XLA's convolution")
available = KERNEL.available


# From this many channels in + out the kernel runs staged (see ConvImpl in cpu_conv.cc):
# every fused block reads all 16 transformed filters, cheap for narrow layers; for wide
# ones they no longer stay in cache (the crossover: bench/bench_conv.py).
STAGED_CHANNELS = 640


def wins(h: int, w: int, cin: int, cout: int) -> bool:
    """Where the kernel beat XLA:CPU's convolution (fwd + both gradients; bench/bench_conv.py
    has the figures), decided per example so that an image never depends on its batch:
    32x32 maps and larger up to 640 + 640 channels (any width from 64x64); 8x8 and 16x16
    maps from 256 to 768 channels in + out (16x16 also narrower), not wider (the transformed
    filters outweigh the multiplies saved) nor narrower at 8x8, and never below 8x8 (too few
    tiles to pay for the transforms). Channels must be multiples of 16 (the kernel's vector
    width).
    """
    if cin % 16 or cout % 16 or h * w < 8 * 8:
        return False
    c = cin + cout
    if h * w >= 64 * 64:
        return True
    if h * w >= 32 * 32:
        return c <= 1280
    return (h * w >= 16 * 16 or c >= 256) and c <= 768


def _filter_inside(h: int, w: int, cin: int, cout: int) -> bool:
    """Whether the conv transforms the filter itself (ConvFilterImpl): on maps of 16x16 and
    smaller with more than 256 channels in + out, where the filter is large next to the
    map and a separate transform writes it out only for the conv to read it back
    (bench/bench_conv.py). The results are bitwise the same either way."""
    return h * w <= 16 * 16 and cin + cout > 256


def _f32(shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _tiles(x_shape) -> int:
    n, h, w, _ = x_shape
    return n * ((h + 1) // 2) * ((w + 1) // 2)


def _conv(x: jax.Array, u: jax.Array) -> jax.Array:
    cin, cout = u.shape[1:]
    work = (16, _tiles(x.shape), cin + cout) if cin + cout >= STAGED_CHANNELS else (0,)
    y, _ = jax.ffi.ffi_call(_CONV, (_f32(x.shape[:3] + (cout,)), _f32(work)),
                            vmap_method="sequential")(x, u)
    return y


def _conv_filter(x: jax.Array, w: jax.Array, flip: bool) -> jax.Array:
    cout = w.shape[2] if flip else w.shape[3]
    work = (16, _tiles(x.shape), x.shape[3] + cout)
    y, _ = jax.ffi.ffi_call(_CONV_FILTER, (_f32(x.shape[:3] + (cout,)), _f32(work)),
                            vmap_method="sequential")(x, w, flip=flip)
    return y


def _filter(w: jax.Array, flip: bool) -> jax.Array:
    cin, cout = w.shape[2:]
    return jax.ffi.ffi_call(_FILTER, _f32((16, cout, cin) if flip else (16, cin, cout)),
                            vmap_method="sequential")(w, flip=flip)


@jax.custom_vjp
def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """SAME-padded, stride-1 conv of float32 x (N, H, W, Ci) with w (3, 3, Ci, Co); Ci and
    Co multiples of 16. Call `available()` first."""
    if _filter_inside(*x.shape[1:3], *w.shape[2:]):
        return _conv_filter(x, w, False)
    return _conv(x, _filter(w, False))


def _fwd(x, w):
    return conv3x3(x, w), (x, w)


def _bwd(res, dy):
    x, w = res
    dy = dy.astype(jnp.float32)
    n, h, wd, cin = x.shape
    cout = w.shape[3]
    if _filter_inside(h, wd, cin, cout):
        dx = _conv_filter(dy, w, True)
    else:
        dx = _conv(dy, _filter(w, True))
    # The weight gradient sums over all 2x2 tiles in a fixed number of chunks (one partial
    # sum each; work buffers in XLA's temporary memory): a function of the shape only, so
    # it is reproducible, with at least 256 tiles per chunk.
    tiles = _tiles(x.shape)
    chunks = max(1, min(8, tiles // 256))
    work = (_f32((chunks, 16, cin, cout)), _f32((16, tiles, cin + cout)))
    dw, *_ = jax.ffi.ffi_call(_WGRAD, (_f32(w.shape), *work), vmap_method="sequential")(x, dy)
    return dx, dw


conv3x3.defvjp(_fwd, _bwd)
