"""jaxmed.diffusion against diffusers' PyTorch schedulers (CPU, float32, tiny arrays)."""

import json

import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
)

from jaxmed.diffusion import ddpm, dpm_solver, pndm, samplers, schedule

# stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
# SD 2.x style (768-v): v-prediction; 'trailing' exercises the other timestep path.
SD2V = {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
CONFIGS = {"sd15": SD15, "sd2v": SD2V}

TORCH_CLASSES = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}
SHAPE = (2, 4, 8, 8)
STEPS = 50
TOL = 1e-5

# diffusers' DPM-Solver calls np.array(tensor, copy=False), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

_BASE = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def fake_model(x, t, acp, prediction_type, xp=np):
    """A deterministic stand-in for the UNet, written once for numpy and jax.numpy.

    It is the ideal denoiser for data concentrated at a target x0 that depends mildly on x,
    so the trajectories stay O(1) and tiny differences are not amplified from step to step.
    """
    a = acp[t]
    x0 = 0.8 * xp.tanh(xp.asarray(_BASE, dtype=x.dtype) + 0.2 * x)
    eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
    if prediction_type == "v_prediction":
        return a**0.5 * eps - (1 - a) ** 0.5 * x0
    if prediction_type == "sample":
        return x0
    return eps


def np_model(x, t, acp, prediction_type):
    # Evaluated in float64 from the float32 sample, identically for both implementations.
    out = fake_model(np.asarray(x, np.float64), int(t), acp, prediction_type)
    return out.astype(np.float32)


def start_noise():
    return np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)


def step_noises(n):
    rng = np.random.default_rng(1)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


def torch_scheduler(name, config, steps=STEPS):
    sched = TORCH_CLASSES[name].from_config(config)
    sched.set_timesteps(steps)
    return sched


def run_torch(name, config, monkeypatch, step_kwargs=None):
    sched = torch_scheduler(name, config)
    acp = sched.alphas_cumprod.numpy().astype(np.float64)
    noises = step_noises(len(sched.timesteps))
    it = iter(noises)
    if name == "ddpm":
        # Couple DDPM's ancestral noise: diffusers draws it through randn_tensor.
        monkeypatch.setattr(
            diffusers_ddpm, "randn_tensor", lambda *a, **k: torch.from_numpy(next(it))
        )
    if name == "dpmpp_2m":  # its x0 is what convert_model_output returns inside step
        convert = sched.convert_model_output
        sched.convert_model_output = lambda *a, **k: x0s.append(convert(*a, **k)) or x0s[-1]
    x = torch.from_numpy(start_noise())
    traj, x0s = [], []
    for i, t in enumerate(sched.timesteps):
        out = torch.from_numpy(np_model(x.numpy(), t, acp, sched.config.prediction_type))
        kwargs = {}
        if step_kwargs:
            kwargs = dict(step_kwargs, variance_noise=torch.from_numpy(noises[i]))
        res = sched.step(out, t, x, **kwargs)
        if name in ("ddpm", "ddim"):
            x0s.append(res.pred_original_sample)
        elif name == "pndm":  # diffusers' PNDM returns no x0: DDIM's formula at (x, t)
            x0s.append(torch.from_numpy(np_x0(x.numpy(), out.numpy(), acp[int(t)],
                                              sched.config.prediction_type)))
        x = res.prev_sample
        traj.append(x.numpy().copy())
    return sched, acp, noises, (np.stack(traj), np.stack([v.numpy() for v in x0s]))


def np_x0(x, out, a, prediction_type):
    """x0 implied by a model output at x where alphas_cumprod is a (float64)."""
    x, out = np.asarray(x, np.float64), np.asarray(out, np.float64)
    if prediction_type == "v_prediction":
        return (a**0.5 * x - (1 - a) ** 0.5 * out).astype(np.float32)
    return ((x - (1 - a) ** 0.5 * out) / a**0.5).astype(np.float32)


def run_jax(name, config, acp, noises, **options):
    sampler = samplers.make_sampler(name, config, STEPS, **options)
    x = jnp.asarray(start_noise())
    state = sampler.init_state(x, jax.random.key(0))
    step = jax.jit(sampler.step)
    pred = schedule.from_config(config).prediction_type
    traj, x0s = [], []
    for i in range(sampler.num_inference_steps):
        out = jnp.asarray(np_model(x, sampler.timesteps[i], acp, pred))
        kw = {"noise": jnp.asarray(noises[i])} if name == "ddpm" or options.get("eta") else {}
        res = step(state, out, i, x, **kw)
        assert isinstance(res, samplers.StepOutput)
        x, state = res.prev_sample, res.state
        traj.append(np.asarray(x))
        x0s.append(np.asarray(res.pred_original_sample))
    return sampler, (np.stack(traj), np.stack(x0s))


def check_x0(got, ref):
    """Per-step pred_original_sample: within TOL of diffusers' relative to the x0's size
    (epsilon models divide by sqrt(alphas_cumprod), ~0.07 at the first timesteps, which
    scales the samples' last-bit differences up by as much)."""
    assert got.shape == ref.shape
    err = np.abs(got - ref).max(axis=tuple(range(1, got.ndim)))
    scale = np.maximum(np.abs(ref).max(axis=tuple(range(1, ref.ndim))), 1.0)
    assert (err / scale).max() <= TOL, f"step {(err / scale).argmax()}: {err.max():.3e}"


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_trajectory_matches_diffusers(name, config_name, monkeypatch):
    config = CONFIGS[config_name]
    sched, acp, noises, (ref, ref_x0) = run_torch(name, config, monkeypatch)
    sampler, (got, got_x0) = run_jax(name, config, acp, noises)
    check_x0(got_x0, ref_x0)
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), sched.timesteps.numpy())
    assert got.shape == ref.shape == (len(sched.timesteps), *SHAPE)
    assert np.all(np.isfinite(ref))
    err = np.abs(got - ref).max(axis=tuple(range(1, got.ndim)))
    print(f"\n{name:9s} {config_name}: max abs err {err.max():.2e} (step {err.argmax()})")
    assert err.max() <= TOL, f"step {err.argmax()}: {err.max():.3e}"


@pytest.mark.parametrize(
    "name, extra, options, step_kwargs",
    [
        ("ddim", {}, {"eta": 0.5}, {"eta": 0.5}),
        ("ddim", {"prediction_type": "sample", "clip_sample": True}, {}, None),
        ("ddpm", {"clip_sample": True, "timestep_spacing": "linspace"}, {}, None),
        ("ddpm", {"variance_type": "fixed_large"}, {}, None),
        ("pndm", {"timestep_spacing": "linspace", "set_alpha_to_one": True}, {}, None),
        ("dpmpp_2m", {"solver_type": "heun", "final_sigmas_type": "sigma_min"}, {}, None),
        ("dpmpp_2m", {"timestep_spacing": "leading", "prediction_type": "v_prediction"}, {}, None),
        ("dpmpp_2m", {"prediction_type": "sample", "lower_order_final": False}, {}, None),
    ],
)
def test_trajectory_variants(name, extra, options, step_kwargs, monkeypatch):
    config = {**SD15, **extra}
    _, acp, noises, (ref, ref_x0) = run_torch(name, config, monkeypatch, step_kwargs)
    _, (got, got_x0) = run_jax(name, config, acp, noises, **options)
    assert np.abs(got - ref).max() <= TOL
    check_x0(got_x0, ref_x0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", None])
@pytest.mark.parametrize("steps", [50, 25, 7, 999])
@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_timesteps_equal_diffusers(name, steps, spacing):
    config = dict(SD15)
    if spacing is not None:  # None: the key is absent, each class uses its own default
        config["timestep_spacing"] = spacing
    expected = torch_scheduler(name, config, steps).timesteps.numpy()
    got = np.asarray(samplers.make_sampler(name, config, steps).timesteps)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"rescale_betas_zero_snr": True},
        {"num_train_timesteps": 999},
    ],
)
def test_schedule_equals_diffusers(extra):
    config = {**SD15, **extra}
    ref = DDPMScheduler.from_config(config)
    sched = schedule.from_config(config)
    assert sched.betas.dtype == sched.alphas_cumprod.dtype == jnp.float32
    if extra.get("rescale_betas_zero_snr"):
        # The rescaling takes a float32 sqrt; torch's vectorised CPU sqrt is not correctly
        # rounded (1 ulp off on ~20% of inputs here, numpy's is exact), and the shift to
        # zero terminal SNR cancels digits, so only closeness can hold.
        np.testing.assert_allclose(np.asarray(sched.betas), ref.betas.numpy(), atol=5e-6)
        np.testing.assert_allclose(
            np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9
        )
        return
    # Bit for bit: torch's float32 linspace and cumprod are reproduced exactly.
    np.testing.assert_array_equal(np.asarray(sched.betas), ref.betas.numpy())
    np.testing.assert_array_equal(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("config", [SD15, SD2V], ids=["sd15", "sd2v"])
def test_add_noise_velocity_target(config):
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((5, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 1, 500, 998, 999])
    ref = DDPMScheduler.from_config(config)
    sched = schedule.from_config(config)
    tt = torch.from_numpy(t)
    want_noisy = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    x0j, nj, tj = jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)
    noisy = jax.jit(schedule.add_noise)(sched, x0j, nj, tj)
    v = jax.jit(schedule.get_velocity)(sched, x0j, nj, tj)
    np.testing.assert_allclose(np.asarray(noisy), want_noisy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v), want_v, rtol=0, atol=1e-6)
    target = schedule.training_target(sched, None, x0j, nj, tj)
    want = want_v if config["prediction_type"] == "v_prediction" else noise
    np.testing.assert_allclose(np.asarray(target), want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(schedule.training_target(sched, "sample", x0j, nj, tj), x0)
    with pytest.raises(ValueError, match="flow"):
        schedule.training_target(sched, "flow", x0j, nj, tj)


@pytest.mark.parametrize("config", [SD15, SD2V], ids=["sd15", "sd2v"])
@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_scan_equals_python_loop(name, config):
    sampler = samplers.make_sampler(name, config, STEPS)
    acp = schedule.from_config(config).alphas_cumprod
    pred = config["prediction_type"]

    def model(x, t):
        return fake_model(x, t, acp, pred, xp=jnp)

    x_init = jnp.asarray(start_noise())
    key = jax.random.key(7)
    run = jax.jit(lambda x, k: samplers.sample_loop(sampler, model, x, k, return_trajectory=True))
    final, traj = run(x_init, key)

    x, state = x_init, sampler.init_state(x_init, key)
    step, jmodel = jax.jit(sampler.step), jax.jit(model)
    loop = []
    for i in range(sampler.num_inference_steps):
        x, state, _ = step(state, jmodel(x, sampler.timesteps[i]), i, x)
        loop.append(np.asarray(x))
    # Inside the scan XLA fuses the model into the step, so float32 rounding may differ.
    np.testing.assert_allclose(np.asarray(traj), np.stack(loop), rtol=0, atol=TOL)
    np.testing.assert_array_equal(np.asarray(final), np.asarray(traj[-1]))


def test_set_timesteps_functions():
    x = jnp.zeros(SHAPE)
    for fn, n in [
        (ddpm.ddpm_set_timesteps, 50),
        (ddpm.ddim_set_timesteps, 50),
        (pndm.pndm_set_timesteps, 51),
        (dpm_solver.dpmpp_2m_set_timesteps, 50),
    ]:
        ts, state = fn(SD15, STEPS, x)
        assert ts.shape == (n,) and ts.dtype == jnp.int32
        jax.tree_util.tree_map(lambda a: a, state)  # a valid pytree
    _, st = pndm.pndm_set_timesteps(SD15, STEPS, SHAPE)
    assert st.ets.shape == (4, *SHAPE)
    pndm_sampler = samplers.make_sampler("pndm", SD15, 10)
    assert samplers.init_noise_sigma == pndm_sampler.init_noise_sigma == 1.0


def test_ddpm_without_key_or_noise_raises():
    sampler = samplers.make_sampler("ddpm", SD15, 10)
    x = jnp.zeros(SHAPE)
    state = sampler.init_state(x)
    with pytest.raises(ValueError, match="key"):
        sampler.step(state, x, 0, x)


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("ddpm", "beta_schedule", "sigmoid"),
        ("ddim", "timestep_spacing", "uniform"),
        ("ddpm", "prediction_type", "flow_prediction"),
        ("pndm", "prediction_type", "sample"),
        ("pndm", "skip_prk_steps", False),
        ("ddpm", "variance_type", "learned_range"),
        ("ddim", "thresholding", True),
        ("dpmpp_2m", "algorithm_type", "sde-dpmsolver++"),
        ("dpmpp_2m", "solver_order", 3),
        ("dpmpp_2m", "use_karras_sigmas", True),
        ("ddim", "steps_offset", -1),
        ("ddim", "num_train_timesteps", "1000"),
    ],
)
def test_unsupported_config_value_raises(name, key, value):
    with pytest.raises(ValueError) as info:
        samplers.make_sampler(name, {**SD15, key: value}, 10)
    assert key in str(info.value) and repr(value) in str(info.value)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="beta_schedule='laplace'"):
        schedule.from_config({**SD15, "beta_schedule": "laplace"})
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        samplers.make_sampler("euler", SD15, 10)
    with pytest.raises(ValueError, match="eta"):
        samplers.make_sampler("pndm", SD15, 10, eta=0.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        samplers.make_sampler("ddim", SD15, 1001)


def test_from_pretrained_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        schedule.from_pretrained(tmp_path)
    assert str(tmp_path / "scheduler_config.json") in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"scheduler_config\.json"):
        schedule.from_pretrained(tmp_path / "nope")

    model = tmp_path / "model"
    (model / "scheduler").mkdir(parents=True)
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD2V))
    sched = schedule.from_pretrained(model)  # a model folder with a scheduler/ subfolder
    assert sched.prediction_type == "v_prediction"
    assert sched.config["timestep_spacing"] == "trailing"
    same = schedule.from_pretrained(model / "scheduler")
    np.testing.assert_array_equal(sched.alphas_cumprod, same.alphas_cumprod)
    # The schedule carries its config, so it can configure any sampler.
    ts = samplers.make_sampler("ddim", sched, STEPS).timesteps
    np.testing.assert_array_equal(ts, torch_scheduler("ddim", SD2V).timesteps.numpy())

    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        schedule.from_pretrained(tmp_path)
