"""jaxmed's UNet against PyTorch diffusers' UNet2DConditionModel (tiny configs, random weights)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxmed.models import convert
from jaxmed.models.unet import (
    SD15_UNET_CONFIG,
    SD21_UNET_CONFIG,
    UNet2DConditionModel,
    UNetConfig,
    abstract_params,
    abstract_variables,
    count_params,
    dummy_inputs,
)

# SD 1.x style: conv projections, one head count everywhere.
TINY_SD1 = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# SD 2.x style: per-block heads, linear projections, upcast attention, 2 transformer layers
# on one block; plus non-default values of the other options we support.
TINY_SD2 = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 3,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": [1, 2, 1],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 24,
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 2, 1],
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 4,
    "norm_eps": 1e-6,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "mid_block_scale_factor": 1.5,
    "center_input_sample": True,
}

TIMESTEPS = np.array([3, 917], np.int64)


def _torch_unet(torch, config: dict, seed: int):
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(seed)
    model = TorchUNet(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random affine norms so that norms are really tested
                if name.endswith("weight"):
                    p.copy_(1 + 0.3 * torch.randn_like(p))
                else:
                    p.copy_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(cfg: UNetConfig, h: int, w: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, h, w, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)
    return x, ctx


def _torch_forward(torch, model, x, t, ctx):
    with torch.no_grad():
        out = model(
            torch.from_numpy(x).permute(0, 3, 1, 2), torch.as_tensor(t), torch.from_numpy(ctx)
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


class Pair:
    def __init__(self, torch, config: dict, seed: int):
        self.torch_model = _torch_unet(torch, config, seed)
        self.config = UNetConfig.from_dict(self.torch_model.config)
        state = {k: v.numpy() for k, v in self.torch_model.state_dict().items()}
        self.params = convert.state_dict_to_params(
            state, abstract_params(self.config), source="torch state_dict"
        )
        self.model = UNet2DConditionModel(self.config)
        self.apply = jax.jit(lambda p, x, t, c: self.model.apply({"params": p}, x, t, c))


@pytest.fixture(scope="module")
def sd1(torch):
    return Pair(torch, TINY_SD1, seed=0)


@pytest.fixture(scope="module")
def sd2(torch):
    return Pair(torch, TINY_SD2, seed=1)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
@pytest.mark.parametrize("hw", [(16, 16), (16, 24)])
def test_parity_with_diffusers(torch, request, name, hw):
    pair = request.getfixturevalue(name)
    x, ctx = _inputs(pair.config, *hw, seed=hw[1])
    want = _torch_forward(torch, pair.torch_model, x, TIMESTEPS, ctx)
    got = np.asarray(pair.apply(pair.params, x, TIMESTEPS, ctx))
    assert got.shape == want.shape == (2, *hw, pair.config.out_channels)
    assert got.dtype == np.float32
    err = np.abs(got - want).max()
    assert err <= 1e-4, (
        f"{name} {hw}: max abs error {err:.2e} (output scale {np.abs(want).max():.2f})"
    )


def test_parity_odd_size_and_scalar_timestep(torch, sd2):
    """Sizes that do not halve evenly (diffusers' forward_upsample_size) and a scalar t."""
    x, ctx = _inputs(sd2.config, 10, 14, seed=3)
    want = _torch_forward(torch, sd2.torch_model, x, 421.0, ctx)
    got = np.asarray(sd2.apply(sd2.params, x, 421.0, ctx))
    assert got.shape == want.shape == (2, 10, 14, 3)
    assert np.abs(got - want).max() <= 1e-4


def test_config_roundtrip_rebuilds_same_diffusers_model(torch, sd1, sd2):
    from diffusers import UNet2DConditionModel as TorchUNet

    for pair, raw in ((sd1, TINY_SD1), (sd2, TINY_SD2)):
        assert pair.config == UNetConfig.from_dict(raw)
        d = pair.config.to_dict()
        assert UNetConfig.from_dict(d) == pair.config
        with torch.device("meta"):
            rebuilt = TorchUNet.from_config(d)
        want = {k: tuple(v.shape) for k, v in pair.torch_model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == want


def _flax_shapes_as_torch(abstract) -> dict:
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        out[convert.path_to_key(path)] = shape
    return out


@pytest.mark.parametrize("raw", [SD15_UNET_CONFIG, SD21_UNET_CONFIG], ids=["sd15", "sd21"])
def test_full_size_params_match_diffusers(torch, raw):
    from diffusers import UNet2DConditionModel as TorchUNet

    cfg = UNetConfig.from_dict(raw)
    abstract = abstract_params(cfg)
    with torch.device("meta"):
        ref = TorchUNet.from_config(raw)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert _flax_shapes_as_torch(abstract) == want
    assert count_params(abstract) == sum(p.numel() for p in ref.parameters())
    if raw is SD15_UNET_CONFIG:
        assert count_params(abstract) == 859_520_964
    assert cfg.to_dict()["attention_head_dim"] == raw["attention_head_dim"]


def test_abstract_variables_carry_logical_axes():
    boxed = abstract_variables(UNetConfig.from_dict(TINY_SD1))["params"]
    attn = boxed["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]
    assert isinstance(attn["to_q"]["kernel"], nn.LogicallyPartitioned)
    assert attn["to_q"]["kernel"].names == ("embed", "heads")
    assert attn["to_out_0"]["kernel"].names == ("heads", "embed")
    ff = boxed["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["ff"]
    assert ff["net_0"]["proj"]["kernel"].names == ("embed", "mlp")
    assert ff["net_2"]["kernel"].names == ("mlp", "embed")


def test_bf16_close_to_fp32(sd1):
    x, ctx = _inputs(sd1.config, 16, 16, seed=16)
    ref = np.asarray(sd1.apply(sd1.params, x, TIMESTEPS, ctx))
    model = UNet2DConditionModel(sd1.config, dtype=jnp.bfloat16)
    got = jax.jit(model.apply)({"params": sd1.params}, x, TIMESTEPS, ctx)
    assert got.dtype == jnp.float32
    rel = np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref)
    assert rel < 5e-2, rel


def test_remat_same_outputs_and_grads(sd1):
    x, ctx = _inputs(sd1.config, 8, 8, seed=8)
    x, ctx = x[:1], ctx[:1]

    def loss_fn(model):
        def f(params):
            out = model.apply({"params": params}, x, TIMESTEPS[:1], ctx)
            return jnp.mean(out**2), out

        return jax.jit(jax.value_and_grad(f, has_aux=True))

    # 8 resnets + 4 transformer blocks in the tiny SD 1.x config are rematerialised.
    remat_model = UNet2DConditionModel(sd1.config, remat=True)
    jaxpr = jax.make_jaxpr(lambda p: remat_model.apply({"params": p}, x, TIMESTEPS[:1], ctx))
    assert str(jaxpr(sd1.params)).count("remat") == 12

    (l0, o0), g0 = loss_fn(UNet2DConditionModel(sd1.config))(sd1.params)
    (l1, o1), g1 = loss_fn(remat_model)(sd1.params)
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    flat0, flat1 = traverse_util.flatten_dict(g0), traverse_util.flatten_dict(g1)
    assert flat0.keys() == flat1.keys()
    for k in flat0:
        np.testing.assert_allclose(
            np.asarray(flat1[k]), np.asarray(flat0[k]), rtol=1e-5, atol=1e-6, err_msg=str(k)
        )


def test_dummy_inputs_shapes():
    cfg = UNetConfig.from_dict(SD15_UNET_CONFIG)
    x, t, c = dummy_inputs(cfg, batch=2, height=64)
    assert x.shape == (2, 64, 64, 4) and t.shape == (2,) and c.shape == (2, 8, 768)


@pytest.mark.parametrize(
    "key,value",
    [
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text_time"),
        ("encoder_hid_dim", 64),
        ("time_cond_proj_dim", 256),
        ("dual_cross_attention", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("conv_in_kernel", 1),
        ("only_cross_attention", True),
        ("act_fn", "mish"),
    ],
)
def test_unsupported_config_raises(key, value):
    raw = dict(TINY_SD1, **{key: value})
    with pytest.raises(ValueError) as e:
        UNetConfig.from_dict(raw, source="unet/config.json")
    msg = str(e.value)
    assert msg.startswith("unet/config.json:")
    assert key in msg
    shown = value[0] if isinstance(value, list) else value
    assert repr(shown) in msg, msg
    assert "support" in msg


def test_unknown_key_and_inconsistent_config_raise():
    with pytest.raises(ValueError, match="not_a_unet_key"):
        UNetConfig.from_dict(dict(TINY_SD1, not_a_unet_key=1))
    with pytest.raises(ValueError, match="attention_head_dim|num_attention_heads"):
        UNetConfig.from_dict(dict(TINY_SD1, attention_head_dim=[8, 8, 8]))
    with pytest.raises(ValueError, match="same length"):
        UNetConfig.from_dict(dict(TINY_SD1, up_block_types=["UpBlock2D"]))
    # Defaults written explicitly by diffusers are fine.
    UNetConfig.from_dict(dict(TINY_SD1, class_embed_type=None, dropout=0.0, conv_in_kernel=3))
