"""The CLIP text tower of Stable Diffusion (transformers ``CLIPTextModel``) in Flax.

Parameters are rooted at ``text_model`` so that their keys are the ones real Stable
Diffusion checkpoints carry (``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.N.self_attn.q_proj.weight``, ...,
``text_model.final_layer_norm.weight``). transformers 5 itself names them without the
prefix (it strips ``text_model.`` when loading and saves without it): `clip_text_key` adds it
back, so folders written by either version load.

Usage::

    cfg = CLIPTextConfig.from_dict(SD15_TEXT_CONFIG)
    model = CLIPTextModel(cfg)
    out = model.apply({"params": params}, input_ids)          # (B, 77) int32
    out.last_hidden_state   # (B, 77, hidden): the UNet's encoder_hidden_states
    out.pooled_output       # (B, hidden): the state at the end-of-text token
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.models.layers import (
    BLC,
    Dtype,
    Embed,
    LayerNorm,
    Linear,
    activation,
    attention,
    constrain,
)

# transformers' ACT2FN names -> jaxmed's `layers.activation` names (same functions).
HIDDEN_ACTS = {
    "quick_gelu": "quick_gelu",  # SD 1.x (OpenAI CLIP)
    "gelu": "gelu",  # SD 2.x (OpenCLIP), exact erf gelu
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
MODEL_TYPE = "clip_text_model"
ARCHITECTURE = "CLIPTextModel"

# Keys of the checkpoint that are buffers, not parameters (old transformers saved them).
IGNORE_UNEXPECTED = (r"(^|\.)embeddings\.position_ids$",)

# Architecture-carrying keys are the dataclass fields; these are checked when present and
# every other key (transformers' generic PretrainedConfig fields: initializer_range,
# torch_dtype, id2label, ...) is ignored, as transformers ignores what a model does not use.
_ZERO_KEYS = ("attention_dropout", "dropout")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers ``CLIPTextConfig`` (defaults are transformers' own defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # unused by the text tower (CLIPTextModelWithProjection's)
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    pad_token_id: int | None = 1

    def __post_init__(self):
        def bad(key: str, value: Any, supported: str):
            raise ValueError(
                f"CLIP text config: unsupported {key}={value!r}; jaxmed's CLIPTextModel "
                f"supports {supported}"
            )

        if self.hidden_act not in HIDDEN_ACTS:
            bad("hidden_act", self.hidden_act, f"one of {sorted(HIDDEN_ACTS)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings", "projection_dim"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, v, "a positive integer")
        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", self.num_attention_heads,
                f"a divisor of hidden_size={self.hidden_size}")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            bad("layer_norm_eps", self.layer_norm_eps, "a positive number")
        if self.eos_token_id is None:
            bad("eos_token_id", None, "an integer (the pooled output is taken at it)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """From a transformers ``text_encoder/config.json`` dict."""
        mt = d.get("model_type", MODEL_TYPE)
        if mt != MODEL_TYPE:
            raise ValueError(
                f"CLIP text config: unsupported model_type={mt!r}; jaxmed reads "
                f"{MODEL_TYPE!r} (a text_encoder folder of a Stable Diffusion checkpoint)"
            )
        archs = d.get("architectures") or [ARCHITECTURE]
        if list(archs) != [ARCHITECTURE]:
            raise ValueError(
                f"CLIP text config: unsupported architectures={archs!r}; jaxmed supports "
                f"[{ARCHITECTURE!r}] (no text projection)"
            )
        for key in _ZERO_KEYS:
            if d.get(key, 0.0) not in (0, 0.0, None):
                raise ValueError(
                    f"CLIP text config: unsupported {key}={d[key]!r}; jaxmed supports only 0.0"
                )
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def from_json(cls, path: str) -> CLIPTextConfig:
        with open(path) as f:
            try:
                return cls.from_dict(json.load(f))
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """A dict that transformers' ``CLIPTextConfig(**d)`` / ``from_dict`` accepts and
        ``CLIPTextModel`` builds the same model from."""
        d: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
        d.update(dataclasses.asdict(self))
        d.update(attention_dropout=0.0, initializer_factor=1.0, initializer_range=0.02)
        return d

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Stable Diffusion 1.x's text_encoder/config.json (openai/clip-vit-large-patch14's text tower).
# Note eos_token_id 2: this old config makes transformers pool at argmax(input_ids), which is
# the <|endoftext|> token 49407 (the largest id).
SD15_TEXT_CONFIG: dict[str, Any] = {
    "architectures": [ARCHITECTURE],
    "model_type": MODEL_TYPE,
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# Stable Diffusion 2.1's text_encoder/config.json (OpenCLIP ViT-H/14 text tower, its last of
# 24 layers dropped: SD 2.x conditions on the penultimate layer).
SD21_TEXT_CONFIG: dict[str, Any] = {
    "architectures": [ARCHITECTURE],
    "model_type": MODEL_TYPE,
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


# ---------------------------------------------------------------------------------------
# Model


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, L, D), after final_layer_norm
    pooled_output: jax.Array  # (B, D), last_hidden_state at the end-of-text token
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings, then each layer's output


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        d = self.config.hidden_size
        proj = lambda name, axes: Linear(d, axes=axes, dtype=self.dtype, name=name)
        q = proj("q_proj", ("embed", "heads"))(x)
        k = proj("k_proj", ("embed", "heads"))(x)
        v = proj("v_proj", ("embed", "heads"))(x)
        o = attention(q, k, v, self.config.num_attention_heads, mask=mask)
        return proj("out_proj", ("heads", "embed"))(o)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = Linear(cfg.intermediate_size, axes=("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        h = activation(HIDDEN_ACTS[cfg.hidden_act])(h)
        return Linear(cfg.hidden_size, axes=("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        h = LayerNorm(eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(h, mask)
        h = LayerNorm(eps, dtype=self.dtype, name="layer_norm2")(x)
        x = x + CLIPMLP(self.config, self.dtype, name="mlp")(h)
        return constrain(x, BLC)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        tok = Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")
        pos = Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"),
                    dtype=self.dtype, name="position_embedding")
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[-1]))[None]


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, mask, num_layers: int, output_hidden_states: bool):
        Layer = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        hidden = [x]
        for i in range(num_layers):
            x = Layer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
            if output_hidden_states:
                hidden.append(x)
        return x, tuple(hidden) if output_hidden_states else None


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, clip_skip: int, output_hidden_states: bool):
        cfg = self.config
        b, seq = input_ids.shape
        if seq > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIP text: sequence length {seq} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings}"
            )
        if not 0 <= clip_skip < cfg.num_hidden_layers:
            raise ValueError(
                f"CLIP text: clip_skip={clip_skip} must be in [0, {cfg.num_hidden_layers})"
            )
        x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        x = constrain(x, BLC)
        mask = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask.astype(bool)[:, None, None, :])
        x, hidden = CLIPEncoder(cfg, self.dtype, self.remat, name="encoder")(
            x, mask, cfg.num_hidden_layers - clip_skip, output_hidden_states
        )
        x = LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        if cfg.eos_token_id == 2:
            # transformers keeps the pre-#24773 rule for configs with eos_token_id 2 (SD 1.x
            # and 2.x): <|endoftext|> is the largest id, take the first argmax.
            idx = jnp.argmax(input_ids, axis=-1)
        else:
            idx = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = x[jnp.arange(b), idx]
        return CLIPTextOutput(x, pooled, hidden)


class CLIPTextModel(nn.Module):
    """transformers CLIPTextModel. ``dtype`` is the compute dtype (params stay float32);
    ``remat`` rematerialises each encoder layer in the backward pass.

    ``__call__(input_ids, attention_mask=None, *, clip_skip=0, output_hidden_states=False)``:
    a causal mask always applies; ``attention_mask`` (B, L), 1 = attend, adds a padding mask
    (Stable Diffusion pipelines pass none). ``clip_skip=k`` runs only the first
    ``num_hidden_layers - k`` layers and applies ``final_layer_norm`` to that output, as
    diffusers' ``clip_skip`` does (``hidden_states[-(k + 1)]`` then the final norm); the
    pooled output is then taken from that state.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        clip_skip: int = 0,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        return CLIPTextTransformer(self.config, self.dtype, self.remat, name="text_model")(
            input_ids, attention_mask, clip_skip, output_hidden_states
        )


# ---------------------------------------------------------------------------------------
# Parameters


def _as_config(config: CLIPTextConfig | Mapping[str, Any]) -> CLIPTextConfig:
    return config if isinstance(config, CLIPTextConfig) else CLIPTextConfig.from_dict(config)


def _init_fn(config: CLIPTextConfig):
    model = CLIPTextModel(config)
    return lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))


def abstract_variables(config: CLIPTextConfig | Mapping[str, Any]) -> dict:
    """{'params': boxed ShapeDtypeStructs} with logical axis names (for sharding rules)."""
    return jax.eval_shape(_init_fn(_as_config(config)), jax.random.key(0))


def abstract_params(config: CLIPTextConfig | Mapping[str, Any]) -> dict:
    """Plain nested dict of ShapeDtypeStructs (no memory): the target of weight conversion."""
    return nn.meta.unbox(abstract_variables(config)["params"])


def init_params(config: CLIPTextConfig | Mapping[str, Any], rng: jax.Array) -> dict:
    """Random float32 params (normal(0.02) embeddings, PyTorch default linears), unboxed."""
    init = _init_fn(_as_config(config))
    return jax.jit(lambda r: nn.meta.unbox(init(r)["params"]))(rng)


def clip_text_key(key: str) -> str:
    """A text-encoder state-dict key in the real-checkpoint layout: adds the ``text_model.``
    prefix that transformers 5 leaves out when it saves a CLIPTextModel."""
    return key if key.startswith("text_model.") else f"text_model.{key}"
