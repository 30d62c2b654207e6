"""The building blocks of jaxmed's UNet, named as diffusers names them.

Layers that know nothing of the UNet's configuration (timestep embedding, resnet,
attention, the transformer block, down- and upsampling) and the three kinds of level that
`jaxmed.models.unet.UNet2DConditionModel` stacks (`DownBlock`, `MidBlock`, `UpBlock`),
which read their sizes from that model's `UNetConfig`. Every module's attribute names are
diffusers' (``attentions_0/transformer_blocks_0/attn1/to_q``), so
`jaxmed.models.convert` maps a diffusers state dict onto them with no special cases.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.models import layers
from jaxmed.models.layers import Conv, GroupNorm, LayerNorm, Linear

Dtype = Any
# A `jaxmed.models.unet.UNetConfig` (typed loosely: that module imports this one).
UNetConfig = Any

def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float
) -> jax.Array:
    """diffusers' ``get_timestep_embedding`` in float32: (B,) -> (B, dim)."""
    half = dim // 2
    # Frequencies are constants; build them in float32 exactly as torch does.
    exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32)
    freqs = np.exp(exponent / np.float32(half - freq_shift)).astype(np.float32)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2, computed in float32 (it is tiny)."""

    features: int
    act_fn: str = "silu"

    @nn.compact
    def __call__(self, t_emb: jax.Array) -> jax.Array:
        h = Linear(self.features, name="linear_1")(t_emb)
        h = layers.activation(self.act_fn)(h)
        return Linear(self.features, name="linear_2")(h)


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv, + time embedding, GroupNorm-act-conv, + (1x1-projected) input.

    ``temb`` must already have been through the activation (the UNet applies it once for
    all blocks; diffusers applies the same function inside every block).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        act = layers.activation(self.act_fn)
        h = act(GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x))
        h = Conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
        t = Linear(self.out_channels, dtype=self.dtype, name="time_emb_proj")(temb)
        h = h + t[:, None, None, :]
        h = act(GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h))
        h = Conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(
                self.out_channels, kernel_size=1, padding=0, dtype=self.dtype, name="conv_shortcut"
            )(x)
        out = x.astype(self.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return layers.constrain(out, layers.NHWC)


class Attention(nn.Module):
    """diffusers ``Attention``: to_q / to_k / to_v without bias, to_out_0 with bias."""

    heads: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    impl: str = "auto"  # model.attention: see jaxmed.kernels.dispatch.attention

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        ctx = x if context is None else context
        qkv = dict(use_bias=False, axes=("embed", "heads"), dtype=self.dtype)
        q = Linear(c, name="to_q", **qkv)(x)
        k = Linear(c, name="to_k", **qkv)(ctx)
        v = Linear(c, name="to_v", **qkv)(ctx)
        o = layers.attention(q, k, v, self.heads, upcast=self.upcast, impl=self.impl)
        return Linear(c, axes=("heads", "embed"), dtype=self.dtype, name="to_out_0")(o)


class GEGLU(nn.Module):
    """proj: C -> 2 * inner, split into value and gate; value * gelu(gate) (exact gelu)."""

    inner: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Linear(2 * self.inner, axes=("embed", "mlp"), dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = GEGLU(self.mult * c, dtype=self.dtype, name="net_0")(x)
        return Linear(c, axes=("mlp", "embed"), dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    heads: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        attn = dict(heads=self.heads, upcast=self.upcast, dtype=self.dtype,
                    impl=self.attention_impl)
        h = LayerNorm(1e-5, dtype=self.dtype, name="norm1")(x)
        x = x + Attention(name="attn1", **attn)(h)
        h = LayerNorm(1e-5, dtype=self.dtype, name="norm2")(x)
        x = x + Attention(name="attn2", **attn)(h, context)
        h = LayerNorm(1e-5, dtype=self.dtype, name="norm3")(x)
        x = x + FeedForward(dtype=self.dtype, name="ff")(h)
        return layers.constrain(x, layers.BLC)


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6), proj_in, transformer blocks on (B, H*W, C), proj_out, + input."""

    heads: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.groups, 1e-6, dtype=self.dtype, name="norm")(x)
        h = h.reshape(b, hgt * wid, c)  # NHWC -> (B, L, C): free, no transpose
        # A 1x1 conv and a Linear are the same matmul; only the stored kernel shape differs.
        if self.use_linear_projection:
            proj_in = Linear(c, dtype=self.dtype, name="proj_in")
        else:
            proj_in = Conv(c, kernel_size=1, padding=0, dtype=self.dtype, name="proj_in")
        h = layers.constrain(proj_in(h), layers.BLC)
        block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            h = block_cls(
                self.heads, upcast=self.upcast, dtype=self.dtype,
                attention_impl=self.attention_impl, name=f"transformer_blocks_{i}"
            )(h, context)
        if self.use_linear_projection:
            proj_out = Linear(c, dtype=self.dtype, name="proj_out")
        else:
            proj_out = Conv(c, kernel_size=1, padding=0, dtype=self.dtype, name="proj_out")
        h = proj_out(h).reshape(b, hgt, wid, c)
        return layers.constrain(h + x.astype(self.dtype), layers.NHWC)


class Downsample2D(nn.Module):
    """3x3 conv with stride 2; padding 0 means diffusers' (0, 1) right/bottom pad."""

    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
        return Conv(x.shape[-1], strides=2, padding=pad, dtype=self.dtype, name="conv")(x)


def _nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch's F.interpolate(mode='nearest') on NHWC; exact 2x is a broadcast."""
    b, h, w, c = x.shape
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, oh, ow, c)
    for axis, n_in, n_out in ((1, h, oh), (2, w, ow)):
        if n_in != n_out:
            scale = np.float32(n_in) / np.float32(n_out)
            idx = np.minimum(
                np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1
            )
            x = jnp.take(x, idx, axis=axis)
    return x


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (2x, or to ``size``), then a 3x3 conv."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        if size is None:
            size = (2 * x.shape[1], 2 * x.shape[2])
        x = _nearest_resize(x, tuple(size))
        return Conv(x.shape[-1], dtype=self.dtype, name="conv")(x)


def _resnet_cls(remat: bool):
    return nn.remat(ResnetBlock2D) if remat else ResnetBlock2D


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (``attention``) or DownBlock2D; returns (x, skip outputs)."""

    config: UNetConfig
    index: int
    attention: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, i = self.config, self.index
        out = cfg.block_out_channels[i]
        resnet = _resnet_cls(self.remat)
        skips = []
        for j in range(cfg.layers_per_block[i]):
            x = resnet(
                out,
                cfg.norm_num_groups,
                cfg.norm_eps,
                cfg.act_fn,
                dtype=self.dtype,
                name=f"resnets_{j}",
            )(x, temb)
            if self.attention:
                x = Transformer2DModel(
                    cfg.num_attention_heads[i],
                    num_layers=cfg.transformer_layers_per_block[i],
                    groups=cfg.norm_num_groups,
                    use_linear_projection=cfg.use_linear_projection,
                    upcast=cfg.upcast_attention,
                    remat=self.remat,
                    dtype=self.dtype,
                    attention_impl=self.attention_impl,
                    name=f"attentions_{j}",
                )(x, context)
            skips.append(x)
        if i < len(cfg.block_out_channels) - 1:
            x = Downsample2D(cfg.downsample_padding, dtype=self.dtype, name="downsamplers_0")(x)
            x = layers.constrain(x, layers.NHWC)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnets_0, attentions_0, resnets_1."""

    config: UNetConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.config
        c = cfg.block_out_channels[-1]
        resnet = _resnet_cls(self.remat)
        args = (c, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, cfg.mid_block_scale_factor)
        x = resnet(*args, dtype=self.dtype, name="resnets_0")(x, temb)
        x = Transformer2DModel(
            cfg.num_attention_heads[-1],
            num_layers=cfg.transformer_layers_per_block[-1],
            groups=cfg.norm_num_groups,
            use_linear_projection=cfg.use_linear_projection,
            upcast=cfg.upcast_attention,
            remat=self.remat,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name="attentions_0",
        )(x, context)
        return resnet(*args, dtype=self.dtype, name="resnets_1")(x, temb)


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (``attention``) or UpBlock2D; up block ``index`` counts from the
    bottom of the UNet, as diffusers' ``up_blocks`` do."""

    config: UNetConfig
    index: int
    attention: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        cfg, i = self.config, self.index
        level = len(cfg.block_out_channels) - 1 - i  # the down block this one mirrors
        out = cfg.block_out_channels[level]
        resnet = _resnet_cls(self.remat)
        skips = list(skips)
        for j in range(cfg.layers_per_block[level] + 1):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = resnet(
                out,
                cfg.norm_num_groups,
                cfg.norm_eps,
                cfg.act_fn,
                dtype=self.dtype,
                name=f"resnets_{j}",
            )(x, temb)
            if self.attention:
                x = Transformer2DModel(
                    cfg.num_attention_heads[level],
                    num_layers=cfg.transformer_layers_per_block[level],
                    groups=cfg.norm_num_groups,
                    use_linear_projection=cfg.use_linear_projection,
                    upcast=cfg.upcast_attention,
                    remat=self.remat,
                    dtype=self.dtype,
                    attention_impl=self.attention_impl,
                    name=f"attentions_{j}",
                )(x, context)
        if level > 0:
            x = Upsample2D(dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
            x = layers.constrain(x, layers.NHWC)
        return x
