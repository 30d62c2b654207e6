r"""FID and alignment vs optimizer step: the training curve of a study's fine-tuning runs.

    python -m jaxmed.study_curve --workdir W [--per-condition 10]

``W`` is a study workdir (`jaxmed.study`, finished or still running). The study is rebuilt
from ``W/study_config.json``, so its phantom data, caches and judge classifier are reused,
not retrained. Then for the un-tuned base (step 0, shared by every strategy) and for every
checkpoint each finished fine-tuning run kept (``W/<name>/train/checkpoints``):

  1. the trainable params of that step are restored and folded into the base model
     (`jaxmed.checkpoint.restore_run`, what `Trainer.exported_params` gives);
  2. ``--per-condition`` images of each condition are synthesised with exactly the study's
     settings (sampler, steps, guidance, seed, paired noise, grey) into
     ``W/<name>/curve/step_<k>/synth`` (resumable, as the study's synthesis is);
  3. they are scored by the study's evaluator (the real test split, the judge): FID-Inception
     (when the preset has it), domain FID, KID, Vendi and alignment AUROC, each with its 95%
     interval, into ``W/<name>/curve/step_<k>/eval``.

Outputs: ``W/curve.json`` (every point), ``W/curve.md`` (a row per strategy x step) and
``W/curve.png`` (FID and alignment AUROC, each with its 95% band, vs step; chance at 0.5).

Two limits to read the curve with. Its N (default 10 per condition) is smaller than the
study's, so its intervals are wider than those of results.md; with the study's N and its
last step a point reproduces the study's numbers exactly (the same images: the same seeds and
paired noise; tests/test_study.py). And only the checkpoints the run kept are on it
(``configs/finetune.py`` ``checkpoint.keep``, the last 3 by default): to see the early
steps, run the study with more checkpoints kept (``--config.finetune.overrides=
"checkpoint.keep=10"``) or taken more often (``finetune.checkpoint_every_steps``).

Cost: one synthesis + evaluation per point, i.e. (1 + strategies x kept checkpoints) x 6 x N
images at the study's sampling cost, plus the real test features once.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import ml_collections

from jaxmed import cli, files
from jaxmed.checkpoint import Checkpointer, restore_run
from jaxmed.data.labels import ALL
from jaxmed.errors import UserError
from jaxmed.eval import report
from jaxmed.eval.tables import BASE
from jaxmed.study import Study

DEFAULT_PER_CONDITION = 10
# (key in an evaluation row, title): the columns of curve.md and curve.json
METRICS = (("fid_inception", "FID-Inception"), ("fid_domain", "domain FID"),
           ("kid_inception", "KID-Inception"), ("kid_domain", "domain KID"),
           ("vendi_domain", "Vendi"), ("align_auroc", "alignment AUROC"))


def open_study(workdir: str) -> Study:
    """The `Study` of ``workdir`` as its ``study_config.json`` describes it."""
    path = os.path.join(workdir, "study_config.json")
    if not os.path.isfile(path):
        raise UserError(f"{workdir} is not a study workdir (no study_config.json): run "
                        "python -m jaxmed.study --workdir there first")
    return Study(ml_collections.ConfigDict(report.read_json(path)), workdir)


def kept_steps(study: Study) -> dict[str, list[int]]:
    """{strategy: its kept checkpoint steps} for each fine-tuning run that finished (a run
    still training would delete checkpoints under the curve)."""
    out = {}
    for name in study.models():
        train_dir = study.path(name, "train")
        if name == BASE or not os.path.isdir(os.path.join(train_dir, "checkpoints")):
            continue
        if not os.path.isfile(os.path.join(train_dir, "summary.json")):
            study.stage(f"{name}: still fine-tuning, not on the curve yet")
            continue
        ckpt = Checkpointer(os.path.join(train_dir, "checkpoints"), async_save=False)
        try:
            steps = sorted(ckpt.all_steps())
        finally:
            ckpt.close()
        if steps:
            out[name] = steps
    return out


def point(study: Study, judge, name: str, step: int, n: int) -> dict:
    """Synthesise and score ``name`` at checkpoint ``step`` (the base at 0): its overall
    metrics with intervals. A point already scored with the same N and settings is read."""
    folder = study.path(name, "curve", f"step_{step}")
    done_path = os.path.join(folder, "point.json")
    key = {"per_condition": n, "settings": study.settings_hash()}
    if os.path.isfile(done_path):
        old = report.read_json(done_path)
        if {k: old.get(k) for k in key} == key:
            return old
    sd, base_params = study.base_model()
    if step == 0:
        params = base_params
    else:
        _, params = restore_run(study.path(name, "train"), dtype=study.config.model.dtype,
                                step=step, base=(sd, base_params))
    syn = study.synthesize_model(f"{name} step {step}", params,
                                 out=os.path.join(folder, "synth"), per_condition=n)
    del params
    ev = study.evaluator(judge).evaluate(os.path.join(folder, "synth"),
                                         out_dir=os.path.join(folder, "eval"))
    row = ev["rows"][ALL]
    out = {"name": name, "step": int(step), **key, "n_generated": ev["n_generated"],
           "synthesis_seconds": syn["seconds"], "evaluation_seconds": ev["seconds"]}
    for k, _ in METRICS:
        out[k] = row.get(k)
        iv = (row.get("ci") or {}).get(k)
        out[f"{k}_ci"] = [iv["lo"], iv["hi"]] if iv else None
    out["align_auroc_ci"] = row.get("align_auroc_ci")
    report.write_json(done_path, out)
    return report.clean(out)


def run_curve(workdir: str, per_condition: int = DEFAULT_PER_CONDITION) -> dict:
    """Every point of ``workdir``'s curve; writes curve.json, curve.md and curve.png."""
    workdir = os.path.abspath(workdir)
    study = open_study(workdir)
    n = int(per_condition)
    if n < 1:
        raise UserError(f"--per-condition must be >= 1, got {n}")
    steps = kept_steps(study)
    if not steps:
        raise UserError(f"{workdir}: no finished fine-tuning run kept a checkpoint "
                        "(W/<strategy>/train/checkpoints); nothing to put on a curve")
    study.progress = study.score_progress = bool(study.config.log.progress)
    study.prepare_data()
    judge = study.judge()
    todo = [(BASE, 0)] + [(m, k) for m, ks in steps.items() for k in ks]
    points = []
    for i, (m, k) in enumerate(todo):
        study.stage(f"curve point {i + 1}/{len(todo)}: {m} at step {k} "
                    f"({len(study.conditions) * n} images)")
        p = point(study, judge, m, k, n)
        study.stage(f"{m} step {k}: {_summary(p)}")
        points.append(p)
    out = {"workdir": workdir, "per_condition": n, "study_per_condition":
           int(study.config.synth.per_condition), "strategies": list(steps),
           "points": points}
    report.write_json(study.path("curve.json"), out)
    files.atomic_write(study.path("curve.md"), curve_markdown(out))
    plot_curve(out, study.path("curve.png"))
    study.stage(f"curve: {study.path('curve.md')}, {study.path('curve.png')}")
    return out


def _summary(p: dict) -> str:
    parts = [f"{title} {report.fmt(p.get(k))}" for k, title in METRICS
             if p.get(k) is not None and not k.startswith("kid")]
    return ", ".join(parts)


def _with_interval(v, ci) -> str:
    if v is None:
        return report.DASH
    if not ci or any(x is None for x in ci):
        return report.fmt(v)
    return f"{report.fmt(v)} [{report.fmt(ci[0])}, {report.fmt(ci[1])}]"


def curve_markdown(curve: dict) -> str:
    pts = curve["points"]
    shown = [(k, t) for k, t in METRICS if any(p.get(k) is not None for p in pts)]
    headers = ["strategy", "step", "N gen", *(t for _, t in shown)]
    base = [p for p in pts if p["name"] == BASE]
    rows = []
    for p in base + [p for p in pts if p["name"] != BASE]:
        rows.append([p["name"], p["step"], p["n_generated"],
                     *(_with_interval(p.get(k), p.get(f"{k}_ci")) for k, _ in shown)])
    fewer = ("; fewer images give wider intervals"
             if curve["per_condition"] < curve["study_per_condition"] else "")
    return (
        "# FID and alignment vs optimizer step\n\n"
        f"{curve['per_condition']} images per condition per point (the study used "
        f"{curve['study_per_condition']}{fewer}). Only the "
        "checkpoints each run kept are here; step 0 is the un-tuned base. Brackets: 95% "
        "intervals (`jaxmed.eval.uncertainty`). Alignment AUROC at chance is 0.5.\n\n"
        + report.md_table(headers, rows) + "\n")


def plot_curve(curve: dict, path: str) -> str:
    """Panels vs optimizer step, one line per strategy from the shared base at step 0, each
    with its 95% band: FID-Inception (when scored), domain FID, alignment AUROC."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    pts = curve["points"]
    base = next(p for p in pts if p["name"] == BASE)
    panels = [(k, t) for k, t in (("fid_inception", "FID-Inception"),
                                  ("fid_domain", "domain FID"),
                                  ("align_auroc", "alignment macro AUROC"))
              if any(p.get(k) is not None for p in pts)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), dpi=110,
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (key, title) in zip(axes[0], panels):
        for i, name in enumerate(curve["strategies"]):
            line = [base] + sorted((p for p in pts if p["name"] == name),
                                   key=lambda p: p["step"])
            line = [p for p in line if _finite(p.get(key))]
            if not line:
                continue
            x = [p["step"] for p in line]
            color = cmap(i % 10)
            ax.plot(x, [p[key] for p in line], marker="o", ms=3, lw=1.2, color=color,
                    label=name)
            band = [(p["step"], *p[f"{key}_ci"]) for p in line
                    if p.get(f"{key}_ci") and all(_finite(v) for v in p[f"{key}_ci"])]
            if len(band) >= 2:
                bx, lo, hi = zip(*band)
                ax.fill_between(bx, lo, hi, color=color, alpha=0.15, lw=0)
        if key == "align_auroc":
            ax.axhline(0.5, ls="--", color="grey", lw=1)
            ax.text(ax.get_xlim()[0], 0.5, " chance", va="bottom", fontsize=7, color="grey")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step (0 = un-tuned base)")
        ax.set_ylabel(f"{title}, 95% band")
        ax.set_title(f"{title} vs step", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{curve['per_condition']} images per condition per point", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


# ------------------------------------------------------------------------ command line


def main(argv=None) -> int:
    return cli.main_guard(_main, argv)


def _main(argv: list[str]) -> int:
    cli.setup_logging(logging.WARNING)
    ap = argparse.ArgumentParser(prog="python -m jaxmed.study_curve",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a study workdir (jaxmed.study)")
    ap.add_argument("--per-condition", type=int, default=DEFAULT_PER_CONDITION,
                    help="images per condition per point (default %(default)s)")
    args = ap.parse_args(argv)
    cli.enable_compilation_cache()
    out = run_curve(args.workdir, args.per_condition)
    print(f"curve of {len(out['points'])} points: {os.path.join(out['workdir'], 'curve.md')}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
