"""The study's results tables: the rows of results.csv and the text of results.md.

`jaxmed.study` runs the models; this module arranges what they recorded (each model's
``done.json``, the real-only classifier rows, the findings of `jaxmed.eval.findings`) into
tables and markdown. Nothing here trains, samples or scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxmed.data.labels import ALL
from jaxmed.eval import report
from jaxmed.eval.alignment_report import judge_views_markdown, paired_alignment_markdown

# The un-tuned base model's name among the study's models.
BASE = "base"

# The overall (all-conditions) metrics results.csv shows per model, in order.
METRICS = ("fid_inception", "fid_domain", "vendi_domain", "vendi_inception", "align_auroc",
           "align_accuracy", "clip_score")


def overall(results: dict, m: str, key: str) -> Any:
    """Model ``m``'s all-conditions value of metric ``key`` (None when not computed)."""
    return results[m]["metrics"]["rows"][ALL].get(key)


def _mean(vals) -> float | None:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else None


def frac_label(f) -> str:
    return f"{100 * float(f):g}%"


def regime_table(rows: Sequence[dict]) -> dict[tuple[str, float | None], float | None]:
    """{(mode, fraction): mean macro AUROC over repeats}."""
    acc: dict[tuple, list] = {}
    for r in rows:
        key = (r["mode"], None if r.get("fraction") is None else float(r["fraction"]))
        acc.setdefault(key, []).append(r.get("macro_auroc"))
    return {k: _mean(v) for k, v in acc.items()}


def regime_col(mode: str, f) -> str:
    tag = {"real": "real", "synthetic": "synthetic", "real+synthetic": "real+syn"}[mode]
    return f"auroc_{tag}" + ("" if f is None else f"@{frac_label(f)}")


def results_table(results: dict, names: Sequence[str], real_tab: dict,
                  fractions: Sequence[float],
                  strat_fracs: Sequence[float]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of results.csv: a row per model -- what it trains, its size and train
    time, the overall metrics, then macro AUROC per downstream regime (synthetic only,
    real + synthetic at each strategy fraction, real only at each fraction)."""
    regime_cols = [("synthetic", None)] + [("real+synthetic", f) for f in strat_fracs]
    real_cols = [("real", f) for f in fractions]
    headers = ["name", "trains", "trainable_params", "train_seconds", "steps", "n_generated",
               *METRICS]
    headers += [regime_col(m, f) for m, f in regime_cols + real_cols]
    table = []
    for m in names:
        r = results[m]
        tab = regime_table(r.get("regimes", []))
        secs = r.get("train_seconds")
        row = [m, "+".join(r.get("trains", [])) or "-", r.get("trainable_params"),
               None if secs is None else round(float(secs), 1), r.get("steps"),
               overall(results, m, "n_generated")]
        row += [overall(results, m, k) for k in METRICS]
        row += [tab.get(k) for k in regime_cols] + [real_tab.get(k) for k in real_cols]
        table.append(row)
    return headers, table


def verdict(f: dict) -> str:
    if f["reproduced"] is None:
        return "NOT TESTED"
    k = f" ({f['count'][0]}/{f['count'][1]} strategies)" if f.get("count") else ""
    if f["reproduced"]:
        return "REPRODUCED" + k
    return ("PARTLY REPRODUCED" if f.get("partial") else "NOT REPRODUCED") + k


def results_markdown(study, results: dict, names: Sequence[str], headers: Sequence[str],
                     table: Sequence[Sequence[Any]], conds: list[str], findings: list[dict],
                     real_tab: dict, fractions: Sequence[float],
                     strat_fracs: Sequence[float]) -> str:
    """results.md: the findings, the judge, the per-model and per-condition tables, the
    real-only classifiers, the plots and the settings. ``study`` is the `jaxmed.study.Study`
    (its config, invocation log and judge summary)."""
    c = study.config
    L: list[str] = [f"# jaxmed study: preset `{c.preset}`", ""]
    total = sum(sum(results[m].get("seconds", {}).values()) for m in names)
    inv = study.invocations()
    L += [f"Models: {len(names)} ({', '.join(names)}). Per-model work (fine-tuning, "
          f"synthesis, evaluation, downstream classifiers) summed: {total / 60:.1f} min."]
    if inv:
        wall = sum(i["seconds"] for i in inv)
        L += [f"Wall time of the study: {wall / 60:.1f} min over {len(inv)} invocation(s) ("
              + "; ".join(f"{i['started']}: {i['seconds'] / 60:.1f} min, "
                          f"{len(i['models_run'])} model(s) run, CPU time "
                          f"{i.get('cpu_seconds', 0) / 60:.1f} min on {i.get('cpu_count')} "
                          f"{i.get('platform')} core(s)/device(s), load average "
                          f"{i.get('load_average')}" for i in inv) + ")."]
    L += [""]
    L += ["## The study's three findings, on this run's data", ""]
    for i, f in enumerate(findings, 1):
        L += [f"{i}. **{verdict(f)}** — {f['claim']}.  ", f"   Evidence: {f['evidence']}.", ""]
    if c.data.kind == "phantom":
        L += ["These are findings on *phantom* chest X-rays with a tiny foundation model and a "
              "short fine-tuning budget, not on CheXpert with SD 1.5: they test whether the "
              "pipeline reproduces the study's qualitative effects, not its numbers. Nothing "
              "was tuned to make a finding come out; each is reported as measured.", ""]
    js = getattr(study, "judge_summary", None)
    if js:
        ok = js["macro_auroc"] is not None and js["macro_auroc"] >= js["min_macro_auroc"]
        L += ["## The judge classifier (domain-FID features, alignment)", "",
              f"Trained on {js.get('n_train', '?')} real training images (100%); macro AUROC "
              f"on {js['n']} real test images: **{report.fmt(js['macro_auroc'])}** "
              f"({'meets' if ok else 'BELOW'} the required {js['min_macro_auroc']}).", "",
              report.md_table(["condition", "AUROC (real test)", "positives"],
                              [[k, js["auroc"].get(k), js["positives"].get(k)]
                               for k in js["auroc"]]), ""]
        L += judge_views_markdown(js.get("views"))
    L += ["## Results per model (all conditions)", "",
          f"FID and Vendi compare {report.fmt(results[names[0]]['metrics']['n_real'])} real "
          "test images with each model's generated set (the same prompts and seeds for every "
          "model). `auroc_*` columns: macro AUROC on the real test split of a classifier "
          "trained on synthetic images only, real + synthetic at a real fraction, or real "
          "only (the same for every row).", ""]
    L += [report.md_table(headers, table), ""]
    # per condition tables
    for key, title in (("fid_inception", "FID-Inception"), ("fid_domain", "domain FID"),
                       ("vendi_domain", "Vendi (q=1, domain features)"),
                       ("align_auroc", "alignment AUROC (judge vs prompt)"),
                       ("align_accuracy", "alignment accuracy")):
        if not any(results[m]["metrics"]["rows"][ALL].get(key) is not None for m in names):
            continue
        rows = [[m] + [results[m]["metrics"]["rows"][cc].get(key) for cc in conds + [ALL]]
                for m in names]
        L += [f"### {title} per condition", "", report.md_table(["model"] + conds + [ALL], rows),
              ""]
    L += paired_alignment_markdown(results, names)
    first = results[names[0]]["metrics"]
    L += ["Sample counts per condition (generated / real): " + ", ".join(
        f"{cc} {first['rows'][cc]['n_generated']}/{first['rows'][cc]['n_real']}"
        for cc in conds + [ALL]) + ". With N <= feature dimension the covariances are "
        "singular and FID is biased upwards; compare FIDs only within a column (same N).", ""]
    if not first["inception"]["available"]:
        L += ["**FID-Inception missing.** " + first["inception"]["message"], ""]
    L += ["## Downstream classifier: real only (strategy-independent)", "",
          report.md_table(["real fraction"] + [frac_label(f) for f in fractions],
                          [["macro AUROC"] + [real_tab.get(("real", f)) for f in fractions]]),
          ""]
    L += ["## Plots", "", "![FID vs trainable parameters](fid_vs_params.png)", "",
          "![AUROC vs real fraction](auroc_vs_fraction.png)", "",
          "![samples](samples_all.png)", "", "Per model: `<name>/samples.png`; metrics: "
          "`<name>/eval/metrics.md`.", ""]
    L += ["## Settings", "", f"- preset `{c.preset}`: {c.description}",
          f"- model: `{c.model.path}` ({c.model.dtype}); images {c.data.resolution} px; data "
          f"{c.data.kind}" + (f" ({c.data.phantom_patients} phantom patients, 2 films each, "
                              "70/15/15% split by patient)" if c.data.kind == "phantom" else ""),
          f"- fine-tuning: {_steps_text(c)}; per-device batch "
          f"{c.finetune.per_device_batch or 'the strategy default (4 or 8)'}, gradient "
          f"accumulation {c.finetune.grad_accum}; learning rates: the study's, x "
          f"{c.finetune.lr_multiplier:g} for every strategy; caption dropout "
          f"{c.finetune.caption_dropout}"
          + (f"; overrides `{c.finetune.overrides}`" if c.finetune.overrides else ""),
          f"- synthesis: {c.synth.per_condition} images per condition x {len(conds)} "
          f"conditions, {c.synth.sampler} {c.synth.steps} steps, guidance {c.synth.guidance}, "
          f"seed {c.synth.seed}",
          f"- classifiers: {c.classifier.arch} widths {tuple(c.classifier.widths)} at "
          f"{c.classifier.image_size} px; judge {c.classifier.judge_epochs} epochs; downstream "
          f"{c.classifier.regime_steps} steps each, batch {c.classifier.batch_size}, "
          f"best-on-validation={bool(c.regimes.use_valid)}; real fractions "
          f"{[frac_label(f) for f in fractions]} (real only), "
          f"{[frac_label(f) for f in strat_fracs]} (real + synthetic); "
          f"{c.regimes.repeats} repeat(s)",
          f"- FID route: {c.eval.fid_method} (eigh when N <= d, else sqrtm)", ""]
    return "\n".join(L)


def _steps_text(c) -> str:
    if c.finetune.max_steps > 0:
        return f"{c.finetune.max_steps} optimizer steps per strategy"
    return f"{c.finetune.epochs} epochs per strategy"
