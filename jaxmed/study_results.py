"""The study's results files and findings: what `jaxmed.study.Study.run` writes at the end.

From each model's ``done.json`` and ``eval/features.npz``, the real test and validation
features and the real-vs-real floor, this module

* picks finding 3's strategy without the test split: the one fixed in the config
  (``regimes.downstream_strategy``) or else the fine-tuned strategy with the lowest FID
  against the floor's real *validation* films;
* tests the three findings with intervals (`jaxmed.eval.findings`;
  docs/STUDY.md "The study");
* writes results.csv / results.md / results.json, the plots and samples_all.png.

The floor: FID / KID / Vendi of a balanced set of real validation films, as many per
condition as each model generates, against the same real test films -- what a perfect
generator would score at this N (docs/STUDY.md "Metrics": FID depends on N).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np

from jaxmed import files, images
from jaxmed.data.labels import ALL
from jaxmed.eval import alignment as A
from jaxmed.eval import findings as F
from jaxmed.eval import report, tables
from jaxmed.eval.fid import RankDeficientWarning, fid_from_features
from jaxmed.eval.tables import BASE
from jaxmed.evaluate import ImageSet, load_features, load_images, read_image_set, save_features

# ------------------------------------------------------------------------ real features


def real_features(study, split: str, judge=None) -> dict:
    """The real ``split``'s features, computed once with the study's evaluator and kept in
    ``WORKDIR/eval_real/<split>_features.npz``."""
    path = study.path("eval_real", f"{split}_features.npz")
    if os.path.isfile(path):
        return load_features(path)
    ev = study.evaluator(judge if judge is not None else study.judge())
    s = ev.real if split == "test" else study.image_set(split)
    feats = ev.real_features() if split == "test" else ev.features(s, desc=f"{split} features")
    save_features(path, feats, s.labels, s.label_columns)
    return load_features(path)


def floor_subset(s: ImageSet, conditions: Sequence[str], per_condition: int) -> ImageSet:
    """Up to ``per_condition`` films positive for each condition, in file order, no film
    twice (a film with several findings counts for the first condition that takes it)."""
    chosen: list[int] = []
    for c in conditions:
        idx = [int(i) for i in np.nonzero(s.positives(c))[0] if int(i) not in chosen]
        chosen += idx[:per_condition]
    chosen.sort()
    return ImageSet([s.paths[i] for i in chosen], s.labels[chosen], s.label_columns,
                    [s.captions[i] for i in chosen], s.source)


def floor(study, judge=None) -> dict:
    """metrics of the real-vs-real floor (``WORKDIR/floor/metrics.json``; computed once)."""
    path = study.path("floor", "metrics.json")
    if os.path.isfile(path):
        return report.read_json(path)
    n = int(study.config.synth.per_condition)
    sub = floor_subset(study.image_set("valid"), study.conditions, n)
    study.stage(f"real-vs-real floor: {len(sub)} validation films ({n} per condition) vs "
                "the real test films")
    ev = study.evaluator(judge if judge is not None else study.judge())
    ev.evaluate(sub, out_dir=study.path("floor"))
    return report.read_json(path)


# ------------------------------------------------------------------------ selection


def validation_fids(results: dict, names: Sequence[str], valid: dict, gen: dict,
                    kind: str) -> dict[str, float]:
    """{model: FID of its generated set against the real validation films ``valid``}."""
    out = {}
    for m in names:
        if m in gen and kind in gen[m] and kind in valid:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RankDeficientWarning)
                out[m] = float(fid_from_features(valid[kind], gen[m][kind], method="eigh"))
    return out


def choose_downstream(config, names: Sequence[str], val_fids: dict) -> tuple[str, str]:
    """(strategy, how it was chosen) for finding 3 -- never from the test split."""
    fixed = str(config.regimes.get("downstream_strategy", "") or "")
    if fixed:
        if fixed not in names:
            raise ValueError(f"regimes.downstream_strategy={fixed!r} is not among the study's "
                             f"models {list(names)}")
        return fixed, "fixed in the config before the run"
    tuned = {m: v for m, v in val_fids.items() if m != BASE}
    if not tuned:
        return "", "no fine-tuned strategy"
    best = min(tuned, key=tuned.get)
    return best, f"lowest FID against the real validation films ({tuned[best]:.4g})"


# ------------------------------------------------------------------------ findings


def _condition_labels(feat: dict, conditions: Sequence[str]) -> np.ndarray:
    cols = [str(c) for c in feat["label_columns"]]
    return np.asarray(feat["labels"], np.float64)[:, [cols.index(c) for c in conditions]]


def compute_findings(study, results: dict, names: Sequence[str], kind: str, fid_name: str,
                     real_rows: list[dict], scarcest: float | None, gen: dict,
                     test: dict, valid: dict) -> tuple[list[dict], dict]:
    """The three findings and what they were chosen / computed from."""
    b = int(study.config.eval.get("intervals", 400)) or 2
    seed = int(study.config.seed)
    fam = {m: F.FAMILY_OF[m] for m in names if m in F.FAMILY_OF and m in gen
           and kind in gen[m]}
    ranking = F.family_ranking(test[kind], {m: gen[m][kind] for m in fam}, fam, b=b,
                               seed=seed) if kind in test and fam else None
    # (2) alignment, paired over seeds, from the judge scores each evaluation saved
    align, why, chance_p = alignment_finding(study, results, names, gen, b, seed)
    # (3) downstream, strategy chosen on validation
    val_fids = validation_fids(results, names, valid, gen, kind)
    chosen, how = choose_downstream(study.config, names, val_fids)
    down, dwhy = None, ""
    if scarcest is None or not chosen:
        dwhy = "no real fraction or no strategy"
    else:
        down = F.downstream_gain(real_rows, results[chosen].get("regimes", []), scarcest)
    label = tables.frac_label(scarcest) if scarcest is not None else "?"
    out = F.three_findings(fid_name=fid_name, ranking=ranking, alignment=align,
                           alignment_why=why, downstream=down, scarcest_label=label,
                           chosen=chosen, chosen_how=how, downstream_why=dwhy,
                           chance_p=chance_p)
    plots = finding_plots(study, ranking, align, fid_name)
    return out, {"validation_fid": val_fids, "downstream_strategy": chosen,
                 "downstream_how": how, "plots": plots,
                 "per_model_fid": ({m: iv.to_dict() for m, iv in ranking["per_model"].items()}
                                   if ranking and "per_model" in ranking else {})}


def alignment_finding(study, results: dict, names: Sequence[str], gen: dict, b: int,
                      seed: int) -> tuple[dict | None, str, dict]:
    """Finding 2 (`findings.alignment_gain_paired`) from each model's saved judge scores
    (``<model>/eval/judge_scores.npz``: the same synthesis plan for every model, checked),
    or from the features files' judge columns when scores were not saved; with each model's
    alignment-against-chance p-value from its evaluation."""
    conds = list(study.conditions)
    paths = {m: study.path(m, "eval") for m in names
             if os.path.isfile(study.path(m, "eval", A.SCORES_FILE))}
    chance = {m: tables.overall(results, m, "align_paired_p_value") for m in names
              if m in results}
    if BASE not in paths and (BASE not in gen or "judge" not in gen[BASE]):
        return None, "the base model or a judge is missing", chance
    if BASE in paths:
        sc = {m: A.load_judge_scores(p, conds) for m, p in paths.items()}
        for m in sc:
            A.same_plan(sc[m], sc[BASE], (paths[m], paths[BASE]))
        probs = {m: v["probs"] for m, v in sc.items()}
        labels, groups = sc[BASE]["prompt_labels"], sc[BASE]["groups"]
    else:  # older evaluations: judge columns of features.npz, one image per group
        probs = {m: gen[m]["judge"] for m in names if m in gen and "judge" in gen[m]}
        labels = _condition_labels(gen[BASE], conds)
        groups = np.arange(labels.shape[0])
    tuned = [m for m in names if m != BASE and m in probs]
    if not tuned:
        return None, "no fine-tuned strategy", chance
    return F.alignment_gain_paired(probs, labels, groups, BASE, tuned, b=max(b, 2),
                                   seed=seed), "", chance


def finding_plots(study, ranking: dict | None, align: dict | None, fid_name: str) -> dict:
    """finding1_fid.png (each model's and each family's FID with its interval) and
    finding2_alignment.png (each strategy's alignment gain over the base)."""
    out = {}
    if ranking and ranking.get("per_model"):
        rows = []
        for key in ranking.get("ranking", []):
            f = ranking["families"][key]
            iv = f["fid"]
            rows.append((f"{F.FAMILY_NAMES[key]} (mean)", iv.value, iv.lo, iv.hi,
                         F.FAMILY_NAMES[key]))
            for m in f["members"]:
                iv = ranking["per_model"][m]
                rows.append((f"  {m}", iv.value, iv.lo, iv.hi, F.FAMILY_NAMES[key]))
        path = study.path("finding1_fid.png")
        floor_path = study.path("floor", "metrics.json")
        fl = None
        if os.path.isfile(floor_path):
            fl = report.read_json(floor_path)["rows"][ALL].get(
                "fid_inception" if fid_name.startswith("FID-Inc") else "fid_domain")
        out["finding1"] = report.plot_intervals(
            rows, path, xlabel=f"{fid_name} (all conditions), 95% interval",
            ref=fl, ref_label="real vs real", title="Finding 1: strategy families by FID")
    if align:
        rows = [(m, iv.value, iv.lo, iv.hi, "") for m, iv in align["per_model"].items()]
        rows.insert(0, ("mean of fine-tuned", align["effect"].value, align["effect"].lo,
                        align["effect"].hi, ""))
        out["finding2"] = report.plot_intervals(
            rows, study.path("finding2_alignment.png"),
            xlabel=f"{align.get('statistic', 'pooled')} alignment macro AUROC minus the "
                   "base's, 95% interval", ref=0.0,
            title="Finding 2: alignment gain over the un-tuned base")
    return out


# ------------------------------------------------------------------------ results files


def write_results(study, results: dict[str, dict], real_rows: list[dict], judge=None) -> dict:
    """results.csv, results.md, results.json, the two plots and samples_all.png."""
    c = study.config
    conds = list(study.conditions)
    names = [m for m in study.models() if m in results]
    real_tab = tables.regime_table(real_rows)
    fractions = sorted({f for (_, f) in real_tab if f is not None})
    strat_fracs = sorted({float(f) for f in (c.regimes.strategy_fractions or c.regimes.fractions)})
    scarcest = min(fractions + strat_fracs) if (fractions or strat_fracs) else None

    def overall(m, key):
        return tables.overall(results, m, key)

    inception = any(overall(m, "fid_inception") is not None for m in names)
    fid_key = "fid_inception" if inception else "fid_domain"
    fid_name = "FID-Inception" if inception else "domain FID"
    kind = fid_key.removeprefix("fid_")

    gen = {m: load_features(p) for m in names
           if os.path.isfile(p := study.path(m, "eval", "features.npz"))}
    test = real_features(study, "test", judge)
    floor_metrics = floor(study, judge)
    # the floor's balanced validation films (as many per condition as each model
    # generates) are also what finding 3's strategy is chosen on
    vpath = study.path("floor", "features.npz")
    valid = load_features(vpath) if os.path.isfile(vpath) else {}
    found, chosen = compute_findings(study, results, names, kind, fid_name, real_rows,
                                     scarcest, gen, test, valid)

    headers, table = tables.results_table(results, names, real_tab, fractions, strat_fracs,
                                          floor=floor_metrics)
    csv_path = files.atomic_write(study.path("results.csv"), report.csv_text(headers, table))

    plots = {}
    pts = [(m, results[m].get("trainable_params"), overall(m, fid_key)) for m in names
           if m != BASE]
    base_fid = overall(BASE, fid_key) if BASE in results else None
    plots["fid_vs_params"] = report.plot_fid_vs_params(
        pts, study.path("fid_vs_params.png"), ylabel=f"{fid_name} (all conditions)",
        base=base_fid)
    real_iv = tables.regime_intervals(real_rows)
    curves, syn_only = {}, {}
    for m in names:
        tab = tables.regime_intervals(results[m].get("regimes", []))
        curves[m] = [(f, *(tables.band(tab, ("real+synthetic", f)) or (None,) * 3))
                     for f in strat_fracs]
        syn_only[m] = tables.band(tab, ("synthetic", None))
    plots["auroc_vs_fraction"] = report.plot_auroc_vs_fraction(
        [(f, *(tables.band(real_iv, ("real", f)) or (None,) * 3)) for f in fractions], curves,
        study.path("auroc_vs_fraction.png"), synthetic_only=syn_only)
    plots["samples_all"] = samples_all(study, names)

    md = tables.results_markdown(study, results, names, headers, table, conds, found,
                                 real_tab, fractions, strat_fracs, floor=floor_metrics,
                                 chosen=chosen)
    md_path = files.atomic_write(study.path("results.md"), md)
    report.write_json(study.path("results.json"),
                      report.clean({"findings": F.jsonable(found), "headers": headers,
                                    "rows": table, "selection": chosen,
                                    "floor": floor_metrics["rows"]}))
    plots.update(chosen.pop("plots"))
    return {"csv": csv_path, "md": md_path, "plots": plots, "findings": found}


def samples_all(study, names: Sequence[str]) -> str:
    """Rows: a real test image per condition, then each model; columns: the conditions."""
    conds = list(study.conditions)
    rows, labels = [], []
    real = study.image_set("test")
    first = []
    for c in conds:
        idx = np.nonzero(real.positives(c))[0][:1]
        first.append(load_images([real.paths[idx[0]]])[0] if len(idx) else None)
    rows.append(first)
    labels.append("real (test)")
    for m in names:
        s = read_image_set(study.path(m, "synth"))
        row = []
        for c in conds:
            idx = np.nonzero(s.positives(c))[0][:1]
            row.append(load_images([s.paths[idx[0]]])[0] if len(idx) else None)
        rows.append(row)
        labels.append(m)
    return files.save_image(images.grid(rows, row_labels=labels, col_labels=conds),
                            study.path("samples_all.png"))
