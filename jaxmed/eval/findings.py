"""The study's three findings, tested on one run's results (docs/STUDY.md "The study").

Each finding is stated as the study states it and judged on this run's numbers only: a
dict ``{claim, reproduced: True / False / None (not testable), evidence}``, plus the count
for the claims about every UNet-training strategy. Nothing is tuned to make a finding come
out; `jaxmed.eval.tables.verdict` turns a finding into the word results.md shows.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxmed.eval import report
from jaxmed.eval.tables import BASE, frac_label, overall, regime_table


def _trains_unet(results: dict, m: str) -> bool:
    return m != BASE and "unet" in results[m].get("trains", [])


def three_findings(results: dict, names: Sequence[str], fid_key: str, fid_name: str,
                   real_tab: dict, scarcest: float | None) -> list[dict]:
    """The study's three findings, each {claim, reproduced: True/False/None, evidence}."""
    out = []
    unet = [m for m in names if _trains_unet(results, m)]

    def ov(m, k):
        return overall(results, m, k)

    have_base = BASE in results
    # (1) FID
    claim = (f"Strategies that train the UNet lower {fid_name} (all conditions) against the "
             "un-tuned base")
    if not have_base or not unet or ov(BASE, fid_key) is None:
        out.append({"claim": claim, "reproduced": None,
                    "evidence": "not testable: the base or UNet-training strategies missing"})
    else:
        b = ov(BASE, fid_key)
        better = [m for m in unet if ov(m, fid_key) is not None and ov(m, fid_key) < b]
        best = min((m for m in names if ov(m, fid_key) is not None), key=lambda m: ov(m, fid_key))
        f = report.fmt
        ev = (f"base {f(b)}; lower in {len(better)}/{len(unet)} UNet-training strategies ("
              + ", ".join(f"{m} {f(ov(m, fid_key))}" for m in unet)
              + f"); lowest overall: {best} ({f(ov(best, fid_key))})")
        other = [m for m in names if m != BASE and m not in unet]
        if other:
            ev += "; strategies that leave the UNet frozen: " + ", ".join(
                f"{m} {f(ov(m, fid_key))}" for m in other)
        out.append(_count_verdict(claim, ev, len(better), len(unet)))
    # (2) alignment
    claim = ("They improve prompt-image alignment (the judge's macro AUROC against the "
             "prompts' labels) against the base")
    if not have_base or not unet or ov(BASE, "align_auroc") is None:
        out.append({"claim": claim, "reproduced": None,
                    "evidence": "not testable: the base, a judge or UNet strategies missing"})
    else:
        b = ov(BASE, "align_auroc")
        better = [m for m in unet if ov(m, "align_auroc") is not None
                  and ov(m, "align_auroc") > b]
        ev = (f"base {b:.3f}; higher in {len(better)}/{len(unet)} UNet-training strategies ("
              + ", ".join(f"{m} {ov(m, 'align_auroc'):.3f}" for m in unet
                          if ov(m, "align_auroc") is not None) + ")")
        out.append(_count_verdict(claim, ev, len(better), len(unet)))
    # (3) downstream at the scarcest fraction
    tuned = [m for m in names if m != BASE and ov(m, fid_key) is not None]
    label = frac_label(scarcest) if scarcest is not None else "?"
    claim = (f"At the scarcest real fraction ({label}), real + synthetic images from the best "
             f"strategy (lowest {fid_name}, chosen before looking at the classifiers) beat "
             "real only in macro AUROC")
    real_only = real_tab.get(("real", scarcest)) if scarcest is not None else None
    if not tuned or real_only is None:
        out.append({"claim": claim, "reproduced": None,
                    "evidence": "not testable: no fine-tuned strategy or no real-only score at "
                                "that fraction"})
    else:
        best = min(tuned, key=lambda m: ov(m, fid_key))
        tab = regime_table(results[best].get("regimes", []))
        mix = tab.get(("real+synthetic", scarcest))
        all_mix = {m: regime_table(results[m].get("regimes", [])).get(("real+synthetic",
                                                                       scarcest))
                   for m in names}
        n_beat = sum(1 for v in all_mix.values() if v is not None and v > real_only)
        if mix is None:
            out.append({"claim": claim, "reproduced": None,
                        "evidence": f"no real+synthetic run of {best} at {label}"})
        else:
            out.append({"claim": claim, "reproduced": mix > real_only,
                        "evidence": f"best strategy {best}: real+synthetic {mix:.3f} vs real "
                                    f"only {real_only:.3f} (difference {mix - real_only:+.3f}); "
                                    f"{n_beat}/{sum(v is not None for v in all_mix.values())} "
                                    "models' real+synthetic beat real only at this fraction"})
    return out


def _count_verdict(claim: str, evidence: str, n_yes: int, n: int) -> dict:
    """A claim about every UNet-training strategy: reproduced when it holds for all of them,
    partly when for a majority, not reproduced otherwise (the count is always shown)."""
    return {"claim": claim, "evidence": evidence, "reproduced": n_yes == n,
            "partial": n_yes < n and 2 * n_yes > n, "count": [n_yes, n]}
