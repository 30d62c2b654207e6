"""Contact sheets: uint8 images tiled into one PIL image, with optional labels and captions.

One grid function for every sheet jaxmed writes: the training run's validation samples and
the CLI's ad-hoc prompts (a flat batch, a caption under each image) and the study's
condition-by-model tables (rows of images, some cells empty, row and column labels).
Save a sheet with `jaxmed.files.save_image` (atomic).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

CAPTION_HEIGHT = 14  # pixels of caption text under each tile
HEADER_HEIGHT = 16  # pixels of column labels above the first row


def _is_rows(images) -> bool:
    return (isinstance(images, (list, tuple)) and len(images) > 0
            and isinstance(images[0], (list, tuple)))


def _chunk(items: Sequence, cols: int) -> list[list]:
    return [list(items[i:i + cols]) for i in range(0, len(items), cols)]


def _fit(text: str, width: int, ellipsis: bool) -> str:
    # About 6 pixels per character of PIL's default font.
    n = max(4, width // 6)
    if len(text) <= n:
        return text
    return text[: n - 1] + "…" if ellipsis else text[:n]


def grid(images, captions: Sequence | None = None, cols: int | None = None, *,
         row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
         tile: int | tuple[int, int] | None = None) -> Image.Image:
    """Tile uint8 images (each (H, W), (H, W, 1) or (H, W, 3)) into one RGB PIL image.

    ``images``: a flat batch ((N, H, W, C) array or a list), laid out ``cols`` per row
    (default min(N, 4)), or a list of rows (lists of images; None leaves a cell blank).
    ``captions`` go under each image, shaped like ``images`` (cut to the tile's width with
    an ellipsis); ``row_labels`` go in a left margin, ``col_labels`` above the first row.
    ``tile``: the cell size, an int (square) or (H, W); default square, the first image's
    height. Images of another size are resized to the cell (bilinear).
    """
    if _is_rows(images):
        rows = [list(r) for r in images]
        cap_rows = [list(r) for r in captions] if captions else None
        ncols = max(len(r) for r in rows)
    else:
        flat = list(images)
        ncols = cols or min(len(flat), 4)
        rows = _chunk(flat, ncols)
        cap_rows = _chunk(list(captions), ncols) if captions else None
    first = next(np.asarray(im) for r in rows for im in r if im is not None)
    if tile is None:
        tile = first.shape[0]
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    th, tw = int(th), int(tw)
    cap_h = CAPTION_HEIGHT if cap_rows else 0
    left = 0 if not row_labels else max(60, 6 * max(len(s) for s in row_labels) + 8)
    top = HEADER_HEIGHT if col_labels else 0
    cell_h = th + cap_h
    sheet = Image.new("RGB", (left + ncols * tw, top + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(col_labels or []):
        draw.text((left + j * tw + 2, 2), _fit(label, tw, ellipsis=False), fill="black")
    for i, row in enumerate(rows):
        y = top + i * cell_h
        if row_labels:
            draw.text((2, y + th // 2 - 6), row_labels[i], fill="black")
        for j, im in enumerate(row):
            if im is None:
                continue
            a = np.asarray(im)
            if a.ndim == 3 and a.shape[-1] == 1:
                a = a[..., 0]
            pil = Image.fromarray(a).convert("RGB")
            if pil.size != (tw, th):
                pil = pil.resize((tw, th), Image.Resampling.BILINEAR)
            sheet.paste(pil, (left + j * tw, y))
            if cap_rows and j < len(cap_rows[i]):
                draw.text((left + j * tw + 2, y + th + 1),
                          _fit(cap_rows[i][j], tw, ellipsis=True), fill="black")
    return sheet

