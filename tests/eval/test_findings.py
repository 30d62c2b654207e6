"""Finding 2's verdict rule (`jaxmed.eval.findings.paired_verdict`): on simulated judge
scores of two models drawn from the same noise seeds, a real alignment gain is REPRODUCED
and equal alignment is REPRODUCED at about the one-sided 2.5% the rule allows; the
finding's per-strategy numbers are those of `alignment.paired_difference_of` on saved
evaluations; the sign-flip permutation test is exact at small numbers of seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxmed.eval import alignment as A
from jaxmed.eval import findings as F
from jaxmed.eval import uncertainty as U

C = 6
CONDS = [f"c{k}" for k in range(C)]


def models(rng, n_seeds, effects, seed_sd=2.0, shared=0.7):
    """Judge probabilities of several models on one paired plan: n_seeds groups of six
    images, image k of a group prompted with condition k; each model's logits = the seed's
    shift (the shared noise) + image noise partly shared across models (same starting
    noise) + effect x prompt."""
    y = np.tile(np.eye(C), (n_seeds, 1))
    g = np.repeat(np.arange(n_seeds), C)
    z = rng.normal(size=(n_seeds, 1)).repeat(C, 0) * seed_sd
    common = rng.normal(size=y.shape)
    out = {}
    for name, e in effects.items():
        own = rng.normal(size=y.shape)
        out[name] = 1 / (1 + np.exp(-(z + shared * common + math.sqrt(1 - shared ** 2) * own
                                      + e * y)))
    return out, y, g


def test_sign_flip_p_value_is_exact_for_few_groups():
    # all four groups favour A: only the identity reaches the observed sum -> 1/16
    above, below = U.sign_flip_p_value([1.0, 2.0, 0.5, 0.25], n_perm=2000)
    assert above == 1 / 16 and below == 1.0
    # a zero statistic: half the sign patterns (and the ties) lie on each side
    above, below = U.sign_flip_p_value([1.0, -1.0], n_perm=2000)
    assert above == below == 0.75
    # beyond 2^G > n_perm: random signs, (1 + count) / (1 + n_perm), same sign symmetry
    c = np.random.default_rng(0).normal(size=40) + 0.5
    above, below = U.sign_flip_p_value(c, n_perm=999, seed=1)
    assert above == 1 / 1000 and below == 1.0


@pytest.mark.parametrize("n_seeds", [10, 30])
def test_finding2_rule_reproduces_a_real_gain_and_keeps_its_level_under_the_null(n_seeds):
    """200 null data sets (base and tuned align equally, effect 0.5 each): REPRODUCED at
    most 5% (the rule's one-sided level is 2.5%; simulated 1.7% at 10 seeds over 2,000
    sets), and so NOT REPRODUCED; a real gain (1.2 vs 0.3) is REPRODUCED in >= 90%."""
    rng = np.random.default_rng(n_seeds)
    null = {F.REPRODUCED: 0, F.NOT_REPRODUCED: 0, F.INCONCLUSIVE: 0}
    for r in range(200):
        p, y, g = models(rng, n_seeds, {"base": 0.5, "lora": 0.5})
        null[F.alignment_gain_paired(p, y, g, "base", ["lora"], b=200, n_perm=500,
                                     seed=r)["verdict"]] += 1
    assert null[F.REPRODUCED] <= 10 and null[F.NOT_REPRODUCED] <= 10, null
    hits = 0
    for r in range(20):
        p, y, g = models(rng, n_seeds, {"base": 0.3, "lora": 1.2, "unet": 1.2})
        res = F.alignment_gain_paired(p, y, g, "base", ["lora", "unet"], b=200, n_perm=500,
                                      seed=r)
        hits += res["verdict"] == F.REPRODUCED
        assert res["effect"].lo <= res["effect"].value <= res["effect"].hi
        # the mean of the per-strategy differences is the finding's effect
        per = np.mean([iv.value for iv in res["per_model"].values()])
        assert abs(per - res["effect"].value) < 1e-12
    assert hits >= 18, hits


def test_paired_verdict_needs_interval_and_permutation_test_to_agree():
    iv = U.Interval(0.05, 0.01, 0.09)
    assert F.paired_verdict(iv, 0.01, 0.99) == F.REPRODUCED
    assert F.paired_verdict(iv, 0.04, 0.96) == F.INCONCLUSIVE  # the test does not reject
    assert F.paired_verdict(iv, math.nan, math.nan) == F.REPRODUCED  # interval alone
    neg = U.Interval(-0.05, -0.09, -0.01)
    assert F.paired_verdict(neg, 0.99, 0.01) == F.NOT_REPRODUCED
    assert F.paired_verdict(U.Interval(0.05, -0.01, 0.09), 0.001, 1.0) == F.INCONCLUSIVE


def test_finding2_equals_paired_difference_of_saved_evaluations(tmp_path):
    rng = np.random.default_rng(7)
    p, y, g = models(rng, 8, {"base": 0.2, "lora": 1.0, "text": 0.4})
    label_columns = ["x", *CONDS]  # the plan's label columns: one the judge does not know
    judge_labels = [*CONDS[::-1], "z"]  # the judge's own order
    dirs = {}
    for m, pm in p.items():
        dirs[m] = str(tmp_path / m)
        (tmp_path / m).mkdir()
        judge_probs = np.concatenate([pm[:, ::-1], rng.random((len(pm), 1))], 1)
        plan = np.concatenate([np.zeros((len(pm), 1)), y], 1)
        A.save_judge_scores(dirs[m], judge_probs, plan, g, judge_labels, label_columns)
    res = F.alignment_gain_paired(p, y, g, "base", ["lora", "text"], b=300, n_perm=500)
    for m in ("lora", "text"):
        d = A.paired_difference_of(dirs[m], dirs["base"], CONDS, n_boot=300,
                                   n_perm=500)["within_seed"]
        iv = res["per_model"][m]
        assert (iv.value, iv.lo, iv.hi) == (d["difference"], *d["interval"])
        assert res["per_model_p"][m] == d["p_value"]
    text = F.three_findings(fid_name="FID", ranking=None, alignment=res, alignment_why="",
                            downstream=None, scarcest_label="1%", chosen="", chosen_how="",
                            chance_p={"base": 0.4, "lora": 0.002})[1]
    assert text["verdict"] == res["verdict"] and "within-seed" in text["claim"]
    assert "p = " in text["evidence"] and "lora p = 0.002" in text["evidence"]
    # a different plan (other noise ids) is refused
    other = str(tmp_path / "other")
    (tmp_path / "other").mkdir()
    A.save_judge_scores(other, np.zeros((len(y), C + 1)), np.zeros((len(y), C + 1)),
                        g[::-1], judge_labels, label_columns)
    with pytest.raises(ValueError, match="different synthesis plans"):
        A.paired_difference_of(other, dirs["base"], CONDS)


def test_unpaired_noise_falls_back_to_the_pooled_interval():
    rng = np.random.default_rng(8)
    p, y, _ = models(rng, 10, {"base": 0.0, "lora": 2.0})
    res = F.alignment_gain_paired(p, y, np.arange(len(y)), "base", ["lora"], b=100)
    assert "statistic" not in res and res["verdict"] == F.REPRODUCED
    assert "interval only" in F.three_findings(
        fid_name="FID", ranking=None, alignment=res, alignment_why="", downstream=None,
        scarcest_label="1%", chosen="", chosen_how="")[1]["evidence"]


def test_downstream_bands_over_seeds_and_repeats(tmp_path):
    """Finding 3's plot: each (mode, fraction) gets the mean over its runs with a t
    interval, and the plot draws it as a band (pixels differ from the plot without)."""
    from scipy import stats

    from jaxmed.eval import report, tables

    rng = np.random.default_rng(9)
    rows = [{"mode": "real", "fraction": f, "repeat": r, "seed": s,
             "macro_auroc": 0.6 + 0.2 * f + 0.02 * rng.normal()}
            for f in (0.01, 0.1, 1.0) for r in range(3) for s in range(2)]
    rows.append({"mode": "synthetic", "fraction": None, "macro_auroc": 0.55})
    tab = tables.regime_intervals(rows)
    vals = [r["macro_auroc"] for r in rows if r["fraction"] == 0.1]
    half = stats.t.ppf(0.975, 5) * np.std(vals, ddof=1) / math.sqrt(6)
    iv = tab[("real", 0.1)]
    assert abs(iv.value - np.mean(vals)) < 1e-12 and abs(iv.hi - iv.value - half) < 1e-12
    assert math.isnan(tab[("synthetic", None)].lo)  # one run: no interval
    pts = [(f, *tables.band(tab, ("real", f))) for f in (0.01, 0.1, 1.0)]
    with_band = report.plot_auroc_vs_fraction(pts, {"lora": pts[:1]}, str(tmp_path / "a.png"),
                                              synthetic_only={"lora": (0.55, 0.5, 0.6)})
    bare = report.plot_auroc_vs_fraction([p[:2] for p in pts], {"lora": [pts[0][:2]]},
                                         str(tmp_path / "b.png"),
                                         synthetic_only={"lora": 0.55})
    from PIL import Image

    a, b = (np.asarray(Image.open(p).convert("L"), np.float64) for p in (with_band, bare))
    assert a.shape == b.shape and np.abs(a - b).mean() > 0.1
