"""jaxmed's CLIP text tower against transformers' CLIPTextModel (tiny, random, no download)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxmed.models import clip_text as ct
from jaxmed.models import convert

TOL = 1e-4
VOCAB, BOS, EOS, EXTRA, LEN = 1000, 997, 998, 999, 16  # EXTRA: an added token above EOS

# transformers CLIPTextConfig keyword arguments.
SD1_STYLE = {  # quick_gelu; eos_token_id is the real end-of-text id (transformers' new rule)
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3,
    "num_attention_heads": 4, "max_position_embeddings": LEN, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 32, "bos_token_id": BOS, "eos_token_id": EOS,
    "pad_token_id": 1,
}
SD2_STYLE = {  # gelu, other sizes; eos_token_id 2 as in real SD configs (argmax rule)
    "vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 3, "max_position_embeddings": LEN, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 24, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1,
}


def _ids(seed=0):
    """Two rows padded SD 1.x style (with <|endoftext|>), two SD 2.x style (with id 0). Row 1
    holds an added token with an id above EOS, where transformers' two pooling rules differ."""
    rng = np.random.default_rng(seed)
    rows = []
    for n, pad in ((5, EOS), (LEN - 2, EOS), (3, 0), (9, 0)):
        body = list(rng.integers(3, BOS, n))
        row = [BOS] + body + [EOS]
        rows.append(row + [pad] * (LEN - len(row)))
    rows[1][4] = EXTRA
    return np.asarray(rows, np.int32)


def _randomize(model, torch):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


class Built:
    def __init__(self, kwargs, torch):
        import transformers

        self.torch_model = _randomize(
            transformers.CLIPTextModel(transformers.CLIPTextConfig(**kwargs)), torch
        )
        self.config = ct.CLIPTextConfig.from_dict(self.torch_model.config.to_dict())
        # transformers 5 drops the `text_model.` prefix; real checkpoints have it.
        self.state = {ct.clip_text_key(k): v.numpy()
                      for k, v in self.torch_model.state_dict().items()}
        self.params = convert.state_dict_to_params(
            self.state, ct.abstract_params(self.config), source="transformers",
            ignore_unexpected=ct.IGNORE_UNEXPECTED,
        )
        self.model = ct.CLIPTextModel(self.config)
        self.apply = jax.jit(lambda p, ids: self.model.apply({"params": p}, ids))

    def torch_out(self, ids, **kw):
        import torch

        with torch.no_grad():
            return self.torch_model(torch.from_numpy(ids).long(), **kw)


@pytest.fixture(scope="module")
def models(torch):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Built({"sd1": SD1_STYLE, "sd2": SD2_STYLE}[name], torch)
        return cache[name]

    return get


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def built(request, models):
    return models(request.param)


def _err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_parity_with_transformers(built):
    ids = _ids()
    ref = built.torch_out(ids)
    out = built.apply(built.params, ids)
    e_last = _err(out.last_hidden_state, ref.last_hidden_state.numpy())
    e_pool = _err(out.pooled_output, ref.pooler_output.numpy())
    print(f"{built.config.hidden_act}: last_hidden_state {e_last:.2e} pooled {e_pool:.2e}")
    assert e_last <= TOL and e_pool <= TOL
    # eos_token_id != 2: the first EOS; eos_token_id == 2 (old configs): the first argmax.
    at = (ids == EOS).argmax(-1) if built.config.eos_token_id == EOS else ids.argmax(-1)
    assert (at[1] == 4) == (built.config.eos_token_id == 2)
    np.testing.assert_array_equal(
        out.pooled_output, np.asarray(out.last_hidden_state)[np.arange(len(ids)), at]
    )
    assert out.hidden_states is None


def test_hidden_states_clip_skip_and_padding_mask(models):
    built = models("sd2")
    ids = _ids(1)
    ref = built.torch_out(ids, output_hidden_states=True)
    run = jax.jit(lambda p, ids, mask=None, *, skip=0: built.model.apply(
        {"params": p}, ids, mask, clip_skip=skip, output_hidden_states=True),
        static_argnames="skip")
    out = run(built.params, ids)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert _err(a, b.numpy()) <= TOL
    # clip_skip=1 (SD 2.x's penultimate layer): final_layer_norm(hidden_states[-2]).
    with __import__("torch").no_grad():
        want = built.torch_model.final_layer_norm(ref.hidden_states[-2]).numpy()
    skipped = run(built.params, ids, skip=1)
    assert len(skipped.hidden_states) == 2
    assert _err(skipped.last_hidden_state, want) <= TOL
    # An explicit padding mask (not used by SD pipelines) combines with the causal mask.
    mask = (np.arange(LEN)[None] < np.asarray([[8], [16], [5], [11]])).astype(np.int32)
    ref_m = built.torch_out(ids, attention_mask=__import__("torch").from_numpy(mask))
    out_m = run(built.params, ids, mask)
    e = _err(out_m.last_hidden_state, ref_m.last_hidden_state.numpy())
    print(f"padding mask: last_hidden_state {e:.2e}")
    assert e <= TOL


def test_bf16_close_to_fp32(models):
    built = models("sd1")
    ids = _ids()
    m16 = ct.CLIPTextModel(built.config, dtype=jnp.bfloat16)
    out16 = jax.jit(lambda p, i: m16.apply({"params": p}, i))(built.params, ids)
    out32 = built.apply(built.params, ids)
    assert out16.last_hidden_state.dtype == jnp.bfloat16
    a = out16.last_hidden_state.astype(jnp.float32)
    rel = float(jnp.abs(a - out32.last_hidden_state).max()
                / jnp.abs(out32.last_hidden_state).max())
    print(f"bf16 vs fp32 last_hidden_state: max rel err {rel:.2e}")
    assert rel < 5e-2


def test_remat_gradients_match(models):
    built = models("sd1")
    ids = _ids()

    def grads(remat):
        m = ct.CLIPTextModel(built.config, remat=remat)
        loss = lambda p: jnp.mean(jnp.square(m.apply({"params": p}, ids).last_hidden_state))
        return jax.jit(jax.grad(loss))(built.params)

    g0, g1 = grads(False), grads(True)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_config_round_trip(built):
    import transformers

    d = ct.CLIPTextConfig.from_dict(built.torch_model.config.to_dict()).to_dict()
    assert d["architectures"] == ["CLIPTextModel"] and d["model_type"] == "clip_text_model"
    assert ct.CLIPTextConfig.from_dict(d) == built.config
    again = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(d))
    want = {k: tuple(v.shape) for k, v in built.torch_model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == want
    # ... and our parameter tree has exactly these keys, with the text_model. prefix.
    ours = {convert.path_to_key(p): tuple(convert.to_torch_layout(p, np.zeros(v.shape)).shape)
            for p, v in traverse_util.flatten_dict(ct.abstract_params(built.config)).items()}
    assert ours == {ct.clip_text_key(k): s for k, s in want.items()}


@pytest.mark.parametrize(
    "cfg, count",
    [(ct.SD15_TEXT_CONFIG, 123_060_480), (ct.SD21_TEXT_CONFIG, 340_387_840)],
    ids=["sd15", "sd21"],
)
def test_param_counts(cfg, count, torch):
    import transformers

    n = sum(int(np.prod(x.shape))
            for x in jax.tree_util.tree_leaves(ct.abstract_params(cfg)))
    assert n == count
    with torch.device("meta"):
        tm = transformers.CLIPTextModel(
            transformers.CLIPTextConfig.from_dict(ct.CLIPTextConfig.from_dict(cfg).to_dict())
        )
    assert sum(p.numel() for p in tm.parameters()) == count
    boxed = ct.abstract_variables(cfg)["params"]
    q = boxed["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.names == ("embed", "heads")


def test_checkpoint_key_forms(models):
    built = models("sd1")
    assert ct.clip_text_key("encoder.layers.0.mlp.fc1.weight") == \
        "text_model.encoder.layers.0.mlp.fc1.weight"
    assert ct.clip_text_key("text_model.final_layer_norm.bias") == \
        "text_model.final_layer_norm.bias"
    # Old transformers saved the position_ids buffer: ignored by IGNORE_UNEXPECTED.
    state = dict(built.state)
    state["text_model.embeddings.position_ids"] = np.arange(LEN)[None]
    params = convert.state_dict_to_params(state, ct.abstract_params(built.config),
                                          ignore_unexpected=ct.IGNORE_UNEXPECTED)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, built.params)


def _sd15(**changes):
    d = dict(ct.SD15_TEXT_CONFIG)
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "d, words",
    [
        (_sd15(hidden_act="relu2"), ["hidden_act", "relu2"]),
        (_sd15(num_attention_heads=5), ["num_attention_heads", "5"]),
        (_sd15(model_type="clip_vision_model"), ["model_type", "clip_vision_model"]),
        (_sd15(architectures=["CLIPTextModelWithProjection"]),
         ["architectures", "CLIPTextModelWithProjection"]),
        (_sd15(attention_dropout=0.1), ["attention_dropout", "0.1"]),
    ],
)
def test_bad_config(d, words):
    with pytest.raises(ValueError) as e:
        ct.CLIPTextConfig.from_dict(d)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_real_config_keys_are_accepted():
    # The fields an SD 1.5 text_encoder/config.json written by transformers 4.22 carries.
    d = _sd15(_name_or_path="openai/clip-vit-large-patch14", attention_dropout=0.0, dropout=0.0,
              initializer_factor=1.0, initializer_range=0.02, torch_dtype="float32",
              transformers_version="4.22.0.dev0")
    cfg = ct.CLIPTextConfig.from_dict(d)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.eos_token_id) == (768, 12, 2)
    assert cfg.head_dim == 64


def test_too_long_input_and_bad_clip_skip(models):
    built = models("sd1")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jax.eval_shape(lambda p: built.model.apply({"params": p}, jnp.zeros((1, LEN + 1), int)),
                       built.params)
    with pytest.raises(ValueError, match="clip_skip"):
        jax.eval_shape(lambda p: built.model.apply({"params": p}, jnp.zeros((1, 4), int),
                                                   clip_skip=3), built.params)
