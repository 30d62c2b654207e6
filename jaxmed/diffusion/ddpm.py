"""DDPM (ancestral, Ho et al. 2020) and DDIM (Song et al. 2021) steps, as diffusers'
DDPMScheduler and DDIMScheduler compute them: the same timestep spacing, the same
x0 / epsilon algebra, one pure ``step(state, model_output, i, sample)`` each, returning a
`StepOutput` (prev_sample, state, pred_original_sample)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxmed.diffusion.schedule import (
    NoiseSchedule,
    StepOutput,
    alpha_at,
    check_steps,
    is_number,
    numpy_schedule,
    resolve_config,
    x0_and_eps,
)

__all__ = [
    "DDIMState",
    "DDPMState",
    "ddim_set_timesteps",
    "ddim_step",
    "ddpm_set_timesteps",
    "ddpm_step",
]

# ----------------------------------------------------------------------------- shared


def _spaced_timesteps(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    """Descending inference timesteps as diffusers' DDPM/DDIM compute them."""
    t_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, t_train - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (t_train // n)).round()[::-1] + cfg["steps_offset"]
    else:  # trailing
        ts = np.round(np.arange(t_train, 0, -t_train / n)) - 1
    return np.ascontiguousarray(ts).astype(np.int64)


def _noise_for(key: jax.Array | None, i: jax.Array, like: jax.Array, who: str) -> jax.Array:
    if key is None:
        raise ValueError(f"{who} needs random noise: pass key= to init_state/set_timesteps")
    # fold_in by step index: the noise does not depend on how the loop is written.
    return jax.random.normal(jax.random.fold_in(key, i), like.shape, like.dtype)


# ----------------------------------------------------------------------------- DDPM


@struct.dataclass
class DDPMState:
    timesteps: jax.Array  # (N,) int32, descending
    alphas_cumprod: jax.Array  # (T,) float32
    key: jax.Array | None
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    variance_type: str = struct.field(pytree_node=False, default="fixed_small")
    clip_sample: bool = struct.field(pytree_node=False, default=False)
    clip_sample_range: float = struct.field(pytree_node=False, default=1.0)


def _ddpm_timesteps(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    check_steps(cfg, n)
    return _spaced_timesteps(cfg, n)


def _ddpm_init(cfg, timesteps, sample, key=None) -> DDPMState:
    del sample
    _, acp = numpy_schedule(cfg)
    return DDPMState(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        alphas_cumprod=jnp.asarray(acp),
        key=key,
        prediction_type=cfg["prediction_type"],
        variance_type=cfg["variance_type"],
        clip_sample=cfg["clip_sample"],
        clip_sample_range=float(cfg["clip_sample_range"]),
    )


def ddpm_set_timesteps(
    config: Mapping[str, Any] | NoiseSchedule,
    num_inference_steps: int,
    sample: Any = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, DDPMState]:
    """Timesteps (as diffusers' DDPMScheduler.set_timesteps) and the initial DDPM state.

    ``key`` seeds the per-step noise (ancestral sampling); ``sample`` is unused (API symmetry).
    """
    cfg = resolve_config("ddpm", config)
    ts = _ddpm_timesteps(cfg, num_inference_steps)
    state = _ddpm_init(cfg, ts, sample, key)
    return state.timesteps, state


def ddpm_step(
    state: DDPMState,
    model_output: jax.Array,
    i: jax.Array | int,
    sample: jax.Array,
    noise: jax.Array | None = None,
) -> StepOutput:
    """One ancestral step x_t -> x_{t_prev} (diffusers DDPMScheduler.step).

    ``i`` indexes ``state.timesteps``; the previous timestep is the next entry (or -1 after
    the last). ``noise`` overrides the key-derived N(0, 1) draw. Returns (prev_sample,
    state, pred_original_sample), the last as diffusers' (x0, clipped if clip_sample).
    """
    ts, acp = state.timesteps, state.alphas_cumprod
    n = ts.shape[0]
    t = ts[i]
    prev_t = jnp.where(i + 1 < n, ts[jnp.minimum(i + 1, n - 1)], -1)
    a_t = acp[t]
    a_prev = alpha_at(acp, prev_t, jnp.float32(1.0))
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha

    x0, _ = x0_and_eps(state.prediction_type, model_output, sample, a_t)
    if state.clip_sample:
        x0 = jnp.clip(x0, -state.clip_sample_range, state.clip_sample_range)

    # Posterior mean of q(x_{t_prev} | x_t, x0) (Ho et al. 2020, eq. 7).
    x0_coef = (a_prev**0.5 * cur_beta) / b_t
    xt_coef = cur_alpha**0.5 * b_prev / b_t
    prev = x0_coef * x0 + xt_coef * sample

    if noise is None:
        noise = _noise_for(state.key, i, model_output, "DDPM sampling")
    var = jnp.maximum(b_prev / b_t * cur_beta, 1e-20)
    if state.variance_type == "fixed_small":
        std = var**0.5
    elif state.variance_type == "fixed_small_log":
        std = jnp.exp(0.5 * jnp.log(var))
    else:  # fixed_large
        std = cur_beta**0.5
    # No noise is added on the step that lands on t = 0 (the final, clean sample).
    prev = jnp.where(t > 0, prev + std * noise, prev)
    return StepOutput(prev.astype(sample.dtype), state, x0.astype(sample.dtype))


# ----------------------------------------------------------------------------- DDIM


@struct.dataclass
class DDIMState:
    timesteps: jax.Array  # (N,) int32, descending
    alphas_cumprod: jax.Array  # (T,) float32
    final_alpha_cumprod: jax.Array  # () float32: abar used when stepping past t = 0
    key: jax.Array | None
    step_ratio: int = struct.field(pytree_node=False, default=1)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    clip_sample: bool = struct.field(pytree_node=False, default=False)
    clip_sample_range: float = struct.field(pytree_node=False, default=1.0)
    eta: float = struct.field(pytree_node=False, default=0.0)
    use_clipped_model_output: bool = struct.field(pytree_node=False, default=False)


def _ddim_init(
    cfg, timesteps, sample, key=None, eta=0.0, use_clipped_model_output=False
) -> DDIMState:
    del sample
    if not is_number(eta) or eta < 0:
        raise ValueError(f"unsupported eta={eta!r} (need a number >= 0)")
    _, acp = numpy_schedule(cfg)
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else acp[0]
    return DDIMState(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        alphas_cumprod=jnp.asarray(acp),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        key=key,
        # diffusers steps back by T // n whatever the spacing, so we do too.
        step_ratio=cfg["num_train_timesteps"] // len(timesteps),
        prediction_type=cfg["prediction_type"],
        clip_sample=cfg["clip_sample"],
        clip_sample_range=float(cfg["clip_sample_range"]),
        eta=float(eta),
        use_clipped_model_output=bool(use_clipped_model_output),
    )


def ddim_set_timesteps(
    config: Mapping[str, Any] | NoiseSchedule,
    num_inference_steps: int,
    sample: Any = None,
    key: jax.Array | None = None,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
) -> tuple[jax.Array, DDIMState]:
    """Timesteps (as diffusers' DDIMScheduler) and the initial DDIM state.

    ``eta`` = 0 is deterministic DDIM; ``eta`` > 0 adds noise drawn from ``key``.
    """
    cfg = resolve_config("ddim", config)
    ts = _ddpm_timesteps(cfg, num_inference_steps)
    state = _ddim_init(cfg, ts, sample, key, eta, use_clipped_model_output)
    return state.timesteps, state


def ddim_step(
    state: DDIMState,
    model_output: jax.Array,
    i: jax.Array | int,
    sample: jax.Array,
    noise: jax.Array | None = None,
) -> StepOutput:
    """One DDIM step (Song et al. 2021, eq. 12), as diffusers DDIMScheduler.step: (prev_sample,
    state, pred_original_sample)."""
    acp = state.alphas_cumprod
    t = state.timesteps[i]
    prev_t = t - state.step_ratio
    a_t = acp[t]
    a_prev = alpha_at(acp, prev_t, state.final_alpha_cumprod)
    b_t = 1 - a_t

    x0, eps = x0_and_eps(state.prediction_type, model_output, sample, a_t)
    if state.clip_sample:
        x0 = jnp.clip(x0, -state.clip_sample_range, state.clip_sample_range)

    var = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
    std = state.eta * var**0.5
    if state.use_clipped_model_output:
        eps = (sample - a_t**0.5 * x0) / b_t**0.5
    direction = (1 - a_prev - std**2) ** 0.5 * eps
    prev = a_prev**0.5 * x0 + direction
    if state.eta > 0:
        if noise is None:
            noise = _noise_for(state.key, i, model_output, "DDIM with eta > 0")
        prev = prev + std * noise
    return StepOutput(prev.astype(sample.dtype), state, x0.astype(sample.dtype))

# ----------------------------------------------------------------------------- for make_sampler


def ddpm_parts(cfg: Mapping[str, Any], num_inference_steps: int):
    """(timesteps, init(sample, key), step) of DDPM for a resolved config."""
    ts = _ddpm_timesteps(cfg, num_inference_steps)
    return ts, lambda sample, key: _ddpm_init(cfg, ts, sample, key), ddpm_step


def ddim_parts(cfg: Mapping[str, Any], num_inference_steps: int, **options: Any):
    """(timesteps, init(sample, key), step) of DDIM; ``options``: eta,
    use_clipped_model_output (checked now, not at the first init)."""
    ts = _ddpm_timesteps(cfg, num_inference_steps)
    _ddim_init(cfg, ts, None, None, **options)  # validate options now
    return ts, lambda sample, key: _ddim_init(cfg, ts, sample, key, **options), ddim_step
