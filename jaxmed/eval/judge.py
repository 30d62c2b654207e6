"""The judge's view of an image, and the judge checked on the kind of image it will judge.

One route into every classifier of the study (the judge and the downstream classifiers),
whatever the image's origin -- a real film, a generated PNG, a VAE reconstruction:

    the stored uint8 pixels at their stored size (PNG / JPEG as written; `load_images`)
      -> grey (mean of the channels) -> antialiased bilinear resize to the classifier's
      size (`jax.image.resize`, `prepare_images`) -> uint8.

Before this module the judge was trained and validated on real films resized by PIL
straight to its input size, while generated images reached it through `prepare_images`;
now `read_for_classifier` (files) and `TrainedClassifier.predict_proba` (arrays) are the
same function, so a difference between real and generated scores is the images', not the
resize's.

`check_judge` then measures the judge's macro AUROC on real test films three ways, all
through that route (docs/STUDY.md "Where jaxmed departs from the study"):

* ``real``: the films as stored;
* ``synthesis_resolution``: the films as the diffusion model sees them in training
  (`jaxmed.data.chexpert.load_image` at the synthesis resolution) and stored the way
  synthesis stores its output (`jaxmed.diffusion.sampling.to_stored`: grey or RGB);
* ``vae_reconstruction``: the same films encoded and decoded by the model's VAE (posterior
  mean) and stored the same way -- the best a generated image can look to the judge.

A judge below ``min_macro_auroc`` on the reconstructions cannot tell the conditions apart
on generated images however good the fine-tuning, so alignment numbers are then void.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxmed.data.chexpert import load_image
from jaxmed.data.combinations import format_label
from jaxmed.diffusion.sampling import to_stored
from jaxmed.eval import metrics as M
from jaxmed.eval.classifier import prepare_images
from jaxmed.evaluate import Evaluator, ImageSet, image_size_of, load_images
from jaxmed.files import atomic_write, save_image

VIEWS = ("real", "synthesis_resolution", "vae_reconstruction")


def read_for_classifier(paths: Sequence[str], image_size: int, *,
                        chunk: int = 256) -> np.ndarray:
    """(N, image_size, image_size) uint8 grey: image files through the judge's route.

    Files are read in chunks at the first file's size (others resized to it by PIL, as
    `jaxmed.evaluate.Evaluator` reads a set), so memory holds only the small outputs.
    """
    if not len(paths):
        raise ValueError("no image paths given")
    size = image_size_of(paths[0])
    out = [prepare_images(load_images(paths[s:s + chunk], size), int(image_size))[..., 0]
           for s in range(0, len(paths), chunk)]
    return np.concatenate(out)


def films_as_stored(paths: Sequence[str], resolution: int, color: str) -> np.ndarray:
    """Real films at the synthesis resolution, as synthesis would store them (uint8)."""
    x = np.stack([load_image(p, int(resolution)) for p in paths])  # [-1, 1], the training view
    return to_stored(np.clip((x + 1.0) / 2.0, 0.0, 1.0), color)


@functools.lru_cache(maxsize=4)
def _reconstruct_fn(sd):
    @jax.jit
    def f(vae_params, x):
        mean, _ = sd.encode_images(vae_params, x)
        y = sd.decode_latents(vae_params, mean * sd.scaling_factor)
        return jnp.clip((y + 1.0) / 2.0, 0.0, 1.0)

    return f


def vae_reconstructions(sd, vae_params, paths: Sequence[str], resolution: int, color: str,
                        *, batch_size: int = 16) -> np.ndarray:
    """Real films at the synthesis resolution through the VAE (posterior mean), stored as
    synthesis stores its output (uint8)."""
    fn = _reconstruct_fn(sd)
    out = []
    for s in range(0, len(paths), batch_size):
        x = np.stack([load_image(p, int(resolution)) for p in paths[s:s + batch_size]])
        m = x.shape[0]
        if m < batch_size and len(paths) > batch_size:  # one compiled shape
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - m, axis=0)])
        out.append(to_stored(np.asarray(fn(vae_params, jax.numpy.asarray(x)))[:m], color))
    return np.concatenate(out)


def write_as_generated(images: np.ndarray, real: ImageSet, out_dir: str, *,
                       first: int = 0, metadata: bool = True) -> str:
    """Stored images of the real films ``first..`` of ``real`` written as a synthesis folder
    would be (``images/*.png``; with ``metadata`` the ``metadata.csv`` of all the films,
    their labels as prompts), for `Evaluator.evaluate`. Returns the folder."""
    for i, img in enumerate(images, first):
        save_image(Image.fromarray(img), os.path.join(out_dir, f"images/{i:06d}.png"))
    if metadata:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["Path", *real.label_columns, "caption", "image_id", "seed", "noise_id"])
        for i, lab in enumerate(real.labels):
            w.writerow([f"images/{i:06d}.png", *map(format_label, lab), real.captions[i], i, 0,
                        i])
        atomic_write(os.path.join(out_dir, "metadata.csv"), buf.getvalue())
    return out_dir


def check_judge(judge, real: ImageSet, conditions: Sequence[str], *, resolution: int,
                color: str, sd=None, vae_params=None, min_macro_auroc: float = 0.85,
                control_dir: str | None = None, chunk: int = 256) -> dict:
    """The judge's macro AUROC on the real test films of ``real`` in the three `VIEWS`.

    Without ``sd`` / ``vae_params`` the reconstruction view is left out. With
    ``control_dir`` the most generated-like view (the reconstructions, else the films at
    the synthesis resolution) is also written there as a synthesis folder and scored by
    `Evaluator.evaluate`, the code generated sets go through: its alignment is the
    real-film positive control (``"positive_control"``). Films are processed ``chunk`` at
    a time. Returns ``{view: {"macro_auroc", "auroc", "n"}, "ok", "min_macro_auroc",
    ...}``; ``ok`` needs every view to reach ``min_macro_auroc``.
    """
    paths = real.paths
    idx = [real.label_columns.index(c) for c in judge.label_names]
    y = np.nan_to_num(real.labels[:, idx], nan=0.0).astype(np.float32)
    recon = sd is not None and vae_params is not None
    last = "vae_reconstruction" if recon else "synthesis_resolution"
    probs: dict[str, list] = {}
    for s in range(0, len(paths), chunk):
        part = paths[s:s + chunk]
        views = {"real": read_for_classifier(part, judge.config.image_size),
                 "synthesis_resolution": films_as_stored(part, resolution, color)}
        if recon:
            views["vae_reconstruction"] = vae_reconstructions(sd, vae_params, part,
                                                              resolution, color)
        for name, x in views.items():
            probs.setdefault(name, []).append(judge.predict_proba(x))
        if control_dir is not None:
            write_as_generated(views[last], real, control_dir, first=s,
                               metadata=s + chunk >= len(paths))
    out = {}
    for name, p in probs.items():
        m = M.summarize(y, np.concatenate(p), judge.label_names)
        out[name] = {k: m[k] for k in ("macro_auroc", "auroc", "n")}
    out["ok"] = all(np.isfinite(v["macro_auroc"]) and v["macro_auroc"] >= min_macro_auroc
                    for v in out.values())
    out["min_macro_auroc"] = float(min_macro_auroc)
    out["resolution"], out["color"] = int(resolution), color
    if control_dir is not None:
        ev = Evaluator(real, domain_classifier=judge, inception=False, vendi=False,
                       conditions=conditions, progress=False)
        res = ev.evaluate(control_dir)
        a = res["alignment"]
        out["positive_control"] = {"view": last, "auroc": a["all"]["auroc"],
                                   "interval": a["paired"]["pooled"]["interval"],
                                   "shuffled": a["paired"]["pooled"]["shuffled"]["value"],
                                   "shuffled_interval":
                                       a["paired"]["pooled"]["shuffled"]["interval"],
                                   "n": a["all"]["n_images"]}
    return out
