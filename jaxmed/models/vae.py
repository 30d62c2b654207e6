"""Stable Diffusion's VAE (diffusers ``AutoencoderKL``) in Flax.

The module tree mirrors diffusers attribute by attribute, so a diffusers state dict converts
with `jaxmed.models.convert.state_dict_to_params` and nothing else::

    encoder/conv_in, encoder/down_blocks_i/{resnets_j, downsamplers_0/conv},
    encoder/mid_block/{resnets_0, attentions_0, resnets_1}, encoder/conv_norm_out,
    encoder/conv_out, quant_conv, post_quant_conv, decoder/conv_in, decoder/mid_block,
    decoder/up_blocks_i/{resnets_j, upsamplers_0/conv}, decoder/conv_norm_out,
    decoder/conv_out

Images are NHWC in [-1, 1]; latents are NHWC with ``latent_channels`` channels, before
scaling (multiply by ``config.scaling_factor`` for the diffusion model: `scale_latents`).

Usage::

    cfg = VAEConfig.from_dict(SD15_VAE_CONFIG)
    model = AutoencoderKL(cfg, dtype=jnp.bfloat16)
    params = init_params(cfg, jax.random.key(0))
    mean, logvar = model.apply({"params": params}, x, method="encode")
    x_rec = model.apply({"params": params}, mean, method="decode")
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.models.layers import (
    NHWC,
    Conv,
    Dtype,
    GroupNorm,
    Linear,
    activation,
    attention,
    constrain,
    silu,
)

# Every GroupNorm of the VAE (resnets, mid-block attention, conv_norm_out) uses this eps.
VAE_NORM_EPS = 1e-6

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers' get_activation names that jaxmed computes identically (not "mish").
SUPPORTED_ACT_FNS = ("silu", "swish", "gelu", "relu")

# Config keys that carry no architecture (diffusers bookkeeping).
_IGNORED_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path"})


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config (defaults are diffusers' own defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: None = None
    latents_std: None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        def bad(key: str, value: Any, supported: str):
            raise ValueError(
                f"VAE config: unsupported {key}={value!r}; jaxmed's AutoencoderKL supports "
                f"{supported}"
            )

        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            v = getattr(self, key)
            if isinstance(v, str) or not isinstance(v, (list, tuple)):
                bad(key, v, "a list")
            object.__setattr__(self, key, tuple(v))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        for i, t in enumerate(self.down_block_types):
            if t != DOWN_BLOCK:
                bad(f"down_block_types[{i}]", t, f"only {DOWN_BLOCK!r}")
        for i, t in enumerate(self.up_block_types):
            if t != UP_BLOCK:
                bad(f"up_block_types[{i}]", t, f"only {UP_BLOCK!r}")
        n = len(self.block_out_channels)
        if n == 0:
            bad("block_out_channels", self.block_out_channels, "at least one level")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"VAE config: down_block_types ({len(self.down_block_types)} entries), "
                f"up_block_types ({len(self.up_block_types)}) and block_out_channels ({n}) "
                "must have the same length"
            )
        if self.act_fn not in SUPPORTED_ACT_FNS:
            bad("act_fn", self.act_fn, f"one of {list(SUPPORTED_ACT_FNS)}")
        for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                    "norm_num_groups"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, v, "a positive integer")
        for c in self.block_out_channels:
            if not isinstance(c, int) or c < 1 or c % self.norm_num_groups:
                bad("block_out_channels", list(self.block_out_channels),
                    f"positive channel counts divisible by norm_num_groups={self.norm_num_groups}")
        if self.latents_mean is not None or self.latents_std is not None:
            bad("latents_mean/latents_std", (self.latents_mean, self.latents_std),
                "only None (Stable Diffusion 1.x / 2.x VAEs)")
        if isinstance(self.scaling_factor, bool) or not isinstance(self.scaling_factor,
                                                                   (int, float)):
            bad("scaling_factor", self.scaling_factor, "a number")
        for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv",
                    "mid_block_add_attention"):
            if not isinstance(getattr(self, key), bool):
                bad(key, getattr(self, key), "true or false")

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (self.num_levels - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers ``vae/config.json`` dict. Unknown keys are errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in _IGNORED_KEYS or key.startswith("_"):
                continue
            if key not in fields:
                raise ValueError(
                    f"VAE config: unknown key {key!r} (value {value!r}); jaxmed's AutoencoderKL "
                    f"understands {sorted(fields)}"
                )
            kwargs[key] = value
        cls_name = d.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(
                f"VAE config: unsupported _class_name={cls_name!r}; jaxmed supports 'AutoencoderKL'"
            )
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str) -> VAEConfig:
        with open(path) as f:
            try:
                return cls.from_dict(json.load(f))
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """A dict that ``diffusers.AutoencoderKL.from_config`` builds the same model from."""
        d: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """VAE latents -> the diffusion model's latents: (z - shift) * scaling_factor."""
        if self.shift_factor is not None:
            z = z - self.shift_factor
        return z * self.scaling_factor

    def unscale_latents(self, z: jax.Array) -> jax.Array:
        """Inverse of `scale_latents` (what is fed to `AutoencoderKL.decode`)."""
        z = z / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        return z


# Stable Diffusion 1.5's vae/config.json (stable-diffusion-v1-5/stable-diffusion-v1-5).
SD15_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": [DOWN_BLOCK] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": [UP_BLOCK] * 4,
}


# ---------------------------------------------------------------------------------------
# Latent distribution (diffusers' DiagonalGaussianDistribution)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian(NamedTuple):
    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return sample_latent(self.mean, self.logvar, rng)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL to N(0, I), summed over H, W, C (per example), as diffusers computes it."""
        var = jnp.exp(self.logvar)
        return 0.5 * jnp.sum(jnp.square(self.mean) + var - 1.0 - self.logvar, axis=(1, 2, 3))


def split_moments(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """quant_conv output (B, h, w, 2 * latent) -> (mean, logvar) in float32, logvar clipped to
    [-30, 20] as diffusers' DiagonalGaussianDistribution does."""
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """mean + std * eps, eps ~ N(0, I) drawn in float32."""
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps).astype(
        mean.dtype
    )


# ---------------------------------------------------------------------------------------
# Blocks

_ATTN_IN_AXES = ("embed", "heads")
_ATTN_OUT_AXES = ("heads", "embed")


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D without a time embedding (norm1 conv1 norm2 conv2 + shortcut)."""

    out_channels: int
    groups: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.act_fn)
        h = GroupNorm(self.groups, VAE_NORM_EPS, dtype=self.dtype, name="norm1")(x)
        h = Conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(act(h))
        h = GroupNorm(self.groups, VAE_NORM_EPS, dtype=self.dtype, name="norm2")(h)
        h = Conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(act(h))
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, padding=0, dtype=self.dtype, name="conv_shortcut")(x)
        return x.astype(self.dtype) + h


class VAEAttention(nn.Module):
    """The mid-block self-attention: GroupNorm, one head of size C over H*W tokens, residual."""

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.groups, VAE_NORM_EPS, dtype=self.dtype, name="group_norm")(x)
        h = h.reshape(b, hgt * wid, c)
        q = Linear(c, axes=_ATTN_IN_AXES, dtype=self.dtype, name="to_q")(h)
        k = Linear(c, axes=_ATTN_IN_AXES, dtype=self.dtype, name="to_k")(h)
        v = Linear(c, axes=_ATTN_IN_AXES, dtype=self.dtype, name="to_v")(h)
        o = attention(q, k, v, heads=1)
        o = Linear(c, axes=_ATTN_OUT_AXES, dtype=self.dtype, name="to_out_0")(o)
        return o.reshape(b, hgt, wid, c) + x.astype(self.dtype)


class Downsample2D(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv (diffusers, padding=0)."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv(self.channels, 3, strides=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                    name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        x = x.reshape(b, 2 * h, 2 * w, c)
        return Conv(self.channels, 3, dtype=self.dtype, name="conv")(x)


class DownEncoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.act_fn, self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return constrain(x, NHWC)


class UpDecoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.act_fn, self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return constrain(x, NHWC)


class UNetMidBlock2D(nn.Module):
    """resnets_0, then (attentions_0, resnets_1); attention omitted when add_attention=False."""

    channels: int
    groups: int
    act_fn: str
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock2D(self.channels, self.groups, self.act_fn, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.dtype, name="attentions_0")(x)
        x = ResnetBlock2D(self.channels, self.groups, self.act_fn, self.dtype, name="resnets_1")(x)
        return constrain(x, NHWC)


def _maybe_remat(cls, remat: bool):
    return nn.remat(cls) if remat else cls


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        boc = cfg.block_out_channels
        g = cfg.norm_num_groups
        Down = _maybe_remat(DownEncoderBlock2D, self.remat)
        Mid = _maybe_remat(UNetMidBlock2D, self.remat)
        h = Conv(boc[0], 3, dtype=self.dtype, name="conv_in")(constrain(x, NHWC))
        for i, ch in enumerate(boc):
            h = Down(ch, cfg.layers_per_block, g, cfg.act_fn, i < len(boc) - 1, self.dtype,
                     name=f"down_blocks_{i}")(h)
        h = Mid(boc[-1], g, cfg.act_fn, cfg.mid_block_add_attention, self.dtype,
                name="mid_block")(h)
        h = GroupNorm(g, VAE_NORM_EPS, dtype=self.dtype, name="conv_norm_out")(h)
        return Conv(2 * cfg.latent_channels, 3, dtype=self.dtype, name="conv_out")(silu(h))


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        boc = cfg.block_out_channels
        g = cfg.norm_num_groups
        Up = _maybe_remat(UpDecoderBlock2D, self.remat)
        Mid = _maybe_remat(UNetMidBlock2D, self.remat)
        h = Conv(boc[-1], 3, dtype=self.dtype, name="conv_in")(constrain(z, NHWC))
        h = Mid(boc[-1], g, cfg.act_fn, cfg.mid_block_add_attention, self.dtype,
                name="mid_block")(h)
        for i, ch in enumerate(reversed(boc)):
            h = Up(ch, cfg.layers_per_block + 1, g, cfg.act_fn, i < len(boc) - 1, self.dtype,
                   name=f"up_blocks_{i}")(h)
        h = GroupNorm(g, VAE_NORM_EPS, dtype=self.dtype, name="conv_norm_out")(h)
        return Conv(cfg.out_channels, 3, dtype=self.dtype, name="conv_out")(silu(h))


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL: `encode` (image -> mean, logvar) and `decode` (latent -> image).

    ``dtype`` is the compute dtype; parameters stay float32. ``encode`` returns float32
    mean / logvar (logvar clipped to [-30, 20]); ``decode`` returns a float32 NHWC image.
    ``remat`` rematerialises each down / mid / up block in the backward pass.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype, self.remat)
        self.decoder = Decoder(cfg, self.dtype, self.remat)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, 1, padding=0, dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, 1, padding=0, dtype=self.dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent)."""
        h = self.encoder(x)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        return split_moments(h)

    def encode_dist(self, x: jax.Array) -> DiagonalGaussian:
        return DiagonalGaussian(*self.encode(x))

    def decode(self, z: jax.Array) -> jax.Array:
        """z (B, h, w, latent_channels), unscaled -> image (B, h*f, w*f, out_channels)."""
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean (also what `init` traces)."""
        mean, _ = self.encode(x)
        return self.decode(mean)


# ---------------------------------------------------------------------------------------
# Parameters


def _as_config(config: VAEConfig | Mapping[str, Any]) -> VAEConfig:
    return config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)


def _init_input(config: VAEConfig) -> jax.ShapeDtypeStruct:
    s = config.downsample_factor
    return jax.ShapeDtypeStruct((1, s, s, config.in_channels), jnp.float32)


def abstract_variables(config: VAEConfig | Mapping[str, Any]) -> dict:
    """{'params': boxed ShapeDtypeStructs} with logical axis names (for sharding rules)."""
    config = _as_config(config)
    model = AutoencoderKL(config)
    x = _init_input(config)
    return jax.eval_shape(lambda r: model.init(r, jnp.zeros(x.shape, x.dtype)),
                          jax.random.key(0))


def abstract_params(config: VAEConfig | Mapping[str, Any]) -> dict:
    """Plain nested dict of ShapeDtypeStructs (no memory): the target of weight conversion."""
    return nn.meta.unbox(abstract_variables(config)["params"])


def init_params(config: VAEConfig | Mapping[str, Any], rng: jax.Array) -> dict:
    """Random float32 params (PyTorch default init for convs / linears), unboxed."""
    config = _as_config(config)
    model = AutoencoderKL(config)
    x = _init_input(config)

    @jax.jit
    def init(r):
        return nn.meta.unbox(model.init(r, jnp.zeros(x.shape, x.dtype))["params"])

    return init(rng)


# ---------------------------------------------------------------------------------------
# Legacy checkpoint names

_LEGACY_ATTN = re.compile(r"^(?P<pre>.*\.attentions\.\d+\.)(?P<name>query|key|value|proj_attn)"
                          r"\.(?P<leaf>weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def legacy_vae_key(key: str) -> str:
    """Rename diffusers' deprecated VAE attention keys to the current ones (as diffusers does
    when loading): ``...attentions.0.query.weight`` -> ``...attentions.0.to_q.weight``, ``key``
    -> ``to_k``, ``value`` -> ``to_v``, ``proj_attn`` -> ``to_out.0``. Other keys pass through.
    (1x1-conv-shaped (O, I, 1, 1) weights are squeezed by `convert.to_flax_layout`.)"""
    m = _LEGACY_ATTN.match(key)
    if not m:
        return key
    return f"{m.group('pre')}{_LEGACY_NAMES[m.group('name')]}.{m.group('leaf')}"
