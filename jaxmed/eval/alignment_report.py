"""results.md sections on the judge and on alignment: the judge's macro AUROC on the images
it will judge (`jaxmed.eval.judge.check_judge`) and each model's paired alignment test
(`jaxmed.eval.alignment.paired_alignment`), with intervals and both controls.

Formatting only: the numbers were computed and recorded by the study.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxmed.data.labels import ALL
from jaxmed.eval import report

VIEW_TITLES = {"real": "real test films (as stored)",
               "synthesis_resolution": "the films at the synthesis resolution, stored as "
                                       "synthesis stores",
               "vae_reconstruction": "their reconstructions by the base model's VAE"}


def interval(v) -> str:
    if not v or v[0] is None or v[1] is None:
        return report.DASH
    return f"[{report.fmt(v[0])}, {report.fmt(v[1])}]"


def lowest(auroc: dict) -> str:
    """'condition value' of the lowest per-condition AUROC (None / NaN left out)."""
    ok = [(k, v) for k, v in auroc.items() if v is not None and v == v]
    if not ok:
        return report.DASH
    k, v = min(ok, key=lambda kv: kv[1])
    return f"{k} {report.fmt(v)}"


def judge_views_markdown(views: dict | None) -> list[str]:
    """Lines: the judge's macro AUROC per view and the real-film positive control."""
    if not views:
        return []
    L = [f"The same judge through the route generated images take (`jaxmed.eval.judge`), at "
         f"the synthesis resolution {views['resolution']} px, colour {views['color']}:", "",
         report.md_table(["images", "macro AUROC", "lowest condition"],
                         [[VIEW_TITLES.get(k, k), views[k]["macro_auroc"],
                           lowest(views[k]["auroc"])] for k in VIEW_TITLES if k in views]),
         ""]
    need = views["min_macro_auroc"]
    L += [f"Every view {'reaches' if views['ok'] else 'does NOT reach'} {need}: "
          + ("alignment below is measurable." if views["ok"] else
             "the judge cannot see the conditions on generated-looking images, so the "
             "alignment numbers below cannot show what the prompts did.")]
    pc = views.get("positive_control")
    if pc:
        L += ["", f"Positive control: the {VIEW_TITLES[pc['view']]} scored as a generated set "
              f"(their true labels as prompts): alignment AUROC {report.fmt(pc['auroc'])} "
              f"{interval(pc['interval'])}; with the labels shuffled (negative control) "
              f"{report.fmt(pc['shuffled'])} {interval(pc['shuffled_interval'])}."]
    return L + [""]


def paired_alignment_markdown(results: dict, names: Sequence[str]) -> list[str]:
    """Lines: per model, pooled and within-seed alignment AUROC with intervals, the
    shuffled-prompt control and the permutation p-values."""
    rows = []
    for m in names:
        r = results[m]["metrics"]["rows"][ALL]
        if "align_auroc_ci" not in r:
            continue
        rows.append([m, r.get("align_groups"), r.get("align_auroc"),
                     interval(r.get("align_auroc_ci")), r.get("align_p_value"),
                     r.get("align_paired_auroc"), interval(r.get("align_paired_auroc_ci")),
                     r.get("align_paired_p_value"), r.get("align_paired_shuffled_auroc"),
                     interval(r.get("align_paired_shuffled_auroc_ci"))])
    if not rows:
        return []
    return ["### Alignment as a paired test", "",
            "Each seed starts one image per condition from the same noise, so its images "
            "differ only by prompt. *Pooled*: the judge's AUROC for a condition, images "
            "prompted with it vs the others; *within seed*: the same comparison inside each "
            "seed only (the seed's own effect cancels). Intervals: 95% percentile bootstrap "
            "over seeds (whole seeds resampled); p: one-sided permutation test, prompts "
            "shuffled inside each seed; the shuffled column is one such shuffle (the "
            "negative control: its interval should hold 0.5).", "",
            report.md_table(["model", "seeds", "pooled", "95% interval", "p", "within seed",
                             "95% interval", "p", "shuffled", "95% interval"], rows), ""]
