r"""A generic, non-medical captioned image corpus for pretraining jaxmed's tiny foundation model.

Stable Diffusion 1.5 knew photographs, drawings and textures before anyone fine-tuned it on
chest X-rays. jaxmed's tiny stand-in (``jaxmed:tiny-sd``, `configs/pretrain_tiny.py`) needs
the same kind of prior at laptop scale, from images that load offline. This module builds
it from the natural photos, textures and graphics that Python packages ship:

* scikit-image's bundled data (astronaut, camera, chelsea the cat, coffee, coins, rocket,
  moon, clock, Hubble deep field, horse silhouette, brick / grass / gravel textures,
  checkerboard, colour wheel, logo, a scanned page, handwritten text, the stereo motorcycle
  photos, the LFW face crops);
* scikit-learn's two sample photos (a Chinese temple, a dahlia), when installed;
* matplotlib's portrait of Grace Hopper.

Anything medical or biological microscopy is excluded on purpose (`EXCLUDED`: retina,
microaneurysms, cell, immunohistochemistry, the Shepp-Logan phantom, brain, kidney, lily,
skin, mitosis, matplotlib's MRI slice, ...): the model should know images, not radiographs.

Each corpus image is one source picture through a random resized crop (area 5-100 % by
source, aspect 3:4..4:3), flips (not for text), brightness / contrast / saturation jitter,
grayscale or sepia conversion of colour photos, and random colour tints of grayscale
textures and patterns. Captions describe subject and style from a small vocabulary and
follow the augmentation ("a photo of a cat", "a black and white photo of the moon",
"a texture of red bricks", "a blue and yellow checkerboard", "a close-up photo of a cup of
coffee", ...), so the text encoder learns colour, style and subject words.

    python -m jaxmed.data.corpus OUT_DIR [--n 6000] [--resolution 128] [--seed 0]
        [--patches PATCH_DIR --patch-size 64]

writes ``OUT_DIR/images/NNNNN.png`` and ``OUT_DIR/captions.csv`` (columns path, caption,
source; paths relative to OUT_DIR), read by ``data.kind=folder``. Image i depends only on
(seed, i): the corpus is deterministic and a larger one extends a smaller one.
``corpus.json`` marks a complete corpus; `ensure_corpus` reuses one built with the same
settings.

`latent_scaling_factor` / `set_scaling_factor` pick the VAE's ``scaling_factor`` as
1 / std of its latents over a corpus (how SD's 0.18215 was chosen).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxmed.cli import add_debug_flag, main_guard
from jaxmed.data.chexpert import load_image
from jaxmed.data.folder import read_folder_csv
from jaxmed.files import atomic_path, write_json
from jaxmed.logging_utils import progress as progress_bar
from jaxmed.models import weights as weights_lib
from jaxmed.models.vae import AutoencoderKL

CORPUS_VERSION = 1

# Medical / biological images shipped by scikit-image and friends: never in the corpus.
EXCLUDED = frozenset({
    "retina", "microaneurysms", "cell", "cells3d", "immunohistochemistry", "ihc",
    "shepp_logan_phantom", "phantom", "brain", "kidney", "lily", "skin", "human_mitosis",
    "palisades_of_vogt", "protein_transport", "nickel_solidification", "binary_blobs",
    "s1045.ima",  # matplotlib's MRI slice
})

COLORS = {  # name -> RGB (0..255) used for tints; the name goes into the caption
    "red": (200, 40, 30), "orange": (235, 130, 30), "yellow": (230, 205, 50),
    "green": (60, 160, 50), "blue": (40, 80, 200), "purple": (120, 50, 160),
    "pink": (235, 120, 170), "brown": (130, 80, 40), "gray": (128, 128, 128),
    "white": (235, 235, 235), "black": (20, 20, 20), "beige": (215, 195, 155),
    "dark green": (25, 90, 35),
}
COLOR_WORDS = frozenset(w for c in COLORS for w in c.split()) | {"rainbow", "golden"}


@dataclasses.dataclass(frozen=True)
class Source:
    """One shipped picture (or a set of alternatives) and how to caption it.

    ``style``: 'photo' (colour or grayscale photograph), 'texture' (grayscale texture,
    tinted; subjects hold ``{c}``), 'pattern' (two-colour pattern; ``{c}`` and ``{c2}``),
    'silhouette' (a black shape on white, tinted; ``{c}``), 'graphic' (used as is),
    'scan' (text: no flips).
    """

    name: str
    load: Callable[[], list[np.ndarray]]  # uint8 arrays (H, W) or (H, W, 3)
    subjects: tuple[str, ...]
    style: str
    origin: str  # package and licence note
    min_area: float = 0.2  # smallest crop, as a fraction of the picture's area
    weight: float = 1.0
    colors: tuple[str, ...] = ()  # tints allowed for texture / pattern / silhouette


def _skimage(name: str) -> Callable[[], list[np.ndarray]]:
    def load():
        from skimage import data

        a = getattr(data, name)()
        if a.dtype == bool:
            a = np.where(a, 255, 0).astype(np.uint8)  # horse: True = background -> white
        return [_to_uint8(a)]
    return load


def _skimage_file(*names: str) -> Callable[[], list[np.ndarray]]:
    def load():
        from skimage import data

        out = []
        for n in names:
            with Image.open(os.path.join(os.path.dirname(data.__file__), n)) as im:
                out.append(np.asarray(im.convert("RGB")))
        return out
    return load


def _lfw_faces() -> list[np.ndarray]:
    from skimage import data

    faces = data.lfw_subset()[:100]  # the first 100 are faces, the rest background patches
    return [_to_uint8(f) for f in faces]


def _logo() -> list[np.ndarray]:
    from skimage import data

    a = data.logo().astype(np.float32)
    rgb, alpha = a[..., :3], a[..., 3:] / 255.0
    return [np.round(rgb * alpha + 255.0 * (1 - alpha)).astype(np.uint8)]  # on white


def _sklearn(name: str) -> Callable[[], list[np.ndarray]]:
    def load():
        from sklearn.datasets import load_sample_image

        return [np.asarray(load_sample_image(name))]
    return load


def _grace_hopper() -> list[np.ndarray]:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        return [np.asarray(im.convert("RGB"))]


def _to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    if a.max() <= 1.0:
        a = a * 255.0
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


SK = "scikit-image data ({})"
SOURCES: tuple[Source, ...] = (
    Source("astronaut", _skimage("astronaut"),
           ("an astronaut", "an astronaut in an orange spacesuit", "a woman astronaut"),
           "photo", SK.format("NASA photograph of Eileen Collins, public domain")),
    Source("camera", _skimage("camera"),
           ("a man with a camera", "a photographer with a camera on a tripod"),
           "photo", SK.format("CC0, Lav Varshney")),
    Source("chelsea", _skimage("chelsea"), ("a cat", "a tabby cat", "a cat's face"),
           "photo", SK.format("CC0, Stefan van der Walt"), weight=1.5),
    Source("coffee", _skimage("coffee"),
           ("a cup of coffee", "coffee in a red cup", "a cup of coffee on a wooden table"),
           "photo", SK.format("CC0, Rachel Michetti")),
    Source("coins", _skimage("coins"), ("old coins", "ancient coins", "silver coins"),
           "photo", SK.format("Brooklyn Museum, no known copyright restrictions")),
    Source("rocket", _skimage("rocket"),
           ("a rocket on a launch pad", "a rocket at night", "a rocket"),
           "photo", SK.format("SpaceX, public domain")),
    Source("moon", _skimage("moon"),
           ("the moon", "the surface of the moon", "craters on the moon"),
           "photo", SK.format("surface of the moon"), min_area=0.1),
    Source("clock", _skimage("clock"), ("a blurry clock", "a wall clock"),
           "photo", SK.format("public domain, Stefan van der Walt"), weight=0.5),
    Source("hubble_deep_field", _skimage("hubble_deep_field"),
           ("galaxies in deep space", "stars and galaxies", "the night sky full of stars"),
           "photo", SK.format("NASA, public domain"), min_area=0.05),
    Source("motorcycle", _skimage_file("motorcycle_left.png", "motorcycle_right.png"),
           ("a red motorcycle", "a motorcycle in a garage", "a motorcycle"),
           "photo", SK.format("stereo motorcycle, Middlebury stereo dataset")),
    Source("lfw_faces", _lfw_faces, ("a face", "a person's face", "a blurry face"),
           "photo", SK.format("Labeled Faces in the Wild subset"), min_area=0.6, weight=0.7),
    Source("china", _sklearn("china.jpg"),
           ("a chinese temple", "a pagoda on a hill", "a temple by a lake"),
           "photo", "scikit-learn sample image (CC BY 2.0, danielbuechele)"),
    Source("flower", _sklearn("flower.jpg"),
           ("an orange flower", "a dahlia", "an orange dahlia flower"),
           "photo", "scikit-learn sample image (CC BY 2.0, vultilion)"),
    Source("grace_hopper", _grace_hopper,
           ("a woman in a navy uniform", "an old woman", "a woman wearing glasses"),
           "photo", "matplotlib sample data (portrait of Grace Hopper, US Navy, public domain)"),
    Source("brick", _skimage("brick"),
           ("a texture of {c} bricks", "a {c} brick wall", "a close-up of {c} bricks"),
           "texture", SK.format("CC0 Textures, CC0"), min_area=0.05, weight=1.5,
           colors=("red", "red", "brown", "orange", "gray", "white", "yellow")),
    Source("grass", _skimage("grass"),
           ("a texture of {c} grass", "{c} blades of grass", "a field of {c} grass"),
           "texture", SK.format("DeviantArt linolafett, CC0"), min_area=0.05,
           colors=("green", "green", "dark green", "yellow", "brown")),
    Source("gravel", _skimage("gravel"),
           ("a texture of {c} gravel", "{c} pebbles", "a pile of {c} stones"),
           "texture", SK.format("CC0 Textures, CC0"), min_area=0.05,
           colors=("gray", "gray", "brown", "beige", "white", "black")),
    Source("checkerboard", _skimage("checkerboard"),
           ("a {c} and {c2} checkerboard", "a {c} and {c2} checkered pattern"),
           "pattern", SK.format("checkerboard"), min_area=0.1, weight=0.7,
           colors=("black", "white", "red", "blue", "yellow", "green")),
    Source("horse", _skimage("horse"),
           ("a {c} silhouette of a horse", "a drawing of a {c} horse on a white background"),
           "silhouette", SK.format("openclipart, CC0, Andreas Preuss"), min_area=0.5,
           weight=0.7, colors=("black", "black", "brown", "blue", "red")),
    Source("logo", _logo, ("a logo with a green and orange snake", "the scikit-image logo"),
           "graphic", SK.format("scikit-image logo"), min_area=0.4, weight=0.5),
    Source("colorwheel", _skimage("colorwheel"),
           ("a rainbow color wheel", "a circle of rainbow colors on black"),
           "graphic", SK.format("colour wheel"), min_area=0.3, weight=0.5),
    Source("page", _skimage("page"), ("a scanned page of printed text", "a page of text"),
           "scan", SK.format("scanned page"), min_area=0.2, weight=0.5),
    Source("text", _skimage("text"),
           ("handwritten equations on paper", "handwritten math on a sheet of paper"),
           "scan", SK.format("Wikipedia, public domain"), min_area=0.2, weight=0.5),
)


def available_sources(sources: Sequence[Source] = SOURCES) -> list[Source]:
    """The sources whose package is installed (scikit-image is required)."""
    if importlib.util.find_spec("skimage") is None:
        raise ModuleNotFoundError("the pretraining corpus needs scikit-image "
                                  "(pip install scikit-image, or jaxmed[test])")
    out = []
    for s in sources:
        if s.name in EXCLUDED:
            raise ValueError(f"corpus source {s.name!r} is excluded (medical / biological)")
        if s.origin.startswith("scikit-learn") and importlib.util.find_spec("sklearn") is None:
            continue
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------
# Augmentation


def _crop_box(rng: np.random.Generator, h: int, w: int, min_area: float):
    """RandomResizedCrop: area fraction in [min_area, 1], log-uniform aspect 3:4..4:3."""
    area = h * w * rng.uniform(min_area, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(round(min(w, max(8, np.sqrt(area * aspect)))))
    ch = int(round(min(h, max(8, np.sqrt(area / aspect)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return x0, y0, cw, ch, (cw * ch) / (h * w)


def _tint(gray: np.ndarray, color: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Grayscale [0, 1] -> RGB: dark shades of ``color`` to light ones."""
    c = np.asarray(color, np.float32) / 255.0
    dark = c * rng.uniform(0.15, 0.35)
    light = c + (1.0 - c) * rng.uniform(0.1, 0.35)
    g = gray[..., None]
    return dark + (light - dark) * g


def _two_tone(gray: np.ndarray, c1: Sequence[int], c2: Sequence[int]) -> np.ndarray:
    a, b = np.asarray(c1, np.float32) / 255.0, np.asarray(c2, np.float32) / 255.0
    g = gray[..., None]
    return a + (b - a) * g


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.asarray([0.299, 0.587, 0.114], np.float32)


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def render(source: Source, pictures: list[np.ndarray], resolution: int,
           rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One augmented (resolution, resolution, 3) uint8 image and its caption."""
    pic = pictures[int(rng.integers(len(pictures)))]
    h, w = pic.shape[:2]
    x0, y0, cw, ch, frac = _crop_box(rng, h, w, source.min_area)
    im = Image.fromarray(pic[y0:y0 + ch, x0:x0 + cw])
    big = cw > resolution or ch > resolution
    resample = Image.Resampling.LANCZOS if big else Image.Resampling.BICUBIC
    im = im.resize((resolution, resolution), resample)
    x = np.asarray(im, np.float32) / 255.0
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    color_in = not np.allclose(x[..., 0], x[..., 1], atol=2 / 255) or not np.allclose(
        x[..., 1], x[..., 2], atol=2 / 255)
    if source.style != "scan":
        if rng.random() < 0.5:
            x = x[:, ::-1]
        if source.style in ("texture", "pattern") and rng.random() < 0.5:
            x = np.rot90(x, k=int(rng.integers(1, 4)))
    close = frac < 0.3
    subject = _pick(rng, source.subjects)
    style = source.style
    if style == "photo":
        gray = not color_in
        sepia = False
        if color_in and rng.random() < 0.2:
            gray = True
        if gray and rng.random() < 0.15:
            sepia = True
        if gray:
            colorless = [s for s in source.subjects if not set(s.split()) & COLOR_WORDS]
            subject = _pick(rng, colorless or list(source.subjects))
            y = _luma(x)
            x = _tint(y, (112, 66, 20), rng) * 0.5 + y[..., None] * 0.5 if sepia else \
                np.repeat(y[..., None], 3, axis=-1)
        kind = ("a sepia photo of" if sepia else "a black and white photo of" if gray
                else "a photo of")
        if close:
            kind = {"a photo of": "a close-up photo of",
                    "a black and white photo of": "a black and white close-up of",
                    "a sepia photo of": "a sepia close-up of"}[kind]
        caption = f"{kind} {subject}"
    elif style == "texture":
        name = _pick(rng, source.colors)
        x = _tint(_luma(x), COLORS[name], rng)
        caption = subject.format(c=name)
    elif style == "pattern":
        c1 = _pick(rng, source.colors)
        c2 = _pick(rng, [c for c in source.colors if c != c1])
        x = _two_tone(_luma(x), COLORS[c1], COLORS[c2])
        caption = subject.format(c=c1, c2=c2)
    elif style == "silhouette":
        name = _pick(rng, source.colors)
        y = _luma(x)  # shape dark, background white
        x = _two_tone(y, COLORS[name], (250, 250, 250))
        caption = subject.format(c=name)
    elif style in ("graphic", "scan"):
        caption = subject
    else:
        raise ValueError(f"source {source.name!r}: unknown style {style!r}")
    # brightness / contrast (all), saturation (colour)
    b = rng.uniform(-0.08, 0.08)
    k = rng.uniform(0.8, 1.2)
    m = x.mean()
    x = (x - m) * k + m + b
    if style in ("photo", "graphic") and not caption.startswith(("a black", "a sepia")):
        s = rng.uniform(0.7, 1.3)
        y = _luma(x)[..., None]
        x = y + (x - y) * s
    x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x), caption


PHOTO_KINDS = ("a photo of", "a close-up photo of", "a black and white photo of",
               "a black and white close-up of", "a sepia photo of", "a sepia close-up of")


def possible_captions(sources: Sequence[Source] = SOURCES) -> set[str]:
    """Every caption `render` can write for ``sources``: the text tower's whole pretraining
    vocabulary (docs/STUDY.md "Where jaxmed departs from the study" asks which prompt words
    it never saw)."""
    out: set[str] = set()
    for src in sources:
        for subj in src.subjects:
            if src.style == "photo":
                out.update(f"{k} {subj}" for k in PHOTO_KINDS)
            elif src.style == "pattern":
                out.update(subj.format(c=a, c2=b) for a in src.colors for b in src.colors
                           if a != b)
            elif src.style in ("texture", "silhouette"):
                out.update(subj.format(c=c) for c in src.colors)
            else:
                out.add(subj)
    return out


# ---------------------------------------------------------------------------------------
# The corpus


def _settings(n_images: int, resolution: int, seed: int, sources: Sequence[Source]) -> dict:
    return {"version": CORPUS_VERSION, "n_images": int(n_images),
            "resolution": int(resolution), "seed": int(seed),
            "sources": [s.name for s in sources]}


def make_corpus(out_dir: str, n_images: int = 6000, resolution: int = 128, seed: int = 0,
                *, sources: Sequence[Source] | None = None, progress: bool = True) -> str:
    """Write ``n_images`` augmented, captioned crops to ``out_dir``; returns the CSV path.

    ``out_dir/images/NNNNN.png`` (RGB uint8), ``out_dir/captions.csv`` (path, caption,
    source) and ``out_dir/corpus.json`` (settings and per-source counts; written last, so
    its presence means complete). Image i is a function of (seed, i) only.
    """
    if n_images < 1 or resolution < 8:
        raise ValueError(f"a corpus needs at least 1 image of at least 8 px; got "
                         f"{n_images} images of {resolution} px")
    sources = available_sources(SOURCES if sources is None else sources)
    weights = np.asarray([s.weight for s in sources], np.float64)
    weights /= weights.sum()
    pictures = {}
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    marker = os.path.join(out_dir, "corpus.json")
    if os.path.exists(marker):
        os.remove(marker)
    rows, counts = [], {s.name: 0 for s in sources}
    bar = progress_bar(total=n_images, desc="corpus", unit="img", enabled=progress)
    for i in range(n_images):
        rng = np.random.default_rng([int(seed), i])
        src = sources[int(rng.choice(len(sources), p=weights))]
        if src.name not in pictures:
            pictures[src.name] = src.load()
        img, caption = render(src, pictures[src.name], resolution, rng)
        rel = f"images/{i:05d}.png"
        Image.fromarray(img).save(os.path.join(out_dir, rel))
        rows.append((rel, caption, src.name))
        counts[src.name] += 1
        bar.update(1)
    bar.close()
    csv_path = os.path.join(out_dir, "captions.csv")
    _write_csv(csv_path, ["path", "caption", "source"], rows)
    meta = {**_settings(n_images, resolution, seed, sources), "counts": counts,
            "captions": len({r[1] for r in rows})}
    write_json(marker, meta)
    return csv_path


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A CSV written whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(header)
        wr.writerows(rows)


def ensure_corpus(out_dir: str, n_images: int = 6000, resolution: int = 128, seed: int = 0,
                  **kwargs) -> str:
    """`make_corpus` unless ``out_dir`` already holds a complete one with these settings."""
    marker = os.path.join(out_dir, "corpus.json")
    want = _settings(n_images, resolution, seed, available_sources(
        kwargs.get("sources") or SOURCES))
    if os.path.isfile(marker):
        with open(marker) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want:
            return os.path.join(out_dir, "captions.csv")
        shutil.rmtree(os.path.join(out_dir, "images"), ignore_errors=True)
    return make_corpus(out_dir, n_images, resolution, seed, **kwargs)


def make_patches(csv_path: str, out_dir: str, size: int = 64, seed: int = 0, *,
                 progress: bool = True) -> str:
    """One random ``size`` x ``size`` crop (no resizing) of every image of a corpus.

    The VAE is fully convolutional (its one attention layer works at any size), so stage 1
    trains it on 64 px patches of the 128 px corpus at a quarter of the cost, with the same
    pixel statistics it will see at 128 px (SD's VAE was trained at 256 px and used at 512).
    Writes ``out_dir/images/NNNNN.png`` and ``out_dir/captions.csv`` (the source captions);
    skipped when ``out_dir/patches.json`` records the same settings.
    """
    records = read_folder_csv(csv_path)
    want = {"source": os.path.abspath(csv_path), "n": len(records), "size": int(size),
            "seed": int(seed)}
    marker = os.path.join(out_dir, "patches.json")
    out_csv = os.path.join(out_dir, "captions.csv")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == want:
                return out_csv
        os.remove(marker)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows = []
    bar = progress_bar(total=len(records.paths), desc="patches", unit="img", enabled=progress)
    for i, (path, caption) in enumerate(zip(records.paths, records.captions)):
        rng = np.random.default_rng([int(seed), 1, i])
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
        h, w = a.shape[:2]
        if h < size or w < size:
            raise ValueError(f"{path}: {w}x{h} is smaller than the {size} px patch")
        y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        rel = f"images/{i:05d}.png"
        Image.fromarray(a[y0:y0 + size, x0:x0 + size]).save(os.path.join(out_dir, rel))
        rows.append((rel, caption))
        bar.update(1)
    bar.close()
    _write_csv(out_csv, ["path", "caption"], rows)
    write_json(marker, want, indent=None)
    return out_csv


# ---------------------------------------------------------------------------------------
# The VAE's scaling factor


def latent_scaling_factor(model_dir: str, csv_path: str, *, resolution: int = 128,
                          max_images: int = 2048, batch: int = 32, seed: int = 0) -> dict:
    """1 / std of the VAE's latents (posterior samples) over the corpus, as SD chose 0.18215.

    Returns {'scaling_factor', 'std', 'mean', 'images'}.
    """
    cfg, params = weights_lib.load_component(model_dir, "vae")
    vae = AutoencoderKL(cfg)
    records = read_folder_csv(csv_path)
    paths = list(records.paths)[:max_images]

    @jax.jit
    def encode(p, x, key):
        mean, logvar = vae.apply({"params": p}, x, method=vae.encode)
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)

    key = jax.random.PRNGKey(seed)
    s1 = s2 = n = 0.0
    for i in range(0, len(paths), batch):
        chunk = paths[i:i + batch]
        x = np.stack([load_image(p, resolution) for p in chunk])
        if len(chunk) < batch:  # one compiled shape
            x = np.concatenate([x, np.zeros((batch - len(chunk),) + x.shape[1:], x.dtype)])
        z = np.asarray(encode(params, x, jax.random.fold_in(key, i)), np.float64)[:len(chunk)]
        s1 += z.sum()
        s2 += np.square(z).sum()
        n += z.size
    mean = s1 / n
    std = float(np.sqrt(max(s2 / n - mean * mean, 1e-12)))
    return {"scaling_factor": 1.0 / std, "std": std, "mean": float(mean),
            "images": len(paths)}


def set_scaling_factor(model_dir: str, value: float) -> None:
    """Write ``scaling_factor`` into ``model_dir/vae/config.json`` (atomically)."""
    path = os.path.join(model_dir, "vae", "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["scaling_factor"] = float(value)
    write_json(path, cfg, sort_keys=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line, under `jaxmed.cli.main_guard` (a user error is one line, exit 2)."""
    return main_guard(_main, argv)


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser("python -m jaxmed.data.corpus", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=6000, help="number of images")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patches", default="", help="also write one random patch of each "
                   "image to this folder (stage 1 of configs/pretrain_tiny.py)")
    p.add_argument("--patch-size", type=int, default=64)
    add_debug_flag(p)
    a = p.parse_args(argv)
    path = ensure_corpus(a.out_dir, a.n, a.resolution, a.seed)
    print(path)
    if a.patches:
        print(make_patches(path, a.patches, a.patch_size, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
