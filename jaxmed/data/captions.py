"""Captions from CheXpert labels: the study's rule, optional templates, caption dropout.

The study's rule (docs/STUDY.md "Data"; the authors' dataset class does the same)::

    "Chest X-ray showing " + ", ".join(positive labels in column order)
    or "Normal chest X-ray with no significant findings" when none is positive

Reading of ``No Finding``: it is one of the label columns, so it is treated like any other
label, literally. A row whose only positive is No Finding is captioned
``"Chest X-ray showing No Finding"``; the "Normal ..." caption appears only when *no* label
column is 1 (in CheXpert that means No Finding is 0 or blank too). A row with No Finding=1
and Support Devices=1 gives ``"Chest X-ray showing No Finding, Support Devices"``. This is
what the authors' code does (``if row[c] == 1`` over all eight columns, No Finding first).

"Positive" means a value equal to 1; 0, -1 (uncertain) and NaN (ignored / blank) are not.

Templates are format strings with a ``{findings}`` field (the ", "-joined positives); the
default single template reproduces the rule. Captions for a row with no positives come
from ``normal_captions`` (default: the study's sentence). Caption dropout replaces a
caption by ``""`` with probability ``dropout`` (for classifier-free guidance; the authors
had none). The template choice and the dropout draw are a pure function of
``(seed, epoch, index)``, so they are reproducible, independent of sharding and worker
order, and resume exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxmed.data.labels import LABELS

# The name jaxmed.sample and jaxmed.evaluate import the label columns by.
LABEL_COLUMNS = LABELS
PREFIX = "Chest X-ray showing "
DEFAULT_TEMPLATE = PREFIX + "{findings}"
NORMAL_CAPTION = "Normal chest X-ray with no significant findings"

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    # splitmix64 finaliser: a cheap, well-mixed 64-bit hash.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform01(seed: int, *keys: int) -> float:
    """A deterministic uniform number in [0, 1) from ``seed`` and integer ``keys``."""
    h = _mix64(int(seed) & _MASK64)
    for k in keys:
        h = _mix64(h ^ (int(k) & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


def positive_findings(labels, columns: Sequence[str] = LABELS) -> list[str]:
    """Names of the columns whose label equals 1, in column order."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    if labels.shape[0] != len(columns):
        raise ValueError(f"{labels.shape[0]} labels for {len(columns)} columns {list(columns)}")
    return [c for c, v in zip(columns, labels) if v == 1]


def caption_from_labels(labels, columns: Sequence[str] = LABELS) -> str:
    """The study's caption for one row of labels (see the module docstring)."""
    found = positive_findings(labels, columns)
    return PREFIX + ", ".join(found) if found else NORMAL_CAPTION


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    templates = tuple(templates)
    if not templates:
        raise ValueError("need at least one caption template")
    for t in templates:
        if "{findings}" not in t:
            raise ValueError(f"caption template {t!r} has no {{findings}} field")
    return templates


class Captioner:
    """Caption for a record: rule or fixed caption, template choice, dropout.

    Args:
      columns: the label column names, in order.
      templates: format strings with ``{findings}``; default the study's single template.
      normal_captions: captions for rows with no positive label; default the study's.
      dropout: probability of the empty caption ``""``.
      seed: seed of the template / dropout draws.
    """

    def __init__(
        self,
        columns: Sequence[str] = LABELS,
        templates: Sequence[str] | None = None,
        normal_captions: Sequence[str] | None = None,
        dropout: float = 0.0,
        seed: int = 0,
    ):
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"caption dropout must be in [0, 1], got {dropout}")
        self.columns = tuple(columns)
        self.templates = _check_templates(templates or (DEFAULT_TEMPLATE,))
        self.normal_captions = tuple(normal_captions or (NORMAL_CAPTION,))
        self.dropout = float(dropout)
        self.seed = int(seed)

    def base_caption(self, labels, *, epoch: int = 0, index: int = 0) -> str:
        """Caption before dropout: a template of the positives, or a normal caption."""
        found = positive_findings(labels, self.columns)
        choices = self.templates if found else self.normal_captions
        k = 0
        if len(choices) > 1:
            k = min(int(uniform01(self.seed, 1, epoch, index) * len(choices)), len(choices) - 1)
        return choices[k].format(findings=", ".join(found)) if found else choices[k]

    def dropped(self, *, epoch: int = 0, index: int = 0) -> bool:
        return self.dropout > 0 and uniform01(self.seed, 0, epoch, index) < self.dropout

    def __call__(self, labels=None, *, epoch: int = 0, index: int = 0,
                 fixed: str | None = None) -> str:
        """Caption of record ``index`` in ``epoch``; ``fixed`` replaces the label rule."""
        if self.dropped(epoch=epoch, index=index):
            return ""
        if fixed is not None:
            return fixed
        return self.base_caption(labels, epoch=epoch, index=index)

    def variants(self, labels_matrix=None, fixed_captions: Sequence[str] | None = None
                 ) -> list[str]:
        """Every caption this captioner can give for these rows (sorted, unique)."""
        return all_caption_variants(
            labels_matrix, self.templates, self.dropout, columns=self.columns,
            normal_captions=self.normal_captions, fixed_captions=fixed_captions,
        )


def all_caption_variants(
    labels_matrix,
    templates: Sequence[str] | None = None,
    dropout: float = 0.0,
    *,
    columns: Sequence[str] = LABELS,
    normal_captions: Sequence[str] | None = None,
    fixed_captions: Sequence[str] | None = None,
) -> list[str]:
    """Every caption a dataset can produce (sorted, unique), for a text-embedding cache.

    ``labels_matrix`` is (N, len(columns)); each distinct row contributes every template
    (or every normal caption when it has no positive); ``fixed_captions`` (a folder CSV's
    caption column) are added as they are; ``""`` is added when ``dropout > 0``.
    """
    templates = _check_templates(templates or (DEFAULT_TEMPLATE,))
    normal_captions = tuple(normal_captions or (NORMAL_CAPTION,))
    out: set[str] = set()
    if labels_matrix is not None and fixed_captions is None:
        m = np.asarray(labels_matrix, dtype=np.float64)
        if m.size:
            m = m.reshape(-1, len(columns))
            for row in np.unique(m == 1, axis=0):
                found = [c for c, v in zip(columns, row) if v]
                if found:
                    out.update(t.format(findings=", ".join(found)) for t in templates)
                else:
                    out.update(normal_captions)
    if fixed_captions is not None:
        out.update(fixed_captions)
    if dropout > 0:
        out.add("")
    return sorted(out)
