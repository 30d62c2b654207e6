"""The study's three findings, tested with intervals (docs/STUDY.md "The study").

Each finding is an effect oriented so that a positive value is what the study claims, with
a 95% interval (`jaxmed.eval.uncertainty`), and a verdict read off the interval only:

* REPRODUCED: the interval lies above zero (no effect is excluded, in the claimed
  direction);
* NOT REPRODUCED: it lies below zero (the opposite effect is shown);
* INCONCLUSIVE: it contains zero, or no interval could be formed (e.g. one repeat);
* NOT TESTED: what the claim needs is missing.

The three claims, as the study states them:

1. Training the UNet gives the best image quality, LoRA and DoRA close behind: the
   strategy families are ranked by their mean FID (the study's 11 strategies only):
   full UNet training (unet, unet+text, unet+vae, unet+vae+text), adapters (lora, dora,
   bitfit, difffit) and frozen UNet (text, vae, vae+text). Claimed contrasts: adapters
   minus UNet training > 0 and frozen UNet minus UNet training > 0; REPRODUCED when both
   are, NOT REPRODUCED when either is reversed. LoRA's and DoRA's distance to the UNet
   family is stated (no verdict: "close" is not a testable threshold).
2. Fine-tuning improves prompt-image alignment: the mean over fine-tuned strategies of the
   judge's within-seed macro AUROC minus the base's. Every model draws image j of every
   prompt from the same noise j (a "seed"), so the comparison is paired twice: inside a
   seed the images differ only by prompt (the within-seed AUROC, `jaxmed.eval.alignment`),
   and seed j of the base and of a tuned model start from the same noise. The rule
   (`paired_verdict`): REPRODUCED only when BOTH the 95% bootstrap interval over seeds
   lies above zero AND the paired sign-flip permutation test over seeds rejects "no
   difference" one-sided at 2.5% (NOT REPRODUCED: both in the opposite direction; else
   INCONCLUSIVE). The interval states the effect's size; the permutation test keeps the
   level where the percentile interval is too narrow with few seeds (simulated levels:
   `paired_verdict`).
3. Synthetic images help a downstream classifier when real data is scarce: real +
   synthetic minus real only, macro AUROC on the real test split at the scarcest real
   fraction, paired by (repeat, seed); the strategy whose images are used is chosen
   without the test split (the caller passes it: fixed in the config, or lowest FID
   against the *validation* films).

Nothing is tuned to make a finding come out; each verdict states its effect size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxmed.eval import alignment as A
from jaxmed.eval import uncertainty as U

REPRODUCED = "REPRODUCED"
NOT_REPRODUCED = "NOT REPRODUCED"
INCONCLUSIVE = "INCONCLUSIVE"
NOT_TESTED = "NOT TESTED"

# The study's strategy families; jaxmed's extra strategies are not in the family test.
# docs/STUDY.md "The 11 strategies and their hyperparameters"
FAMILY_OF = {"unet": "unet", "unet+text": "unet", "unet+vae": "unet", "unet+vae+text": "unet",
             "lora": "adapter", "dora": "adapter", "bitfit": "adapter", "difffit": "adapter",
             "text": "frozen", "vae": "frozen", "vae+text": "frozen"}
FAMILY_NAMES = {"unet": "UNet training", "adapter": "adapters (PEFT)",
                "frozen": "frozen UNet"}
# (worse family, better family): the claim is FID(worse) - FID(better) > 0
CONTRASTS = (("adapter", "unet"), ("frozen", "unet"))


def verdict(effect: U.Interval | None, claimed: int = 1) -> str:
    """The verdict an interval allows (module docstring); ``claimed`` is the sign the
    study claims for the effect."""
    if effect is None or not math.isfinite(effect.value):
        return NOT_TESTED
    side = effect.excludes_zero()
    if side == 0:
        return INCONCLUSIVE
    return REPRODUCED if side == claimed else NOT_REPRODUCED


def combine(verdicts: Sequence[str]) -> str:
    """All parts reproduced -> REPRODUCED; any reversed -> NOT REPRODUCED; else
    INCONCLUSIVE (NOT TESTED parts are ignored; all of them -> NOT TESTED)."""
    v = [x for x in verdicts if x != NOT_TESTED]
    if not v:
        return NOT_TESTED
    if NOT_REPRODUCED in v:
        return NOT_REPRODUCED
    return REPRODUCED if all(x == REPRODUCED for x in v) else INCONCLUSIVE


def _iv(iv: U.Interval, digits: int = 3) -> str:
    return U.fmt_interval(iv, digits)


# ------------------------------------------------------------------------ finding 1


def family_ranking(real: np.ndarray, gen: Mapping[str, np.ndarray],
                   families: Mapping[str, str], *, b: int = U.DEFAULT_B, seed: int = 0,
                   level: float = U.LEVEL) -> dict:
    """Finding 1 on features: ``gen`` {model: (N, d)} (every model the same N, image i of
    each from the same prompt and noise), ``families`` {model: family key}.

    Returns {verdict, families: {key: {members, fid}}, contrasts: [...], ranking, members}
    with Interval dicts; the replicates are paired across models (one `HalfSamples`)."""
    models = [m for m in gen if m in families]
    sizes = {gen[m].shape[0] for m in models}
    if len(sizes) > 1:
        return {"verdict": NOT_TESTED, "why": f"generated sets differ in size {sorted(sizes)}"}
    if not models:
        return {"verdict": NOT_TESTED, "why": "no model of the study's families"}
    hs = U.HalfSamples(real.shape[0], sizes.pop(), b, seed)
    if not hs.usable:
        return {"verdict": NOT_TESTED, "why": "too few images for half-samples"}
    ident_r, ident_g = np.arange(hs.n_real)[None], np.arange(hs.n_gen)[None]
    val = {m: float(U.fid_replicates(real, gen[m], ident_r, ident_g)[0]) for m in models}
    reps = {m: U.fid_replicates(real, gen[m], hs.real, hs.gen) for m in models}
    fam: dict[str, dict] = {}
    for key in FAMILY_NAMES:
        mem = [m for m in models if families[m] == key]
        if mem:
            v = float(np.mean([val[m] for m in mem]))
            r = np.mean([reps[m] for m in mem], axis=0)
            fam[key] = {"members": mem, "value": v, "reps": r,
                        "fid": U.centred_interval(r, v, level)}
    contrasts = []
    for worse, better in CONTRASTS:
        if worse in fam and better in fam:
            eff = U.difference_interval(fam[worse]["reps"], fam[better]["reps"],
                                        fam[worse]["value"], fam[better]["value"], level)
            contrasts.append({"worse": worse, "better": better, "effect": eff,
                              "verdict": verdict(eff)})
    members = {}
    if "unet" in fam:
        for m in ("lora", "dora"):
            if m in val:
                members[m] = U.difference_interval(reps[m], fam["unet"]["reps"], val[m],
                                                   fam["unet"]["value"], level)
    ranking = sorted(fam, key=lambda k: fam[k]["value"])
    out = {"verdict": combine([c["verdict"] for c in contrasts]) if contrasts else NOT_TESTED,
           "families": {k: {"members": f["members"], "fid": f["fid"]} for k, f in fam.items()},
           "contrasts": contrasts, "ranking": ranking, "close": members,
           "per_model": {m: U.centred_interval(reps[m], val[m], level) for m in models}}
    if not contrasts:
        out["why"] = ("needs the UNet-training family and at least one other family; present: "
                      + (", ".join(FAMILY_NAMES[k] for k in fam) or "none"))
    return out


def _finding1(r: dict, fid_name: str) -> dict:
    claim = (f"Training the UNet gives the best image quality: the UNet-training family has a "
             f"lower mean {fid_name} (all conditions) than the adapters and the frozen-UNet "
             "family (the study's 11 strategies, grouped)")
    if r["verdict"] == NOT_TESTED:
        return {"claim": claim, "verdict": NOT_TESTED, "effect": None,
                "evidence": f"not testable: {r.get('why', '')}"}
    fams = "; ".join(f"{FAMILY_NAMES[k]} ({', '.join(f['members'])}) {_iv(f['fid'])}"
                     for k, f in ((k, r["families"][k]) for k in r["ranking"]))
    cons = "; ".join(f"{FAMILY_NAMES[c['worse']]} minus {FAMILY_NAMES[c['better']]} "
                     f"{_iv(c['effect'])}: {c['verdict']}" for c in r["contrasts"])
    ev = f"family means, best first: {fams}. Differences: {cons}"
    if r["close"]:
        ev += ". LoRA / DoRA minus the UNet-training mean (\"close behind\", no verdict): " + \
            ", ".join(f"{m} {_iv(iv)}" for m, iv in r["close"].items())
    main = min((c["effect"] for c in r["contrasts"]), key=lambda iv: iv.lo
               if math.isfinite(iv.lo) else -math.inf)
    return {"claim": claim, "verdict": r["verdict"], "effect": main.to_dict(), "evidence": ev,
            "contrasts": [{**c, "effect": c["effect"].to_dict()} for c in r["contrasts"]]}


# ------------------------------------------------------------------------ finding 2


def alignment_gain(probs: Mapping[str, np.ndarray], labels: np.ndarray, base: str,
                   tuned: Sequence[str], *, b: int = U.DEFAULT_B, seed: int = 0,
                   level: float = U.LEVEL) -> dict:
    """Finding 2: mean over ``tuned`` of the judge's macro AUROC minus ``base``'s, with a
    paired half-sample interval over the generated images (the same prompts and noise for
    every model), plus each strategy's own difference."""
    n = labels.shape[0]
    rng = np.random.default_rng(seed)
    idx = U.half_samples(n, b, rng)
    ident = np.arange(n)[None]
    val = {m: float(U.macro_auroc_replicates(probs[m], labels, ident)[0])
           for m in [base, *tuned]}
    reps = {m: U.macro_auroc_replicates(probs[m], labels, idx) for m in [base, *tuned]}
    mean_v = float(np.mean([val[m] for m in tuned]))
    mean_r = np.mean([reps[m] for m in tuned], axis=0)
    eff = U.difference_interval(mean_r, reps[base], mean_v, val[base], level)
    per = {m: U.difference_interval(reps[m], reps[base], val[m], val[base], level)
           for m in tuned}
    return {"effect": eff, "verdict": verdict(eff), "base": val[base], "tuned_mean": mean_v,
            "per_model": per}


def paired_verdict(effect: U.Interval | None, p_above: float, p_below: float,
                   claimed: int = 1) -> str:
    """Finding 2's rule (module docstring): the interval and the paired permutation test
    must agree. A side counts only when the interval excludes zero on it AND that side's
    one-sided p-value is <= (1 - level) / 2; NaN p-values (e.g. unpaired noise: no
    permutation test) leave the interval alone to decide. Simulated null
    (`tests/eval/test_findings.py`'s model: two models aligning equally, six prompts per
    seed, 2,000 data sets each, 400 bootstrap resamples, 2026-12-05): REPRODUCED / NOT
    REPRODUCED in 1.7% / 2.3% of cases at 10 seeds and 1.9% / 2.3% at 30 by this rule,
    against 4.7% / 5.6% and 3.2% / 3.1% for the interval alone (nominal 2.5% each)."""
    v = verdict(effect, claimed)
    if v not in (REPRODUCED, NOT_REPRODUCED):
        return v
    alpha = (1.0 - effect.level) / 2.0
    side = effect.excludes_zero()
    p = p_above if side > 0 else p_below
    if math.isfinite(p) and p > alpha:
        return INCONCLUSIVE
    return v


def alignment_gain_paired(probs: Mapping[str, np.ndarray], labels: np.ndarray, groups,
                          base: str, tuned: Sequence[str], *, b: int = 1000,
                          n_perm: int = 2000, seed: int = 0, level: float = U.LEVEL) -> dict:
    """Finding 2 from the judge's probabilities of every model on one synthesis plan
    (``probs`` {model: (N, C)}, the prompts' ``labels`` (N, C), each image's noise
    ``groups`` (N,)): the mean over ``tuned`` of the within-seed macro AUROC minus
    ``base``'s (`alignment.counts_difference` of the mean counts, which is the mean of
    the differences), and each strategy's own difference -- the same numbers
    `alignment.paired_difference_of` gives for two saved evaluations. Without noise
    shared inside a group (no within-seed pairs) it falls back to `alignment_gain` (pooled
    AUROC, half-sample interval, no permutation test)."""
    counts = {m: A.within_seed_counts(probs[m], labels, groups) for m in [base, *tuned]}
    pairs = counts[base][1]
    if pairs.sum() == 0:
        return alignment_gain(probs, labels, base, tuned, b=b, seed=seed, level=level)
    kw = dict(n_boot=b, n_perm=n_perm, level=level, seed=seed)

    def one(wins_a) -> dict:
        d = A.counts_difference(wins_a, counts[base][0], pairs, **kw)
        iv = U.Interval(d["difference"], *d["interval"], level, b)
        return {"effect": iv, "p_value": d["p_value"], "p_value_below": d["p_value_below"],
                "verdict": paired_verdict(iv, d["p_value"], d["p_value_below"])}

    mean = one(np.mean([counts[m][0] for m in tuned], axis=0))
    per = {m: one(counts[m][0]) for m in tuned}
    value = {m: float(A.within_seed_auroc(counts[m][0], pairs)[0]) for m in [base, *tuned]}
    return {**mean, "statistic": "within-seed", "base": value[base],
            "tuned_mean": float(np.mean([value[m] for m in tuned])),
            "per_model": {m: r["effect"] for m, r in per.items()},
            "per_model_p": {m: r["p_value"] for m, r in per.items()},
            "n_groups": int(pairs.shape[0])}


def _finding2(r: dict | None, why: str = "", chance_p: Mapping[str, float] | None = None
              ) -> dict:
    within = bool(r) and r.get("statistic") == "within-seed"
    claim = ("Fine-tuning improves prompt-image alignment over the un-tuned base (the judge's "
             f"{'within-seed ' if within or r is None else ''}macro AUROC against the prompts' "
             "labels, mean over fine-tuned strategies minus base)")
    if r is None:
        return {"claim": claim, "verdict": NOT_TESTED, "effect": None,
                "evidence": f"not testable: {why}"}
    if within:
        ev = (f"base {r['base']:.3f}, fine-tuned mean {r['tuned_mean']:.3f} over "
              f"{r['n_groups']} seeds: difference {_iv(r['effect'])}, paired permutation "
              f"p = {r['p_value']:.3g} (one-sided; the verdict needs the interval above 0 "
              "and p <= 0.025); per strategy: "
              + ", ".join(f"{m} {_iv(iv)} (p = {r['per_model_p'][m]:.2g})"
                          for m, iv in r["per_model"].items()))
    else:
        ev = (f"base {r['base']:.3f}, fine-tuned mean {r['tuned_mean']:.3f}: difference "
              f"{_iv(r['effect'])} (unpaired noise: pooled AUROC, interval only); per "
              "strategy: " + ", ".join(f"{m} {_iv(iv)}" for m, iv in r["per_model"].items()))
    ps = {m: p for m, p in (chance_p or {}).items() if p is not None and math.isfinite(p)}
    if ps:
        ev += ("; each model's alignment against chance (prompts shuffled inside each seed, "
               "permutation p): " + ", ".join(f"{m} p = {p:.2g}" for m, p in ps.items()))
    return {"claim": claim, "verdict": r["verdict"], "effect": r["effect"].to_dict(),
            "evidence": ev}


# ------------------------------------------------------------------------ finding 3


def downstream_gain(real_rows: Sequence[dict], mix_rows: Sequence[dict],
                    fraction: float, level: float = U.LEVEL) -> dict:
    """Finding 3: real + synthetic minus real only (macro AUROC) at ``fraction``, paired by
    (repeat, seed); the mean paired difference with a t interval over the pairs."""
    def by_key(rows, mode):
        return {(r.get("repeat"), r.get("seed")): r for r in rows
                if r["mode"] == mode and r.get("fraction") is not None
                and math.isclose(float(r["fraction"]), fraction)
                and r.get("macro_auroc") is not None}
    real, mix = by_key(real_rows, "real"), by_key(mix_rows, "real+synthetic")
    keys = sorted(set(real) & set(mix), key=str)
    eff = U.paired_difference([mix[k]["macro_auroc"] for k in keys],
                              [real[k]["macro_auroc"] for k in keys], level)
    ratio = [(mix[k].get("n_synthetic"), mix[k].get("n_real")) for k in keys]
    return {"effect": eff, "verdict": verdict(eff) if keys else NOT_TESTED, "pairs": len(keys),
            "real": float(np.mean([real[k]["macro_auroc"] for k in keys])) if keys else None,
            "mix": float(np.mean([mix[k]["macro_auroc"] for k in keys])) if keys else None,
            "ratio": ratio[0] if ratio else None}


def _finding3(r: dict | None, label: str, chosen: str, how: str, why: str = "") -> dict:
    claim = (f"At the scarcest real fraction ({label}), adding synthetic images from one "
             f"strategy chosen without the test split ({chosen or '?'}: {how}) raises the "
             "downstream classifier's macro AUROC on the real test split over real only")
    if r is None or r["verdict"] == NOT_TESTED:
        return {"claim": claim, "verdict": NOT_TESTED, "effect": None,
                "evidence": f"not testable: {why or 'no paired real / real+synthetic runs'}"}
    eff: U.Interval = r["effect"]
    ev = (f"real + synthetic {r['mix']:.3f} vs real only {r['real']:.3f} over {r['pairs']} "
          f"paired run(s) (seed x repeat): difference {_iv(eff)}")
    if r["pairs"] < 2:
        ev += " (one pair: no interval, so no verdict beyond INCONCLUSIVE)"
    if r["ratio"] and r["ratio"][1]:
        ev += (f"; mixing ratio synthetic:real = {r['ratio'][0]}:{r['ratio'][1]} "
               f"({r['ratio'][0] / r['ratio'][1]:.1f}:1) images")
    return {"claim": claim, "verdict": r["verdict"], "effect": eff.to_dict(), "evidence": ev}


# ------------------------------------------------------------------------ all three


def three_findings(*, fid_name: str, ranking: dict | None, alignment: dict | None,
                   alignment_why: str, downstream: dict | None, scarcest_label: str,
                   chosen: str, chosen_how: str, downstream_why: str = "",
                   chance_p: Mapping[str, float] | None = None) -> list[dict]:
    """The three findings, each {claim, verdict, effect (Interval dict or None), evidence}:
    ``ranking`` from `family_ranking`, ``alignment`` from `alignment_gain_paired`, ``downstream``
    from `downstream_gain` (None: not testable, with the reason); ``chance_p``: each
    model's alignment-against-chance permutation p-value, reported with finding 2."""
    f1 = _finding1(ranking or {"verdict": NOT_TESTED, "why": "no features"}, fid_name)
    return [f1, _finding2(alignment, alignment_why, chance_p),
            _finding3(downstream, scarcest_label, chosen, chosen_how, downstream_why)]


def jsonable(findings: Sequence[dict]) -> list[dict[str, Any]]:
    """Findings with every Interval turned into its dict (for results.json)."""
    def conv(x):
        if isinstance(x, U.Interval):
            return x.to_dict()
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x
    return [conv(f) for f in findings]
