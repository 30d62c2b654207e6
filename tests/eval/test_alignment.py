"""Alignment as a paired test (`jaxmed.eval.alignment.paired_alignment`): the weighted
AUROC a bootstrap resample uses equals the AUROC of the resample built out; a real prompt
effect is detected and its shuffled-prompt control is not; the interval over seeds covers
the true value at about the nominal rate under the null."""

from __future__ import annotations

import numpy as np

from jaxmed.eval import alignment as A
from jaxmed.eval import metrics as M
from jaxmed.eval import uncertainty as U

C = 6
CONDS = [f"c{k}" for k in range(C)]


def paired_set(rng, n_seeds, effect, seed_sd=2.0):
    """n_seeds groups of six images, image k of a group prompted with condition k; the
    judge's logits = the seed's own shift (shared noise) + image noise + effect x prompt."""
    y = np.tile(np.eye(C), (n_seeds, 1))
    g = np.repeat(np.arange(n_seeds), C)
    z = rng.normal(size=(n_seeds, 1)).repeat(C, 0) * seed_sd
    z = z + rng.normal(size=(n_seeds * C, C)) + effect * y
    return 1 / (1 + np.exp(-z)), y, g


def test_weighted_auroc_is_the_auroc_of_the_resample():
    rng = np.random.default_rng(0)
    p = np.round(rng.random(40), 1)  # ties on purpose
    y = rng.random(40) < 0.4
    w = rng.integers(0, 4, 40).astype(float)
    inv, nu = A._ranks_by_value(p)
    got = A._weighted_auroc(inv, nu, y, ~y, w)
    rep = np.repeat(np.arange(40), w.astype(int))
    want = M.auroc_per_label(y[rep, None].astype(np.float32), p[rep, None])[0]
    assert abs(got - want) < 1e-12


def test_shuffle_within_groups_permutes_inside_each_group_only():
    rng = np.random.default_rng(1)
    g = rng.integers(0, 5, 30)
    y = np.arange(30.0)[:, None]
    s = A._shuffle_within_groups(y, g, rng)
    assert not np.array_equal(s, y)
    for k in range(5):
        assert sorted(s[g == k, 0]) == sorted(y[g == k, 0])


def test_effect_detected_and_shuffled_control_at_chance():
    rng = np.random.default_rng(2)
    p, y, g = paired_set(rng, 20, effect=1.5)
    r = A.paired_alignment(p, y, g, CONDS, n_boot=300, n_perm=100)
    # the pooled value is alignment_from_probs's AUROC
    assert abs(r["pooled"]["value"] - A.alignment_from_probs(p, y, CONDS)["all"]["auroc"]) \
        < 1e-12
    for kind in ("pooled", "within_seed"):
        lo, hi = r[kind]["interval"]
        assert 0.5 < lo <= r[kind]["value"] <= hi, r[kind]
        assert r[kind]["null"]["p_value"] <= 0.02
        slo, shi = r[kind]["shuffled"]["interval"]
        assert slo < 0.5 < shi, r[kind]["shuffled"]
    # the seed's shared shift blurs the pooled AUROC; the paired comparison removes it
    assert r["within_seed"]["value"] > r["pooled"]["value"]
    # unpaired noise: every image its own group, no within-seed pairs
    r1 = A.paired_alignment(p, y, np.arange(len(p)), CONDS, n_boot=50, n_perm=10)
    assert r1["within_seed"] is None and r1["n_groups"] == len(p)
    assert abs(r1["pooled"]["value"] - r["pooled"]["value"]) < 1e-12
    slo, shi = r1["pooled"]["shuffled"]["interval"]  # shuffled across images instead
    assert slo < 0.5 < shi and r1["pooled"]["shuffled"]["value"] < r1["pooled"]["value"]


def test_interval_over_seeds_covers_chance_under_the_null():
    """150 null data sets of 30 seeds: the within-seed interval holds 0.5 at about the
    nominal 95% (percentile bootstrap, slightly narrow at small N), and the permutation
    test of the same statistic rejects at about its 5% level."""
    rng = np.random.default_rng(3)
    cover = reject = 0
    reps = 150
    for r in range(reps):
        p, y, g = paired_set(rng, 30, effect=0.0)
        pa = A._PairedAlignment(p, y, g)
        wins, pairs = pa.group_counts()
        iv = U.bootstrap_groups(
            lambda w, a=wins, b=pairs: A._PairedAlignment.within(a, b, w)[0], 30, b=200,
            seed=r)
        lo, hi = iv.lo, iv.hi
        cover += lo <= 0.5 <= hi
        value = A._PairedAlignment.within(wins, pairs)[0][0]
        null = [A._PairedAlignment.within(*pa.with_labels(
            A._shuffle_within_groups(y, pa.g_index, rng)).group_counts())[0][0]
            for _ in range(30)]
        reject += A._null_summary(np.asarray(null), value, 0.95)["p_value"] <= 0.05
    assert 0.88 <= cover / reps <= 0.99, cover / reps
    assert reject / reps <= 0.10, reject / reps


def test_paired_difference_between_two_models_on_the_same_noise():
    rng = np.random.default_rng(4)
    p0, y, g = paired_set(rng, 25, effect=0.0)
    logit0 = np.log(p0 / (1 - p0))
    p1 = 1 / (1 + np.exp(-(logit0 + 1.5 * y)))  # the same images, plus a prompt effect
    d = A.paired_difference(p1, p0, y, g, CONDS, n_boot=300)
    single = [A.paired_alignment(p, y, g, CONDS, n_boot=10, n_perm=2) for p in (p1, p0)]
    for kind in ("pooled", "within_seed"):
        want = single[0][kind]["value"] - single[1][kind]["value"]
        assert abs(d[kind]["difference"] - want) < 1e-12
        assert 0 < d[kind]["interval"][0] <= d[kind]["difference"] <= d[kind]["interval"][1]
    same = A.paired_difference(p0, p0, y, g, CONDS, n_boot=50)
    assert same["within_seed"]["interval"] == [0.0, 0.0]


def _reference_interval_over_groups(stat_fn, n_groups, n_boot, seed, level=0.95):
    """The alignment module's own group bootstrap before it moved into
    `jaxmed.eval.uncertainty` (kept here as the reference its numbers must match)."""
    rng = np.random.default_rng(seed)
    vals = []
    for start in range(0, n_boot, 100):
        m = min(100, n_boot - start)
        draws = rng.integers(0, n_groups, size=(m, n_groups))
        weights = np.stack([np.bincount(d, minlength=n_groups) for d in draws]).astype(
            np.float64)
        vals.append(np.asarray(stat_fn(weights), np.float64).reshape(-1))
    vals = np.concatenate(vals)
    vals = vals[np.isfinite(vals)]
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(vals, [a, 1.0 - a])
    return float(lo), float(hi)


def test_group_bootstrap_matches_the_former_alignment_helper():
    """One bootstrap implementation: `uncertainty.bootstrap_groups` draws the same group
    resamples (chunks of 100 included) and gives bit-identical bounds."""
    rng = np.random.default_rng(5)
    p, y, g = paired_set(rng, 12, effect=0.8)
    wins, pairs = A.within_seed_counts(p, y, g)

    def fn(w):
        return A.within_seed_auroc(wins, pairs, w)

    for n_boot, seed in ((250, 0), (100, 3), (37, 9)):
        iv = U.bootstrap_groups(fn, 12, b=n_boot, seed=seed)
        assert (iv.lo, iv.hi) == _reference_interval_over_groups(fn, 12, n_boot, seed)
        assert iv.value == fn(np.ones((1, 12)))[0]
    # the row bootstrap draws from the same generator in the same order
    x = rng.normal(size=30)
    r2 = np.random.default_rng(4)
    want = [np.mean(x[r2.integers(0, 30, 30)]) for _ in range(50)]
    assert (U.bootstrap(np.mean, x, b=50, seed=4).lo, U.bootstrap(np.mean, x, b=50, seed=4).hi
            ) == U.percentile_interval(want)
