"""Noise schedules and samplers (DDPM, DDIM, PNDM, DPM-Solver++ 2M) as pure JAX functions.

Everything a sampler needs at a step lives in a small pytree *state* (constants such as the
timestep table and ``alphas_cumprod`` plus the running history), so ``step`` is a pure
function usable under ``jax.jit``, ``lax.scan`` and ``lax.fori_loop``::

    sampler = make_sampler("pndm", from_pretrained("runwayml-sd15"), 50)
    state = sampler.init_state(latents, key)
    for i in range(len(sampler.timesteps)):                 # or sample_loop(...) with lax.scan
        eps = unet(latents, sampler.timesteps[i])
        latents, state = sampler.step(state, eps, i, latents)

``i`` is the index into ``sampler.timesteps`` (not the timestep value). Configuration is a
diffusers ``scheduler_config.json`` dict; keys a sampler does not read are ignored (as diffusers
does), keys missing from it take that diffusers scheduler class's default, and values we do not
implement raise ``ValueError`` naming the key and the value. Results match diffusers'
schedulers step for step in float32 (see tests/test_schedulers.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "SAMPLERS",
    "DDIMState",
    "DDPMState",
    "DPMSolverState",
    "NoiseSchedule",
    "PNDMState",
    "Sampler",
    "add_noise",
    "ddim_set_timesteps",
    "ddim_step",
    "ddpm_set_timesteps",
    "ddpm_step",
    "dpmpp_2m_set_timesteps",
    "dpmpp_2m_step",
    "from_config",
    "from_pretrained",
    "get_velocity",
    "init_noise_sigma",
    "load_config",
    "make_sampler",
    "pndm_set_timesteps",
    "pndm_step",
    "sample_loop",
    "training_target",
]

CONFIG_NAME = "scheduler_config.json"

# Every sampler here starts from unit-variance Gaussian noise.
init_noise_sigma = 1.0

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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_numbers(cfg: Mapping[str, Any]) -> None:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"scheduler config: unsupported {key}={cfg[key]!r} ({why})")

    if not _is_int(cfg["num_train_timesteps"]) or cfg["num_train_timesteps"] < 2:
        raise bad("num_train_timesteps", "need an integer >= 2")
    if not _is_int(cfg["steps_offset"]) or cfg["steps_offset"] < 0:
        raise bad("steps_offset", "need an integer >= 0")
    for key in ("beta_start", "beta_end"):
        if not _is_number(cfg[key]) or not 0.0 <= cfg[key] < 1.0:
            raise bad(key, "need a number in [0, 1)")
    if "clip_sample_range" in cfg and (
        not _is_number(cfg["clip_sample_range"]) or cfg["clip_sample_range"] <= 0
    ):
        raise bad("clip_sample_range", "need a positive number")
    if "lambda_min_clipped" in cfg and not _is_number(cfg["lambda_min_clipped"]):
        raise bad("lambda_min_clipped", "need a number")
    tb = cfg["trained_betas"]
    if tb is not None:
        try:
            arr = np.asarray(tb, dtype=np.float64)
        except (TypeError, ValueError):
            raise bad("trained_betas", "need a list of numbers") from None
        if arr.shape != (cfg["num_train_timesteps"],) or not np.all((arr >= 0) & (arr < 1)):
            raise bad("trained_betas", "need num_train_timesteps numbers in [0, 1)")


def _resolve(name: str, config: Mapping[str, Any] | NoiseSchedule) -> dict[str, Any]:
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


def _schedule_np(cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    betas = _betas_np(cfg)
    return betas, _cumprod_f32(np.float32(1.0) - betas)


def from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """Build the noise schedule from a diffusers scheduler config dict (validated)."""
    cfg = _resolve("*", config)
    betas, acp = _schedule_np(cfg)
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


# ----------------------------------------------------------------------------- helpers


def _check_steps(cfg: Mapping[str, Any], n: int) -> None:
    if not _is_int(n) or n < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
    if n > cfg["num_train_timesteps"]:
        raise ValueError(
            f"num_inference_steps={n} exceeds num_train_timesteps={cfg['num_train_timesteps']}"
        )


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


def _shape_dtype(sample: Any) -> tuple[tuple[int, ...], Any]:
    if isinstance(sample, (tuple, list)):
        return tuple(sample), jnp.float32
    return tuple(sample.shape), sample.dtype


def _alpha_at(acp: jax.Array, t: jax.Array, fallback: jax.Array) -> jax.Array:
    # alphas_cumprod[t] for t >= 0, else `fallback`: a negative index must not wrap around.
    return jnp.where(t >= 0, acp[jnp.maximum(t, 0)], fallback)


def _x0_and_eps(
    prediction_type: str, model_output: jax.Array, sample: jax.Array, a_t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        return (sample - b_t**0.5 * model_output) / a_t**0.5, model_output
    if prediction_type == "v_prediction":
        x0 = a_t**0.5 * sample - b_t**0.5 * model_output
        return x0, a_t**0.5 * model_output + b_t**0.5 * sample
    x0 = model_output  # "sample"
    return x0, (sample - a_t**0.5 * x0) / b_t**0.5


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
    _check_steps(cfg, n)
    return _spaced_timesteps(cfg, n)


def _ddpm_init(cfg, timesteps, sample, key=None) -> DDPMState:
    del sample
    _, acp = _schedule_np(cfg)
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
    cfg = _resolve("ddpm", config)
    ts = _ddpm_timesteps(cfg, num_inference_steps)
    state = _ddpm_init(cfg, ts, sample, key)
    return state.timesteps, state


def ddpm_step(
    state: DDPMState,
    model_output: jax.Array,
    i: jax.Array | int,
    sample: jax.Array,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, DDPMState]:
    """One ancestral step x_t -> x_{t_prev} (diffusers DDPMScheduler.step).

    ``i`` indexes ``state.timesteps``; the previous timestep is the next entry (or -1 after
    the last). ``noise`` overrides the key-derived N(0, 1) draw.
    """
    ts, acp = state.timesteps, state.alphas_cumprod
    n = ts.shape[0]
    t = ts[i]
    prev_t = jnp.where(i + 1 < n, ts[jnp.minimum(i + 1, n - 1)], -1)
    a_t = acp[t]
    a_prev = _alpha_at(acp, prev_t, jnp.float32(1.0))
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha

    x0, _ = _x0_and_eps(state.prediction_type, model_output, sample, a_t)
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
    return prev.astype(sample.dtype), state


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
    if not _is_number(eta) or eta < 0:
        raise ValueError(f"unsupported eta={eta!r} (need a number >= 0)")
    _, acp = _schedule_np(cfg)
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
    cfg = _resolve("ddim", config)
    ts = _ddpm_timesteps(cfg, num_inference_steps)
    state = _ddim_init(cfg, ts, sample, key, eta, use_clipped_model_output)
    return state.timesteps, state


def ddim_step(
    state: DDIMState,
    model_output: jax.Array,
    i: jax.Array | int,
    sample: jax.Array,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, DDIMState]:
    """One DDIM step (Song et al. 2021, eq. 12), as diffusers DDIMScheduler.step."""
    acp = state.alphas_cumprod
    t = state.timesteps[i]
    prev_t = t - state.step_ratio
    a_t = acp[t]
    a_prev = _alpha_at(acp, prev_t, state.final_alpha_cumprod)
    b_t = 1 - a_t

    x0, eps = _x0_and_eps(state.prediction_type, model_output, sample, a_t)
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
    return prev.astype(sample.dtype), state


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
    _check_steps(cfg, n)
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
    shape, dtype = _shape_dtype(sample)
    _, acp = _schedule_np(cfg)
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
    cfg = _resolve("pndm", config)
    ts = _pndm_timesteps(cfg, num_inference_steps)
    state = _pndm_init(cfg, ts, sample, num_inference_steps)
    return state.timesteps, state


def _pndm_prev_sample(state, sample, t, prev_t, model_output):
    # Transfer x_t -> x_{t_prev} given eps (PNDM paper eq. 9; diffusers _get_prev_sample).
    acp = state.alphas_cumprod
    a_t = acp[t]
    a_prev = _alpha_at(acp, prev_t, state.final_alpha_cumprod)
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
) -> tuple[jax.Array, PNDMState]:
    """One PLMS step (diffusers PNDMScheduler.step_plms), jit/scan friendly.

    The stored history ``ets`` holds raw model outputs; the Adams-Bashforth order grows
    1, (improved Euler), 2, 3, 4 over the first steps, selected by ``state.counter``.
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
    return prev.astype(sample.dtype), new_state


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
    _, acp = _schedule_np(cfg)
    if cfg["rescale_betas_zero_snr"]:
        # As diffusers: a tiny abar instead of 0 at the last step keeps sigma finite.
        acp = acp.copy()
        acp[-1] = 2.0**-24
    return acp


def _dpm_timesteps(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    _check_steps(cfg, n)
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
    shape, dtype = _shape_dtype(sample)
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
    cfg = _resolve("dpmpp_2m", config)
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
) -> tuple[jax.Array, DPMSolverState]:
    """One DPM-Solver++(2M) step (Lu et al. 2022), as diffusers DPMSolverMultistepScheduler.

    The solver works on x0 predictions; the first step (no history yet) and, by default, the
    last step (which lands on sigma = 0, where the log-SNR is infinite) are first order.
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
    return prev.astype(sample.dtype), new_state


# ----------------------------------------------------------------------------- generic


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A configured sampler: loop ``i`` over ``range(len(timesteps))``, call the model at
    ``timesteps[i]`` and feed its output to ``step``.

    Not a pytree: close over it in jitted code (its arrays become constants); the state
    returned by ``init_state`` is the pytree to thread through ``lax.scan``.
    """

    name: str
    timesteps: jax.Array
    num_inference_steps: int
    _init: Callable[..., Any] = dataclasses.field(repr=False)
    _step: Callable[..., Any] = dataclasses.field(repr=False)
    init_noise_sigma: float = init_noise_sigma

    def init_state(self, sample: Any, key: jax.Array | None = None) -> Any:
        """Initial state for samples shaped like ``sample`` (array or shape tuple). ``key``
        seeds the noise of stochastic samplers (DDPM, DDIM with eta > 0)."""
        return self._init(sample, key)

    def step(self, state, model_output, i, sample, **kwargs):
        """(prev_sample, new_state) from the model output at ``timesteps[i]``."""
        return self._step(state, model_output, i, sample, **kwargs)

    def scale_model_input(self, sample: jax.Array, i: Any = None) -> jax.Array:
        """Identity for these samplers (kept for loops written against diffusers' API)."""
        del i
        return sample


SAMPLERS = ("ddpm", "ddim", "pndm", "dpmpp_2m")


def make_sampler(
    name: str,
    config: Mapping[str, Any] | NoiseSchedule,
    num_inference_steps: int,
    **options: Any,
) -> Sampler:
    """Sampler ``name`` in SAMPLERS, configured from a scheduler config dict or schedule.

    ``options``: for 'ddim', ``eta`` and ``use_clipped_model_output``.
    """
    allowed = {"ddim": {"eta", "use_clipped_model_output"}}.get(name, set())
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")
    extra = set(options) - allowed
    if extra:
        raise ValueError(f"sampler {name!r} takes no option(s) {sorted(extra)}")
    cfg = _resolve(name, config)
    if name == "ddpm":
        ts = _ddpm_timesteps(cfg, num_inference_steps)
        init = lambda sample, key: _ddpm_init(cfg, ts, sample, key)  # noqa: E731
        step = ddpm_step
    elif name == "ddim":
        ts = _ddpm_timesteps(cfg, num_inference_steps)
        _ddim_init(cfg, ts, None, None, **options)  # validate options now
        init = lambda sample, key: _ddim_init(cfg, ts, sample, key, **options)  # noqa: E731
        step = ddim_step
    elif name == "pndm":
        ts = _pndm_timesteps(cfg, num_inference_steps)
        init = lambda sample, key: _pndm_init(cfg, ts, sample, num_inference_steps)  # noqa: E731
        step = pndm_step
    else:
        ts = _dpm_timesteps(cfg, num_inference_steps)
        init = lambda sample, key: _dpm_init(cfg, ts, sample)  # noqa: E731
        step = dpmpp_2m_step
    return Sampler(name, jnp.asarray(ts, jnp.int32), len(ts), init, step)


def sample_loop(
    sampler: Sampler,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    sample: jax.Array,
    key: jax.Array | None = None,
    *,
    return_trajectory: bool = False,
    unroll: int = 1,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Run the whole reverse process with ``lax.scan``: ``model_fn(x, t) -> model output``.

    ``sample`` is the starting noise (already multiplied by ``init_noise_sigma``). Returns the
    final sample, and with ``return_trajectory`` also every step's sample stacked on axis 0.
    """
    state = sampler.init_state(sample, key)

    def body(carry, i):
        x, st = carry
        t = sampler.timesteps[i]
        out = model_fn(sampler.scale_model_input(x, i), t)
        x, st = sampler.step(st, out, i, x)
        return (x, st), (x if return_trajectory else None)

    idx = jnp.arange(sampler.num_inference_steps)
    (x, _), traj = jax.lax.scan(body, (sample, state), idx, unroll=unroll)
    return (x, traj) if return_trajectory else x
