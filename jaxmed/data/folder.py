"""Generic readers: a folder + CSV of paths with captions or labels, or a bare image folder.

``read_folder_csv``: a CSV with a path column (``path`` or ``Path``) and either a
``caption`` column (used as is; templates do not apply, caption dropout does) or label
columns (captioned by the study's rule in the given column order).

``read_image_folder``: every image under a folder (recursively, sorted), all with one
caption (default ``DEFAULT_FOLDER_CAPTION``) and no labels (``labels`` is (N, 0)).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jaxmed.data.chexpert import (
    Records,
    _pairs,
    parse_label_frame,
    require_columns,
    rewrite_path,
)
from jaxmed.data.labels import LABELS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_FOLDER_CAPTION = "Chest X-ray"


def read_folder_csv(
    csv_path: str,
    image_root: str | None = None,
    *,
    path_column: str | None = None,
    caption_column: str = "caption",
    label_columns: Sequence[str] | None = None,
    uncertain: str = "zeros",
    path_replace: Sequence[tuple[str, str]] | tuple[str, str] = (),
    path_regex: Sequence[tuple[str, str]] | tuple[str, str] = (),
) -> Records:
    """Records from a CSV of image paths with a caption column or label columns.

    Args:
      csv_path: the CSV.
      image_root: folder the paths are relative to; default the CSV's folder.
      path_column: the path column; default ``path``, else ``Path``.
      caption_column: used when present (and ``label_columns`` is not given).
      label_columns: label columns (caption rule); default the study's 8 when the CSV
        has no caption column. When the CSV has both, labels are kept and the captions
        still come from ``caption_column``.
    """
    import pandas as pd

    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    cols = list(df.columns)
    if path_column is None:
        path_column = "path" if "path" in cols else "Path"
    has_caption = caption_column in cols
    if label_columns is None:
        if has_caption:
            label_columns = [c for c in LABELS if c in cols]
        else:
            label_columns = LABELS
    label_columns = tuple(label_columns)
    require_columns(cols, [path_column, *label_columns], csv_path)
    if not has_caption and not label_columns:
        raise ValueError(
            f"{csv_path}: need a {caption_column!r} column or label columns; "
            f"columns found: {cols}"
        )
    if label_columns:
        lab = df[list(label_columns)].replace("", np.nan)
        labels = parse_label_frame(lab, label_columns, csv_path, uncertain)
    else:
        labels = np.zeros((len(df), 0), np.float32)
    root = os.path.dirname(os.path.abspath(csv_path)) if image_root is None else image_root
    rep, rx = _pairs(path_replace), _pairs(path_regex)
    paths = []
    for r, p in enumerate(df[path_column]):
        if not p:
            raise ValueError(f"{csv_path}: CSV row {r}: empty {path_column!r}")
        paths.append(os.path.join(root, rewrite_path(p, rep, rx)))
    captions = list(df[caption_column]) if has_caption else None
    return Records(paths=paths, labels=labels, rows=np.arange(len(df)),
                   label_columns=label_columns, source=csv_path, captions=captions,
                   image_root=root)


def read_image_folder(
    folder: str,
    caption: str = DEFAULT_FOLDER_CAPTION,
    *,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> Records:
    """Every image file under ``folder`` (recursive, sorted), each with ``caption``."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    ext = tuple(e.lower() for e in extensions)
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if f.lower().endswith(ext))
    paths.sort()
    if not paths:
        raise ValueError(f"{folder}: no image files ({', '.join(ext)})")
    return Records(paths=paths, labels=np.zeros((len(paths), 0), np.float32),
                   rows=np.arange(len(paths)), label_columns=(), source=folder,
                   captions=[caption] * len(paths))
