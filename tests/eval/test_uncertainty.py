"""KID against clean-fid's formula, coverage of the intervals, and the verdict logic.

Everything here is numpy on small simulated features (no models)."""

import math
import warnings

import numpy as np
import pytest

from jaxmed.eval import findings
from jaxmed.eval import uncertainty as U
from jaxmed.eval.fid import RankDeficientWarning, fid_from_features


def _clean_fid_kernel_distance(feats1, feats2, subsets):
    """clean-fid's ``kernel_distance`` written out with explicit loops over pairs, on given
    subsets (``subsets``: [(rows of feats2, rows of feats1)], as clean-fid draws them)."""
    n = feats1.shape[1]
    t = 0.0
    m = len(subsets[0][0])
    for ix, iy in subsets:
        x, y = feats2[ix], feats1[iy]
        a = b = 0.0
        for i in range(m):
            for j in range(m):
                kb = (float(np.dot(x[i], y[j])) / n + 1) ** 3
                b += kb
                if i != j:
                    a += (float(np.dot(x[i], x[j])) / n + 1) ** 3
                    a += (float(np.dot(y[i], y[j])) / n + 1) ** 3
        t += a / (m - 1) - b * 2 / m
    return t / len(subsets) / m


def test_kid_matches_clean_fid_formula():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 16)) + 0.2
    gen = rng.normal(size=(25, 16)) * 1.3
    # the subsets kid() draws: real rows first, then generated rows, from one Generator
    draw = np.random.default_rng(7)
    subsets = []
    for _ in range(5):
        iy = draw.choice(40, 20, replace=False)
        ix = draw.choice(25, 20, replace=False)
        subsets.append((ix, iy))
    mean, sd = U.kid(real, gen, subsets=5, subset_size=20, seed=7)
    ref = _clean_fid_kernel_distance(real, gen, subsets)
    assert abs(mean - ref) < 1e-6 * max(1.0, abs(ref))
    per = [_clean_fid_kernel_distance(real, gen, [s]) for s in subsets]
    assert abs(sd - np.std(per)) < 1e-6
    # one subset holding every image: KID is the full-sample statistic, order-free
    full, _ = U.kid(real[:25], gen, subsets=1, subset_size=1000, seed=3)
    assert abs(full - _clean_fid_kernel_distance(real[:25], gen, [(np.arange(25),) * 2])) < 1e-6


def test_replicates_at_the_identity_equal_the_point_estimates():
    rng = np.random.default_rng(1)
    real, gen = rng.normal(size=(30, 40)), rng.normal(size=(20, 40)) + 0.5
    ir, ig = np.arange(30)[None], np.arange(20)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)
        ref = fid_from_features(real, gen, method="sqrtm")
    assert abs(U.fid_replicates(real, gen, ir, ig)[0] - ref) < 1e-6 * ref
    kxx, kyy, kxy = U.poly_kernel(gen, gen), U.poly_kernel(real, real), U.poly_kernel(gen, real)
    assert abs(U.kid_replicates(real, gen, ir, ig)[0] - U.mmd2_unbiased(kxx, kyy, kxy)) < 1e-9
    from jaxmed.eval.vendi import vendi_score
    assert abs(U.vendi_value(gen) - vendi_score(gen, q=1)) < 1e-9


def test_intervals_cover_the_expected_value_at_about_the_nominal_rate():
    """100 simulated (real, generated) pairs, d = 32, 60 real vs 30 generated; the target is
    each statistic's mean at these N (over 200 fresh draws). Stated band: coverage of the
    95% intervals in [0.85, 1.0] (a binomial SD at 0.95 over 100 cases is 0.022; the
    half-sample intervals are slightly conservative for FID and KID)."""
    d, nr, ng, sims = 32, 60, 30, 100
    rng = np.random.default_rng(2)
    a = rng.normal(size=(d, d)) / math.sqrt(d)

    def draw():
        return rng.normal(size=(nr, d)), rng.normal(size=(ng, d)) @ a * 1.3 + 0.2

    def point(xr, xg):
        return {"fid": U.fid_replicates(xr, xg, np.arange(nr)[None], np.arange(ng)[None])[0],
                "kid": U.kid_replicates(xr, xg, np.arange(nr)[None], np.arange(ng)[None])[0],
                "vendi": U.vendi_value(xg)}

    truth = {k: np.mean(v) for k, v in _stack([point(*draw()) for _ in range(200)]).items()}
    hits = dict.fromkeys(truth, 0)
    for s in range(sims):
        xr, xg = draw()
        hs = U.HalfSamples(nr, ng, b=100, seed=s)
        p = point(xr, xg)
        ivs = {"fid": U.centred_interval(U.fid_replicates(xr, xg, hs.real, hs.gen), p["fid"]),
               "kid": U.centred_interval(U.kid_replicates(xr, xg, hs.real, hs.gen), p["kid"]),
               "vendi": U.centred_interval(U.vendi_replicates(xg, hs.gen), p["vendi"],
                                           log=True)}
        for k, iv in ivs.items():
            hits[k] += iv.lo <= truth[k] <= iv.hi
    cover = {k: v / sims for k, v in hits.items()}
    assert all(0.85 <= c <= 1.0 for c in cover.values()), cover


def _stack(points):
    return {k: np.array([p[k] for p in points]) for k in points[0]}


def test_metric_intervals_contain_their_values_and_handle_tiny_sets():
    rng = np.random.default_rng(3)
    out = U.metric_intervals(rng.normal(size=(50, 8)), rng.normal(size=(20, 8)) + 1, b=50)
    for k in ("fid", "kid", "vendi"):
        assert out[k].lo <= out[k].value <= out[k].hi, (k, out[k])
    tiny = U.metric_intervals(rng.normal(size=(3, 8)), rng.normal(size=(3, 8)), b=20)
    assert math.isnan(tiny["fid"].lo) and math.isfinite(tiny["fid"].value)
    assert U.fmt_interval(out["fid"]).count("[") == 1
    assert U.fmt_interval(tiny["fid"]).count("[") == 0


def test_verdicts_follow_the_interval():
    iv = U.Interval
    assert findings.verdict(iv(0.1, 0.02, 0.2)) == findings.REPRODUCED
    assert findings.verdict(iv(-0.1, -0.2, -0.02)) == findings.NOT_REPRODUCED
    assert findings.verdict(iv(0.1, -0.02, 0.2)) == findings.INCONCLUSIVE
    assert findings.verdict(iv(0.1, math.nan, math.nan)) == findings.INCONCLUSIVE
    assert findings.verdict(None) == findings.NOT_TESTED


@pytest.mark.parametrize("effect", [0.0, 0.05])
def test_paired_difference_verdicts_on_simulated_runs(effect):
    """5 seeds x 2 repeats of (real + synthetic, real only) AUROCs with a shared per-seed
    offset: a real effect of +0.05 is REPRODUCED nearly always; under the null,
    REPRODUCED comes out at about the 2.5% a two-sided 95% interval allows (stated band:
    <= 6% of 400 cases) and NOT REPRODUCED at about the same rate."""
    rng = np.random.default_rng(4)
    counts = {findings.REPRODUCED: 0, findings.NOT_REPRODUCED: 0, findings.INCONCLUSIVE: 0}
    for _ in range(400):
        base = 0.7 + 0.03 * rng.normal(size=10)
        real = base + 0.01 * rng.normal(size=10)
        mix = base + effect + 0.01 * rng.normal(size=10)
        counts[findings.verdict(U.paired_difference(mix, real))] += 1
    if effect:
        assert counts[findings.REPRODUCED] >= 390, counts
    else:
        assert counts[findings.REPRODUCED] <= 24, counts
        assert counts[findings.NOT_REPRODUCED] <= 24, counts


def test_family_ranking_verdicts():
    """Finding 1 on simulated features: the UNet-training models' generated features match
    the real distribution, the adapters' are shifted, the frozen-UNet models' shifted more
    -> REPRODUCED; every model alike -> not REPRODUCED (the family contrasts are null)."""
    rng = np.random.default_rng(5)
    d, nr, ng = 16, 80, 40
    real = rng.normal(size=(nr, d))
    z = rng.normal(size=(ng, d))  # shared starting noise: image i of each model is a pair

    def model(shift, jitter=0.05):
        return z + shift + jitter * rng.normal(size=(ng, d))

    fam = {"unet": "unet", "unet+text": "unet", "lora": "adapter", "dora": "adapter",
           "text": "frozen", "vae": "frozen"}
    shifts = {"unet": 0.0, "unet+text": 0.0, "lora": 0.4, "dora": 0.4, "text": 0.8, "vae": 0.8}
    feats = {m: model(shifts[m]) for m in fam}
    f = findings.family_ranking(real, feats, fam, b=200, seed=0)
    assert f["verdict"] == findings.REPRODUCED, f
    null = {m: model(0.3) for m in fam}
    f0 = findings.family_ranking(real, null, fam, b=200, seed=0)
    assert f0["verdict"] != findings.REPRODUCED, f0


def test_metric_intervals_of_an_empty_real_set_give_vendi_only():
    rng = np.random.default_rng(6)
    out = U.metric_intervals(np.zeros((0, 8)), rng.normal(size=(12, 8)), b=20)
    assert set(out) == {"vendi"} and out["vendi"].lo <= out["vendi"].value <= out["vendi"].hi


def test_generic_bootstrap_and_macro_auroc_api():
    """The API for other metrics (e.g. alignment): the percentile bootstrap of a mean has
    the normal-theory width (within 15%), and macro_auroc_replicates at the identity equals
    the evaluator's alignment AUROC (`alignment_from_probs`)."""
    from jaxmed.eval.alignment import alignment_from_probs

    rng = np.random.default_rng(7)
    x = rng.normal(size=400)
    iv = U.bootstrap(np.mean, x, b=400, seed=1)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert abs((iv.hi - iv.lo) / (2 * half) - 1) < 0.15 and iv.lo < iv.value < iv.hi
    y = (rng.random((40, 3)) < 0.4).astype(float)
    p = np.clip(y * 0.3 + rng.random((40, 3)) * 0.7, 0, 1)
    y[0, 1] = np.nan  # a blank prompt label
    p[1, 0] = p[2, 0]  # a tie
    ref = alignment_from_probs(p, y, ("a", "b", "c"))["all"]["auroc"]
    got = U.macro_auroc_replicates(p, y, np.arange(40)[None])[0]
    assert abs(got - ref) < 1e-9
