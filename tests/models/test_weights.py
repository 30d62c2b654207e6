"""diffusers-layout folders in and out: what PyTorch writes, jaxmed reads (sharded, fp16
variants, pickles only on request), what jaxmed writes, PyTorch reads; bad folders give
errors that name the file and the key."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.models import clip_text, tiny, unet, vae, weights
from jaxmed.models.convert import WeightMismatchError, params_to_state_dict
from jaxmed.models.tokenizer import tokenize

TOL = 1e-4


@pytest.fixture(scope="module")
def torch_pipeline(tmp_path_factory, torch):
    """A tiny PyTorch StableDiffusionPipeline saved with save_pretrained (safetensors)."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfgs = tiny.configs("test")
    u = UNet2DConditionModel(**cfgs["unet"].to_dict())
    v = AutoencoderKL(**cfgs["vae"].to_dict())
    t = CLIPTextModel(CLIPTextConfig(**{k: x for k, x in cfgs["text_encoder"].to_dict().items()
                                        if k not in ("architectures",)}))
    for m in (u, v, t):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))  # norms and biases away from 1 / 0
    pipe = StableDiffusionPipeline(
        vae=v, text_encoder=t, tokenizer=tiny.clip_tokenizer(), unet=u,
        scheduler=PNDMScheduler.from_config(tiny.SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    folder = str(tmp_path_factory.mktemp("torch-sd"))
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
            np.array([3, 700]), rng.standard_normal((2, 77, 32)).astype(np.float32),
            rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))


def _torch_outputs(pipe, torch, ids):
    x, t, ctx, img = _inputs()
    with torch.no_grad():
        u = pipe.unet(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(t),
                      torch.tensor(ctx)).sample.permute(0, 2, 3, 1).numpy()
        dist = pipe.vae.encode(torch.tensor(img).permute(0, 3, 1, 2)).latent_dist
        mean = dist.mean.permute(0, 2, 3, 1).numpy()
        dec = pipe.vae.decode(torch.tensor(x).permute(0, 3, 1, 2)).sample
        dec = dec.permute(0, 2, 3, 1).numpy()
        h = pipe.text_encoder(torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
    return u, mean, dec, h


def _jax_outputs(p, ids):
    x, t, ctx, img = _inputs()
    u = unet.UNet2DConditionModel(p.configs["unet"]).apply({"params": p.params["unet"]}, x, t, ctx)
    m = vae.AutoencoderKL(p.configs["vae"])
    mean, _ = m.apply({"params": p.params["vae"]}, img, method=m.encode)
    dec = m.apply({"params": p.params["vae"]}, jnp.asarray(x), method=m.decode)
    h = clip_text.CLIPTextModel(p.configs["text_encoder"]).apply(
        {"params": p.params["text_encoder"]}, ids).last_hidden_state
    return [np.asarray(a) for a in (u, mean, dec, h)]


def test_reads_what_diffusers_writes(torch_pipeline, torch):
    pipe, folder = torch_pipeline
    p = weights.load_pipeline(folder)
    ids = tokenize(p.tokenizer, ["Chest X-ray showing Edema", "a photo of a cat"])
    np.testing.assert_array_equal(
        ids, pipe.tokenizer(["Chest X-ray showing Edema", "a photo of a cat"],
                            padding="max_length", max_length=77, truncation=True).input_ids)
    for a, b in zip(_jax_outputs(p, ids), _torch_outputs(pipe, torch, ids)):
        assert np.max(np.abs(a - b)) <= TOL
    assert p.scheduler_config["_class_name"] == "PNDMScheduler"


def test_diffusers_reads_what_jaxmed_writes(torch_pipeline, torch, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe, folder = torch_pipeline
    p = weights.load_pipeline(folder)
    out = weights.save_pipeline(str(tmp_path / "out"), p.configs, p.params, p.scheduler_config,
                                p.tokenizer, max_shard_size=200_000)
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"
                                       ".index.json"))  # sharded
    back = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    ids = tokenize(p.tokenizer, ["a photo of a cat", ""])
    for a, b in zip(_torch_outputs(back, torch, ids), _torch_outputs(pipe, torch, ids)):
        assert np.max(np.abs(a - b)) <= TOL
    again = weights.load_pipeline(out)
    for c in ("unet", "vae", "text_encoder"):
        for x, y in zip(_leaves(p.params[c]), _leaves(again.params[c])):
            np.testing.assert_array_equal(x, y)


def _leaves(tree):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


def test_sharded_fp16_variant_from_diffusers(torch_pipeline, torch, tmp_path):
    pipe, _ = torch_pipeline
    pipe.unet.to(torch.float16).save_pretrained(str(tmp_path / "unet"), variant="fp16",
                                                max_shard_size="100KB")
    pipe.unet.to(torch.float32)
    files = os.listdir(tmp_path / "unet")
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    cfg, params = weights.load_component(str(tmp_path), "unet", variant="fp16")
    want = {k: v.half().float().numpy() for k, v in pipe.unet.state_dict().items()}
    got = params_to_state_dict(params)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # without variant=, a folder holding only the fp16 files is still read (and logged)
    _, params2 = weights.load_component(str(tmp_path), "unet")
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(params), _leaves(params2)))


def test_pickle_only_with_opt_in(torch_pipeline, torch, tmp_path):
    pipe, _ = torch_pipeline
    d = tmp_path / "vae"
    pipe.vae.save_pretrained(str(d), safe_serialization=False)
    assert "diffusion_pytorch_model.bin" in os.listdir(d)
    with pytest.raises(weights.MissingComponentError, match="allow_pickle=True"):
        weights.load_component(str(tmp_path), "vae")
    _, params = weights.load_component(str(tmp_path), "vae", allow_pickle=True)
    assert len(_leaves(params)) == len(pipe.vae.state_dict())


def test_missing_component_is_named(torch_pipeline, tmp_path):
    _, folder = torch_pipeline
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(weights.MissingComponentError, match=r"no vae/ folder"):
        weights.load_pipeline(str(broken))
    os.remove(broken / "unet" / "config.json")
    with pytest.raises(weights.MissingComponentError, match=r"unet/config\.json is missing"):
        weights.load_component(str(broken), "unet")


def test_unsupported_block_type_names_file_and_key(torch_pipeline, tmp_path):
    _, folder = torch_pipeline
    shutil.copytree(os.path.join(folder, "unet"), tmp_path / "unet")
    path = tmp_path / "unet" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["down_block_types"][0] = "SimpleCrossAttnDownBlock2D"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        weights.load_component(str(tmp_path), "unet")
    msg = str(e.value)
    assert str(path) in msg and "down_block_types" in msg and "SimpleCrossAttnDownBlock2D" in msg


def test_weight_shape_mismatch_names_file_and_key(torch_pipeline, tmp_path):
    _, folder = torch_pipeline
    shutil.copytree(os.path.join(folder, "unet"), tmp_path / "unet")
    path = tmp_path / "unet" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["cross_attention_dim"] = 48  # the checkpoint's attn2 projections are 32 wide
    path.write_text(json.dumps(cfg))
    with pytest.raises(WeightMismatchError) as e:
        weights.load_component(str(tmp_path), "unet")
    msg = str(e.value)
    assert "diffusion_pytorch_model.safetensors" in msg and "attn2.to_k.weight" in msg


def test_corrupt_safetensors_is_named(torch_pipeline, tmp_path):
    _, folder = torch_pipeline
    shutil.copytree(os.path.join(folder, "vae"), tmp_path / "vae")
    f = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        weights.load_component(str(tmp_path), "vae")


def test_clip_bpe_tokenizer_is_clips():
    tok = tiny.clip_tokenizer()
    assert len(tok) == 49408 and tok.pad_token_id == 49407
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    assert len(model["merges"]) == 48894 and len(model["vocab"]) == 49408
    ids = tokenize(tok, "Chest X-ray showing Cardiomegaly")[0]
    assert ids[0] == 49406 and ids.shape == (77,) and ids[-1] == 49407


# The files of SD 1.5's hub repository (stable-diffusion-v1-5/stable-diffusion-v1-5), as
# listed on the hub: the diffusers components in three precisions/variants, the root
# single-file checkpoints and the safety checker.
SD15_REPO_FILES = [
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
    "v1-inference.yaml", "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "safety_checker/model.fp16.safetensors",
    "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin",
]


def test_hub_download_fetches_only_the_components():
    """huggingface_hub matches allow_patterns with fnmatch: only the default-precision
    diffusers components are fetched (not the 4-7 GB root checkpoints or variants)."""
    got = {f for f in SD15_REPO_FILES
           if any(fnmatch.fnmatch(f, p) for p in weights.HUB_ALLOW_PATTERNS)}
    assert got == {
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    # Sharded checkpoints of a component are fetched with their index.
    for f in ("unet/diffusion_pytorch_model-00001-of-00002.safetensors",
              "unet/diffusion_pytorch_model.safetensors.index.json"):
        assert any(fnmatch.fnmatch(f, p) for p in weights.HUB_ALLOW_PATTERNS), f
