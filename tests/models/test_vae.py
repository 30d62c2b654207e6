"""jaxmed's AutoencoderKL against diffusers' (tiny configs, random weights, no download)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxmed.models import convert, vae

TOL = 1e-4

# diffusers AutoencoderKL keyword arguments.
TINY = {  # SD 1.x-style: 2 levels, 1 layer per block
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 32,
}
THREE_LEVEL = {  # 3 levels, 2 layers per block, other latent width and scaling factor
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 2,
    "norm_num_groups": 16,
    "latent_channels": 3,
    "sample_size": 32,
    "scaling_factor": 0.13025,
}
# Structure only (no compile): no attention, no quant convs, one input channel.
BARE = {
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (8, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "norm_num_groups": 4,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
}
# Input shapes (B, H, W): square, and non-square with an odd side (asymmetric padding).
SHAPES = {"tiny": [(2, 32, 32), (1, 24, 15)], "three_level": [(2, 32, 32), (1, 16, 28)]}


def _randomize(module, torch):
    """Random weights everywhere, norms included (default init leaves them at 1 / 0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name.split(".")[-2]:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def _flat_keys(params):
    return {convert.path_to_key(p): tuple(convert.to_torch_layout(p, np.zeros(v.shape)).shape)
            for p, v in traverse_util.flatten_dict(params).items()}


class Built:
    def __init__(self, kwargs, torch):
        import diffusers

        self.torch_vae = _randomize(diffusers.AutoencoderKL(**kwargs), torch)
        self.config = vae.VAEConfig.from_dict(dict(self.torch_vae.config))
        self.state = {k: v.numpy() for k, v in self.torch_vae.state_dict().items()}
        self.params = convert.state_dict_to_params(
            self.state, vae.abstract_params(self.config), source="diffusers"
        )
        self.model = vae.AutoencoderKL(self.config)
        self.encode = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method="encode"))
        self.decode = jax.jit(lambda p, z: self.model.apply({"params": p}, z, method="decode"))


@pytest.fixture(scope="module")
def models(torch):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Built({"tiny": TINY, "three_level": THREE_LEVEL}[name], torch)
            cache[name].name = name
        return cache[name]

    return get


@pytest.fixture(scope="module", params=["tiny", "three_level"])
def built(request, models):
    return models(request.param)


@pytest.fixture(scope="module")
def tiny(models):
    return models("tiny")


def _nchw(x):
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def _nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def test_parity_with_diffusers(built, torch):
    rng = np.random.default_rng(0)
    f = built.config.downsample_factor
    for b, h, w in SHAPES[built.name]:
        x = rng.uniform(-1, 1, (b, h, w, built.config.in_channels)).astype(np.float32)
        with torch.no_grad():
            dist = built.torch_vae.encode(torch.from_numpy(_nchw(x))).latent_dist
        mean, logvar = built.encode(built.params, x)
        lh, lw = dist.mean.shape[2:]  # floor(side / f): odd sides lose a row (zero pad + stride)
        assert (lh, lw) == (h // f, w // f)
        assert mean.shape == logvar.shape == (b, lh, lw, built.config.latent_channels)
        assert mean.dtype == jnp.float32
        err_m = np.abs(np.asarray(mean) - _nhwc(dist.mean.numpy())).max()
        err_v = np.abs(np.asarray(logvar) - _nhwc(dist.logvar.numpy())).max()

        z = rng.standard_normal((b, lh, lw, built.config.latent_channels)).astype(np.float32)
        with torch.no_grad():
            ref = built.torch_vae.decode(torch.from_numpy(_nchw(z))).sample.numpy()
        out = built.decode(built.params, z)
        assert out.shape == (b, lh * f, lw * f, built.config.out_channels)
        err_d = np.abs(np.asarray(out) - _nhwc(ref)).max()
        print(f"{built.name} {(b, h, w)}: mean {err_m:.2e} logvar {err_v:.2e} decode {err_d:.2e}")
        assert err_m <= TOL and err_v <= TOL and err_d <= TOL, (err_m, err_v, err_d)


def test_bf16_close_to_fp32(tiny):
    built = tiny
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    m16 = vae.AutoencoderKL(built.config, dtype=jnp.bfloat16)
    rec16 = jax.jit(lambda p, x: m16.apply({"params": p}, x))(built.params, x)
    rec32 = jax.jit(lambda p, x: built.model.apply({"params": p}, x))(built.params, x)
    assert rec16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(rec16)))
    rel = float(jnp.abs(rec16 - rec32).max() / jnp.abs(rec32).max())
    print(f"bf16 vs fp32 reconstruction: max rel err {rel:.2e}")
    assert rel < 1e-1


def test_remat_gradients_match(tiny):
    x = np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)

    def grads(remat):
        m = vae.AutoencoderKL(tiny.config, remat=remat)

        def loss(p):  # the "vae" strategy's reconstruction term, through encode and decode
            mean, logvar = m.apply({"params": p}, x, method="encode")
            z = vae.sample_latent(mean, logvar, jax.random.key(0))
            return jnp.mean(jnp.square(m.apply({"params": p}, z, method="decode") - x))

        return jax.jit(jax.grad(loss))(tiny.params)

    g0, g1 = grads(False), grads(True)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)
    assert float(jnp.abs(g0["decoder"]["conv_out"]["kernel"]).max()) > 0


def test_config_round_trip(built):
    import diffusers

    d = vae.VAEConfig.from_dict(dict(built.torch_vae.config)).to_dict()
    assert vae.VAEConfig.from_dict(d) == built.config
    again = diffusers.AutoencoderKL.from_config(d)
    want = {k: tuple(v.shape) for k, v in built.torch_vae.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == want
    assert again.config.scaling_factor == built.config.scaling_factor


@pytest.mark.parametrize("kwargs", [TINY, THREE_LEVEL, BARE], ids=["tiny", "three", "bare"])
def test_param_tree_matches_diffusers_keys(kwargs, torch):
    import diffusers

    with torch.device("meta"):
        tv = diffusers.AutoencoderKL(**kwargs)
    want = {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    assert _flat_keys(vae.abstract_params(vae.VAEConfig.from_dict(dict(tv.config)))) == want


def test_sd15_param_count(torch):
    import diffusers

    cfg = vae.VAEConfig.from_dict(vae.SD15_VAE_CONFIG)
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(vae.abstract_params(cfg)))
    assert n == 83_653_863
    with torch.device("meta"):
        tv = diffusers.AutoencoderKL.from_config(cfg.to_dict())
    assert sum(p.numel() for p in tv.parameters()) == n
    assert cfg.scaling_factor == 0.18215 and cfg.downsample_factor == 8
    # Boxed variables carry logical axis names for the sharding rules.
    boxed = vae.abstract_variables(cfg)["params"]
    kernel = boxed["encoder"]["conv_in"]["kernel"]
    assert kernel.names == ("conv_h", "conv_w", "conv_in", "conv_out")


def test_legacy_attention_names(built):
    def legacy(k):
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        return k

    old = {}
    for k, v in built.state.items():
        lk = legacy(k)
        if lk != k and v.ndim == 2:  # old checkpoints stored these as 1x1 convs
            v = v[:, :, None, None]
        old[lk] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    assert old["decoder.mid_block.attentions.0.query.weight"].ndim == 4
    fixed = {vae.legacy_vae_key(k): v for k, v in old.items()}
    assert set(fixed) == set(built.state)
    params = convert.state_dict_to_params(fixed, vae.abstract_params(built.config))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, built.params)


def test_legacy_vae_key_unit():
    k = vae.legacy_vae_key
    assert k("encoder.mid_block.attentions.0.query.weight") == \
        "encoder.mid_block.attentions.0.to_q.weight"
    assert k("decoder.mid_block.attentions.0.proj_attn.bias") == \
        "decoder.mid_block.attentions.0.to_out.0.bias"
    for same in ("decoder.mid_block.attentions.0.group_norm.weight",
                 "decoder.mid_block.attentions.0.to_v.bias",
                 "encoder.down_blocks.0.resnets.1.conv1.weight", "quant_conv.weight"):
        assert k(same) == same


def _sd15(**changes):
    d = dict(vae.SD15_VAE_CONFIG)
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "d, words",
    [
        (_sd15(down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]),
         ["down_block_types[3]", "AttnDownEncoderBlock2D"]),
        (_sd15(up_block_types=["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"]),
         ["up_block_types[3]", "AttnUpDecoderBlock2D"]),
        (_sd15(act_fn="mish"), ["act_fn", "mish"]),
        (_sd15(norm_num_groups=24), ["block_out_channels", "norm_num_groups=24"]),
        (_sd15(block_out_channels=[128, 256]), ["block_out_channels", "same length"]),
        (_sd15(latents_mean=[0.0] * 4), ["latents_mean", "0.0"]),
        (_sd15(frobnicate=3), ["frobnicate", "3"]),
        (_sd15(_class_name="AutoencoderTiny"), ["_class_name", "AutoencoderTiny"]),
    ],
)
def test_bad_config(d, words):
    with pytest.raises(ValueError) as e:
        vae.VAEConfig.from_dict(d)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_config_defaults_and_ignored_keys():
    d = _sd15(_diffusers_version="0.6.0", _name_or_path="x", _use_default_values=["a"])
    del d["scaling_factor"]  # old SD configs omit it: diffusers' default applies
    cfg = vae.VAEConfig.from_dict(d)
    assert cfg.scaling_factor == 0.18215 and cfg.block_out_channels == (128, 256, 512, 512)
    z = jnp.ones((1, 2, 2, 4))
    np.testing.assert_allclose(cfg.unscale_latents(cfg.scale_latents(z)), z, rtol=1e-6)
    shifted = vae.VAEConfig.from_dict(_sd15(shift_factor=0.5, scaling_factor=2.0))
    np.testing.assert_allclose(shifted.scale_latents(z), (z - 0.5) * 2.0)


def test_diagonal_gaussian_matches_diffusers(torch):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(0)
    params = rng.standard_normal((2, 8, 3, 3)).astype(np.float32) * 3
    params[:, 4:] *= 20  # exercise the logvar clipping
    ref = DiagonalGaussianDistribution(torch.from_numpy(params))
    dist = vae.DiagonalGaussian(*vae.split_moments(jnp.asarray(_nhwc(params))))
    np.testing.assert_allclose(dist.mean, _nhwc(ref.mean.numpy()), rtol=1e-6)
    np.testing.assert_allclose(dist.logvar, _nhwc(ref.logvar.numpy()), rtol=1e-6)
    np.testing.assert_allclose(dist.kl(), ref.kl().numpy(), rtol=1e-5)
    s = vae.sample_latent(dist.mean, dist.logvar, jax.random.key(0))
    assert s.shape == dist.mean.shape
    assert np.isfinite(np.asarray(s)).all()
