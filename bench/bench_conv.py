"""3x3 convolution, forward + input and weight gradients: torch vs XLA:CPU vs jaxmed's
Winograd kernel (jaxmed/kernels/cpu_conv.cc, what layers.Conv runs where `cpu_conv.wins`).

    python bench/bench_conv.py [--repeats 30] [--shapes 4,32,64,64 2,64,320,320]

The UNet's CPU train step is convolution-bound; this isolates its convolutions (default:
the medium UNet's shapes at batch 4, plus SD's at batch 2; NHWC for jax, NCHW for torch,
fp32, SAME padding). Reported: median ms per fwd + bwd, and speed ratios (> 1: jaxmed's
kernel faster). `cpu_conv.wins` was set from these numbers.
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
