"""FID between two plain image folders (or saved statistics), as ``python -m pytorch_fid``:

    python -m jaxmed.evaluate fid DIR1 DIR2 [--method auto|sqrtm|eigh] [--batch-size 50]
        [--inception-weights PATH] [--out DIR]
    python -m jaxmed.evaluate fid --save-stats DIR STATS.npz    # reuse: pass STATS.npz

Each of the two paths is a folder of images (its files with an image extension, not its
subfolders, as pytorch-fid; any size, grey or colour, each read as RGB) or a ``.npz`` of
statistics (``mu``, ``sigma``: pytorch-fid's format; jaxmed also stores ``n``, the number
of images, which pytorch-fid ignores). Features are FID-Inception pool3 (2048-d, pytorch-fid's
network and bilinear resize to 299, `jaxmed.eval.inception`).

The FID is printed in full precision with the route that computed it: ``sqrtm`` is
pytorch-fid's computation; ``eigh`` the same trace from a symmetric eigenproblem, exact for
rank-deficient covariances (`jaxmed.eval.fid`). ``--method auto`` (the default) takes
``sqrtm`` when both sets have N > d images and ``eigh`` otherwise; the two differ from the
6th significant digit on when N <= d, where ``sqrtm`` itself is noisy. A statistics file
without ``n`` counts as N > d.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxmed.cli import add_debug_flag, main_guard
from jaxmed.data.folder import IMAGE_EXTENSIONS
from jaxmed.eval import inception as inception_lib
from jaxmed.eval.fid import (
    RankDeficientWarning,
    choose_method,
    feature_stats,
    fid_from_features,
    frechet_distance,
    load_stats,
    save_stats,
)
from jaxmed.files import write_json
from jaxmed.logging_utils import progress as progress_bar

CHUNK = 256  # images read at a time: only features stay in memory


def list_images(folder: str) -> list[str]:
    """Sorted image files directly in ``folder``; ValueError if there are none."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder (or .npz statistics file)")
    names = sorted(n for n in os.listdir(folder)
                   if n.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise ValueError(f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                         "subfolders are not searched, as in pytorch-fid")
    return [os.path.join(folder, n) for n in names]


def _read_rgb(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def folder_features(folder: str, extractor, *, batch_size: int = 50,
                    progress: bool = True) -> np.ndarray:
    """(N, d) features of the images in ``folder``, in file-name order. Images of one size
    go through the extractor together; each is resized to the network's input on its own,
    so the features do not depend on the other images."""
    paths = list_images(folder)
    out: list[np.ndarray | None] = [None] * len(paths)
    bar = progress_bar(total=len(paths), desc=f"features {os.path.basename(folder)}",
                       enabled=progress, unit="img")
    try:
        for a in range(0, len(paths), CHUNK):
            images = [_read_rgb(p) for p in paths[a:a + CHUNK]]
            by_size: dict[tuple[int, ...], list[int]] = {}
            for i, im in enumerate(images):
                by_size.setdefault(im.shape, []).append(i)
            for idx in by_size.values():
                feats = extractor.extract_features(
                    np.stack([images[i] for i in idx]),
                    batch_size=min(batch_size, len(idx)), progress=False)
                for i, f in zip(idx, np.asarray(feats)):
                    out[a + i] = f
            bar.update(len(images))
    finally:
        bar.close()
    return np.stack(out)


def _stats_of(path: str) -> dict:
    mu, sigma = load_stats(path)
    with np.load(path) as z:
        n = int(z["n"]) if "n" in z.files else None
    return {"path": path, "mu": mu, "sigma": sigma, "n": n}


def _is_stats(path: str) -> bool:
    return path.endswith(".npz") and os.path.isfile(path)


def folder_fid(path1: str, path2: str, *, method: str = "auto", extractor=None,
               inception_weights: str | None = None, batch_size: int = 50,
               progress: bool = True) -> dict:
    """FID between two image folders / ``.npz`` statistics files. Returns ``fid`` (float),
    ``route`` (the method that computed it), ``method`` (as asked), ``n1``, ``n2``, ``d``
    and ``notes``."""
    for p in (path1, path2):  # a wrong path fails before the network loads
        if not _is_stats(p):
            list_images(p)
    sides = []
    for p in (path1, path2):
        if _is_stats(p):
            sides.append(_stats_of(p))
            continue
        if extractor is None:  # looked up at run time, so a test can stub the network
            extractor = inception_lib.InceptionFeatures(weights=inception_weights)
        f = folder_features(p, extractor, batch_size=batch_size, progress=progress)
        sides.append({"path": p, "features": f, "n": f.shape[0]})
    d = next(s["features"].shape[1] if "features" in s else s["mu"].shape[0] for s in sides)
    n1, n2 = sides[0]["n"], sides[1]["n"]
    route = choose_method(method, n1, n2, d)
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RankDeficientWarning)
        if all("features" in s for s in sides):
            value = fid_from_features(sides[0]["features"], sides[1]["features"], method=route)
        else:
            stats = [(s["mu"], s["sigma"]) if "mu" in s else
                     feature_stats(s["features"], name=s["path"]) for s in sides]
            value = frechet_distance(*stats[0], *stats[1], method=route)
    if any(issubclass(w.category, RankDeficientWarning) for w in caught):
        notes.append(f"N <= d (N1 {n1}, N2 {n2}, d {d}): rank-deficient covariances, FID "
                     "biased upwards; compare only at equal N (pytorch-fid recommends N >= "
                     "2048)")
    return {"format": "jaxmed.evaluate.fid/1", "path1": path1, "path2": path2,
            "fid": float(value), "route": route, "method": method, "n1": n1, "n2": n2,
            "d": int(d), "notes": notes}


def route_text(result: dict) -> str:
    """One line: which route computed the FID and why."""
    route, method = result["route"], result["method"]
    why = {"sqrtm": "pytorch-fid's scipy.linalg.sqrtm",
           "eigh": "a symmetric eigenproblem (exact for rank-deficient covariances)"}[route]
    if method == "auto":
        n = f"N1 {result['n1']}, N2 {result['n2']}, d {result['d']}"
        rule = "both sets have N > d" if route == "sqrtm" else "a set has N <= d"
        return f"route: {route}, {why} (--method auto, as {rule}: {n})"
    return f"route: {route}, {why} (--method {method})"


def save_folder_stats(folder: str, out: str, *, inception_weights: str | None = None,
                      batch_size: int = 50, progress: bool = True, extractor=None) -> int:
    """Write the folder's FID statistics (pytorch-fid's ``mu``, ``sigma``, plus ``n``)."""
    list_images(folder)  # a wrong path fails before the network loads
    extractor = extractor or inception_lib.InceptionFeatures(weights=inception_weights)
    f = folder_features(folder, extractor, batch_size=batch_size, progress=progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)
        mu, sigma = feature_stats(f, name=folder)
    save_stats(out, mu, sigma, n=f.shape[0])
    return f.shape[0]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxmed.evaluate fid",
                                 description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("paths", nargs=2, metavar="PATH",
                    help="two image folders or .npz statistics (with --save-stats: the "
                         "folder, then the .npz to write)")
    ap.add_argument("--method", default="auto", choices=("auto", "sqrtm", "eigh"),
                    help="FID route (default auto: sqrtm when both sets have N > d)")
    ap.add_argument("--save-stats", action="store_true",
                    help="write the first path's statistics to the second (.npz)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--inception-weights", default=None,
                    help="FID Inception weights file (.pth / .pt / .safetensors)")
    ap.add_argument("--out", default=None, help="also write metrics.json to this folder")
    ap.add_argument("--no-progress", action="store_true")
    add_debug_flag(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxmed.evaluate fid ...``: user errors (a missing folder, an unreadable
    file, a missing optional package) are one ``error:`` line, exit 2 (`jaxmed.cli.main_guard`)."""
    return main_guard(_main, argv, extra_errors=(ImportError, OSError))


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    p1, p2 = args.paths
    if args.save_stats:
        if not p2.endswith(".npz"):
            raise ValueError(f"--save-stats writes a .npz file; got {p2!r}")
        n = save_folder_stats(p1, p2, inception_weights=args.inception_weights,
                              batch_size=args.batch_size, progress=not args.no_progress)
        print(f"wrote FID statistics of {n} images of {p1} to {p2}", flush=True)
        return 0
    result = folder_fid(p1, p2, method=args.method, inception_weights=args.inception_weights,
                        batch_size=args.batch_size, progress=not args.no_progress)
    print(f"FID: {result['fid']!r}", flush=True)
    print(route_text(result), flush=True)
    for note in result["notes"]:
        print(f"note: {note}", flush=True)
    if args.out:
        path = write_json(os.path.join(args.out, "metrics.json"), result)
        print(f"wrote {path}", flush=True)
    return 0
