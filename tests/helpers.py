"""Helpers the test files share (plain functions, classes and constants; the fixtures are in
conftest.py). Import them as `from tests.helpers import ...`.

Tiny model configs: the UNet / VAE / CLIP text tower of `jaxmed.models.tiny.configs("test")`
(also what the `tiny_sd_folder` fixture writes) serve most tests. The ones here are used by
several files; a config that one test file alone needs (the parity configs of
tests/models/test_unet.py, test_vae.py, test_clip_text.py) is declared in that file. Their
shapes are fixed: the persistent compilation cache and the parity tolerances depend on them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxmed.cli import load_config
from jaxmed.data.labels import CSV_COLUMNS, LABELS
from jaxmed.kernels import build
from jaxmed.models import clip_text, convert, unet, weights
from jaxmed.strategies.base import flatten

# The repository's root (tests/ is one level below it).
ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------
# Processes and kernels


def run_on_8_cpu_devices(script: str) -> None:
    """Run `script` in a fresh interpreter on 8 simulated CPU devices; it must print OK."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def kernel_without_compiler(kernel, monkeypatch, tmp_path, caplog) -> str:
    """Make `kernel` (a kernels.build.Kernel) try to build with a compiler that does not exist;
    assert it reports itself unavailable, with a warning naming its source, and leaves no
    library behind. Returns the logged warnings."""
    monkeypatch.setattr(kernel, "_ok", None)
    monkeypatch.setenv("JAXMED_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert not kernel.available()
    assert f"{kernel.source.name} unavailable" in caplog.text
    assert not list(tmp_path.glob("*.so"))
    return caplog.text


# --------------------------------------------------------------------------------------
# Data

CSV_HEADER = ",".join(CSV_COLUMNS)


def write_chexpert_dataset(root, n=16, size=40, seed=0, name="train.csv"):
    """A CheXpert-format CSV with n random grayscale PNGs under root/imgs (test data)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "imgs"), exist_ok=True)
    lines = [CSV_HEADER]
    for i in range(n):
        img = rng.integers(0, 255, (size, size), dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(root, "imgs", f"{i}.png"))
        labels = rng.integers(0, 2, len(LABELS))
        lines.append(f"imgs/{i}.png,Female,60,Frontal,PA," + ",".join(map(str, labels)))
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------
# The strategy tests' model: a text encoder + UNet smaller than `jaxmed.models.tiny`'s test
# UNet (one cross-attention level, no mid block) plus a one-layer CLIP text tower. It has every
# kind of layer the strategies touch (to_q / to_k / to_v / to_out.0 in attn1 and attn2, GEGLU,
# resnets with shortcut convs, GroupNorm / LayerNorm, time embedding) and compiles in a few
# seconds, which keeps the strategy tests fast on a loaded CPU. Every strategy runs through
# one jitted function (text encoder -> UNet -> sum(out * w)) that returns the loss, the
# output and the gradient w.r.t. the trainable tree.

# The LoRA target modules the strategy tests use (peft's names).
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# diffusers UNet2DConditionModel / transformers CLIPTextConfig keyword arguments.
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,),
                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=16,
                 attention_head_dim=4, norm_num_groups=8, mid_block_type=None)
TINY_TEXT = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=8, hidden_act="quick_gelu",
                 projection_dim=16, bos_token_id=98, eos_token_id=99, pad_token_id=1)


def _randomize_torch(model, torch, seed):
    """Non-trivial norms and biases (torch inits them to 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def leaves_of(tree) -> dict[tuple, np.ndarray]:
    """{(component, *path): array} over a {component: params} tree."""
    return {(c, *p): np.asarray(v) for c, sub in tree.items() for p, v in flatten(sub).items()}


class TinyTextUNet:
    """jaxmed text encoder + UNet, their PyTorch twins, inputs, and one jitted function per
    strategy."""

    def __init__(self, torch):
        import transformers
        from diffusers import UNet2DConditionModel

        self.torch = torch
        torch.manual_seed(0)
        tu = _randomize_torch(UNet2DConditionModel(**TINY_UNET), torch, 0)
        tt = _randomize_torch(
            transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)), torch, 1)
        self.unet_state = {k: v.detach().clone() for k, v in tu.state_dict().items()}
        self.text_state = {k: v.detach().clone() for k, v in tt.state_dict().items()}
        self.torch_unet_config = dict(tu.config)
        self.torch_text_config = tt.config
        self.ucfg = unet.UNetConfig.from_dict(tu.config)
        self.tcfg = weights.COMPONENTS["text_encoder"].config_from_dict(tt.config.to_dict())
        self.params = {
            "unet": convert.state_dict_to_params(
                {k: v.numpy() for k, v in self.unet_state.items()},
                unet.abstract_params(self.ucfg)),
            "text_encoder": convert.state_dict_to_params(
                {clip_text.clip_text_key(k): v.numpy() for k, v in self.text_state.items()},
                clip_text.abstract_params(self.tcfg), ignore_unexpected=(r"position_ids$",)),
        }
        self.unet = unet.UNet2DConditionModel(self.ucfg)
        self.text = clip_text.CLIPTextModel(self.tcfg)
        rng = np.random.default_rng(0)
        body = rng.integers(2, 98, (2, 6))
        self.ids = np.concatenate([np.full((2, 1), 98), body, np.full((2, 1), 99)], 1)
        self.ids = self.ids.astype(np.int32)
        self.x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
        self.t = np.array([3, 917], np.int32)
        self.w = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
        self._fns = {}

    # -- jaxmed
    def fn(self, key: str, strategy):
        """jit(value_and_grad) of sum(UNet(x, t, text(ids)) * w) w.r.t. the trainable tree;
        aux = (UNet output, text context). One compile per key."""
        if key not in self._fns:
            def loss(trainable, frozen, ids, x, t, w):
                p = strategy.combine(trainable, frozen)
                with strategy.intercept("text_encoder", trainable, frozen):
                    ctx = self.text.apply({"params": p["text_encoder"]}, ids).last_hidden_state
                with strategy.intercept("unet", trainable, frozen):
                    out = self.unet.apply({"params": p["unet"]}, x, t, ctx)
                return jnp.sum(out * w), (out, ctx)

            self._fns[key] = jax.jit(jax.value_and_grad(loss, has_aux=True))
        return self._fns[key]

    def run(self, key, strategy, trainable, frozen):
        (loss, (out, ctx)), grads = self.fn(key, strategy)(
            trainable, frozen, self.ids, self.x, self.t, self.w)
        return np.asarray(out), np.asarray(ctx), jax.device_get(grads)

    # -- PyTorch
    def torch_unet(self, folder=None):
        from diffusers import UNet2DConditionModel

        if folder is not None:
            return UNet2DConditionModel.from_pretrained(folder).eval()
        m = UNet2DConditionModel.from_config(self.torch_unet_config)
        m.load_state_dict(self.unet_state)
        return m.eval()

    def torch_text(self):
        import transformers

        m = transformers.CLIPTextModel(self.torch_text_config)
        m.load_state_dict(self.text_state, strict=False)
        return m.eval()

    def torch_forward(self, model, ctx, grad=False):
        torch = self.torch
        sample = torch.from_numpy(self.x).permute(0, 3, 1, 2)
        ctx = np.array(ctx)
        with torch.set_grad_enabled(grad):
            out = model(sample, torch.from_numpy(self.t).long(), torch.from_numpy(ctx)).sample
            loss = (out * torch.from_numpy(self.w).permute(0, 3, 1, 2)).sum()
            if grad:
                loss.backward()
        return out.detach().permute(0, 2, 3, 1).numpy()


def optim_config(**kw):
    """The `optim` block of configs/finetune.py:lora, with `kw` set in it."""
    cfg = load_config("configs/finetune.py:lora").optim
    with cfg.unlocked():
        for k, v in kw.items():
            cfg[k] = v
    return cfg
