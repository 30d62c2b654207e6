"""PNDM's pseudo linear multistep (PLMS) steps, as diffusers' PNDMScheduler with
skip_prk_steps=True (what SD checkpoints ship): SD 1.5's default sampler."""

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
    numpy_schedule,
    resolve_config,
    shape_dtype,
    x0_and_eps,
)

__all__ = ["PNDMState", "pndm_set_timesteps", "pndm_step"]

# ----------------------------------------------------------------------------- PNDM (PLMS)


@struct.dataclass
class PNDMState:
    timesteps: jax.Array  # (N + 1,) int32: the second timestep appears twice, see below
    alphas_cumprod: jax.Array  # (T,) float32
    final_alpha_cumprod: jax.Array  # () float32
    ets: jax.Array  # (4, *sample) past model outputs, newest last; unused slots are zero
    cur_sample: jax.Array  # x_T, kept for the second (corrector) evaluation
    counter: jax.Array  # () int32: steps taken so far
    step_ratio: int = struct.field(pytree_node=False, default=1)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")


def _pndm_timesteps(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    check_steps(cfg, n)
    t_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        asc = np.linspace(0, t_train - 1, n).round().astype(np.int64)
    elif spacing == "leading":
        asc = (np.arange(0, n) * (t_train // n)).round() + cfg["steps_offset"]
    else:  # trailing
        asc = np.round(np.arange(t_train, 0, -t_train / n))[::-1].astype(np.int64) - 1
    # PLMS is a 4-step multistep method with nothing to extrapolate from at the start. With
    # skip_prk_steps diffusers replaces the Runge-Kutta warm-up by one improved-Euler step:
    # step from t0 to t1 with eps(x_T, t0), evaluate eps at (x_t1, t1), then redo t0 -> t1
    # from x_T with the average. That second evaluation at t1 is why t1 is listed twice.
    plms = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1]
    return np.ascontiguousarray(plms).astype(np.int64)


def _pndm_init(cfg, timesteps, sample, num_inference_steps) -> PNDMState:
    if sample is None:
        raise ValueError("PNDM needs the sample shape for its history buffer: pass `sample`")
    shape, dtype = shape_dtype(sample)
    _, acp = numpy_schedule(cfg)
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else acp[0]
    return PNDMState(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        alphas_cumprod=jnp.asarray(acp),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        ets=jnp.zeros((4, *shape), dtype),
        cur_sample=jnp.zeros(shape, dtype),
        counter=jnp.zeros((), jnp.int32),
        step_ratio=cfg["num_train_timesteps"] // num_inference_steps,
        prediction_type=cfg["prediction_type"],
    )


def pndm_set_timesteps(
    config: Mapping[str, Any] | NoiseSchedule,
    num_inference_steps: int,
    sample: Any,
    key: jax.Array | None = None,
) -> tuple[jax.Array, PNDMState]:
    """Timesteps (``num_inference_steps + 1`` of them, as diffusers' PNDMScheduler with
    skip_prk_steps=True) and the initial PLMS state sized for ``sample`` (array or shape)."""
    del key
    cfg = resolve_config("pndm", config)
    ts = _pndm_timesteps(cfg, num_inference_steps)
    state = _pndm_init(cfg, ts, sample, num_inference_steps)
    return state.timesteps, state


def _pndm_prev_sample(state, sample, t, prev_t, model_output):
    # Transfer x_t -> x_{t_prev} given eps (PNDM paper eq. 9; diffusers _get_prev_sample).
    acp = state.alphas_cumprod
    a_t = acp[t]
    a_prev = alpha_at(acp, prev_t, state.final_alpha_cumprod)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    if state.prediction_type == "v_prediction":
        model_output = a_t**0.5 * model_output + b_t**0.5 * sample
    sample_coeff = (a_prev / a_t) ** 0.5
    denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
    return sample_coeff * sample - (a_prev - a_t) * model_output / denom


def pndm_step(
    state: PNDMState,
    model_output: jax.Array,
    i: jax.Array | int,
    sample: jax.Array,
) -> StepOutput:
    """One PLMS step (diffusers PNDMScheduler.step_plms), jit/scan friendly.

    The stored history ``ets`` holds raw model outputs; the Adams-Bashforth order grows
    1, (improved Euler), 2, 3, 4 over the first steps, selected by ``state.counter``.
    Returns (prev_sample, state, pred_original_sample). diffusers' PNDM returns no x0; here
    it is the one this step's model output implies at ``sample`` and ``timesteps[i]`` (the
    timestep the model was called at), as DDIM's formula gives it.
    """
    c = state.counter
    t = state.timesteps[i]
    ratio = state.step_ratio
    # Counter 1 is the corrector evaluation at the repeated timestep: it redoes the first
    # step, so it goes from t + ratio to t, starting again from x_T, and is not appended to
    # the history (diffusers keeps only the first of the two outputs at t0).
    redo = c == 1
    t_from = jnp.where(redo, t + ratio, t)
    t_to = jnp.where(redo, t, t - ratio)
    ets = jnp.where(redo, state.ets, jnp.concatenate([state.ets[1:], model_output[None]]))
    x_from = jnp.where(redo, state.cur_sample, sample)
    cur_sample = jnp.where(c == 0, sample, state.cur_sample)

    e1, e2, e3, e4 = ets[3], ets[2], ets[1], ets[0]
    branches = [
        lambda: model_output,
        lambda: (model_output + e1) / 2,
        lambda: (3 * e1 - e2) / 2,
        lambda: (23 * e1 - 16 * e2 + 5 * e3) / 12,
        lambda: (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
    ]
    # History length equals min(counter, 4) from counter 2 on, so the counter picks the order.
    eps = jax.lax.switch(jnp.minimum(c, 4), branches)
    prev = _pndm_prev_sample(state, x_from, t_from, t_to, eps)
    new_state = state.replace(ets=ets, cur_sample=cur_sample, counter=c + 1)
    x0, _ = x0_and_eps(state.prediction_type, model_output, sample, state.alphas_cumprod[t])
    return StepOutput(prev.astype(sample.dtype), new_state, x0.astype(sample.dtype))

# ----------------------------------------------------------------------------- for make_sampler


def pndm_parts(cfg: Mapping[str, Any], num_inference_steps: int):
    """(timesteps, init(sample, key), step) of PNDM for a resolved config."""
    ts = _pndm_timesteps(cfg, num_inference_steps)
    return ts, lambda sample, key: _pndm_init(cfg, ts, sample, num_inference_steps), pndm_step
