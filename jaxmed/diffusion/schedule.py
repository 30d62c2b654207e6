"""Noise schedules: a diffusers ``scheduler_config.json`` -> betas, ``alphas_cumprod``, and the
forward process the trainer noises latents with.

Configuration is a diffusers ``scheduler_config.json`` dict; keys a sampler does not read are
ignored (as diffusers does), keys missing from it take that diffusers scheduler class's
default, and values we do not implement raise ``ValueError`` naming the key and the value.
The samplers that step these schedules are in `jaxmed.diffusion.samplers`. Results match
diffusers' schedulers step for step in float32 (see tests/diffusion/test_schedulers.py).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "NoiseSchedule",
    "StepOutput",
    "add_noise",
    "from_config",
    "from_pretrained",
    "get_velocity",
    "load_config",
    "training_target",
]

CONFIG_NAME = "scheduler_config.json"

# ----------------------------------------------------------------------------- configuration

# Defaults shared by diffusers' DDPM/DDIM/PNDM/DPMSolverMultistep scheduler classes.
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

# Per-class defaults: a key missing from scheduler_config.json takes the value the matching
# diffusers class would use, so e.g. DPM-Solver defaults to 'linspace' spacing and DDIM to
# set_alpha_to_one=True exactly as `XScheduler.from_config(cfg)` would.
_SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddpm": {
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "thresholding": False,
    },
    "ddim": {
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
    },
    "pndm": {
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
    },
    "dpmpp_2m": {
        "timestep_spacing": "linspace",
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "thresholding": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
    },
}

# Keys whose value must be one of a fixed set (per sampler where it differs).
_ANY_BOOL = (False, True)
_CHOICES: dict[str, dict[str, tuple]] = {
    "beta_schedule": {"*": ("linear", "scaled_linear", "squaredcos_cap_v2")},
    "timestep_spacing": {"*": ("leading", "trailing", "linspace")},
    "prediction_type": {
        "*": ("epsilon", "v_prediction", "sample"),
        # diffusers' PNDM has no x0-prediction branch.
        "pndm": ("epsilon", "v_prediction"),
    },
    # learned variances would need the model's extra output channels; SD uses fixed_small.
    "variance_type": {
        "ddpm": ("fixed_small", "fixed_small_log", "fixed_large"),
        "dpmpp_2m": (None,),
    },
    # Dynamic thresholding is meant for pixel-space models, not SD's latents.
    "thresholding": {"*": (False,)},
    # PNDM's Runge-Kutta warm-up is not implemented: SD checkpoints ship skip_prk_steps=True.
    "skip_prk_steps": {"pndm": (True,)},
    # diffusers' PNDM has no zero-terminal-SNR rescaling (it silently ignores the key).
    "rescale_betas_zero_snr": {"pndm": (False,), "*": _ANY_BOOL},
    "clip_sample": {"*": _ANY_BOOL},
    "set_alpha_to_one": {"*": _ANY_BOOL},
    "solver_order": {"dpmpp_2m": (1, 2)},
    "algorithm_type": {"dpmpp_2m": ("dpmsolver++",)},
    "solver_type": {"dpmpp_2m": ("midpoint", "heun")},
    "lower_order_final": {"*": _ANY_BOOL},
    "euler_at_final": {"*": _ANY_BOOL},
    "final_sigmas_type": {"dpmpp_2m": ("zero", "sigma_min")},
    "use_karras_sigmas": {"*": (False,)},
    "use_exponential_sigmas": {"*": (False,)},
    "use_beta_sigmas": {"*": (False,)},
    "use_lu_lambdas": {"*": (False,)},
    "use_flow_sigmas": {"*": (False,)},
    "use_dynamic_shifting": {"*": (False,)},
}


def _same(a: Any, b: Any) -> bool:
    # Type-strict equality so that True is not accepted as solver_order 1 and vice versa.
    return type(a) is type(b) and a == b


def _check_choice(name: str, key: str, value: Any) -> None:
    table = _CHOICES.get(key)
    if table is None:
        return
    choices = table.get(name, table.get("*"))
    if choices is None:
        return
    if not any(_same(value, c) for c in choices):
        raise ValueError(
            f"scheduler config: unsupported {key}={value!r} for sampler {name!r} "
            f"(supported: {', '.join(repr(c) for c in choices)})"
        )


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_numbers(cfg: Mapping[str, Any]) -> None:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"scheduler config: unsupported {key}={cfg[key]!r} ({why})")

    if not is_int(cfg["num_train_timesteps"]) or cfg["num_train_timesteps"] < 2:
        raise bad("num_train_timesteps", "need an integer >= 2")
    if not is_int(cfg["steps_offset"]) or cfg["steps_offset"] < 0:
        raise bad("steps_offset", "need an integer >= 0")
    for key in ("beta_start", "beta_end"):
        if not is_number(cfg[key]) or not 0.0 <= cfg[key] < 1.0:
            raise bad(key, "need a number in [0, 1)")
    if "clip_sample_range" in cfg and (
        not is_number(cfg["clip_sample_range"]) or cfg["clip_sample_range"] <= 0
    ):
        raise bad("clip_sample_range", "need a positive number")
    if "lambda_min_clipped" in cfg and not is_number(cfg["lambda_min_clipped"]):
        raise bad("lambda_min_clipped", "need a number")
    tb = cfg["trained_betas"]
    if tb is not None:
        try:
            arr = np.asarray(tb, dtype=np.float64)
        except (TypeError, ValueError):
            raise bad("trained_betas", "need a list of numbers") from None
        if arr.shape != (cfg["num_train_timesteps"],) or not np.all((arr >= 0) & (arr < 1)):
            raise bad("trained_betas", "need num_train_timesteps numbers in [0, 1)")


def resolve_config(name: str, config: Mapping[str, Any] | NoiseSchedule) -> dict[str, Any]:
    """Config values one sampler reads: its diffusers class defaults, overridden by `config`."""
    raw = config.config if isinstance(config, NoiseSchedule) else config
    if not isinstance(raw, Mapping):
        raise TypeError(f"scheduler config must be a mapping, got {type(raw).__name__}")
    defaults = {**_COMMON_DEFAULTS, **_SAMPLER_DEFAULTS.get(name, {})}
    cfg = {k: raw.get(k, v) for k, v in defaults.items()}
    for key, value in cfg.items():
        _check_choice(name, key, value)
    _check_numbers(cfg)
    return cfg


def _freeze(config: Mapping[str, Any]) -> tuple:
    # A hashable copy: it sits in a static (non-pytree) field, so jit needs to hash it.
    def fr(v: Any) -> Any:
        if isinstance(v, Mapping):
            return tuple(sorted((k, fr(x)) for k, x in v.items()))
        if isinstance(v, (list, tuple)):
            return tuple(fr(x) for x in v)
        return v

    return tuple(sorted((str(k), fr(v)) for k, v in config.items()))


# ----------------------------------------------------------------------------- schedule


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32), bit for bit.

    torch computes start + step * i from the front half and end - step * (n - 1 - i) from the
    back half with a fused multiply-add in float32; the float64 evaluation below rounds once,
    like the FMA, so the betas equal diffusers' exactly.
    """
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], np.float32)
    step = np.float64((e - s) / np.float32(n - 1))
    idx = np.arange(n, dtype=np.float64)
    front = (np.float64(s) + step * idx).astype(np.float32)
    back = (np.float64(e) - step * (n - 1 - idx)).astype(np.float32)
    return np.where(np.arange(n) < n // 2, front, back)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in float64 and rounds each output.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift sqrt(alphas_cumprod) so the last step has SNR 0."""
    f32 = np.float32
    abar_sqrt = np.sqrt(_cumprod_f32(f32(1.0) - betas))
    a0, a_t = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - a_t) * (a0 / (a0 - a_t))
    abar = abar_sqrt * abar_sqrt
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (f32(1.0) - alphas).astype(f32)


def _betas_np(cfg: Mapping[str, Any]) -> np.ndarray:
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = _linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        # Linear in sqrt(beta), as SD (and the original LDM code) defines it.
        b = _linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)
        betas = b * b
    else:  # squaredcos_cap_v2
        betas = _cosine_betas(n)
    if cfg["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


@struct.dataclass
class NoiseSchedule:
    """The training noise schedule: ``betas`` and ``alphas_cumprod`` as float32 ``(T,)`` arrays.

    ``config`` keeps the scheduler_config.json it came from (frozen, hashable), so the same
    object can configure any sampler through :func:`make_sampler`.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    frozen_config: tuple = struct.field(pytree_node=False, default=())

    @property
    def config(self) -> dict[str, Any]:
        def thaw(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {k: thaw(v) for k, v in self.frozen_config}

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def prediction_type(self) -> str:
        return dict(self.frozen_config).get("prediction_type", "epsilon")


def numpy_schedule(cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    betas = _betas_np(cfg)
    return betas, _cumprod_f32(np.float32(1.0) - betas)


def from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """Build the noise schedule from a diffusers scheduler config dict (validated)."""
    cfg = resolve_config("*", config)
    betas, acp = numpy_schedule(cfg)
    return NoiseSchedule(jnp.asarray(betas), jnp.asarray(acp), _freeze(config))


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``scheduler_config.json`` from a file path, a scheduler folder, or a model folder
    holding a ``scheduler/`` subfolder."""
    path = os.fspath(path)
    if os.path.isfile(path):
        candidates = [path]
    else:
        candidates = [
            os.path.join(path, CONFIG_NAME),
            os.path.join(path, "scheduler", CONFIG_NAME),
        ]
    for cand in candidates:
        if os.path.isfile(cand):
            try:
                with open(cand, encoding="utf-8") as f:
                    config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cand}: not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{cand}: expected a JSON object, got {type(config).__name__}")
            return config
    raise FileNotFoundError(f"no scheduler config: looked for {' and '.join(candidates)}")


def from_pretrained(path: str | os.PathLike) -> NoiseSchedule:
    """:func:`from_config` on ``<path>/scheduler_config.json`` (or ``<path>/scheduler/...``)."""
    return from_config(load_config(path))


# ----------------------------------------------------------------------------- training side


def _coef(values: jax.Array, timesteps: jax.Array, ndim: int) -> jax.Array:
    # One coefficient per batch element, broadcast over the remaining sample dimensions.
    c = values[jnp.asarray(timesteps)].reshape(-1)
    return c.reshape(c.shape + (1,) * (ndim - 1))


def add_noise(
    schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array
) -> jax.Array:
    """Forward process q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    ``timesteps`` holds one integer per batch element (or a scalar). As in diffusers the
    schedule is cast to the sample's dtype first.
    """
    acp = schedule.alphas_cumprod.astype(x0.dtype)
    a = _coef(acp, timesteps, x0.ndim)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def get_velocity(
    schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array
) -> jax.Array:
    """The v-prediction target (Salimans & Ho 2022): sqrt(abar_t) noise - sqrt(1-abar_t) x0."""
    acp = schedule.alphas_cumprod.astype(x0.dtype)
    a = _coef(acp, timesteps, x0.ndim)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0


def training_target(
    schedule: NoiseSchedule,
    prediction_type: str | None,
    x0: jax.Array,
    noise: jax.Array,
    timesteps: jax.Array,
) -> jax.Array:
    """What the denoiser is regressed onto for ``prediction_type`` (None: the schedule's)."""
    if prediction_type is None:
        prediction_type = schedule.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return get_velocity(schedule, x0, noise, timesteps)
    if prediction_type == "sample":
        return x0
    raise ValueError(
        f"unsupported prediction_type={prediction_type!r} "
        "(supported: 'epsilon', 'v_prediction', 'sample')"
    )

# ----------------------------------------------------------------------------- sampler helpers


def check_steps(cfg: Mapping[str, Any], n: int) -> None:
    """A sampler's step count: a positive integer, at most the training timesteps."""
    if not is_int(n) or n < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
    if n > cfg["num_train_timesteps"]:
        raise ValueError(
            f"num_inference_steps={n} exceeds num_train_timesteps={cfg['num_train_timesteps']}"
        )


def shape_dtype(sample: Any) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) of a sample array, or of a shape tuple (float32)."""
    if isinstance(sample, (tuple, list)):
        return tuple(sample), jnp.float32
    return tuple(sample.shape), sample.dtype


def x0_and_eps(
    prediction_type: str, model_output: jax.Array, sample: jax.Array, a_t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(x0, epsilon) implied by a model output at ``sample`` where alphas_cumprod is ``a_t``,
    for prediction type epsilon, v_prediction or sample (diffusers' formulas)."""
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        return (sample - b_t**0.5 * model_output) / a_t**0.5, model_output
    if prediction_type == "v_prediction":
        x0 = a_t**0.5 * sample - b_t**0.5 * model_output
        return x0, a_t**0.5 * model_output + b_t**0.5 * sample
    x0 = model_output  # "sample"
    return x0, (sample - a_t**0.5 * x0) / b_t**0.5


def alpha_at(acp: jax.Array, t: jax.Array, fallback: jax.Array) -> jax.Array:
    # alphas_cumprod[t] for t >= 0, else `fallback`: a negative index must not wrap around.
    return jnp.where(t >= 0, acp[jnp.maximum(t, 0)], fallback)


class StepOutput(NamedTuple):
    """What every sampler step returns (diffusers' SchedulerOutput, plus the state):
    ``prev_sample`` (x at the next timestep), the sampler's new ``state``, and
    ``pred_original_sample``, the clean sample x0 the step predicts from the model output
    (clipped where the config clips it), e.g. to preview a sample or guide it."""

    prev_sample: jax.Array
    state: Any
    pred_original_sample: jax.Array
