"""Dense-layer weight gradient dw = x^T dy: torch vs XLA:CPU vs jaxmed's kernel
(jaxmed/kernels/cpu_dense.cc, what kernels.dispatch.matmul's backward pass runs on CPU).

    python bench/bench_dense.py [--repeats 50] [--shapes 1024,128,128 256,256,2048]

Shapes are M (tokens), K (input features), N (output features): by default the medium
UNet's attention projections, GEGLU, proj_in/out and 1x1 shortcuts at batch 4, fp32.
Reported: median ms, and speed ratios (> 1: jaxmed's kernel faster). XLA contracts both
operands over their leading axis by transposing dy and calling Eigen; alone it is faster
for wide N, but inside a train step the kernel is faster there too (see cpu_dense.wins).

Measured on a 2-core AVX-512 CPU, 2026-11, XLA vs kernel, ms (M x K x N): 1024 x 512 x 128
0.69 vs 0.37; 1024 x 128 x 128 0.16 vs 0.11; 256 x 256 x 256 0.17 vs 0.08; 4096 x 64 x 64
0.25 vs 0.15; 1024 x 128 x 1024 0.70 vs 0.89 (XLA faster alone), yet the medium UNet's
train step went 273 -> 263 ms with the kernel there too. In that step the transposes and
products the kernel replaces were ~55 ms of thunk time.
"""

from __future__ import annotations

import argparse
import os

from bench_conv import _median_ms

SHAPES = [(256, 256, 256), (1024, 128, 128), (1024, 512, 128), (256, 1024, 256),
          (1024, 128, 1024), (256, 256, 2048), (4096, 64, 64), (4096, 192, 64),
          (308, 64, 128), (4, 256, 1024)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--shapes", nargs="+", help="M,K,N each")
    a = ap.parse_args()
    shapes = [tuple(map(int, s.split(","))) for s in a.shapes] if a.shapes else SHAPES

    import jax
    import numpy as np
    import torch

    from jaxmed.kernels import cpu_dense

    torch.set_num_threads(os.cpu_count() or 1)
    if not cpu_dense.available():
        raise SystemExit("the jaxmed dense kernel is unavailable here (see the warning above)")
    xla, ours = jax.jit(lambda x, dy: x.T @ dy), jax.jit(cpu_dense.wgrad)
    print(f"{'M,K,N':16} {'torch ms':>9} {'xla ms':>8} {'jaxmed ms':>9} {'vs torch':>8} "
          f"{'vs xla':>7}")
    for m, k, n in shapes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((m, k)).astype(np.float32)
        dy = rng.standard_normal((m, n)).astype(np.float32)
        xj, dyj = jax.numpy.asarray(x), jax.numpy.asarray(dy)
        xla_ms = _median_ms(lambda xj=xj, dyj=dyj: jax.block_until_ready(xla(xj, dyj)),
                            a.repeats)
        ours_ms = _median_ms(lambda xj=xj, dyj=dyj: jax.block_until_ready(ours(xj, dyj)),
                             a.repeats)
        xt, dyt = torch.tensor(x), torch.tensor(dy)
        torch_ms = _median_ms(lambda xt=xt, dyt=dyt: xt.t() @ dyt, a.repeats)
        print(f"{f'{m},{k},{n}':16} {torch_ms:9.3f} {xla_ms:8.3f} {ours_ms:9.3f} "
              f"{torch_ms / ours_ms:7.2f}x {xla_ms / ours_ms:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
