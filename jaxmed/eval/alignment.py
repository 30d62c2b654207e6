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

from jaxmed import files
from jaxmed.eval import metrics as M
from jaxmed.eval import uncertainty as U


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
                         thresholds=None, probs: np.ndarray | None = None,
                         groups=None, **paired_kw) -> dict:
    """Judge (a `TrainedClassifier` trained on real images) vs the prompts' labels.

    ``prompt_labels`` is (N, len(label_columns)); only ``conditions`` the judge knows are
    scored (the others are listed under ``"missing"``). ``probs``: the judge's
    probabilities when already computed (N, judge labels). ``groups``: each image's noise
    group (N,); when given, ``"paired"`` holds `paired_alignment` (intervals, the
    shuffled-prompt control, the permutation test).
    """
    judge_labels = tuple(judge.label_names)
    idx, missing = _judge_columns(judge_labels, conditions)
    scored = [c for c in conditions if c not in missing]
    cols = [list(label_columns).index(c) for c in scored]
    if probs is None:
        probs = judge.predict_proba(images)
    if thresholds is not None:
        thresholds = np.asarray(thresholds, np.float64)[idx]
    p_scored = np.asarray(probs)[:, idx]
    y_scored = np.asarray(prompt_labels, np.float64)[:, cols]
    out = alignment_from_probs(p_scored, y_scored, scored, thresholds=thresholds)
    out["missing"] = missing
    if groups is not None:
        out["paired"] = paired_alignment(p_scored, y_scored, groups, scored, **paired_kw)
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


# --------------------------------------------------------------------------------------
# The paired test: images that share their starting noise differ only by prompt


def _ranks_by_value(p: np.ndarray) -> tuple[np.ndarray, int]:
    """(index of each value among the sorted unique values, number of unique values)."""
    u, inv = np.unique(p, return_inverse=True)
    return inv.reshape(-1), u.size


def _weighted_auroc(inv: np.ndarray, n_unique: int, pos: np.ndarray, neg: np.ndarray,
                    w: np.ndarray) -> float:
    """Mann-Whitney AUROC with per-image weights (ties count 1/2); NaN without both classes.

    A bootstrap resample is the original images with integer weights (how often each was
    drawn), so this is the AUROC of the resample without building it.
    """
    wp = np.bincount(inv[pos], weights=w[pos], minlength=n_unique)
    wn = np.bincount(inv[neg], weights=w[neg], minlength=n_unique)
    sp, sn = wp.sum(), wn.sum()
    if sp <= 0 or sn <= 0:
        return float("nan")
    below = np.cumsum(wn) - wn
    return float(np.sum(wp * (below + 0.5 * wn)) / (sp * sn))


def _within_group_pairs(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ordered pairs (i, j), i != j, of images in the same group, and the pair's group."""
    order = np.argsort(groups, kind="stable")
    g_sorted = groups[order]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    ends = np.r_[starts[1:], g_sorted.size]
    ii, jj, gg = [], [], []
    for k, (a, b) in enumerate(zip(starts, ends)):
        idx = order[a:b]
        if idx.size < 2:
            continue
        i, j = np.meshgrid(idx, idx, indexing="ij")
        keep = i != j
        ii.append(i[keep])
        jj.append(j[keep])
        gg.append(np.full(int(keep.sum()), k))
    if not ii:
        e = np.zeros(0, np.int64)
        return e, e, e
    return np.concatenate(ii), np.concatenate(jj), np.concatenate(gg)


class _PairedAlignment:
    """Per-group sufficient statistics of the two alignment AUROCs of one labelling.

    * pooled: per condition, the AUROC of the judge's probability for the condition, images
      prompted with it vs images prompted without it (what `alignment_from_probs` reports);
    * within-seed: the same comparison restricted to pairs of images that share their
      starting noise (a group), so the noise's own effect on the judge cancels: the paired
      test. 0.5 = the prompt does not move the judge.

    The macro value is the mean over conditions scored (both classes present).
    """

    def __init__(self, probs, labels, groups):
        self.p = np.asarray(probs, np.float64)
        self.y = np.asarray(labels, np.float64)
        self.g_index = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
        self.n_groups = int(self.g_index.max()) + 1 if self.g_index.size else 0
        self.ranks = [_ranks_by_value(self.p[:, k]) for k in range(self.p.shape[1])]
        self.pi, self.pj, self.pg = _within_group_pairs(self.g_index)

    def with_labels(self, labels) -> _PairedAlignment:
        new = object.__new__(_PairedAlignment)
        new.__dict__.update(self.__dict__)
        new.y = np.asarray(labels, np.float64)
        return new

    def pooled(self, group_weights=None) -> tuple[float, np.ndarray]:
        w = np.ones(self.p.shape[0]) if group_weights is None else \
            np.asarray(group_weights, np.float64)[self.g_index]
        per = np.array([_weighted_auroc(inv, nu, self.y[:, k] == 1, self.y[:, k] == 0, w)
                        for k, (inv, nu) in enumerate(self.ranks)])
        ok = np.isfinite(per)
        return (float(per[ok].mean()) if ok.any() else float("nan")), per

    def group_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(wins, pairs), each (groups, conditions): within-group positive-negative pairs
        and how many the positive won (ties 1/2)."""
        c = self.p.shape[1]
        wins = np.zeros((self.n_groups, c))
        pairs = np.zeros((self.n_groups, c))
        for k in range(c):
            yi, yj = self.y[self.pi, k], self.y[self.pj, k]
            m = (yi == 1) & (yj == 0)
            d = self.p[self.pi[m], k] - self.p[self.pj[m], k]
            score = (d > 0) + 0.5 * (d == 0)
            wins[:, k] = np.bincount(self.pg[m], weights=score, minlength=self.n_groups)
            pairs[:, k] = np.bincount(self.pg[m], minlength=self.n_groups)
        return wins, pairs

    @staticmethod
    def within(wins, pairs, group_weights=None) -> tuple[np.ndarray, np.ndarray]:
        """Macro within-seed AUROC (one per row of ``group_weights`` (B, G), or one value)
        and the per-condition values."""
        w = np.ones((1, wins.shape[0])) if group_weights is None else np.atleast_2d(
            group_weights)
        num, den = w @ wins, w @ pairs
        with np.errstate(invalid="ignore", divide="ignore"):
            per = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
        ok = np.isfinite(per)
        macro = np.where(ok.any(1), np.nansum(per, 1) / np.maximum(ok.sum(1), 1), np.nan)
        return macro, per


def _shuffle_within_groups(y: np.ndarray, g_index: np.ndarray,
                           rng: np.random.Generator) -> np.ndarray:
    """Prompt labels permuted among the images of each group (rows move together)."""
    key = g_index + rng.random(g_index.size)  # a random order inside each group
    order = np.argsort(key, kind="stable")  # groups stay contiguous, shuffled inside
    by_group = np.argsort(g_index, kind="stable")
    out = np.empty_like(y)
    out[by_group] = y[order]
    return out


def paired_alignment(probs: np.ndarray, prompt_labels: np.ndarray, groups,
                     conditions: Sequence[str], *, n_boot: int = 1000, n_perm: int = 200,
                     level: float = 0.95, seed: int = 0) -> dict:
    """Alignment with intervals and controls, from judge probabilities (N, C), prompt labels
    (N, C) (0/1/NaN) and each image's noise group (N,) (images of a group share their
    starting noise and differ only by prompt; `jaxmed.sample` ``paired_noise``).

    Returns, for the pooled AUROC (`alignment_from_probs`'s) and the within-seed AUROC
    (pairs inside a group only; see `_PairedAlignment`):

    * ``value`` and ``interval``: the macro AUROC and its percentile bootstrap interval
      over groups (seeds), resampled whole, ``n_boot`` times;
    * ``per_condition``: the per-condition values;
    * ``shuffled``: the negative control: the same images with the prompt labels permuted
      inside each group (one draw), with its own interval -- it should contain 0.5;
    * ``null``: ``n_perm`` such permutations: their mean, central ``level`` range, and the
      one-sided permutation p-value of ``value`` (H0: the prompt does not move the judge).

    Which to read for a verdict: the permutation p-value keeps its level (simulated null,
    six prompts per seed, 200 data sets: 6.5% rejections at 10 seeds, 3.5% at 30); the
    percentile interval is a little narrow with few seeds (it held 0.5 in 89.5% of them at
    10 seeds, 92.5% at 30; 2026-12-05), so it gives the effect's size, not the test.

    With every image in its own group (unpaired noise) ``within_seed`` is None, the
    pooled interval is over images and the prompts are shuffled across all images.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(prompt_labels, np.float64)
    g = np.asarray(groups).reshape(-1)
    if p.shape != y.shape or p.ndim != 2 or p.shape[1] != len(conditions) or \
            g.size != p.shape[0]:
        raise ValueError(f"probs {p.shape}, prompt labels {y.shape} and groups {g.shape} "
                         f"must be (N, {len(conditions)}), (N, {len(conditions)}) and (N,)")
    base = _PairedAlignment(p, y, g)
    rng = np.random.default_rng(seed)
    # prompts are shuffled inside each seed; with no seed shared (unpaired), across all
    strata = base.g_index if base.pi.size else np.zeros_like(base.g_index)
    shuffled = base.with_labels(_shuffle_within_groups(y, strata, rng))
    null_labels = [_shuffle_within_groups(y, strata, rng) for _ in range(n_perm)]
    kw = dict(b=n_boot, level=level, seed=seed)

    def pooled_of(a):
        return lambda w: np.array([a.pooled(row)[0] for row in w])

    def summary(a, value, per, fn) -> dict:
        return {"value": value, "interval": _bounds(U.bootstrap_groups(
            fn, base.n_groups, value=value, **kw)),
            "per_condition": {c: float(v) for c, v in zip(conditions, per)}}

    out = {"n_images": int(p.shape[0]), "n_groups": base.n_groups, "level": level,
           "n_boot": n_boot, "n_perm": n_perm}
    # pooled
    v, per = base.pooled()
    out["pooled"] = summary(base, v, per, pooled_of(base))
    sv, sper = shuffled.pooled()
    out["pooled"]["shuffled"] = summary(shuffled, sv, sper, pooled_of(shuffled))
    null = np.array([base.with_labels(lab).pooled()[0] for lab in null_labels])
    out["pooled"]["null"] = _null_summary(null, v, level)
    # within seed
    wins, pairs = base.group_counts()
    if pairs.sum() == 0:
        out["within_seed"] = None
        return out
    v, per = (x[0] for x in _PairedAlignment.within(wins, pairs))
    out["within_seed"] = summary(base, float(v), per,
                                 lambda w: _PairedAlignment.within(wins, pairs, w)[0])
    sw, sp = shuffled.group_counts()
    sv, sper = (x[0] for x in _PairedAlignment.within(sw, sp))
    out["within_seed"]["shuffled"] = summary(
        shuffled, float(sv), sper, lambda w: _PairedAlignment.within(sw, sp, w)[0])
    null = np.array([_PairedAlignment.within(*base.with_labels(lab).group_counts())[0][0]
                     for lab in null_labels])
    out["within_seed"]["null"] = _null_summary(null, float(v), level)
    return out


def _null_summary(null: np.ndarray, value: float, level: float) -> dict:
    null = null[np.isfinite(null)]
    if null.size == 0 or not np.isfinite(value):
        return {"mean": float("nan"), "range": [float("nan")] * 2, "p_value": float("nan")}
    a = (1.0 - level) / 2.0
    return {"mean": float(null.mean()), "range": [float(x) for x in np.quantile(null, [a, 1 - a])],
            "p_value": float((1 + np.sum(null >= value)) / (1 + null.size))}


def paired_alignment_row(paired: dict | None) -> dict:
    """The flat columns a results row carries from `paired_alignment`'s output."""
    if not paired:
        return {}
    pooled, within = paired["pooled"], paired.get("within_seed")
    row = {"align_auroc_ci": pooled["interval"],
           "align_shuffled_auroc": pooled["shuffled"]["value"],
           "align_shuffled_auroc_ci": pooled["shuffled"]["interval"],
           "align_p_value": pooled["null"]["p_value"], "align_groups": paired["n_groups"]}
    if within:
        row.update(align_paired_auroc=within["value"], align_paired_auroc_ci=within["interval"],
                   align_paired_shuffled_auroc=within["shuffled"]["value"],
                   align_paired_shuffled_auroc_ci=within["shuffled"]["interval"],
                   align_paired_p_value=within["null"]["p_value"])
    return row


def _bounds(iv: U.Interval) -> list[float]:
    return [iv.lo, iv.hi]


def within_seed_counts(probs: np.ndarray, prompt_labels: np.ndarray, groups
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(wins, pairs), each (groups, conditions): per noise group, the within-group
    (prompted, not prompted) image pairs of each condition and how many the prompted image
    won on the judge's probability (ties 1/2). The within-seed AUROC is
    ``within_seed_auroc(wins, pairs)``."""
    return _PairedAlignment(probs, prompt_labels, groups).group_counts()


def within_seed_auroc(wins: np.ndarray, pairs: np.ndarray, weights=None) -> np.ndarray:
    """Macro within-seed AUROC of (wins, pairs) counts, one value per row of the group
    ``weights`` (B, G) (unit weights: one value)."""
    return _PairedAlignment.within(wins, pairs, weights)[0]


def counts_difference(wins_a: np.ndarray, wins_b: np.ndarray, pairs: np.ndarray, *,
                      n_boot: int = 1000, n_perm: int = 2000, level: float = 0.95,
                      seed: int = 0) -> dict:
    """Within-seed macro AUROC of A minus B from their group counts on the same prompts and
    noise (one ``pairs``): the difference, its percentile bootstrap interval over groups
    (both models resampled with the same groups) and the paired sign-flip permutation
    p-values (`uncertainty.sign_flip_p_value`): the statistic is
    ``mean_c sum_g (wins_a - wins_b)[g, c] / sum_g pairs[g, c]``, a sum of per-group terms,
    and under H0 (A and B align equally) each group's term is as likely negated.
    ``p_value``: one-sided, A above B; ``p_value_below``: A below B."""
    wa, wb, pr = (np.asarray(x, np.float64) for x in (wins_a, wins_b, pairs))
    diff = float(within_seed_auroc(wa, pr)[0] - within_seed_auroc(wb, pr)[0])
    iv = U.bootstrap_groups(lambda w: within_seed_auroc(wa, pr, w) - within_seed_auroc(
        wb, pr, w), pr.shape[0], b=n_boot, seed=seed, level=level, value=diff)
    tot = pr.sum(0)
    ok = tot > 0
    contrib = ((wa - wb)[:, ok] / tot[ok]).sum(1) / max(int(ok.sum()), 1)
    above, below = U.sign_flip_p_value(contrib, diff, n_perm=n_perm, seed=seed)
    return {"difference": diff, "interval": _bounds(iv), "p_value": above,
            "p_value_below": below, "n_perm": n_perm}


def paired_difference(probs_a: np.ndarray, probs_b: np.ndarray, prompt_labels: np.ndarray,
                      groups, conditions: Sequence[str], *, n_boot: int = 1000,
                      n_perm: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Model A's alignment minus model B's on the same prompts and noise (row i of both
    is the same prompt from the same noise, as the study synthesises every model): the
    pooled and within-seed macro AUROC differences with percentile bootstrap intervals,
    both models resampled with the same seeds (a paired interval); the within-seed
    difference also carries the paired sign-flip permutation p-values (`counts_difference`),
    the test a verdict reads (`jaxmed.eval.findings` "finding 2")."""
    pa, pb = np.asarray(probs_a, np.float64), np.asarray(probs_b, np.float64)
    if pa.shape != pb.shape:
        raise ValueError(f"the two models' probabilities differ in shape: {pa.shape} vs "
                         f"{pb.shape}; score the same synthesis plan with both")
    a, b = _PairedAlignment(pa, prompt_labels, groups), _PairedAlignment(pb, prompt_labels,
                                                                         groups)
    out = {"n_groups": a.n_groups, "level": level}
    diff = a.pooled()[0] - b.pooled()[0]
    out["pooled"] = {"difference": diff, "interval": _bounds(U.bootstrap_groups(
        lambda w: np.array([a.pooled(r)[0] - b.pooled(r)[0] for r in w]), a.n_groups,
        b=n_boot, level=level, seed=seed, value=diff))}
    wa, wb = a.group_counts(), b.group_counts()
    if wa[1].sum() == 0:
        out["within_seed"] = None
        return out
    out["within_seed"] = counts_difference(wa[0], wb[0], wa[1], n_boot=n_boot, n_perm=n_perm,
                                           level=level, seed=seed)
    return out


SCORES_FILE = "judge_scores.npz"


def save_judge_scores(out_dir: str, probs: np.ndarray, prompt_labels: np.ndarray, groups,
                      judge_labels: Sequence[str], label_columns: Sequence[str]) -> str:
    """The per-image inputs of the alignment test, so that two models' alignment can be
    compared pairwise later (`paired_difference_of`)."""
    path = os.path.join(out_dir, SCORES_FILE)
    with files.atomic_path(path) as tmp:
        np.savez(tmp, probs=np.asarray(probs, np.float32),
                 prompt_labels=np.asarray(prompt_labels, np.float32),
                 groups=np.asarray(groups, np.int64), judge_labels=np.asarray(judge_labels),
                 label_columns=np.asarray(label_columns))
    return path


def load_judge_scores(eval_dir: str, conditions: Sequence[str]) -> dict:
    """One evaluation's saved judge scores (`save_judge_scores`) restricted to the
    ``conditions`` the judge knows: {probs, prompt_labels (N, C), groups, conditions}."""
    with np.load(os.path.join(eval_dir, SCORES_FILE)) as z:
        d = {k: z[k] for k in z.files}
    idx, missing = _judge_columns(tuple(str(x) for x in d["judge_labels"]), conditions)
    scored = [c for c in conditions if c not in missing]
    cols = [[str(x) for x in d["label_columns"]].index(c) for c in scored]
    return {"probs": d["probs"][:, idx].astype(np.float64),
            "prompt_labels": d["prompt_labels"][:, cols].astype(np.float64),
            "groups": d["groups"], "conditions": scored}


def same_plan(a: dict, b: dict, names: tuple[str, str]) -> None:
    """Two `load_judge_scores` come from the same synthesis plan, or a clear error."""
    for k in ("prompt_labels", "groups"):
        if not np.array_equal(a[k], b[k], equal_nan=k == "prompt_labels"):
            raise ValueError(f"{names[0]} and {names[1]} scored different synthesis plans "
                             f"({k} differ): a paired comparison needs the same prompts and "
                             "noise")


def paired_difference_of(eval_dir_a: str, eval_dir_b: str, conditions: Sequence[str],
                         **kw) -> dict:
    """`paired_difference` of two evaluation folders (``jaxmed.evaluate --out``) that scored
    the same synthesis plan (same prompts, order and noise ids)."""
    a, b = (load_judge_scores(f, conditions) for f in (eval_dir_a, eval_dir_b))
    same_plan(a, b, (eval_dir_a, eval_dir_b))
    return paired_difference(a["probs"], b["probs"], a["prompt_labels"], a["groups"],
                             a["conditions"], **kw)
