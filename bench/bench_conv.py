"""3x3 convolution, forward + input and weight gradients: XLA:CPU (jaxmed's Conv) vs torch.

    python bench/bench_conv.py [--repeats 30]

The medium UNet's train step is convolution-bound; this isolates the convolutions at its
shapes (batch 4, NHWC for XLA, NCHW for torch, fp32, SAME padding) to show how much of the
gap to torch is the convolution library itself. Reported: median ms per fwd + bwd.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

SHAPES = [(4, 32, 64, 64), (4, 32, 128, 64), (4, 16, 128, 128), (4, 8, 256, 256)]


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
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from jax import lax

    torch.set_num_threads(os.cpu_count() or 1)

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
    print(f"{'batch,hw,cin,cout':20} {'torch ms':>9} {'xla ms':>8} {'ratio':>6}")
    for b, hw, cin, cout in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((b, hw, hw, cin)).astype(np.float32)
        w = (rng.standard_normal((3, 3, cin, cout)) * 0.05).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        xla_ms = _median_ms(lambda xj=xj, wj=wj: jax.block_until_ready(grad(xj, wj)), a.repeats)
        xt = torch.tensor(x.transpose(0, 3, 1, 2)).requires_grad_()
        wt = torch.tensor(w.transpose(3, 2, 0, 1)).requires_grad_()

        def torch_step(xt=xt, wt=wt):
            xt.grad = wt.grad = None
            (torch.nn.functional.conv2d(xt, wt, padding=1) ** 2).sum().backward()

        torch_ms = _median_ms(torch_step, a.repeats)
        print(f"{f'{b},{hw},{cin},{cout}':20} {torch_ms:9.2f} {xla_ms:8.2f} "
              f"{torch_ms / xla_ms:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
