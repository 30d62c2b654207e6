"""The study's results tables: the rows of results.csv and the text of results.md.

`jaxmed.study` runs the models; this module arranges what they recorded (each model's
``done.json``, the real-only classifier rows, the findings of `jaxmed.eval.findings`) into
tables and markdown. Nothing here trains, samples or scores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxmed.data.labels import ALL
from jaxmed.eval import report
from jaxmed.eval.alignment_report import judge_views_markdown, paired_alignment_markdown
from jaxmed.eval.uncertainty import Interval, fmt_interval, mean_interval

# The un-tuned base model's name among the study's models.
BASE = "base"

# The overall (all-conditions) metrics results.csv shows per model, in order.
METRICS = ("fid_inception", "fid_domain", "kid_inception", "kid_domain", "vendi_domain",
           "vendi_inception", "align_auroc", "align_accuracy", "clip_score")
# Metrics with a 95% interval in each row's "ci" (`jaxmed.evaluate`); results.csv carries
# <metric>_lo / <metric>_hi beside them, results.md shows ``value [lo, hi]``.
CI_METRICS = ("fid_inception", "fid_domain", "kid_inception", "kid_domain", "vendi_domain",
              "vendi_inception")
# The results table's row for the real-vs-real floor (`jaxmed.study_results.floor`).
FLOOR = "real: valid vs test"


def overall(results: dict, m: str, key: str) -> Any:
    """Model ``m``'s all-conditions value of metric ``key`` (None when not computed)."""
    return results[m]["metrics"]["rows"][ALL].get(key)


def interval(results: dict, m: str, key: str, cond: str = ALL) -> dict | None:
    """Model ``m``'s interval dict of ``key`` ({value, lo, hi, ...}), or None."""
    return results[m]["metrics"]["rows"][cond].get("ci", {}).get(key)


def _metric_headers() -> list[str]:
    out = []
    for k in METRICS:
        out.append(k)
        if k in CI_METRICS:
            out += [f"{k}_lo", f"{k}_hi"]
    return out


def _metric_cells(row: dict) -> list[Any]:
    out = []
    ci = row.get("ci") or {}
    for k in METRICS:
        out.append(row.get(k))
        if k in CI_METRICS:
            iv = ci.get(k) or {}
            out += [iv.get("lo"), iv.get("hi")]
    return out


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


def regime_intervals(rows: Sequence[dict]) -> dict[tuple[str, float | None], Interval]:
    """{(mode, fraction): mean macro AUROC over the runs (seeds x repeats) with its 95% t
    interval}; NaN bounds from a single run."""
    acc: dict[tuple, list] = {}
    for r in rows:
        key = (r["mode"], None if r.get("fraction") is None else float(r["fraction"]))
        v = r.get("macro_auroc")
        acc.setdefault(key, []).append(math.nan if v is None else float(v))
    return {k: mean_interval(v) for k, v in acc.items()}


def band(tab: dict, key) -> tuple | None:
    """(value, lo, hi) of a `regime_intervals` entry, None when absent."""
    iv = tab.get(key)
    return None if iv is None else (iv.value, iv.lo, iv.hi)


def regime_col(mode: str, f) -> str:
    tag = {"real": "real", "synthetic": "synthetic", "real+synthetic": "real+syn"}[mode]
    return f"auroc_{tag}" + ("" if f is None else f"@{frac_label(f)}")


def results_table(results: dict, names: Sequence[str], real_tab: dict,
                  fractions: Sequence[float],
                  strat_fracs: Sequence[float], *, floor: dict | None = None
                  ) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of results.csv: a row per model -- what it trains, its size and train
    time, the overall metrics with their 95% bounds, then macro AUROC per downstream regime
    (synthetic only, real + synthetic at each strategy fraction, real only at each
    fraction); last, with ``floor`` (an evaluation of real validation films), the
    real-vs-real row."""
    regime_cols = [("synthetic", None)] + [("real+synthetic", f) for f in strat_fracs]
    real_cols = [("real", f) for f in fractions]
    headers = ["name", "trains", "trainable_params", "train_seconds", "steps", "n_generated",
               *_metric_headers()]
    headers += [regime_col(m, f) for m, f in regime_cols + real_cols]
    table = []
    for m in names:
        r = results[m]
        tab = regime_table(r.get("regimes", []))
        secs = r.get("train_seconds")
        row = [m, "+".join(r.get("trains", [])) or "-", r.get("trainable_params"),
               None if secs is None else round(float(secs), 1), r.get("steps"),
               overall(results, m, "n_generated")]
        row += _metric_cells(results[m]["metrics"]["rows"][ALL])
        row += [tab.get(k) for k in regime_cols] + [real_tab.get(k) for k in real_cols]
        table.append(row)
    if floor is not None:
        fr = floor["rows"][ALL]
        row = [FLOOR, "-", None, None, None, fr.get("n_generated")] + _metric_cells(fr)
        row = [None if h.startswith("align") or h == "clip_score" else v
               for h, v in zip(headers, row + [None] * (len(headers) - len(row)), strict=True)]
        table.append(row)
    return headers, table


def display_table(headers: Sequence[str], table: Sequence[Sequence[Any]]
                  ) -> tuple[list[str], list[list[Any]]]:
    """results.md's form of the results table: ``value [lo, hi]`` cells, no bound columns."""
    keep = [i for i, h in enumerate(headers) if not h.endswith(("_lo", "_hi"))]
    rows = []
    for r in table:
        cells = []
        for i in keep:
            h = headers[i]
            if h in CI_METRICS and r[i] is not None:
                j = headers.index(f"{h}_lo")
                cells.append(fmt_interval({"value": r[i], "lo": r[j], "hi": r[j + 1]},
                                          4 if h.startswith("kid") else 3))
            else:
                cells.append(r[i])
        rows.append(cells)
    return [headers[i] for i in keep], rows


def verdict(f: dict) -> str:
    """The finding's verdict word (`jaxmed.eval.findings`)."""
    return f["verdict"]


def results_markdown(study, results: dict, names: Sequence[str], headers: Sequence[str],
                     table: Sequence[Sequence[Any]], conds: list[str], findings: list[dict],
                     real_tab: dict, fractions: Sequence[float],
                     strat_fracs: Sequence[float], *, floor: dict | None = None,
                     chosen: dict | None = None) -> str:
    """results.md: the findings, the judge, the per-model and per-condition tables (with
    95% intervals and the real-vs-real floor), the real-only classifiers, the plots and the
    settings. ``study`` is the `jaxmed.study.Study` (its config, invocation log and judge
    summary); ``chosen``: how finding 3's strategy was chosen (`jaxmed.study_results`)."""
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
    L += ["A verdict is read off a 95% interval of the effect, oriented so that positive is "
          "what the study claims: REPRODUCED when the interval lies above zero, NOT "
          "REPRODUCED when it lies below, INCONCLUSIVE when it contains zero or cannot be "
          "formed. FID / KID / Vendi intervals come from half-samples of the real and the "
          "generated images (paired across models: every model is sampled from the same "
          "prompts and noise); downstream differences from the paired (seed, repeat) runs "
          "(`jaxmed.eval.uncertainty`). Finding 2 also needs the paired sign-flip "
          "permutation test over noise seeds to agree (one-sided p <= 0.025): with few seeds "
          "the bootstrap interval alone is too narrow (`jaxmed.eval.findings.paired_verdict`)"
          ".", ""]
    L += _budget_notes(c, findings)
    if chosen:
        vf = chosen.get("validation_fid") or {}
        L += [f"Finding 3's strategy: **{chosen.get('downstream_strategy') or '-'}** "
              f"({chosen.get('downstream_how', '')}); the test split played no part in the "
              "choice." + (" FID against the validation films: " + ", ".join(
                  f"{m} {report.fmt(v)}" for m, v in vf.items()) + "." if vf else ""), ""]
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
    L += [report.md_table(*display_table(headers, table)), ""]
    if floor is not None:
        nf = floor["rows"][ALL]["n_generated"]
        ng = results[names[0]]["metrics"]["rows"][ALL]["n_generated"]
        L += [f"`{FLOOR}`: {nf} real validation films, as many per condition as each model "
              "generates, scored against the same real test films: the value a generator "
              "indistinguishable from real films would get at this N"
              + (f" (the validation split holds too few films of some conditions: {nf} "
                 f"rather than {ng}, so the floor sits at a smaller N)" if nf != ng else "")
              + ". Cells are `value [95% interval]`; KID is the mean over subsets (its "
              "subset SD in results.csv).", ""]
    # per condition tables
    for key, title in (("fid_inception", "FID-Inception"), ("fid_domain", "domain FID"),
                       ("kid_inception", "KID-Inception"), ("kid_domain", "domain KID"),
                       ("vendi_domain", "Vendi (q=1, domain features)"),
                       ("align_auroc", "alignment AUROC (judge vs prompt)"),
                       ("align_accuracy", "alignment accuracy")):
        if not any(results[m]["metrics"]["rows"][ALL].get(key) is not None for m in names):
            continue
        rows = [[m] + [_cell(results[m]["metrics"]["rows"][cc], key) for cc in conds + [ALL]]
                for m in names]
        if floor is not None and key in CI_METRICS:
            rows.append([FLOOR] + [_cell(floor["rows"][cc], key) for cc in conds + [ALL]])
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
    L += ["## Plots", ""]
    for f, alt in (("finding1_fid.png", "finding 1: FID by strategy family"),
                   ("finding2_alignment.png", "finding 2: alignment gain over the base")):
        if os.path.isfile(study.path(f)):
            L += [f"![{alt}]({f})", ""]
    L += ["![FID vs trainable parameters](fid_vs_params.png)", "",
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
          f"checkpoint selection on real validation: {_valid_text(c)}; real fractions "
          f"{[frac_label(f) for f in fractions]} (real only), "
          f"{[frac_label(f) for f in strat_fracs]} (real + synthetic); "
          f"{c.regimes.repeats} repeat(s); real + synthetic trains on every synthetic image "
          f"plus the real fraction (the ratio is stated in finding 3)",
          f"- intervals: {c.eval.intervals} half-sample replicates per interval, 95%",
          f"- FID route: {c.eval.fid_method} (eigh when N <= d, else sqrtm)", ""]
    return "\n".join(L)


def _cell(row: dict, key: str) -> Any:
    iv = (row.get("ci") or {}).get(key)
    if iv is None or row.get(key) is None:
        return row.get(key)
    return fmt_interval(iv, 4 if key.startswith("kid") else 3)


def _budget_notes(c, findings: list[dict]) -> list[str]:
    """What this preset's budget cannot decide, said next to the verdicts."""
    notes = []
    if int(c.regimes.repeats) < 2:
        notes.append("one downstream repeat gives one (seed, repeat) pair: finding 3 has no "
                     "interval and can only be INCONCLUSIVE (`regimes.repeats` >= 3 for a "
                     "verdict)")
    n = int(c.synth.per_condition)
    if n < 6:
        notes.append(f"{n} noise seeds: finding 2's sign-flip permutation test cannot reach "
                     f"p <= 0.025 (its smallest p-value is 2^-{n}), so finding 2 is at best "
                     "INCONCLUSIVE")
    if n < 30:
        notes.append(f"{n} generated images per condition: per-condition intervals are wide "
                     "and FID is far above its large-N value (compare only at equal N, and "
                     "against the floor row)")
    if not notes:
        return []
    return ["What this preset's budget cannot decide: " + "; ".join(notes) + ".", ""]


def _valid_text(c) -> str:
    if not c.regimes.use_valid:
        return "none (fixed steps, last weights)"
    if c.regimes.get("scale_valid", False):
        return "a validation subset scaled with the real fraction"
    return "the whole validation split"


def _steps_text(c) -> str:
    if c.finetune.max_steps > 0:
        return f"{c.finetune.max_steps} optimizer steps per strategy"
    return f"{c.finetune.epochs} epochs per strategy"
