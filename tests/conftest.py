"""Shared test set-up: persistent XLA compilation cache, float32 determinism, torch threads."""

import logging
import os
import subprocess
import sys

import pytest

# One compile per shape across the whole suite (and across CI runs on a warm machine).
_CACHE = os.environ.setdefault(
    "JAXMED_COMPILATION_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)

import jax  # noqa: E402

from jaxmed.data.labels import CSV_COLUMNS, LABELS  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Parity tests compare against torch's float32 matmuls; keep XLA at full precision.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def torch():
    import torch
    torch.manual_seed(0)
    return torch


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
    from jaxmed.kernels import build

    monkeypatch.setattr(kernel, "_ok", None)
    monkeypatch.setenv("JAXMED_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert not kernel.available()
    assert f"{kernel.source.name} unavailable" in caplog.text
    assert not list(tmp_path.glob("*.so"))
    return caplog.text


CSV_HEADER = ",".join(CSV_COLUMNS)


def write_chexpert_dataset(root, n=16, size=40, seed=0, name="train.csv"):
    """A CheXpert-format CSV with n random grayscale PNGs under root/imgs (test data)."""
    import numpy as np
    from PIL import Image

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


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A random tiny SD 1.x pipeline in diffusers layout (UNet (32, 64), VAE f=4, 32 px)."""
    from jaxmed.models import tiny

    folder = str(tmp_path_factory.mktemp("tiny-sd"))
    tiny.write_random_pipeline(folder, "test", image_size=32, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("chexpert-tiny"))
    return write_chexpert_dataset(root, n=16, size=40)
