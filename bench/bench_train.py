"""Train-step speed: jaxmed vs the authors' PyTorch recipe, same UNet, batch, machine.

    python bench/bench_train.py                      # tiny + medium, 16x16 and 32x32 latents
    python bench/bench_train.py --configs tiny --sizes 16 --strategies unet lora --steps 10
    python bench/bench_train.py --device cuda --configs sd15 --sizes 64   # on a GPU machine

The UNet configurations are the bench's fixed ``tiny`` and ``medium`` (`CONFIGS` below), plus
SD 1.5's own UNet (`sd15`, 860M parameters; 64x64 latents are the study's 512 px): batch 4,
fp32 (on a GPU both frameworks may use TF32 in matrix products and convolutions), text
context (4, 77, cross_attention_dim), DDPM scaled_linear betas, AdamW lr 1e-4 wd 1e-2,
grad-norm clip 1.0, LoRA r8 alpha 16 on to_q/to_k/to_v/to_out.0.

PyTorch: diffusers UNet2DConditionModel (+ peft for LoRA; biases only for BitFit) and
torch.optim.AdamW, the step the authors' train script runs on cached latents.
jaxmed: the real `jaxmed.train.make_train_step` (strategy registry, jaxmed.optim's AdamW)
on cached latents and text embeddings, i.e. what a study run executes.

Each (framework, config, size, strategy) runs in its own process, so peak RSS is the
child's own; with --rounds N the pair runs N times, alternating, and the median run of each
is reported. Both processes first keep freed host memory (jaxmed.hostmem, as jaxmed's
command-line tools do; --malloc default for glibc's defaults). Reported: median
steady-state step time, compile time (jaxmed) / first-step time (torch), peak RSS, and the
speed ratio torch/jaxmed (> 1 means jaxmed is faster).

Why `jaxmed.train` accumulates gradients in a Python loop on CPU (a lax.scan elsewhere):
XLA:CPU runs convolution weight gradients inside a while loop up to ~60x slower than
unrolled. Measured on the 2-core CPU: a 3x3 conv's weight gradient 2.9 s in lax.scan vs
46 ms unrolled; a VAE training step at 128 px 23.5 s vs 1.1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32),
    "medium": dict(block_out_channels=(64, 128, 256), layers_per_block=2,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                     "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   cross_attention_dim=64),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768),
}
BATCH = 4
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def torch_unet(cfg_name: str):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(in_channels=4, out_channels=4, attention_head_dim=8,
                                norm_num_groups=32, **CONFIGS[cfg_name])


def run_torch(cfg_name: str, size: int, strategy: str, steps: int, device: str) -> dict:
    import torch
    from diffusers import DDPMScheduler

    torch.set_num_threads(os.cpu_count() or 1)
    torch.backends.cuda.matmul.allow_tf32 = True  # as XLA's default precision on GPU
    unet = torch_unet(cfg_name).to(device)
    if strategy == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    elif strategy == "bitfit":
        for n, p in unet.named_parameters():
            p.requires_grad_(n.endswith(".bias"))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(BATCH, 4, size, size, generator=g, device=device)
    ctx = torch.randn(BATCH, 77, CONFIGS[cfg_name]["cross_attention_dim"], generator=g,
                      device=device)
    unet.train()

    def step():
        noise = torch.randn(latents.shape, generator=g, device=device)
        t = torch.randint(0, 1000, (BATCH,), generator=g, device=device)
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)  # waits for the device

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out = {"first_step_s": first, "step_ms": 1000 * statistics.median(times),
           "trainable": sum(p.numel() for p in params)}
    if device != "cpu":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def jax_step(cfg_name: str, size: int, strategy: str, device: str = "cpu"):
    """jaxmed's compiled train step on this config: (step, state, frozen, batch, info);
    ``state, metrics = step(state, frozen, batch)`` (the state is donated)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if jax.default_backend() != ("gpu" if device == "cuda" else device):
        raise SystemExit(f"--device {device}: jax's default backend is {jax.default_backend()}")
    from jaxmed import strategies, train
    from jaxmed.checkpoint import TrainState
    from jaxmed.cli import load_config, set_override
    from jaxmed.models import convert, tiny, unet
    from jaxmed.models.sd import StableDiffusion
    from jaxmed.optim import make_optimizer
    from jaxmed.strategies import count

    tu = torch_unet(cfg_name)
    ucfg = unet.UNetConfig.from_dict(dict(tu.config))
    state = {k: v.detach().numpy() for k, v in tu.state_dict().items()}
    uparams = convert.state_dict_to_params(state, unet.abstract_params(ucfg))
    cfgs = tiny.configs("test")
    cfgs["unet"] = ucfg
    sd = StableDiffusion.from_configs(cfgs, tiny.SD15_SCHEDULER)
    params = {"unet": uparams}  # cached latents + context: the VAE and text tower never run

    c = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "finetune.py")
                    + ":" + strategy)
    for k, v in {"optim.grad_accum": 1}.items():
        set_override(c, k, str(v))
    opts = {"lrs": {"unet": 1e-4}} if strategy == "unet" else {"lr": 1e-4}
    strat = strategies.get(strategy, **opts)
    # Under jit, as jaxmed.train does: the frozen weights become device arrays once (eagerly
    # they would stay numpy and be copied to the device in every step: +37 ms a medium
    # lora step).
    trainable, frozen = jax.jit(strat.init)(params, jax.random.PRNGKey(0))
    tx = make_optimizer(strat, trainable, c.optim)
    st = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                    opt_state=tx.init(trainable), ema=None,
                    bad_step=jnp.full((), -1, jnp.int32))
    step_fn = jax.jit(train.make_train_step(sd, strat, tx, c), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    batch = {
        "latent_mean": jnp.asarray(rng.standard_normal((BATCH, size, size, 4)), jnp.float32),
        "latent_logvar": jnp.full((BATCH, size, size, 4), -20.0, jnp.float32),
        "context": jnp.asarray(rng.standard_normal(
            (BATCH, 77, CONFIGS[cfg_name]["cross_attention_dim"])), jnp.float32),
    }
    t0 = time.perf_counter()
    compiled = step_fn.lower(st, frozen, batch).compile()
    info = {"compile_s": time.perf_counter() - t0, "trainable": count(trainable)}
    mem = compiled.memory_analysis()
    if mem is not None:
        info["xla_temp_mb"] = getattr(mem, "temp_size_in_bytes", 0) / 2**20
    return compiled, st, frozen, batch, info


def run_jax(cfg_name: str, size: int, strategy: str, steps: int, device: str) -> dict:
    import jax

    compiled, st, frozen, batch, out = jax_step(cfg_name, size, strategy, device)
    st, m = compiled(st, frozen, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        st, m = compiled(st, frozen, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    out["step_ms"] = 1000 * statistics.median(times)
    if device != "cpu":
        out["device_peak_mb"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**20
    return out


def child(args) -> None:
    fw, cfg_name, size, strategy, steps, device = args
    # What jaxmed's command-line tools do first (jaxmed/hostmem.py); torch gets the same
    # malloc, so the comparison stays like for like. --malloc default turns it off for both.
    from jaxmed.hostmem import keep_freed_memory

    keep_freed_memory()
    fn = run_torch if fw == "torch" else run_jax
    res = fn(cfg_name, int(size), strategy, int(steps), device)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "medium"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[16, 32])
    ap.add_argument("--strategies", nargs="+", default=["unet", "lora", "bitfit"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each pair this many times, alternating torch and jaxmed, and "
                         "report the medians (torch's step time varies up to 30%% between "
                         "processes here)")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="keep: both processes keep freed memory (jaxmed.hostmem, what the "
                         "jaxmed CLIs do); default: glibc's defaults for both")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where both frameworks run (cuda: torch on the GPU, jax's GPU backend)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child)
        return
    env = dict(os.environ)
    if a.malloc == "default":
        env["JAXMED_HOST_MALLOC"] = "default"
    rows = []
    # MB: peak host RSS on CPU, peak device memory on a GPU
    mb = ("torch_rss_mb", "jax_rss_mb") if a.device == "cpu" else ("torch_device_mb",
                                                                    "jax_device_mb")
    print(f"{'config':8} {'latent':>6} {'strategy':8} {'torch ms':>9} {'jaxmed ms':>9} "
          f"{'speedup':>7} {'jax compile s':>13} {'torch MB':>9} {'jax MB':>8}")
    for cfg_name in a.configs:
        for size in a.sizes:
            for strategy in a.strategies:
                runs = {"torch": [], "jax": []}
                for _ in range(a.rounds):
                    for fw in ("torch", "jax"):
                        p = subprocess.run([sys.executable, __file__, "--child", fw, cfg_name,
                                            str(size), strategy, str(a.steps), a.device],
                                           capture_output=True, text=True, env=env)
                        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                        if p.returncode or not line:
                            raise SystemExit(f"{fw} {cfg_name} {size} {strategy} failed:\n"
                                             f"{p.stderr[-3000:]}")
                        runs[fw].append(json.loads(line[0][7:]))
                        print(f"  ({fw} {cfg_name} {size} {strategy}: "
                              f"{runs[fw][-1]['step_ms']:.1f} ms)", flush=True)
                t, j = (sorted(r, key=lambda x: x["step_ms"])[len(r) // 2]  # median run
                        for r in (runs["torch"], runs["jax"]))
                row = {"config": cfg_name, "latent": size, "strategy": strategy,
                       "torch_ms": t["step_ms"], "jax_ms": j["step_ms"],
                       "speedup": t["step_ms"] / j["step_ms"], "jax_compile_s": j["compile_s"],
                       "torch_rss_mb": t["peak_rss_mb"], "jax_rss_mb": j["peak_rss_mb"],
                       "device": a.device, "torch_device_mb": t.get("device_peak_mb"),
                       "jax_device_mb": j.get("device_peak_mb"),
                       "trainable_torch": t["trainable"], "trainable_jax": j["trainable"]}
                rows.append(row)
                print(f"{cfg_name:8} {size:>6} {strategy:8} {row['torch_ms']:9.1f} "
                      f"{row['jax_ms']:9.1f} {row['speedup']:6.2f}x {row['jax_compile_s']:13.1f} "
                      f"{row[mb[0]]:9.0f} {row[mb[1]]:8.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
