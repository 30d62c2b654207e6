"""CheXpert-format CSV reader, the record table, and the image loader.

CSV format (the study's split files; CheXpert's own train.csv / valid.csv too)::

    Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,...,Support Devices

Only ``Path``, the label columns and (when filtering frontal views) ``Frontal/Lateral``
are required. The study's labels are already 0/1. CheXpert's raw labels (1, 0, -1 for
uncertain, blank for unmentioned) are accepted: blank -> 0 always (unmentioned means not
found), and -1 by the ``uncertain`` policy: ``'zeros'`` (default; U-Zeros, which is what
the study's 0/1 files amount to), ``'ones'`` (U-Ones), or ``'ignore'`` (NaN: not positive
for captions, maskable in a classifier loss).

Images: ``Path`` is joined to ``image_root`` (default: the CSV's folder) after the path
rewrites, e.g. the authors' ``path_replace=[("CheXpert-v1.0/", "CheXpert-v1.0_512x512/")]``
(plain substring replacement, as their code does) or ``path_regex=[(pattern, repl)]``.
When none of the first images exists, the CheXpert folder layouts are guessed
(`jaxmed.data.layouts`).

Image loading (`load_image`): as the study, a plain resize to ``resolution`` x
``resolution`` with no crop (the aspect ratio is not kept), then [-1, 1], 3 channels, HWC
float32. The filter is PIL's bilinear (with PIL's antialiasing when downscaling), which is
exactly what the authors' ``torchvision.transforms.Resize((512, 512))`` does on a PIL
image. 8-bit images are resized in uint8 as PIL/torchvision do (so 8-bit inputs match the
authors' pipeline bit for bit); 16-bit images ('I;16', 'I') are scaled by 1/65535 and
resized in float ('F'); grayscale is repeated to 3 channels; RGBA / palette / CMYK images
are converted to RGB (alpha dropped, like ``convert('RGB')``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from jaxmed.data.labels import LABELS
from jaxmed.data.layouts import resolve_paths
from jaxmed.errors import UserError

UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")
RESAMPLE = ("bilinear", "bicubic", "lanczos", "nearest")


class BadImageError(UserError, RuntimeError):
    """An image that cannot be read or decoded; names the file and its CSV row."""

    def __init__(self, path: str, row: int | None, source: str | None, reason: str):
        self.path, self.row, self.source, self.reason = path, row, source, reason
        where = ""
        if row is not None:
            where = f" (CSV row {row}" + (f" of {source}" if source else "") + ")"
        super().__init__(f"cannot read image {path}{where}: {reason}")


@dataclass
class Records:
    """The record table of a dataset: one entry per image, no pixels.

    Attributes:
      paths: resolved image paths (for loader-backed sources: the image names).
      labels: (N, L) float32 labels in ``label_columns`` order (NaN = ignored).
      rows: (N,) int64 CSV row numbers (data rows, counted from 0 after the header;
        the spreadsheet line is ``row + 2``): the batch's ``index`` and the error locator.
      label_columns: the L label names.
      source: where the records come from (the CSV path), for error messages.
      captions: fixed captions (a folder CSV's caption column), else None: captions then
        come from the labels by the study's rule.
      loader: for sources without files (TFDS): ``loader(i) -> array`` of record ``i``.
      image_root: the folder the CSV's paths were joined to (for error messages).
    """

    paths: list[str]
    labels: np.ndarray
    rows: np.ndarray
    label_columns: tuple[str, ...] = LABELS
    source: str = ""
    captions: list[str] | None = None
    loader: Callable[[int], np.ndarray] | None = field(default=None, repr=False)
    image_root: str = ""

    def __post_init__(self):
        n = len(self.paths)
        self.labels = np.asarray(self.labels, dtype=np.float32).reshape(n, len(self.label_columns))
        self.rows = np.asarray(self.rows, dtype=np.int64).reshape(n)
        self.label_columns = tuple(self.label_columns)
        if self.captions is not None and len(self.captions) != n:
            raise ValueError(f"{len(self.captions)} captions for {n} records")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> Records:
        """Records at positions ``idx`` (a slice, index array or boolean mask)."""
        idx = np.arange(len(self))[idx]
        loader = None
        if self.loader is not None:
            base = self.loader
            loader = lambda i, _m=idx: base(int(_m[i]))
        return Records(
            paths=[self.paths[i] for i in idx], labels=self.labels[idx], rows=self.rows[idx],
            label_columns=self.label_columns, source=self.source,
            captions=None if self.captions is None else [self.captions[i] for i in idx],
            loader=loader, image_root=self.image_root,
        )

    def load(self, i: int, resolution: int | tuple[int, int] = 512,
             resample: str = "bilinear") -> np.ndarray:
        """Image of record ``i``; raises `BadImageError` naming the path and CSV row."""
        try:
            if self.loader is not None:
                return image_from_array(self.loader(i), resolution, resample)
            return load_image(self.paths[i], resolution, resample)
        except BadImageError:
            raise
        except Exception as e:  # noqa: BLE001 - any decode failure is a bad image
            raise BadImageError(self.paths[i], int(self.rows[i]), self.source,
                                f"{type(e).__name__}: {e}") from e


def _size(resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def _resample(name: str):
    if name not in RESAMPLE:
        raise ValueError(f"resample {name!r} is not one of {RESAMPLE}")
    return getattr(Image.Resampling, name.upper())


def pil_to_array(img, resolution: int | tuple[int, int] = 512,
                 resample: str = "bilinear") -> np.ndarray:
    """PIL image -> (H, W, 3) float32 in [-1, 1], plain resize (see the module docstring)."""
    h, w = _size(resolution)
    flt = _resample(resample)
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img)
        if mode == "F":
            a = np.clip(a.astype(np.float32), 0.0, 1.0)
        else:
            a = a.astype(np.float32) * np.float32(1 / 65535)
        f = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))  # mode F
        if f.size != (w, h):
            f = f.resize((w, h), flt)
        x = np.clip(np.asarray(f, dtype=np.float32), 0.0, 1.0)[..., None] * 2 - 1
    else:
        if mode == "LA" or mode == "1":
            img = img.convert("L")
        elif mode not in ("L", "RGB"):
            img = img.convert("RGB")
        if img.size != (w, h):
            img = img.resize((w, h), flt)
        x = np.asarray(img, dtype=np.float32) * np.float32(2 / 255) - 1
        if x.ndim == 2:
            x = x[..., None]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x, dtype=np.float32)


def load_image(path: str, resolution: int | tuple[int, int] = 512,
               resample: str = "bilinear") -> np.ndarray:
    """Read an image file -> (H, W, 3) float32 in [-1, 1]."""
    with Image.open(path) as img:
        img.load()
        return pil_to_array(img, resolution, resample)


def image_from_array(a, resolution: int | tuple[int, int] = 512,
                     resample: str = "bilinear") -> np.ndarray:
    """A decoded (H, W), (H, W, 1) or (H, W, 3|4) uint8/uint16 array -> (H, W, 3) [-1, 1]."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype == np.uint16:
        img = Image.fromarray(np.ascontiguousarray(a if a.ndim == 2 else a[..., 0]))  # I;16
    else:
        img = Image.fromarray(a.astype(np.uint8))
    return pil_to_array(img, resolution, resample)


def rewrite_path(path: str, path_replace: Sequence[tuple[str, str]] = (),
                 path_regex: Sequence[tuple[str, str]] = ()) -> str:
    """Apply substring replacements, then regex substitutions, in order."""
    for old, new in path_replace:
        path = path.replace(old, new)
    for pattern, repl in path_regex:
        path = re.sub(pattern, repl, path)
    return path


def _pairs(x) -> list[tuple[str, str]]:
    if not x:
        return []
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(s, str) for s in x):
        return [(x[0], x[1])]  # a single (old, new) pair
    return [(str(a), str(b)) for a, b in x]


def convert_labels(values: np.ndarray, uncertain: str = "zeros") -> np.ndarray:
    """Raw CheXpert values (1, 0, -1, NaN for blank) -> float32 by the uncertainty policy."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain={uncertain!r} is not one of {UNCERTAIN_POLICIES}")
    v = np.asarray(values, dtype=np.float32).copy()
    v[np.isnan(v)] = 0.0  # blank = unmentioned = not found
    v[v == -1] = {"zeros": 0.0, "ones": 1.0, "ignore": np.nan}[uncertain]
    return v


def require_columns(columns: Sequence[str], required: Sequence[str], source: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing}; columns found: {list(columns)}"
        )


def parse_label_frame(df, label_columns: Sequence[str], source: str,
                      uncertain: str = "zeros") -> np.ndarray:
    """(N, L) float32 from a DataFrame's label columns; bad values name the row and column."""
    import pandas as pd

    out = np.empty((len(df), len(label_columns)), dtype=np.float32)
    for j, c in enumerate(label_columns):
        col = pd.to_numeric(df[c], errors="coerce")
        bad = (col.isna() & df[c].notna() & (df[c].astype(str).str.strip() != "")) | (
            col.notna() & ~col.isin([0, 1, -1])
        )
        if bad.any():
            r = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{source}: CSV row {int(df.index[r])}, column {c!r}: label "
                f"{df[c].iloc[r]!r} is not 1, 0, -1 or blank"
            )
        out[:, j] = col.to_numpy(dtype=np.float32, na_value=np.nan)
    return convert_labels(out, uncertain)


def read_chexpert_csv(
    csv_path: str,
    image_root: str | None = None,
    *,
    label_columns: Sequence[str] = LABELS,
    uncertain: str = "zeros",
    frontal_only: bool = True,
    path_replace: Sequence[tuple[str, str]] | tuple[str, str] = (),
    path_regex: Sequence[tuple[str, str]] | tuple[str, str] = (),
    max_records: int | None = None,
    guess_layout: bool = True,
    require_images: bool = False,
) -> Records:
    """Read a CheXpert-format CSV into `Records` (nothing is decoded).

    Args:
      csv_path: the CSV (``Path,Sex,Age,Frontal/Lateral,AP/PA,<labels>``).
      image_root: folder the ``Path`` column is relative to; default the CSV's folder.
      label_columns: the label columns, in caption order (default the study's 8).
      uncertain: policy for -1 labels: 'zeros' | 'ones' | 'ignore' (NaN).
      frontal_only: keep rows whose ``Frontal/Lateral`` is ``Frontal``.
      path_replace: (old, new) substring replacements on ``Path``, e.g.
        ``("CheXpert-v1.0/", "CheXpert-v1.0_512x512/")``.
      path_regex: (pattern, repl) ``re.sub`` rewrites on ``Path`` after those.
      max_records: keep only the first N records (after filtering).
      guess_layout: when none of the first images exists as given, try the CheXpert
        layouts (`jaxmed.data.layouts`) and fail naming what was tried; False joins the
        paths as given.
      require_images: fail (naming the folders tried) when none of the first images
        exists, rather than when an image is loaded (a training run sets it).
    """
    import pandas as pd

    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    df = pd.read_csv(csv_path, dtype={"Path": str}, keep_default_na=True)
    required = ["Path", *label_columns] + (["Frontal/Lateral"] if frontal_only else [])
    require_columns(list(df.columns), required, csv_path)
    if df["Path"].isna().any():
        r = int(np.flatnonzero(df["Path"].isna().to_numpy())[0])
        raise ValueError(f"{csv_path}: CSV row {r}: empty Path")
    labels = parse_label_frame(df, label_columns, csv_path, uncertain)
    keep = np.ones(len(df), dtype=bool)
    if frontal_only:
        keep = df["Frontal/Lateral"].astype(str).str.strip().str.lower().eq("frontal").to_numpy()
    rows = np.flatnonzero(keep)
    if max_records is not None:
        rows = rows[:max_records]
    root = os.path.dirname(os.path.abspath(csv_path)) if image_root is None else image_root
    rep, rx = _pairs(path_replace), _pairs(path_regex)
    rels = [rewrite_path(df["Path"].iat[r], rep, rx) for r in rows]
    paths = resolve_paths(rels, root, csv_path, require=require_images) if guess_layout \
        else [os.path.join(root, p) for p in rels]
    return Records(paths=paths, labels=labels[rows], rows=rows,
                   label_columns=tuple(label_columns), source=csv_path, image_root=root)
