"""The data-regime experiment: real fractions vs synthetic vs both, scored on real test data.

The study asks whether synthetic X-rays help a classifier tested on real images when real
data is scarce. `run_regimes` trains one classifier per (repeat, mode, fraction) with
`train_classifier` and scores each on the real test set.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from jaxmed.eval import metrics as M
from jaxmed.eval.classifier.config import ClassifierConfig
from jaxmed.eval.classifier.inputs import prepare_images, validate_labels
from jaxmed.eval.classifier.train import train_classifier


def subset_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of the rows in which every prefix is as label-covering as it can be.

    First one random positive of each label (rarest label first, skipping labels already
    covered), then the rest shuffled; a fraction's subset is a prefix, so subsets of one
    repeat are nested and every label keeps a positive once the prefix is long enough.
    """
    y = np.asarray(labels) > 0.5
    n = y.shape[0]
    chosen: list[int] = []
    covered = np.zeros(y.shape[1], bool)
    for k in np.argsort(y.sum(axis=0), kind="stable"):
        if covered[k] or not y[:, k].any():
            continue
        i = int(rng.choice(np.nonzero(y[:, k])[0]))
        chosen.append(i)
        covered |= y[i]
    rest = np.setdiff1d(np.arange(n), np.asarray(chosen, np.int64))
    return np.concatenate([np.asarray(chosen, np.int64), rng.permutation(rest)])


def _scaled_val(x: np.ndarray, y: np.ndarray, frac: float | None, seed: int):
    """The validation subset for real fraction ``frac`` (None: synthetic only -> none)."""
    if frac is None:
        return None, None
    order = subset_order(y, np.random.default_rng([int(seed), 1]))
    n = max(int(round(frac * x.shape[0])), y.shape[1])  # the head covers each label once
    idx = np.sort(order[:n])
    return x[idx], y[idx]


def _check_pair(pair, name: str, num_labels: int):
    if pair is None:
        return None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be an (images, labels) pair")
    images, labels = pair
    n = len(images)
    return images, validate_labels(labels, n, num_labels, name=f"{name} labels")


def run_regimes(real_train, synthetic, test, fractions: Sequence[float] = (
        0.01, 0.05, 0.10, 0.25, 0.5, 1.0), modes: Sequence[str] = (
        "real", "synthetic", "real+synthetic"), repeats: int = 1,
        seeds: Sequence[int] | None = None, config: ClassifierConfig | None = None, *,
        val=None, progress: bool = False, value_range: str = "auto",
        scale_val: bool = False) -> list[dict]:
    """Train one classifier per (repeat, mode, fraction) and score it on the real test set.

    ``real_train``, ``synthetic``, ``test`` and the optional ``val`` are (images, labels)
    pairs. Real subsets are prefixes of `subset_order` (seeded per repeat; nested across
    fractions). 'synthetic' trains on all synthetic images once per repeat and reports
    ``fraction=None``. With ``val`` the classifier keeps its best-on-val weights and the
    rows also carry F1 at per-label thresholds chosen on val (``f1_best``). With
    ``scale_val`` a run at real fraction f selects on a prefix of `subset_order` of val
    holding max(f x N_val, number of labels) images (the head covers every label), so
    that selection uses no more labelled real data than training does (docs/STUDY.md
    "Where jaxmed departs from the study"); synthetic-only runs then train for the fixed
    number of steps (no real data).

    Each row: fraction, mode, repeat, seed, n_real, n_synthetic, n_train, best_step, plus the
    `metrics.summarize` keys (macro_auroc, auroc, n_auroc_excluded, f1, macro_f1, ...).
    """
    config = config or ClassifierConfig()
    allowed = ("real", "synthetic", "real+synthetic")
    for m in modes:
        if m not in allowed:
            raise ValueError(f"unknown mode {m!r}; modes are {allowed}")
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"fractions must be in (0, 1]; got {f}")
    if seeds is None:
        seeds = [config.seed + r for r in range(repeats)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != repeats:
        raise ValueError(f"{len(seeds)} seeds for repeats={repeats}")
    L = config.num_labels
    real_train = _check_pair(real_train, "real_train", L)
    synthetic = _check_pair(synthetic, "synthetic", L)
    test = _check_pair(test, "test", L)
    val = _check_pair(val, "val", L)
    if test is None:
        raise ValueError("run_regimes needs a real test set")
    if real_train is None and any(m != "synthetic" for m in modes):
        raise ValueError("modes 'real' / 'real+synthetic' need real_train")
    if synthetic is None and any(m != "real" for m in modes):
        raise ValueError("modes 'synthetic' / 'real+synthetic' need synthetic data")

    size = config.image_size
    prep = functools.partial(prepare_images, image_size=size, value_range=value_range)
    test_x = prep(test[0], name="test images")
    real_x = prep(real_train[0], name="real_train images") if real_train is not None else None
    syn_x = prep(synthetic[0], name="synthetic images") if synthetic is not None else None
    val_x = prep(val[0], name="val images") if val is not None else None

    jobs = []
    for r, seed in enumerate(seeds):
        for mode in modes:
            for frac in ([None] if mode == "synthetic" else list(fractions)):
                jobs.append((r, seed, mode, frac))
    rows = []
    orders: dict[int, np.ndarray] = {}
    for r, seed, mode, frac in jobs:
        xs, ys, n_real, n_syn = [], [], 0, 0
        if mode != "synthetic":
            if r not in orders:
                orders[r] = subset_order(real_train[1], np.random.default_rng(seed))
            n_real = max(1, int(round(frac * real_x.shape[0])))
            idx = np.sort(orders[r][:n_real])
            xs.append(real_x[idx])
            ys.append(real_train[1][idx])
        if mode != "real":
            n_syn = syn_x.shape[0]
            xs.append(syn_x)
            ys.append(synthetic[1])
        cfg = config.replace(seed=seed)
        vx, vy = (val_x, val[1]) if val is not None else (None, None)
        if val is not None and scale_val:
            vx, vy = _scaled_val(val_x, val[1], frac, seed)
        clf = train_classifier(cfg, np.concatenate(xs), np.concatenate(ys), vx, vy,
                               progress=progress)
        thresholds = None
        if vx is not None:
            thresholds = M.best_thresholds(vy, clf.predict_proba(vx))
        summary = M.summarize(test[1], clf.predict_proba(test_x), cfg.labels,
                              thresholds=thresholds)
        row = {"fraction": frac, "mode": mode, "repeat": r, "seed": seed, "n_real": n_real,
               "n_synthetic": n_syn, "n_train": n_real + n_syn, "best_step": clf.best_step,
               "n_val": 0 if vx is None else int(vx.shape[0])}
        row.update({k: v for k, v in summary.items() if k not in ("labels",)})
        row["n_test"] = row.pop("n")
        rows.append(row)
    return rows
