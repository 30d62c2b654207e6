"""Prompt-image alignment: does a generated image show what its prompt asked for?

Two judges:

* `classifier_alignment` -- a chest X-ray classifier trained on *real* images (the "judge")
  scores every generated image; its probability for a condition is compared with the
  label in the image's prompt. Per condition: AUROC (prompted images with the condition
  vs prompted images without it; NaN when the generated set holds one class only),
  accuracy at the judge's threshold (0.5 unless thresholds are given, e.g. chosen on real
  validation images), the mean probability on the prompted images (``hit``) and the
  counts. ``all``: the mean over conditions with an AUROC, and the accuracy over every
  (image, condition) pair. The paper reports alignment; the authors' public code has no
  implementation, so this is jaxmed's reading: the same judge for every strategy, so
  strategies compare on equal terms. A judge that cannot see a condition well on real
  images cannot see it on generated ones either: report the judge's real-test AUROC next
  to these numbers (the study does, in results.md).

* `clip_score` -- CLIPScore (Hessel et al. 2021, as torchmetrics computes it):
  ``100 * max(cos(E_img, E_txt), 0)`` averaged over images, with a CLIP model the user
  provides as a transformers folder (``CLIPModel`` + processor files). Needs torch and
  transformers; nothing is downloaded. General-domain CLIP models know little about chest
  X-rays, so treat it as a secondary signal.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jaxmed.eval import metrics as M


def _judge_columns(judge_labels: Sequence[str], conditions: Sequence[str]):
    idx, missing = [], []
    for c in conditions:
        if c in judge_labels:
            idx.append(list(judge_labels).index(c))
        else:
            missing.append(c)
    return idx, missing


def alignment_from_probs(probs: np.ndarray, prompt_labels: np.ndarray,
                         conditions: Sequence[str], *, thresholds=None) -> dict:
    """Alignment metrics from judge probabilities (N, C) and prompt labels (N, C) (0/1/NaN).

    NaN prompt labels (blank / uncertain in the combination CSV) are left out per condition.
    Returns ``{"per_condition": {c: {...}}, "all": {...}}``.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(prompt_labels, np.float64)
    if p.shape != y.shape or p.ndim != 2 or p.shape[1] != len(conditions):
        raise ValueError(f"probs {p.shape} and prompt labels {y.shape} must both be "
                         f"(N, {len(conditions)})")
    t = np.full(len(conditions), 0.5) if thresholds is None else np.broadcast_to(
        np.asarray(thresholds, np.float64), (len(conditions),))
    per, correct, total = {}, 0, 0
    for k, c in enumerate(conditions):
        ok = ~np.isnan(y[:, k])
        yk, pk = y[ok, k] == 1, p[ok, k]
        n_pos, n_neg = int(yk.sum()), int((~yk).sum())
        auc = float(M.auroc_per_label(yk[:, None].astype(np.float32), pk[:, None])[0]) \
            if ok.any() else float("nan")
        pred = pk >= t[k]
        acc = float(np.mean(pred == yk)) if ok.any() else float("nan")
        correct += int(np.sum(pred == yk))
        total += int(ok.sum())
        per[c] = {"auroc": auc, "accuracy": acc,
                  "hit": float(pk[yk].mean()) if n_pos else float("nan"),
                  "false_alarm": float(pk[~yk].mean()) if n_neg else float("nan"),
                  "n_prompted": n_pos, "n_other": n_neg, "threshold": float(t[k])}
    aucs = [v["auroc"] for v in per.values() if np.isfinite(v["auroc"])]
    hits = [v["hit"] for v in per.values() if np.isfinite(v["hit"])]
    return {"per_condition": per,
            "all": {"auroc": float(np.mean(aucs)) if aucs else float("nan"),
                    "accuracy": correct / total if total else float("nan"),
                    "hit": float(np.mean(hits)) if hits else float("nan"),
                    "n_conditions_scored": len(aucs), "n_images": int(y.shape[0])}}


def classifier_alignment(judge, images, prompt_labels: np.ndarray,
                         conditions: Sequence[str], *, label_columns: Sequence[str],
                         thresholds=None, probs: np.ndarray | None = None) -> dict:
    """Judge (a `TrainedClassifier` trained on real images) vs the prompts' labels.

    ``prompt_labels`` is (N, len(label_columns)); only ``conditions`` the judge knows are
    scored (the others are listed under ``"missing"``). ``probs``: the judge's
    probabilities when already computed (N, judge labels).
    """
    judge_labels = tuple(judge.label_names)
    idx, missing = _judge_columns(judge_labels, conditions)
    scored = [c for c in conditions if c not in missing]
    cols = [list(label_columns).index(c) for c in scored]
    if probs is None:
        probs = judge.predict_proba(images)
    if thresholds is not None:
        thresholds = np.asarray(thresholds, np.float64)[idx]
    out = alignment_from_probs(np.asarray(probs)[:, idx],
                               np.asarray(prompt_labels, np.float64)[:, cols], scored,
                               thresholds=thresholds)
    out["missing"] = missing
    return out


# --------------------------------------------------------------------------------------
# CLIP score


class ClipScorer:
    """Per-image CLIPScore with a user-provided transformers CLIP folder (see module doc)."""

    def __init__(self, clip_dir: str, *, batch_size: int = 32):
        if not os.path.isdir(clip_dir):
            raise FileNotFoundError(f"CLIP model folder {clip_dir} does not exist")
        try:
            import torch  # noqa: F401
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as e:  # pragma: no cover - optional dependency
            raise ImportError("the CLIP score needs torch and transformers "
                              "(pip install torch transformers)") from e
        self.clip_dir = clip_dir
        self.batch_size = int(batch_size)
        self.model = CLIPModel.from_pretrained(clip_dir).eval()
        self.processor = CLIPProcessor.from_pretrained(clip_dir)

    def scores(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """(N,) float64 CLIPScores of uint8 images (N, H, W[, C]) against their captions."""
        import torch

        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        out = []
        bs = self.batch_size
        with torch.no_grad():
            for s in range(0, images.shape[0], bs):
                inp = self.processor(text=list(captions[s:s + bs]), images=list(images[s:s + bs]),
                                     return_tensors="pt", padding=True, truncation=True)
                o = self.model(**inp)
                img = torch.nn.functional.normalize(o.image_embeds, dim=-1)
                txt = torch.nn.functional.normalize(o.text_embeds, dim=-1)
                out.append((100.0 * (img * txt).sum(-1).clamp(min=0)).double().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def clip_score(images: np.ndarray, captions: Sequence[str], clip_dir: str, *,
               batch_size: int = 32) -> dict:
    """Mean CLIPScore of images against their captions: ``{"clip_score", "std", "n"}``."""
    sc = ClipScorer(clip_dir, batch_size=batch_size).scores(images, captions)
    return {"clip_score": float(sc.mean()), "std": float(sc.std()), "n": int(sc.size),
            "model": clip_dir}
