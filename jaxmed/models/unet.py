"""Stable Diffusion's UNet2DConditionModel (SD 1.x / SD 2.x) in Flax linen.

Module and parameter names mirror diffusers' ``UNet2DConditionModel`` attribute for
attribute (``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel`` is
``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight``), so
`jaxmed.models.convert` maps a diffusers state dict onto this model with no special cases.
This module holds the configuration, the model that stacks the levels, and its parameter
helpers; the blocks themselves are in `jaxmed.models.unet_blocks`.

* `UNetConfig` reads / writes a diffusers ``unet/config.json`` dict; anything that would
  build a different architecture than the one implemented here is a ValueError naming the
  key and value.
* `UNet2DConditionModel` takes NHWC latents, (B,) or scalar timesteps and (B, L, D) text
  states and returns the NHWC noise prediction in float32. ``dtype`` is the compute dtype;
  params stay float32; norms, softmax and the time embedding run in float32.
* ``remat=True`` rematerialises every resnet and transformer block (less activation memory
  in training, one extra forward of those blocks in the backward pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.models import layers
from jaxmed.models.layers import Conv, GroupNorm
from jaxmed.models.unet_blocks import (
    DownBlock,
    MidBlock,
    TimestepEmbedding,
    UpBlock,
    timestep_embedding,
)

Dtype = Any

CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"
DOWN = "DownBlock2D"
CROSS_ATTN_UP = "CrossAttnUpBlock2D"
UP = "UpBlock2D"
MID_CROSS_ATTN = "UNetMidBlock2DCrossAttn"
SUPPORTED_DOWN_BLOCKS = (CROSS_ATTN_DOWN, DOWN)
SUPPORTED_UP_BLOCKS = (CROSS_ATTN_UP, UP)
SUPPORTED_MID_BLOCKS = (MID_CROSS_ATTN, None)

# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------

# diffusers keys that only change the architecture away from SD 1.x / 2.x: accepted only at
# the values listed (the first is diffusers' default).
_FIXED_KEYS: dict[str, tuple[Any, ...]] = {
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "dropout": (0.0,),
}
# Keys that only matter together with a feature refused above: any value is accepted.
_INERT_KEYS = frozenset({"addition_time_embed_dim", "addition_embed_type_num_heads"})
_SUPPORTED_ACT_FNS = ("silu", "swish")


def _err(source: str | None, msg: str) -> ValueError:
    return ValueError(f"{source}: {msg}" if source else msg)


def _same(value: Any, allowed: Any) -> bool:
    """``value == allowed`` without True == 1 or None == anything."""
    if allowed is None or isinstance(allowed, bool) or isinstance(value, bool):
        return value is allowed or (isinstance(value, np.bool_) and bool(value) is allowed)
    return isinstance(value, (int, float, str, np.number)) and value == allowed


def _per_block(value: Any, n: int, key: str, source: str | None = None) -> tuple[int, ...]:
    """int -> (int,) * n; a sequence of n ints -> tuple; anything else is an error."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),) * n
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value
        ):
            raise _err(
                source,
                f"unet config: {key}={list(value)!r} must be an int or a list of {n} ints "
                f"(one per down block); nested per-layer lists are not supported",
            )
        return tuple(int(v) for v in value)
    raise _err(source, f"unet config: {key}={value!r} must be an int or a list of {n} ints")


def _compact(values: tuple[int, ...]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else list(values)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture of an SD 1.x / 2.x UNet, normalised.

    Per-block fields (``layers_per_block``, ``transformer_layers_per_block``,
    ``num_attention_heads``) may be given as an int and are stored as one value per down
    block. ``num_attention_heads`` is the real number of heads (diffusers' configs call it
    ``attention_head_dim``; see `from_dict`).
    """

    sample_size: int | tuple[int, int] | None = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (DOWN,)
    mid_block_type: str | None = MID_CROSS_ATTN
    up_block_types: tuple[str, ...] = (UP,) + (CROSS_ATTN_UP,) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    num_attention_heads: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False

    def __post_init__(self):
        n = len(self.down_block_types)
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("down_block_types", tuple(self.down_block_types))
        set_("up_block_types", tuple(self.up_block_types))
        set_("block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if isinstance(self.sample_size, Sequence):
            set_("sample_size", tuple(int(s) for s in self.sample_size))
        for key in ("layers_per_block", "transformer_layers_per_block", "num_attention_heads"):
            set_(key, _per_block(getattr(self, key), n, key))
        self.validate()

    def validate(self, source: str | None = None) -> None:
        n = len(self.down_block_types)
        for key, kinds in (
            ("down_block_types", SUPPORTED_DOWN_BLOCKS),
            ("up_block_types", SUPPORTED_UP_BLOCKS),
        ):
            for t in getattr(self, key):
                if t not in kinds:
                    raise _err(
                        source,
                        f"unet config: {key} contains {t!r}, which jaxmed's UNet does not "
                        f"support; supported {key}: {list(kinds)}",
                    )
        if self.mid_block_type not in SUPPORTED_MID_BLOCKS:
            raise _err(
                source,
                f"unet config: mid_block_type={self.mid_block_type!r} is not supported; "
                f"supported mid_block_type: {list(SUPPORTED_MID_BLOCKS)}",
            )
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise _err(
                source,
                "unet config: down_block_types, up_block_types and block_out_channels must "
                f"have the same length; got {n}, {len(self.up_block_types)} and "
                f"{len(self.block_out_channels)}",
            )
        if self.act_fn not in _SUPPORTED_ACT_FNS:
            raise _err(
                source,
                f"unet config: act_fn={self.act_fn!r} is not supported; supported act_fn: "
                f"{list(_SUPPORTED_ACT_FNS)}",
            )
        if not isinstance(self.norm_num_groups, int) or isinstance(self.norm_num_groups, bool):
            raise _err(
                source,
                f"unet config: norm_num_groups={self.norm_num_groups!r} is not supported; "
                "it must be an int (GroupNorm everywhere, as in SD)",
            )
        if not isinstance(self.cross_attention_dim, int) or isinstance(
            self.cross_attention_dim, bool
        ):
            raise _err(
                source,
                f"unet config: cross_attention_dim={self.cross_attention_dim!r} is not "
                "supported; it must be one int (768 for SD 1.x, 1024 for SD 2.x)",
            )
        for c, h in zip(self.block_out_channels, self.num_attention_heads):
            if c % h:
                raise _err(
                    source,
                    f"unet config: block_out_channels {c} is not divisible by {h} attention "
                    "heads (attention_head_dim / num_attention_heads)",
                )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise _err(
                    source,
                    f"unet config: block_out_channels {c} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}",
                )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    # -- diffusers config.json ------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> UNetConfig:
        """Parse a diffusers ``unet/config.json`` dict (or a torch model's ``.config``).

        ``source`` (e.g. the file path) prefixes every error message. Keys starting with
        ``_`` are ignored; unknown keys and unsupported values raise ValueError.
        """
        d = {k: v for k, v in dict(d).items() if not k.startswith("_")}
        fields = {f.name for f in dataclasses.fields(cls)}
        renamed = {"attention_head_dim", "num_attention_heads", "only_cross_attention"}
        unknown = sorted(set(d) - fields - renamed - set(_FIXED_KEYS) - _INERT_KEYS)
        if unknown:
            raise _err(
                source,
                f"unet config: unknown key(s) {unknown}; jaxmed's UNet reads the "
                "UNet2DConditionModel keys of diffusers",
            )
        for key, allowed in _FIXED_KEYS.items():
            if key in d and not any(_same(d[key], a) for a in allowed):
                raise _err(
                    source,
                    f"unet config: {key}={d[key]!r} is not supported by jaxmed's UNet "
                    f"(SD 1.x / 2.x architecture); supported {key}: {list(allowed)}",
                )
        only_cross = d.pop("only_cross_attention", False)
        flags = only_cross if isinstance(only_cross, (list, tuple)) else [only_cross]
        if any(bool(f) for f in flags):
            raise _err(
                source,
                f"unet config: only_cross_attention={only_cross!r} is not supported; "
                "supported only_cross_attention: [False]",
            )
        # diffusers' naming bug: without num_attention_heads, attention_head_dim IS the
        # number of heads per block.
        heads_key = "attention_head_dim"
        heads = d.pop("attention_head_dim", 8)
        if d.get("num_attention_heads") is not None:
            heads_key, heads = "num_attention_heads", d["num_attention_heads"]
        d.pop("num_attention_heads", None)
        kwargs = {k: v for k, v in d.items() if k in fields}
        cad = kwargs.get("cross_attention_dim", 1280)
        if isinstance(cad, (list, tuple)) and len(set(cad)) == 1:
            kwargs["cross_attention_dim"] = cad[0]
        kwargs.setdefault("cross_attention_dim", 1280)  # diffusers' default
        for key in ("down_block_types", "up_block_types"):
            if key in kwargs:
                if isinstance(kwargs[key], str) or not isinstance(kwargs[key], Sequence):
                    raise _err(source, f"unet config: {key}={kwargs[key]!r} must be a list")
                kwargs[key] = tuple(
                    t[7:] if isinstance(t, str) and t.startswith("UNetRes") else t
                    for t in kwargs[key]
                )
        n = len(kwargs.get("down_block_types", cls.down_block_types))
        for key in ("layers_per_block", "transformer_layers_per_block"):
            if key in kwargs:
                kwargs[key] = _per_block(kwargs[key], n, key, source)
        kwargs["num_attention_heads"] = _per_block(heads, n, heads_key, source)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise _err(source, str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        """A diffusers ``unet/config.json`` dict (``UNet2DConditionModel.from_config``
        builds the same architecture from it)."""
        sample_size = self.sample_size
        if isinstance(sample_size, tuple):
            sample_size = list(sample_size)
        return {
            "_class_name": "UNet2DConditionModel",
            "act_fn": self.act_fn,
            # diffusers' naming bug: this key holds the number of heads per block.
            "attention_head_dim": _compact(self.num_attention_heads),
            "block_out_channels": list(self.block_out_channels),
            "center_input_sample": self.center_input_sample,
            "class_embed_type": None,
            "cross_attention_dim": self.cross_attention_dim,
            "down_block_types": list(self.down_block_types),
            "downsample_padding": self.downsample_padding,
            "dual_cross_attention": False,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "in_channels": self.in_channels,
            "layers_per_block": _compact(self.layers_per_block),
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "mid_block_type": self.mid_block_type,
            "norm_eps": self.norm_eps,
            "norm_num_groups": self.norm_num_groups,
            "num_class_embeds": None,
            "only_cross_attention": False,
            "out_channels": self.out_channels,
            "resnet_time_scale_shift": "default",
            "sample_size": sample_size,
            "transformer_layers_per_block": _compact(self.transformer_layers_per_block),
            "up_block_types": list(self.up_block_types),
            "upcast_attention": self.upcast_attention,
            "use_linear_projection": self.use_linear_projection,
        }


_SD_DOWN = [CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, DOWN]
_SD_UP = [UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP]

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
SD15_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": list(_SD_DOWN),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": list(_SD_UP),
}

# stabilityai/stable-diffusion-2-1 unet/config.json
SD21_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": list(_SD_DOWN),
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": list(_SD_UP),
    "upcast_attention": True,
    "use_linear_projection": True,
}


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class UNet2DConditionModel(nn.Module):
    """SD's conditional UNet: (B, H, W, C_in) latents -> (B, H, W, C_out) float32."""

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    # model.attention: auto | einsum | dot_product | flash (jaxmed.kernels.dispatch.attention)
    attention: str = "auto"

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
    ) -> jax.Array:
        cfg = self.config
        b = sample.shape[0]
        act = layers.activation(cfg.act_fn)

        # time: sinusoidal -> MLP, float32; every resnet sees act(emb).
        t = jnp.asarray(timesteps, dtype=jnp.float32).reshape(-1)
        t = jnp.broadcast_to(t, (b,))
        t_emb = timestep_embedding(
            t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
        )
        emb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, name="time_embedding")(t_emb)
        temb = act(emb)

        context = layers.constrain(encoder_hidden_states.astype(self.dtype), layers.BLC)
        x = sample.astype(jnp.float32)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = Conv(cfg.block_out_channels[0], dtype=self.dtype, name="conv_in")(x)
        x = layers.constrain(x, layers.NHWC)

        skips = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, res = DownBlock(
                cfg, i, kind == CROSS_ATTN_DOWN, self.remat, self.dtype,
                attention_impl=self.attention, name=f"down_blocks_{i}"
            )(x, temb, context)
            skips += res

        if cfg.mid_block_type == MID_CROSS_ATTN:
            x = MidBlock(cfg, self.remat, self.dtype, attention_impl=self.attention,
                         name="mid_block")(x, temb, context)

        n = len(cfg.block_out_channels)
        for i, kind in enumerate(cfg.up_block_types):
            k = cfg.layers_per_block[n - 1 - i] + 1
            res, skips = skips[-k:], skips[:-k]
            # Upsample to the next skip's size: 2x, or torch's nearest resize for odd sizes.
            size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
            x = UpBlock(
                cfg, i, kind == CROSS_ATTN_UP, self.remat, self.dtype,
                attention_impl=self.attention, name=f"up_blocks_{i}"
            )(x, res, temb, context, size)

        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype, name="conv_norm_out")(x)
        x = act(x)
        x = Conv(cfg.out_channels, dtype=self.dtype, name="conv_out")(x)
        return layers.constrain(x.astype(jnp.float32), layers.NHWC)


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


def dummy_inputs(
    config: UNetConfig,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    seq_len: int = 8,
    dtype: Dtype = jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zero (sample NHWC, timesteps (B,), encoder_hidden_states) for init / tracing; the
    default spatial size is the smallest that keeps every level's size exact (params do
    not depend on it)."""
    smallest = 2 ** (len(config.block_out_channels) - 1)
    height = height or smallest
    width = width or height
    return (
        jnp.zeros((batch, height, width, config.in_channels), dtype),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, seq_len, config.cross_attention_dim), dtype),
    )


def _init_fn(config: UNetConfig):
    model = UNet2DConditionModel(config)
    return lambda rng: model.init(rng, *dummy_inputs(config))


def abstract_variables(config: UNetConfig) -> dict:
    """``{'params': ...}`` of ShapeDtypeStructs inside nn.LogicallyPartitioned boxes (for
    sharding rules); no memory is allocated."""
    return jax.eval_shape(_init_fn(config), jax.random.PRNGKey(0))


def abstract_params(config: UNetConfig) -> dict:
    """The plain param tree as ShapeDtypeStructs (no memory); the target for
    `jaxmed.models.convert.state_dict_to_params`."""
    return nn.meta.unbox(abstract_variables(config)["params"])


def init_params(config: UNetConfig, rng: jax.Array, dtype: Dtype = jnp.float32) -> dict:
    """Randomly initialised plain params (PyTorch's default init), cast to ``dtype``."""
    params = nn.meta.unbox(jax.jit(_init_fn(config))(rng)["params"])
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def count_params(params: Any) -> int:
    """Number of scalars in a (possibly abstract or boxed) param tree."""
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(nn.meta.unbox(params)))
