"""DPM-Solver++(2M) steps (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with
algorithm_type='dpmsolver++': a second-order multistep solver on x0 predictions."""

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
    check_steps,
    numpy_schedule,
    resolve_config,
    shape_dtype,
)

__all__ = ["DPMSolverState", "dpmpp_2m_set_timesteps", "dpmpp_2m_step"]

# ----------------------------------------------------------------------------- DPM-Solver++


@struct.dataclass
class DPMSolverState:
    timesteps: jax.Array  # (N,) int32
    sigmas: jax.Array  # (N + 1,) float32: sqrt((1 - abar) / abar) at each timestep, then final
    model_outputs: jax.Array  # (2, *sample): previous and latest x0 predictions
    lower_order_nums: jax.Array  # () int32: steps taken, capped at solver_order
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    solver_order: int = struct.field(pytree_node=False, default=2)
    solver_type: str = struct.field(pytree_node=False, default="midpoint")
    first_order_final: bool = struct.field(pytree_node=False, default=True)


def _dpm_alphas_cumprod(cfg: Mapping[str, Any]) -> np.ndarray:
    _, acp = numpy_schedule(cfg)
    if cfg["rescale_betas_zero_snr"]:
        # As diffusers: a tiny abar instead of 0 at the last step keeps sigma finite.
        acp = acp.copy()
        acp[-1] = 2.0**-24
    return acp


def _dpm_timesteps(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    check_steps(cfg, n)
    t_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    acp = _dpm_alphas_cumprod(cfg)
    lam = np.log(np.sqrt(acp)) - np.log(np.sqrt(np.float32(1) - acp))
    clipped = int(np.searchsorted(np.flip(lam), np.float32(cfg["lambda_min_clipped"])))
    last = t_train - clipped
    # n + 1 points, dropping the final one: diffusers never evaluates the model at t ~ 0.
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + cfg["steps_offset"]
    else:  # trailing
        ts = np.arange(last, 0, -t_train / n).round() - 1
    return np.ascontiguousarray(ts).astype(np.int64)


def _dpm_init(cfg, timesteps, sample) -> DPMSolverState:
    if sample is None:
        raise ValueError("DPM-Solver needs the sample shape for its history: pass `sample`")
    shape, dtype = shape_dtype(sample)
    acp = _dpm_alphas_cumprod(cfg)
    sig_all = np.sqrt((np.float32(1) - acp) / acp)
    if cfg["final_sigmas_type"] == "zero":
        sig_last = np.float32(0.0)
    else:  # sigma_min
        sig_last = np.sqrt((np.float32(1) - acp[0]) / acp[0])
    sigmas = np.concatenate([sig_all[timesteps], [sig_last]]).astype(np.float32)
    n = len(timesteps)
    first_order_final = bool(
        cfg["euler_at_final"]
        or (cfg["lower_order_final"] and n < 15)
        or cfg["final_sigmas_type"] == "zero"
    )
    return DPMSolverState(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        sigmas=jnp.asarray(sigmas),
        model_outputs=jnp.zeros((2, *shape), dtype),
        lower_order_nums=jnp.zeros((), jnp.int32),
        prediction_type=cfg["prediction_type"],
        solver_order=cfg["solver_order"],
        solver_type=cfg["solver_type"],
        first_order_final=first_order_final,
    )


def dpmpp_2m_set_timesteps(
    config: Mapping[str, Any] | NoiseSchedule,
    num_inference_steps: int,
    sample: Any,
    key: jax.Array | None = None,
) -> tuple[jax.Array, DPMSolverState]:
    """Timesteps (as diffusers' DPMSolverMultistepScheduler) and the initial solver state."""
    del key
    cfg = resolve_config("dpmpp_2m", config)
    ts = _dpm_timesteps(cfg, num_inference_steps)
    state = _dpm_init(cfg, ts, sample)
    return state.timesteps, state


def _alpha_sigma(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    # From the VE sigma = sqrt((1-abar)/abar) back to VP alpha_t = sqrt(abar), sigma_t.
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def dpmpp_2m_step(
    state: DPMSolverState,
    model_output: jax.Array,
    i: jax.Array | int,
    sample: jax.Array,
) -> StepOutput:
    """One DPM-Solver++(2M) step (Lu et al. 2022), as diffusers DPMSolverMultistepScheduler.

    The solver works on x0 predictions; the first step (no history yet) and, by default, the
    last step (which lands on sigma = 0, where the log-SNR is infinite) are first order.
    Returns (prev_sample, state, pred_original_sample): the last is that x0 prediction
    (diffusers' ``convert_model_output``).
    """
    sigmas = state.sigmas
    n = state.timesteps.shape[0]
    alpha_s0, sigma_s0 = _alpha_sigma(sigmas[i])
    alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])

    if state.prediction_type == "epsilon":
        x0 = (sample - sigma_s0 * model_output) / alpha_s0
    elif state.prediction_type == "v_prediction":
        x0 = alpha_s0 * sample - sigma_s0 * model_output
    else:  # sample
        x0 = model_output
    outputs = jnp.stack([state.model_outputs[1], x0.astype(state.model_outputs.dtype)])

    lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
    lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
    h = lambda_t - lambda_s0

    def first_order():
        return (sigma_t / sigma_s0) * sample - (alpha_t * (jnp.exp(-h) - 1.0)) * x0

    def second_order():
        alpha_s1, sigma_s1 = _alpha_sigma(sigmas[jnp.maximum(i - 1, 0)])
        lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
        r0 = (lambda_s0 - lambda_s1) / h
        m0, m1 = outputs[1], outputs[0]
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        if state.solver_type == "midpoint":
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
                - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
            )
        return (  # heun
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
            + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
        )

    if state.solver_order == 1:
        prev = first_order()
    else:
        use_first = state.lower_order_nums < 1
        if state.first_order_final:
            use_first = use_first | (i == n - 1)
        # cond, not where: the unused branch may divide by an infinite step size.
        prev = jax.lax.cond(use_first, first_order, second_order)
    new_state = state.replace(
        model_outputs=outputs,
        lower_order_nums=jnp.minimum(state.lower_order_nums + 1, state.solver_order),
    )
    return StepOutput(prev.astype(sample.dtype), new_state, x0.astype(sample.dtype))

# ----------------------------------------------------------------------------- for make_sampler


def dpmpp_2m_parts(cfg: Mapping[str, Any], num_inference_steps: int):
    """(timesteps, init(sample, key), step) of DPM-Solver++(2M) for a resolved config."""
    ts = _dpm_timesteps(cfg, num_inference_steps)
    return ts, lambda sample, key: _dpm_init(cfg, ts, sample), dpmpp_2m_step
