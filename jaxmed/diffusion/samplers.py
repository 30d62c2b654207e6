"""Samplers (DDPM, DDIM, PNDM, DPM-Solver++ 2M) as pure JAX functions, behind one interface.

Everything a sampler needs at a step lives in a small pytree *state* (constants such as the
timestep table and ``alphas_cumprod`` plus the running history), so ``step`` is a pure
function usable under ``jax.jit``, ``lax.scan`` and ``lax.fori_loop``::

    sampler = make_sampler("pndm", schedule.from_pretrained("path/to/sd15"), 50)
    state = sampler.init_state(latents, key)
    for i in range(len(sampler.timesteps)):                 # or sample_loop(...) with lax.scan
        eps = unet(latents, sampler.timesteps[i])
        latents, state, x0 = sampler.step(state, eps, i, latents)  # x0: the clean estimate

``i`` is the index into ``sampler.timesteps`` (not the timestep value). The configuration
(a scheduler_config.json dict or a `NoiseSchedule`) is read as `jaxmed.diffusion.schedule`
describes; each family's steps are in its own module (ddpm.py: DDPM and DDIM, pndm.py,
dpm_solver.py). Results match diffusers' schedulers step for step in float32 (see
tests/diffusion/test_schedulers.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxmed.diffusion import ddpm, dpm_solver, pndm
from jaxmed.diffusion.schedule import NoiseSchedule, StepOutput, resolve_config

__all__ = ["SAMPLERS", "Sampler", "StepOutput", "init_noise_sigma", "make_sampler",
           "sample_loop"]

# Every sampler here starts from unit-variance Gaussian noise.
init_noise_sigma = 1.0

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

    def step(self, state, model_output, i, sample, **kwargs) -> StepOutput:
        """(prev_sample, new_state, pred_original_sample) from the model output at
        ``timesteps[i]`` (a `StepOutput`; x0 as diffusers' ``pred_original_sample``)."""
        return self._step(state, model_output, i, sample, **kwargs)

    def scale_model_input(self, sample: jax.Array, i: Any = None) -> jax.Array:
        """Identity for these samplers (kept for loops written against diffusers' API)."""
        del i
        return sample


# Each family builds (timesteps, init(sample, key), step) from a resolved config.
_PARTS: dict[str, Callable[..., Any]] = {
    "ddpm": ddpm.ddpm_parts,
    "ddim": ddpm.ddim_parts,
    "pndm": pndm.pndm_parts,
    "dpmpp_2m": dpm_solver.dpmpp_2m_parts,
}
SAMPLERS = tuple(_PARTS)


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
    cfg = resolve_config(name, config)
    ts, init, step = _PARTS[name](cfg, num_inference_steps, **options)
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
        x, st, _ = sampler.step(st, out, i, x)
        return (x, st), (x if return_trajectory else None)

    idx = jnp.arange(sampler.num_inference_steps)
    (x, _), traj = jax.lax.scan(body, (sample, state), idx, unroll=unroll)
    return (x, traj) if return_trajectory else x
