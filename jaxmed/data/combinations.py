"""Combination CSVs: which label combinations to synthesise, and how many images of each.

A combination CSV (docs/STUDY.md "Synthesis") has the label columns (values 1, 0, -1 or
blank) and ``count`` (images per row); other columns are ignored. Bad rows are errors that
name the file, the data row, its line and the column.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxmed.data.captions import caption_from_labels
from jaxmed.data.labels import LABELS


@dataclass(frozen=True)
class Combination:
    """One row of a combination CSV: label values (NaN = blank) and how many images."""

    labels: tuple[float, ...]
    count: int
    row: int  # data row number (0 = first row after the header)

    def caption(self, columns: Sequence[str] = LABELS) -> str:
        return caption_from_labels(self.labels, columns)


def _label_value(text: Any, where: str) -> float:
    if text is None:
        return math.nan
    if isinstance(text, (int, float, np.integer, np.floating)) and not isinstance(text, bool):
        v = float(text)
    else:
        s = str(text).strip()
        if s == "" or s.lower() == "nan":
            return math.nan
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"{where}: label value {text!r} is not a number "
                             "(use 1, 0, -1 or leave blank)") from None
    if math.isnan(v):
        return v
    if v not in (1.0, 0.0, -1.0):
        raise ValueError(f"{where}: label value {text!r} must be 1, 0, -1 or blank")
    return v


def _count_value(text: Any, where: str) -> int:
    s = str(text).strip() if text is not None else ""
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"{where}: count {text!r} is not a whole number") from None
    if not math.isfinite(v) or v != int(v):
        raise ValueError(f"{where}: count {text!r} is not a whole number")
    if v < 0:
        raise ValueError(f"{where}: count {text!r} is negative (need >= 0)")
    return int(v)


def parse_combinations(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                       source: str = "combinations", header: Sequence[str] | None = None,
                       ) -> list[Combination]:
    """Validate rows (dicts: label columns + ``count``) into `Combination` s."""
    columns = tuple(columns)
    if header is None:
        header = list(rows[0].keys()) if rows else []
    have = set(header)
    missing = [c for c in (*columns, "count") if c not in have]
    if missing:
        what = " and ".join(f"column {c!r}" for c in missing)
        raise ValueError(
            f"{source} has no {what}: a combination CSV needs the label columns "
            f"{list(columns)} and 'count' (images per row); found columns {list(header)}")
    out = []
    for r, row in enumerate(rows):
        where = f"{source}, data row {r} (line {r + 2})"
        labels = tuple(_label_value(row.get(c), f"{where}, column {c!r}") for c in columns)
        out.append(Combination(labels, _count_value(row.get("count"), where), r))
    return out


def read_combinations(path: str, columns: Sequence[str] = LABELS) -> list[Combination]:
    """A combination CSV (label columns + ``count``; other columns ignored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"combination CSV {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    if not header:
        raise ValueError(f"combination CSV {path} is empty (no header line)")
    return parse_combinations(rows, columns, source=f"combination CSV {path}", header=header)


def format_label(v: float) -> str:
    """A label value as written in CSVs: "1", "0", "-1", or "" for blank (NaN)."""
    return "" if math.isnan(v) else str(int(v))
