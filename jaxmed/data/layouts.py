"""Where a CSV's images are: the CheXpert folder layouts, guessed when the paths as given
do not exist, and the ``old=>new`` path rewrites of ``data.path_rewrite``.

CheXpert CSVs name images relative to the folder that holds the dataset folder, e.g.
``CheXpert-v1.0_512x512/train/patient1/study1/view1_frontal.jpg``, and the released
variants (``CheXpert-v1.0``, ``CheXpert-v1.0-small``, ``CheXpert-v1.0_512x512``) differ only
in that first folder. When no image resolves as given, `resolve_paths` tries, in order:
``image_root`` being the dataset folder itself (the first folder dropped), another variant's
folder inside ``image_root``, and (for paths that start below the dataset folder) each
variant's folder inside ``image_root``; it takes the first under which images exist and
says so, or names every folder it tried.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from jaxmed.errors import UserError

log = logging.getLogger(__name__)

LAYOUTS = ("CheXpert-v1.0", "CheXpert-v1.0-small", "CheXpert-v1.0_512x512")
PROBE = 16  # the first records checked: a layout resolves when any of them exists


def parse_rewrites(text: str) -> list[tuple[str, str]]:
    """``"old=>new"`` or several separated by ``;`` -> [(old, new), ...] (applied in order)."""
    pairs = []
    for part in str(text or "").split(";"):
        if not part.strip():
            continue
        if "=>" not in part:
            raise UserError(f"data.path_rewrite={text!r}: write each rewrite as 'old=>new', "
                            "several separated by ';' (e.g. 'CheXpert-v1.0/=>"
                            "CheXpert-v1.0_512x512/;/old/root/=>/new/root/')")
        old, new = part.split("=>", 1)
        pairs.append((old.strip(), new.strip()))
    return pairs


def _split_first(rel: str) -> tuple[str, str]:
    head, _, rest = rel.replace("\\", "/").lstrip("./").partition("/")
    return head, rest


def _candidates(rel: str, root: str) -> list[tuple[str, str, str]]:
    """(description, drop_first_folder, insert_folder) guesses for a relative CSV path."""
    head, _ = _split_first(rel)
    out = [("as given", "", "")]
    if head in LAYOUTS:
        out.append((f"image_root is the {head} folder itself", head, ""))
        out += [(f"{other}/ in image_root instead of {head}/", head, other)
                for other in LAYOUTS if other != head]
    else:
        out += [(f"{layout}/ in image_root", "", layout) for layout in LAYOUTS]
    return out


def _apply(rel: str, root: str, drop: str, insert: str) -> str:
    if drop:
        rel = _split_first(rel)[1]
    return os.path.join(root, insert, rel) if insert else os.path.join(root, rel)


def resolve_paths(rels: Sequence[str], root: str, source: str, *,
                  require: bool = False) -> list[str]:
    """Absolute image paths for the CSV's (rewritten) relative ``rels`` under ``root``,
    guessing the CheXpert layout when none of the first records exists as given. When
    nothing resolves: the paths as given, or with ``require`` a `UserError` naming what
    was tried (a run that reads the images; a reader of labels alone needs no images)."""
    as_given = [os.path.join(root, r) for r in rels]
    if not rels or os.path.isabs(rels[0]):
        return as_given
    probe = list(rels[:PROBE])
    tried = []
    for desc, drop, insert in _candidates(probe[0], root):
        if drop and not all(_split_first(r)[0] == drop for r in probe):
            continue
        if any(os.path.exists(_apply(r, root, drop, insert)) for r in probe):
            if desc != "as given":
                log.warning("%s: images found with %s (e.g. %s); set data.image_root or "
                            "data.path_rewrite to say so and skip this guess", source, desc,
                            _apply(probe[0], root, drop, insert))
            return [_apply(r, root, drop, insert) for r in rels]
        tried.append(f"{_apply(probe[0], root, drop, insert)} ({desc})")
    if not require:
        return as_given
    raise UserError(
        f"{source}: none of the first {len(probe)} images exists under image_root {root} "
        f"(every image unreadable); for the first CSV path {probe[0]!r} tried: "
        + "; ".join(tried) + ". Set data.image_root to the folder the CSV's Path column is "
        "relative to, or data.path_rewrite='old=>new' (several separated by ';')")
