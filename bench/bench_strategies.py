"""Strategies against each other within jaxmed: one process, every strategy's compiled train
step, timed in alternating rounds, so the machine's drift between processes (10-30% here)
cancels out of the ratios.

    python bench/bench_strategies.py --configs tiny medium --sizes 16 32 --rounds 5

Same model, batch and step as bench_train.py (which compares jaxmed with PyTorch); reported
per strategy: the median step time over all rounds and its ratio to full fine-tuning (unet).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import CONFIGS, jax_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=list(CONFIGS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[16, 32])
    ap.add_argument("--strategies", nargs="+", default=["unet", "lora", "bitfit"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per strategy and round")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    if "unet" not in a.strategies:
        raise SystemExit("--strategies must include unet (the ratios are to it)")

    import jax

    from jaxmed.hostmem import keep_freed_memory

    keep_freed_memory()
    rows = []
    print(f"{'config':8} {'latent':>6} " + " ".join(f"{s + ' ms':>11}" for s in a.strategies)
          + "   " + " ".join(f"{s + '/unet':>11}" for s in a.strategies if s != "unet"))
    for cfg_name in a.configs:
        for size in a.sizes:
            steps = {s: list(jax_step(cfg_name, size, s)) for s in a.strategies}
            times = {s: [] for s in a.strategies}
            for _ in range(a.rounds):
                for s, (fn, st, frozen, batch, _) in steps.items():
                    st, m = fn(st, frozen, batch)  # warm after the other strategies ran
                    jax.block_until_ready(m)
                    for _ in range(a.steps):
                        t0 = time.perf_counter()
                        st, m = fn(st, frozen, batch)
                        jax.block_until_ready(m["loss"])
                        times[s].append(1000 * (time.perf_counter() - t0))
                    steps[s][1] = st
            ms = {s: statistics.median(t) for s, t in times.items()}
            row = {"config": cfg_name, "latent": size, "step_ms": ms,
                   "ratio_to_unet": {s: ms[s] / ms["unet"] for s in ms}}
            rows.append(row)
            print(f"{cfg_name:8} {size:>6} " + " ".join(f"{ms[s]:11.1f}" for s in a.strategies)
                  + "   " + " ".join(f"{ms[s] / ms['unet']:11.2f}" for s in a.strategies
                                     if s != "unet"), flush=True)
            del steps
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
