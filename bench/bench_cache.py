"""Encode once, train many: train-step time with and without the latent / text caches.

    python bench/bench_cache.py                       # 256 and 512 px, tiny architecture
    python bench/bench_cache.py --sizes 256 --strategies lora unet --steps 5
    python bench/bench_cache.py --study               # + the `ci` study with caches on / off

Model: jaxmed's tiny SD architecture (`random:tiny@<px>`: UNet (64, 128, 128), VAE f=8,
CLIP text 64-d), batch 4, fp32, grad_accum 1, on the phantom chest X-rays at the given
resolution. "off" encodes every image with the VAE encoder and every caption with the text
encoder inside each step (the authors' recipe); "on" reads VAE posteriors and text
embeddings from the caches (built once, time reported separately).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def step_time(strategy: str, px: int, cache: str, steps: int, data_dir: str) -> dict:
    from jaxmed import train
    from jaxmed.cli import load_config, set_override

    c = load_config(os.path.join(ROOT, "configs", "finetune.py") + ":" + strategy)
    for k, v in {"model.path": f"random:tiny@{px}", "data.kind": "phantom",
                 "data.phantom_dir": data_dir, "data.phantom_patients": 40,
                 "data.resolution": px, "train.per_device_batch": 4, "optim.grad_accum": 1,
                 "cache.latents": cache, "cache.text": cache, "cache.prefill": True,
                 "log.progress": False,
                 "log.sample_every_steps": -1, "log.tensorboard": False,
                 "export.diffusers": False, "export.adapters": False}.items():
        set_override(c, k, str(v))
    with tempfile.TemporaryDirectory() as wd:
        set_override(c, "cache.dir", os.path.join(data_dir, f"cache{px}"))
        t0 = time.perf_counter()
        trainer = train.Trainer(c, wd)
        setup = time.perf_counter() - t0
        batches = trainer.make_batches()
        from jaxmed.data import prefetch_to_device

        it = prefetch_to_device(trainer._numeric(batches), 2, trainer._batch_sharding_fn())
        state = trainer.state
        t0 = time.perf_counter()
        state, m = trainer.train_step(state, trainer.frozen, next(it))
        jax.block_until_ready(m)
        first = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            batch = next(it)
            t0 = time.perf_counter()
            state, m = trainer.train_step(state, trainer.frozen, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        batches.close()
    return {"setup_s": setup, "first_step_s": first, "step_ms": 1000 * statistics.median(times)}


def study_time(cache: str) -> float:
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "jaxmed.study", "--config",
                            os.path.join(ROOT, "configs", "study.py") + ":ci", "--workdir", wd,
                            "--config.finetune.overrides="
                            f"cache.latents={cache};cache.text={cache}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode:
            sys.exit(f"the ci study failed (cache={cache}):\n{r.stderr[-3000:]}")
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--strategies", nargs="+", default=["lora", "unet"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "jaxmed-bench-data"))
    ap.add_argument("--study", action="store_true")
    a = ap.parse_args()
    print(f"{'px':>4} {'strategy':8} {'no cache ms':>11} {'cache ms':>9} {'speedup':>7} "
          f"{'cache build+setup s':>19}")
    for px in a.sizes:
        data = os.path.join(a.data, str(px))
        for strategy in a.strategies:
            off = step_time(strategy, px, "off", a.steps, data)
            on = step_time(strategy, px, "on", a.steps, data)
            print(f"{px:>4} {strategy:8} {off['step_ms']:11.1f} {on['step_ms']:9.1f} "
                  f"{off['step_ms'] / on['step_ms']:6.2f}x {on['setup_s']:19.1f}", flush=True)
    if a.study:
        on, off = study_time("auto"), study_time("off")
        print(f"ci study total: caches on {on:.0f} s, off {off:.0f} s ({off / on:.2f}x)")


if __name__ == "__main__":
    main()
