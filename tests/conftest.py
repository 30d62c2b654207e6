"""Shared test set-up: persistent XLA compilation cache, float32 determinism, torch threads."""

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


@pytest.fixture(scope="session")
def torch():
    import torch
    torch.manual_seed(0)
    return torch
