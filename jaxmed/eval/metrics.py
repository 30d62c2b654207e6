"""Multi-label classification metrics in numpy: AUROC, F1, accuracy, a summary dict.

Conventions (all functions):

* ``y_true`` is an (N, L) array of 0/1 labels (bool, int or float holding only 0 and 1);
  ``y_prob`` an (N, L) array of finite scores (probabilities; any monotone score works for
  AUROC). A 1-D pair is treated as one label.
* A prediction is positive when ``y_prob >= threshold``.
* AUROC is the Mann-Whitney statistic with average ranks for ties, which is exactly the
  trapezoidal area scikit-learn's ``roc_auc_score`` computes. A label whose column holds only
  one class has no AUROC: it is NaN and left out of the macro average (and counted).
* F1 is ``2 TP / (2 TP + FP + FN)``; when that denominator is 0 (no positives, none
  predicted) it is ``zero_division`` (0.0 by default, as scikit-learn's default).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_2d(y_true, y_prob, *, check_prob: bool = True) -> tuple[np.ndarray, np.ndarray]:
    yt = np.asarray(y_true)
    yp = np.asarray(y_prob, dtype=np.float64)
    if yt.ndim == 1:
        yt = yt[:, None]
    if yp.ndim == 1:
        yp = yp[:, None]
    if yt.ndim != 2 or yp.ndim != 2:
        raise ValueError(f"labels and scores must be (N, L) arrays; got {yt.shape} and {yp.shape}")
    if yt.shape != yp.shape:
        raise ValueError(f"labels {yt.shape} and scores {yp.shape} have different shapes")
    if yt.shape[0] == 0:
        raise ValueError("metrics need at least one example; got 0 rows")
    yt_f = yt.astype(np.float64)
    if not np.all((yt_f == 0) | (yt_f == 1)):
        bad = np.unique(yt_f[(yt_f != 0) & (yt_f != 1)])[:5]
        raise ValueError(f"labels must be 0/1; found values {bad.tolist()}")
    if check_prob and not np.all(np.isfinite(yp)):
        rows = np.unique(np.nonzero(~np.isfinite(yp))[0])[:5]
        raise ValueError(f"scores contain NaN or inf (rows {rows.tolist()} ...)")
    return yt_f.astype(bool), yp


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, tied values sharing the mean of their positions."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = xs.size
    starts = np.concatenate([[0], np.nonzero(xs[1:] != xs[:-1])[0] + 1])
    ends = np.concatenate([starts[1:], [n]])  # exclusive
    group_rank = (starts + 1 + ends) / 2.0  # mean of positions start+1 .. end
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def auroc_per_label(y_true, y_prob) -> np.ndarray:
    """(L,) AUROC per label; NaN where the label's column holds a single class."""
    yt, yp = _as_2d(y_true, y_prob)
    out = np.full(yt.shape[1], np.nan)
    for k in range(yt.shape[1]):
        pos = yt[:, k]
        n_pos = int(pos.sum())
        n_neg = pos.size - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = _average_ranks(yp[:, k])
        u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
        out[k] = u / (float(n_pos) * float(n_neg))
    return out


def macro_auroc(y_true, y_prob) -> tuple[float, int]:
    """(mean AUROC over labels that have both classes, number of labels left out).

    The mean is NaN when no label has both classes.
    """
    per = auroc_per_label(y_true, y_prob)
    valid = ~np.isnan(per)
    mean = float(per[valid].mean()) if valid.any() else float("nan")
    return mean, int((~valid).sum())


def _thresholds(thresholds, n_labels: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(n_labels, float(t))
    if t.shape != (n_labels,):
        raise ValueError(f"thresholds must be a scalar or have one value per label ({n_labels}); "
                         f"got shape {t.shape}")
    return t


def predict_labels(y_prob, thresholds=0.5) -> np.ndarray:
    """Boolean (N, L) predictions ``y_prob >= threshold`` (scalar or per-label thresholds)."""
    yp = np.asarray(y_prob, dtype=np.float64)
    if yp.ndim == 1:
        yp = yp[:, None]
    return yp >= _thresholds(thresholds, yp.shape[1])


def _confusion(yt: np.ndarray, pred: np.ndarray):
    tp = np.sum(yt & pred, axis=0).astype(np.float64)
    fp = np.sum(~yt & pred, axis=0).astype(np.float64)
    fn = np.sum(yt & ~pred, axis=0).astype(np.float64)
    tn = np.sum(~yt & ~pred, axis=0).astype(np.float64)
    return tp, fp, fn, tn


def f1_per_label(y_true, y_prob, thresholds=0.5, *, zero_division: float = 0.0) -> np.ndarray:
    """(L,) F1 per label of the predictions ``y_prob >= thresholds``."""
    yt, yp = _as_2d(y_true, y_prob)
    tp, fp, fn, _ = _confusion(yt, predict_labels(yp, thresholds))
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), zero_division)
    return f1


def accuracy_per_label(y_true, y_prob, thresholds=0.5) -> np.ndarray:
    """(L,) fraction of examples whose label k is predicted correctly."""
    yt, yp = _as_2d(y_true, y_prob)
    return np.mean(yt == predict_labels(yp, thresholds), axis=0)


def subset_accuracy(y_true, y_prob, thresholds=0.5) -> float:
    """Fraction of examples whose every label is predicted correctly (exact match)."""
    yt, yp = _as_2d(y_true, y_prob)
    return float(np.mean(np.all(yt == predict_labels(yp, thresholds), axis=1)))


def best_thresholds(y_val, p_val, *, default: float = 0.5) -> np.ndarray:
    """(L,) per-label thresholds that maximise F1 on a validation set.

    For each label every cut between two consecutive distinct scores is tried; the chosen
    threshold is the midpoint of that gap (the lowest score when everything is predicted
    positive), so ``p_val >= t`` reproduces the best validation F1. Ties in F1 go to the
    higher threshold. A label without positives in ``y_val`` gets ``default``.
    """
    yt, yp = _as_2d(y_val, p_val)
    out = np.full(yt.shape[1], float(default))
    for k in range(yt.shape[1]):
        pos = yt[:, k]
        n_pos = int(pos.sum())
        if n_pos == 0:
            continue
        order = np.argsort(-yp[:, k], kind="mergesort")
        s = yp[order, k]
        cum_tp = np.cumsum(pos[order])
        # last index of each group of equal scores (descending): cut after it
        last = np.concatenate([np.nonzero(s[1:] != s[:-1])[0], [s.size - 1]])
        tp = cum_tp[last].astype(np.float64)
        n_pred = last + 1.0
        f1 = 2 * tp / (n_pred + n_pos)  # 2TP / (2TP + FP + FN)
        i = int(np.argmax(f1))  # first maximum = highest threshold
        hi = s[last[i]]
        if i + 1 < last.size:
            lo = s[last[i + 1]]
            mid = 0.5 * (hi + lo)
            out[k] = mid if lo < mid <= hi else hi
        else:
            out[k] = hi
    return out


def _per_label_dict(names: Sequence[str], values: np.ndarray) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, values)}


def summarize(y_true, y_prob, label_names: Sequence[str] | None = None, *,
              thresholds=None) -> dict:
    """All metrics of one evaluation as a JSON-friendly dict.

    Keys: ``n``, ``labels``, ``macro_auroc``, ``auroc`` (per label, NaN for single-class
    labels), ``n_auroc_excluded`` and ``auroc_excluded`` (labels left out of the macro),
    ``f1`` / ``macro_f1`` / ``accuracy`` / ``mean_accuracy`` / ``subset_accuracy`` at 0.5,
    ``positives`` (count per label), and, when per-label ``thresholds`` are given (e.g. from
    `best_thresholds` on a validation set), ``thresholds``, ``f1_best``, ``macro_f1_best``,
    ``accuracy_best``.
    """
    yt, yp = _as_2d(y_true, y_prob)
    n_labels = yt.shape[1]
    if label_names is None:
        label_names = [f"label_{k}" for k in range(n_labels)]
    label_names = list(label_names)
    if len(label_names) != n_labels:
        raise ValueError(f"{len(label_names)} label names for {n_labels} label columns")
    per_auc = auroc_per_label(yt, yp)
    macro, n_excl = macro_auroc(yt, yp)
    f1 = f1_per_label(yt, yp, 0.5)
    acc = accuracy_per_label(yt, yp, 0.5)
    out = {
        "n": int(yt.shape[0]),
        "labels": label_names,
        "positives": {n: int(v) for n, v in zip(label_names, yt.sum(axis=0))},
        "macro_auroc": macro,
        "auroc": _per_label_dict(label_names, per_auc),
        "n_auroc_excluded": n_excl,
        "auroc_excluded": [n for n, v in zip(label_names, per_auc) if np.isnan(v)],
        "f1": _per_label_dict(label_names, f1),
        "macro_f1": float(f1.mean()),
        "accuracy": _per_label_dict(label_names, acc),
        "mean_accuracy": float(acc.mean()),
        "subset_accuracy": subset_accuracy(yt, yp, 0.5),
    }
    if thresholds is not None:
        t = _thresholds(thresholds, n_labels)
        f1b = f1_per_label(yt, yp, t)
        out["thresholds"] = _per_label_dict(label_names, t)
        out["f1_best"] = _per_label_dict(label_names, f1b)
        out["macro_f1_best"] = float(f1b.mean())
        out["accuracy_best"] = _per_label_dict(label_names, accuracy_per_label(yt, yp, t))
    return out
