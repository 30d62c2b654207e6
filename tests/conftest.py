"""Session set-up (persistent XLA compilation cache, full-precision matmuls) and the fixtures
every folder shares. Helpers that are not fixtures are in tests/helpers.py."""

import os

import pytest

# One compile per shape across the whole suite (and across CI runs on a warm machine).
_CACHE = os.environ.setdefault(
    "JAXMED_COMPILATION_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Parity tests compare against torch's float32 matmuls; keep XLA at full precision.
jax.config.update("jax_default_matmul_precision", "highest")

from tests.helpers import write_chexpert_dataset  # noqa: E402


def pytest_collection_modifyitems(items):
    """The long tests (marked slow) first: with `-n 2 --dist worksteal` (README, "Two commands") the
    two workers then end on short tests together, instead of one worker running a long test
    alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def torch():
    import torch
    torch.manual_seed(0)
    return torch


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
