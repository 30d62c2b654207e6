"""3x3 convolution, forward + input and weight gradients: torch vs XLA:CPU vs jaxmed's
Winograd kernel (jaxmed/kernels/cpu_conv.cc, what kernels.dispatch.conv runs on CPU where
`cpu_conv.wins`).

    python bench/bench_conv.py [--repeats 30] [--shapes 4,32,64,64 2,64,320,320]

The UNet's CPU train step is convolution-bound; this isolates its convolutions (default:
the medium UNet's shapes at batch 4, plus SD's at batch 2; NHWC for jax, NCHW for torch,
fp32, SAME padding). Reported: median ms per fwd + bwd, and speed ratios (> 1: jaxmed's
kernel faster). `cpu_conv.wins` was set from these numbers.

Measured on a 2-core AVX-512 CPU, 2026-11 (fwd + both gradients; kernel vs XLA):
- `cpu_conv.wins`: 32x32 at 64 -> 64 1.05 vs 3.0 ms (2.9x); 32x32 up to 640 + 640 channels
  1.1x; 64x64 at 320 1.5x; 8x8 and 16x16 from 256 to 768 channels in + out 1.3-1.7x
  (16x16 at 128 + 128 1.6x); 16x16 at 640 + 640 0.7x; 4x4 at 256 0.87x.
- `cpu_conv.STAGED_CHANNELS`: fused vs staged, 16x16 at 128 + 128 1.04 vs 1.47 ms; 32x32
  at 640 + 640 125 vs 77 ms.
- `cpu_conv._filter_inside` (fwd / input gradient, ms, separate filter transform + conv vs
  inside): 8x8 at 256 -> 256 0.52 / 0.92 vs 0.49 / 0.63; 16x16 at 384 -> 128 1.07 / 1.37
  vs 1.06 / 1.05; 16x16 at 128 -> 128 0.38 / 0.46 vs 0.40 / 0.45; 32x32 at 128 -> 128
  1.23 / 1.35 vs 1.35 / 1.38. The 256 x 256 filter transform alone: 0.16 ms, 0.65 ms
  inside a train step (w and u cold).
- `kernels.dispatch.IM2COL_PIXELS` (im2col vs XLA's convolution at 4x4, batch 4): 256 ->
  256 channels 0.87 vs 1.62 ms, 512 -> 256 1.14 vs 2.91 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

SHAPES = [(4, 32, 64, 64), (4, 32, 128, 64), (4, 32, 192, 64), (4, 32, 128, 128),
          (4, 16, 128, 128), (4, 16, 256, 128), (4, 16, 384, 128), (4, 16, 256, 256),
          (4, 8, 256, 256), (4, 8, 512, 256), (4, 8, 64, 64), (4, 4, 256, 256),
          (2, 64, 320, 320), (2, 32, 640, 640), (2, 16, 640, 640), (2, 8, 1280, 1280)]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--shapes", nargs="+", help="batch,size,cin,cout each")
    a = ap.parse_args()
    shapes = [tuple(map(int, s.split(","))) for s in a.shapes] if a.shapes else SHAPES

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from jax import lax

    from jaxmed.kernels import cpu_conv

    torch.set_num_threads(os.cpu_count() or 1)
    if not cpu_conv.available():
        raise SystemExit("the jaxmed conv kernel is unavailable here (see the warning above)")

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def grad(c):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(c(x, w) ** 2), argnums=(0, 1)))

    xla_grad, ours_grad = grad(conv), grad(cpu_conv.conv3x3)
    print(f"{'batch,hw,cin,cout':18} {'torch ms':>9} {'xla ms':>8} {'jaxmed ms':>9} "
          f"{'vs torch':>8} {'vs xla':>7} {'used':>5}")
    for b, hw, cin, cout in shapes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((b, hw, hw, cin)).astype(np.float32)
        w = (rng.standard_normal((3, 3, cin, cout)) * 0.05).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        xla_ms = _median_ms(lambda xj=xj, wj=wj: jax.block_until_ready(xla_grad(xj, wj)),
                            a.repeats)
        ours_ms = _median_ms(lambda xj=xj, wj=wj: jax.block_until_ready(ours_grad(xj, wj)),
                             a.repeats)
        xt = torch.tensor(x.transpose(0, 3, 1, 2)).requires_grad_()
        wt = torch.tensor(w.transpose(3, 2, 0, 1)).requires_grad_()

        def torch_step(xt=xt, wt=wt):
            xt.grad = wt.grad = None
            (torch.nn.functional.conv2d(xt, wt, padding=1) ** 2).sum().backward()

        torch_ms = _median_ms(torch_step, a.repeats)
        used = "yes" if cpu_conv.wins(hw, hw, cin, cout) else "no"
        print(f"{f'{b},{hw},{cin},{cout}':18} {torch_ms:9.2f} {xla_ms:8.2f} {ours_ms:9.2f} "
              f"{torch_ms / ours_ms:7.2f}x {xla_ms / ours_ms:6.2f}x {used:>5}", flush=True)


if __name__ == "__main__":
    main()
