r"""The whole study: fine-tune with every strategy, synthesise, score, tabulate, plot.

    python -m jaxmed.study --config configs/study.py:demo --workdir /tmp/study \
        [--config.model.path=DIR] [--config.strategies="('lora','bitfit')"]

For the un-tuned base and each strategy of ``config.strategies`` (the study's 11 plus
difffit-orig, svdiff and attn by default):

  1. fine-tune (`jaxmed.train`, ``configs/finetune.py:<strategy>`` with the preset's
     overrides: model, data, steps, batch, learning-rate multiplier) -- skipped for the base;
  2. synthesise the balanced set: the same combination CSV (``per_condition`` images of
     each of the six conditions), sampler, steps, guidance and seed for every model, so
     every comparison is paired (image i of two models starts from the same noise);
  3. evaluate (`jaxmed.evaluate`): FID-Inception (or the message saying how to get the
     weights), domain FID on the judge classifier's features, Vendi, alignment by the judge;
  4. train downstream classifiers on synthetic images alone and on real + synthetic at
     the preset's real fractions, tested on the real test split;
  5. write ``WORKDIR/<name>/done.json``.

A model whose ``done.json`` exists is skipped (resumable: a killed study reruns only what
was unfinished; a killed fine-tuning run resumes from its checkpoint). Shared work is done
once: the phantom data (``WORKDIR/data``), the latent / text caches (``WORKDIR/cache``),
the judge classifier (``WORKDIR/judge``), the real-only classifiers
(``WORKDIR/regimes_real.json``; strategy-independent) and the real test features.

The judge: one classifier trained on 100% of the real training split, labels = the six
conditions. It provides the domain-FID features and judges alignment; its macro AUROC on
the real test split is checked against ``judge.min_macro_auroc`` and reported.

Outputs: ``results.csv`` and ``results.md`` (a row per model: trainable parameters, train
time, FID-Inception, domain FID, Vendi, alignment, macro AUROC per regime; per-condition
tables; the study's three findings, each stated as reproduced or not with its numbers;
the settings), ``fid_vs_params.png``, ``auroc_vs_fraction.png``, ``<name>/samples.png`` and
``samples_all.png`` (rows = models, columns = conditions, the same prompts and seeds).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxmed import files
from jaxmed.data.labels import ALL, CONDITIONS
from jaxmed.eval import report

BASE = "base"
FINETUNE_CONFIG = "configs/finetune.py"


class Study:
    """One study run in ``workdir``; `run()` does everything not done yet."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.t0 = time.perf_counter()
        self.conditions = tuple(config.eval.conditions) or CONDITIONS
        self._sd = None
        self._evaluator = None
        self._arrays: dict[str, Any] = {}
        self.progress = bool(config.log.progress)

    # ------------------------------------------------------------------ logging
    def stage(self, msg: str) -> None:
        el = time.perf_counter() - self.t0
        print(f"[jaxmed.study {int(el // 60):02d}:{el % 60:04.1f}] {msg}", flush=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def settings_hash(self) -> str:
        """What a model's results depend on (not the model list, logging or description)."""
        import hashlib

        d = self.config.to_dict()
        for k in ("strategies", "include_base", "description", "preset", "log"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> dict:
        c = self.config.data
        if c.kind == "phantom":
            from jaxmed.data import phantom

            folder = self.path("data")
            self.stage(f"phantom data: {c.phantom_patients} patients at "
                       f"{self.phantom_resolution} px in {folder}")
            csvs = phantom.ensure_dataset(folder, n_patients=c.phantom_patients,
                                          resolution=self.phantom_resolution,
                                          seed=self.config.seed, progress=self.progress)
            self.data = {**csvs, "root": folder}
        elif c.kind == "chexpert":
            missing = [k for k in ("train_csv", "valid_csv", "test_csv") if not c[k]]
            if missing:
                raise ValueError(f"data.kind=chexpert needs --config.data.{missing[0]}=PATH "
                                 "(the study's CSV format) and --config.data.image_root=DIR")
            self.data = {"train": c.train_csv, "valid": c.valid_csv, "test": c.test_csv,
                         "root": c.image_root or None}
        else:
            raise ValueError(f"data.kind={c.kind!r}: choose phantom or chexpert")
        return self.data

    @property
    def phantom_resolution(self) -> int:
        # what jaxmed.train asks of the phantom (so the fine-tuning runs reuse this folder)
        return max(int(self.config.data.resolution), 64)

    def image_set(self, split: str):
        from jaxmed.evaluate import ImageSet, read_image_set

        s = read_image_set(self.data[split], self.data["root"])
        cap = self.config.data.max_test_images if split == "test" else -1
        if cap and cap > 0 and len(s) > cap:
            s = ImageSet(s.paths[:cap], s.labels[:cap], s.label_columns, s.captions[:cap],
                         s.source)
        return s

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(grey uint8 images at the classifier size, 0/1 labels of the conditions)."""
        if split not in self._arrays:
            from jaxmed.evaluate import load_images

            s = self.image_set(split)
            size = int(self.config.classifier.image_size)
            x = load_images(s.paths, (size, size)).mean(-1).round().astype(np.uint8)
            self._arrays[split] = (x, self._condition_labels(s))
        return self._arrays[split]

    def _condition_labels(self, s) -> np.ndarray:
        idx = [s.label_columns.index(c) for c in self.conditions]
        return np.nan_to_num(s.labels[:, idx], nan=0.0).astype(np.float32)

    # ------------------------------------------------------------------ classifiers
    def classifier_config(self, *, judge: bool):
        from jaxmed.eval.classifier import ClassifierConfig

        c = self.config.classifier
        kw = dict(arch=c.arch, image_size=int(c.image_size), num_labels=len(self.conditions),
                  label_names=tuple(self.conditions), widths=tuple(c.widths), lr=float(c.lr),
                  batch_size=int(c.batch_size), seed=int(self.config.seed),
                  pos_weight=c.pos_weight)
        if judge:
            kw.update(epochs=int(c.judge_epochs))
        else:
            steps = int(c.regime_steps)
            kw.update(steps=steps, eval_every=max(1, steps // max(1, int(c.regime_evals))))
        return ClassifierConfig(**kw)

    def judge(self):
        """The classifier trained on 100% real training data (trained once, then loaded)."""
        from jaxmed.eval.classifier import TrainedClassifier, train_classifier

        folder = self.path("judge")
        summary_path = os.path.join(folder, "test.json")
        if os.path.isfile(summary_path) and os.path.isfile(os.path.join(folder, "config.json")):
            clf = TrainedClassifier.load(folder)
            self.judge_summary = report.read_json(summary_path)
            return clf
        cfg = self.classifier_config(judge=True)
        xtr, ytr = self.arrays("train")
        xv, yv = self.arrays("valid")
        xte, yte = self.arrays("test")
        self.stage(f"judge classifier: {cfg.arch} at {cfg.image_size} px on {len(xtr)} real "
                   f"training images ({cfg.epochs} epochs, best on {len(xv)} validation images)")
        t = time.perf_counter()
        clf = train_classifier(cfg, xtr, ytr, xv, yv, progress=self.progress)
        summary = clf.evaluate(xte, yte)
        summary["seconds"] = round(time.perf_counter() - t, 1)
        summary["n_train"] = int(len(xtr))
        summary["min_macro_auroc"] = float(self.config.classifier.min_macro_auroc)
        clf.save(folder)
        report.write_json(summary_path, summary)
        self.judge_summary = report.clean(summary)
        ok = summary["macro_auroc"] >= self.config.classifier.min_macro_auroc
        self.stage(f"judge: macro AUROC {summary['macro_auroc']:.3f} on {summary['n']} real test "
                   f"images ({'>=' if ok else 'BELOW'} {self.config.classifier.min_macro_auroc})")
        return clf

    def real_regimes(self) -> list[dict]:
        path = self.path("regimes_real.json")
        if os.path.isfile(path):
            return report.read_json(path)
        from jaxmed.eval.classifier import run_regimes

        r = self.config.regimes
        self.stage(f"downstream, real only: fractions {list(r.fractions)} x {r.repeats} "
                   "repeat(s) (strategy-independent, computed once)")
        rows = run_regimes(self.arrays("train"), None, self.arrays("test"), r.fractions,
                           modes=("real",), repeats=int(r.repeats), seeds=self._seeds(),
                           config=self.classifier_config(judge=False),
                           val=self.arrays("valid") if r.use_valid else None,
                           progress=self.progress)
        report.write_json(path, rows)
        return report.clean(rows)

    def _seeds(self):
        r = self.config.regimes
        return list(r.seeds) if r.seeds else None

    # ------------------------------------------------------------------ models
    def base_model(self):
        if self._sd is None:
            from jaxmed.models.sd import StableDiffusion

            m = self.config.model
            self.stage(f"loading the base model {m.path}")
            self._sd = StableDiffusion.load(m.path, dtype=m.dtype, remat=bool(m.remat))
        return self._sd

    def finetune_config(self, name: str) -> ml_collections.ConfigDict:
        from jaxmed.cli import load_config, set_override

        c, ft = self.config, self.config.finetune
        cfg = load_config(f"{ft.config}:{name}")
        over = {
            "seed": c.seed, "model.path": c.model.path, "model.dtype": c.model.dtype,
            "model.remat": bool(c.model.remat),
            "data.resolution": int(c.data.resolution),
            "data.max_images": int(c.data.max_train_images),
            "data.caption_dropout": float(ft.caption_dropout),
            "optim.grad_accum": int(ft.grad_accum),
            "train.per_device_batch": int(ft.per_device_batch),
            "train.max_steps": int(ft.max_steps), "train.epochs": int(ft.epochs),
            "cache.dir": self.path("cache"),
            "log.sample_every_steps": -1, "log.tensorboard": bool(c.log.tensorboard),
            "log.progress": self.progress,
        }
        if ft.checkpoint_every_steps > 0:
            over["checkpoint.every_steps"] = int(ft.checkpoint_every_steps)
        if c.data.kind == "phantom":
            over.update({"data.kind": "phantom", "data.phantom_dir": self.path("data"),
                         "data.phantom_patients": int(c.data.phantom_patients)})
        else:
            over.update({"data.kind": "chexpert", "data.csv": c.data.train_csv,
                         "data.image_root": c.data.image_root})
        for k, v in over.items():
            _set(cfg, k, v)
        mult = float(ft.lr_multiplier)
        if mult != 1.0:
            s = cfg.strategy
            if "lrs" in s and isinstance(s.lrs, ml_collections.ConfigDict):
                for comp in list(s.lrs.keys()):
                    s.lrs[comp] = float(s.lrs[comp]) * mult
            for key in ("lr", "text_lr"):
                if key in s and s[key] is not None:
                    s[key] = float(s[key]) * mult
        for item in [x for x in str(ft.overrides).split(";") if x.strip()]:
            if "=" not in item:
                raise ValueError(f"finetune.overrides: {item!r} is not key=value")
            k, v = item.split("=", 1)
            set_override(cfg, k.strip().removeprefix("--config."), v.strip())
        return cfg

    def train_model(self, name: str) -> tuple[dict, dict]:
        """(plain params, train summary) of a fine-tuned model; reuses a finished run."""
        from jaxmed import train

        sd, params = self.base_model()
        cfg = self.finetune_config(name)
        wd = self.path(name, "train")
        summary_path = os.path.join(wd, "summary.json")
        export = os.path.join(wd, "export")
        if os.path.isfile(summary_path) and os.path.isfile(
                os.path.join(export, "model_index.json")):
            summary = report.read_json(summary_path)
            want = cfg.train.max_steps
            if want <= 0 or summary.get("steps") == want:
                from jaxmed.models.sd import StableDiffusion

                self.stage(f"{name}: reusing the finished fine-tuning run in {wd}")
                _, tuned = StableDiffusion.load(export, dtype=cfg.model.dtype)
                first = os.path.join(wd, "first_summary.json")
                if os.path.isfile(first):
                    summary = report.read_json(first)
                return tuned, summary
        self.stage(f"{name}: fine-tuning ({_lr_text(cfg.strategy)})")
        trainer = train.Trainer(cfg, wd, sd=sd, params=params)
        summary = trainer.run()
        tuned = trainer.exported_params()
        if summary.get("resumed_from", 0) == 0:
            report.write_json(os.path.join(wd, "first_summary.json"), summary)
        else:  # a resumed run: its train time is only the remainder
            summary["note"] = f"resumed from step {summary['resumed_from']}"
        del trainer
        return tuned, summary

    # ------------------------------------------------------------------ per model
    def combinations(self) -> str:
        from jaxmed.data import phantom

        path = self.path("combinations.csv")
        n = int(self.config.synth.per_condition)
        phantom.make_combination_csv([[c] for c in self.conditions], n, path)
        return path

    def evaluator(self, judge):
        if self._evaluator is None:
            from jaxmed.evaluate import Evaluator

            e = self.config.eval
            self.stage("evaluator: real test features (computed once)"
                       + ("" if e.inception else "; FID-Inception disabled by the preset"))
            self._evaluator = Evaluator(
                self.image_set("test"), domain_classifier=judge, inception=bool(e.inception),
                inception_weights=e.inception_weights or None, conditions=self.conditions,
                vendi=True, clip=e.clip or None, fid_method=e.fid_method,
                progress=self.progress)
            self._evaluator.real_features()
        return self._evaluator

    def run_model(self, name: str, judge) -> dict:
        from jaxmed.sample import synthesize

        d = self.path(name)
        os.makedirs(d, exist_ok=True)
        times, t = {}, time.perf_counter()
        sd, base_params = self.base_model()
        if name == BASE:
            params, summary = base_params, {"trainable_params": 0, "train_seconds": 0.0,
                                            "steps": 0}
        else:
            params, summary = self.train_model(name)
        times["train"] = round(time.perf_counter() - t, 1)

        s = self.config.synth
        t = time.perf_counter()
        n = int(s.per_condition) * len(self.conditions)
        self.stage(f"{name}: synthesising {n} images ({s.sampler}, {s.steps} steps, guidance "
                   f"{s.guidance}, seed {s.seed})")
        syn = synthesize(sd, params, self.combinations(), os.path.join(d, "synth"),
                         batch_size=int(s.batch_size), sampler=s.sampler, steps=int(s.steps),
                         guidance=float(s.guidance), seed=int(s.seed),
                         resolution=int(self.config.data.resolution),
                         micro_batch=int(s.micro_batch) or None, progress=self.progress,
                         model_id=name)
        times["synthesis"] = round(time.perf_counter() - t, 1)
        self.sample_grid(name)

        t = time.perf_counter()
        self.stage(f"{name}: evaluating")
        ev = self.evaluator(judge).evaluate(os.path.join(d, "synth"),
                                            out_dir=os.path.join(d, "eval"))
        times["evaluation"] = round(time.perf_counter() - t, 1)

        t = time.perf_counter()
        regimes = self.synthetic_regimes(name, os.path.join(d, "synth"))
        times["downstream"] = round(time.perf_counter() - t, 1)
        trains = () if name == BASE else tuple(_strategy(name).trains)
        done = {"name": name, "trains": list(trains), "settings": self.settings_hash(),
                "trainable_params": int(summary.get("trainable_params", 0)),
                "train_seconds": summary.get("train_seconds"), "steps": summary.get("steps"),
                "train_note": summary.get("note", ""),
                "synthesis": {"n": syn["total"], "seconds": syn["seconds"]},
                "metrics": ev, "regimes": regimes, "seconds": times}
        report.write_json(os.path.join(d, "done.json"), done)
        ov = ev["rows"][ALL]
        self.stage(f"{name}: done in {sum(times.values()):.0f}s -- FID-Inception "
                   f"{report.fmt(ov.get('fid_inception'))}, domain FID "
                   f"{report.fmt(ov.get('fid_domain'))}, Vendi "
                   f"{report.fmt(ov.get('vendi_domain'))}, alignment AUROC "
                   f"{report.fmt(ov.get('align_auroc'))}")
        return report.clean(done)

    def synthetic_regimes(self, name: str, synth_dir: str) -> list[dict]:
        from jaxmed.eval.classifier import run_regimes
        from jaxmed.evaluate import load_images, read_image_set

        r = self.config.regimes
        modes = [m for m in r.modes if m != "real"]
        if not modes:
            return []
        s = read_image_set(synth_dir)
        size = int(self.config.classifier.image_size)
        x = load_images(s.paths, (size, size)).mean(-1).round().astype(np.uint8)
        y = self._condition_labels(s)
        fr = tuple(r.strategy_fractions) or tuple(r.fractions)
        self.stage(f"{name}: downstream classifiers: {modes} (real fractions {list(fr)}) on "
                   f"{len(x)} synthetic images")
        return report.clean(run_regimes(
            self.arrays("train"), (x, y), self.arrays("test"), fr, modes=tuple(modes),
            repeats=int(r.repeats), seeds=self._seeds(),
            config=self.classifier_config(judge=False),
            val=self.arrays("valid") if r.use_valid else None, progress=self.progress))

    def sample_grid(self, name: str) -> str:
        from jaxmed.evaluate import load_images, read_image_set

        s = read_image_set(self.path(name, "synth"))
        k = int(self.config.synth.grid_per_condition)
        rows, labels = [], []
        for c in self.conditions:
            idx = np.nonzero(s.positives(c))[0][:k]
            rows.append(list(load_images([s.paths[i] for i in idx])))
            labels.append(c)
        return report.image_grid(rows, self.path(name, "samples.png"), row_labels=labels)

    # ------------------------------------------------------------------ the run
    def log_invocation(self, ran: Sequence[str]) -> None:
        """Append this invocation's wall time to invocations.jsonl (results.md sums them)."""
        import jax

        rec = {"started": time.strftime("%Y-%m-%d %H:%M:%S",
                                        time.localtime(time.time() - self.elapsed())),
               "seconds": round(self.elapsed(), 1), "models_run": list(ran),
               "cpu_seconds": round(_cpu_seconds(), 1), "cpu_count": os.cpu_count(),
               "platform": jax.devices()[0].platform, "load_average": _loadavg()}
        with open(self.path("invocations.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def invocations(self) -> list[dict]:
        p = self.path("invocations.jsonl")
        if not os.path.isfile(p):
            return []
        with open(p) as f:
            return [json.loads(x) for x in f if x.strip()]

    def models(self) -> list[str]:
        from jaxmed import strategies

        names = list(self.config.strategies)
        bad = [n for n in names if n not in strategies.names()]
        if bad:
            raise ValueError(f"strategies {bad} are unknown; valid: {strategies.names()}")
        return ([BASE] if self.config.include_base else []) + names

    def run(self) -> dict:
        c = self.config
        models = self.models()
        self.stage(f"study preset {c.preset!r} in {self.workdir}: {len(models)} models "
                   f"({', '.join(models)})")
        report.write_json(self.path("study_config.json"), c.to_dict())
        self.prepare_data()
        todo = [m for m in models if not os.path.isfile(self.path(m, "done.json"))]
        for m in models:
            if m not in todo:
                self.stage(f"{m}: finished earlier (done.json), skipped")
                old = report.read_json(self.path(m, "done.json")).get("settings")
                if old is not None and old != self.settings_hash():
                    self.stage(f"WARNING {m}: done.json was written with other settings; "
                               f"its results are kept. Delete {self.path(m)} to redo it.")
        judge = self.judge()
        real_rows = self.real_regimes()
        results = {}
        for i, m in enumerate(models):
            if m not in todo:
                results[m] = report.read_json(self.path(m, "done.json"))
                continue
            self.stage(f"=== {m} ({i + 1}/{len(models)}) ===")
            results[m] = self.run_model(m, judge)
        self.stage("writing results.csv, results.md, plots")
        self.log_invocation(todo)
        out = write_results(self, results, real_rows)
        self.stage(f"finished: {out['md']}")
        return out


# ------------------------------------------------------------------------ aggregation


def _strategy(name: str):
    from jaxmed import strategies

    return strategies.get(name)


def _lr_text(strategy_cfg) -> str:
    if "lrs" in strategy_cfg and strategy_cfg.lrs is not None:
        return "lr " + ", ".join(f"{k} {float(v):g}" for k, v in strategy_cfg.lrs.items())
    return f"lr {float(strategy_cfg.lr):g}"


def _set(cfg, dotted: str, value) -> None:
    from jaxmed.cli import set_override

    set_override(cfg, dotted, repr(value) if not isinstance(value, str) else value)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _mean(vals) -> float | None:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else None


def _frac_label(f) -> str:
    return f"{100 * float(f):g}%"


def regime_table(rows: Sequence[dict]) -> dict[tuple[str, float | None], float | None]:
    """{(mode, fraction): mean macro AUROC over repeats}."""
    acc: dict[tuple, list] = {}
    for r in rows:
        key = (r["mode"], None if r.get("fraction") is None else float(r["fraction"]))
        acc.setdefault(key, []).append(r.get("macro_auroc"))
    return {k: _mean(v) for k, v in acc.items()}


def write_results(study: Study, results: dict[str, dict], real_rows: list[dict]) -> dict:
    c = study.config
    conds = list(study.conditions)
    names = [m for m in study.models() if m in results]
    real_tab = regime_table(real_rows)
    fractions = sorted({f for (_, f) in real_tab if f is not None})
    strat_fracs = sorted({float(f) for f in (c.regimes.strategy_fractions or c.regimes.fractions)})
    scarcest = min(fractions + strat_fracs) if (fractions or strat_fracs) else None

    def overall(m, key):
        return results[m]["metrics"]["rows"][ALL].get(key)

    inception = any(overall(m, "fid_inception") is not None for m in names)
    fid_key = "fid_inception" if inception else "fid_domain"
    fid_name = "FID-Inception" if inception else "domain FID"

    # ---- results.csv: a row per model
    regime_cols = [("synthetic", None)] + [("real+synthetic", f) for f in strat_fracs]
    real_cols = [("real", f) for f in fractions]
    headers = ["name", "trains", "trainable_params", "train_seconds", "steps", "n_generated",
               "fid_inception", "fid_domain", "vendi_domain", "vendi_inception", "align_auroc",
               "align_accuracy", "clip_score"]
    headers += [_regime_col(m, f) for m, f in regime_cols + real_cols]
    table = []
    for m in names:
        r = results[m]
        tab = regime_table(r.get("regimes", []))
        secs = r.get("train_seconds")
        row = [m, "+".join(r.get("trains", [])) or "-", r.get("trainable_params"),
               None if secs is None else round(float(secs), 1), r.get("steps"),
               results[m]["metrics"]["rows"][ALL].get("n_generated")]
        row += [overall(m, k) for k in ("fid_inception", "fid_domain", "vendi_domain",
                                        "vendi_inception", "align_auroc", "align_accuracy",
                                        "clip_score")]
        row += [tab.get(k) for k in regime_cols] + [real_tab.get(k) for k in real_cols]
        table.append(row)
    csv_path = files.atomic_write(study.path("results.csv"), report.csv_text(headers, table))

    # ---- plots
    plots = {}
    pts = [(m, results[m].get("trainable_params"), overall(m, fid_key)) for m in names
           if m != BASE]
    base_fid = overall(BASE, fid_key) if BASE in results else None
    plots["fid_vs_params"] = report.plot_fid_vs_params(
        pts, study.path("fid_vs_params.png"), ylabel=f"{fid_name} (all conditions)",
        base=base_fid)
    curves, syn_only = {}, {}
    for m in names:
        tab = regime_table(results[m].get("regimes", []))
        curves[m] = [(f, tab.get(("real+synthetic", f))) for f in strat_fracs]
        syn_only[m] = tab.get(("synthetic", None))
    plots["auroc_vs_fraction"] = report.plot_auroc_vs_fraction(
        [(f, real_tab.get(("real", f))) for f in fractions], curves,
        study.path("auroc_vs_fraction.png"), synthetic_only=syn_only)
    plots["samples_all"] = samples_all(study, names)

    # ---- findings
    findings = three_findings(study, results, names, fid_key, fid_name, real_tab, scarcest)

    # ---- results.md
    md = _results_markdown(study, results, names, headers, table, conds, findings, fid_key,
                           fid_name, real_tab, fractions, strat_fracs, plots)
    md_path = files.atomic_write(study.path("results.md"), md)
    report.write_json(study.path("results.json"), {"findings": findings, "headers": headers,
                                                   "rows": table})
    return {"csv": csv_path, "md": md_path, "plots": plots, "findings": findings}


def _regime_col(mode: str, f) -> str:
    tag = {"real": "real", "synthetic": "synthetic", "real+synthetic": "real+syn"}[mode]
    return f"auroc_{tag}" + ("" if f is None else f"@{_frac_label(f)}")


def samples_all(study: Study, names: Sequence[str]) -> str:
    """Rows: a real test image per condition, then each model; columns: the conditions."""
    from jaxmed.evaluate import load_images, read_image_set

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
    return report.image_grid(rows, study.path("samples_all.png"), row_labels=labels,
                             col_labels=conds)


def _trains_unet(results: dict, m: str) -> bool:
    return m != BASE and "unet" in results[m].get("trains", [])


def three_findings(study: Study, results: dict, names: Sequence[str], fid_key: str,
                   fid_name: str, real_tab: dict, scarcest: float | None) -> list[dict]:
    """The study's three findings, each {claim, reproduced: True/False/None, evidence}."""
    out = []
    unet = [m for m in names if _trains_unet(results, m)]

    def ov(m, k):
        return results[m]["metrics"]["rows"][ALL].get(k)

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
    label = _frac_label(scarcest) if scarcest is not None else "?"
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


def _verdict(f: dict) -> str:
    if f["reproduced"] is None:
        return "NOT TESTED"
    k = f" ({f['count'][0]}/{f['count'][1]} strategies)" if f.get("count") else ""
    if f["reproduced"]:
        return "REPRODUCED" + k
    return ("PARTLY REPRODUCED" if f.get("partial") else "NOT REPRODUCED") + k


def _results_markdown(study, results, names, headers, table, conds, findings, fid_key,
                      fid_name, real_tab, fractions, strat_fracs, plots) -> str:
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
        L += [f"{i}. **{_verdict(f)}** — {f['claim']}.  ", f"   Evidence: {f['evidence']}.", ""]
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
    first = results[names[0]]["metrics"]
    L += ["Sample counts per condition (generated / real): " + ", ".join(
        f"{cc} {first['rows'][cc]['n_generated']}/{first['rows'][cc]['n_real']}"
        for cc in conds + [ALL]) + ". With N <= feature dimension the covariances are "
        "singular and FID is biased upwards; compare FIDs only within a column (same N).", ""]
    if not first["inception"]["available"]:
        L += ["**FID-Inception missing.** " + first["inception"]["message"], ""]
    L += ["## Downstream classifier: real only (strategy-independent)", "",
          report.md_table(["real fraction"] + [_frac_label(f) for f in fractions],
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
          f"{[_frac_label(f) for f in fractions]} (real only), "
          f"{[_frac_label(f) for f in strat_fracs]} (real + synthetic); "
          f"{c.regimes.repeats} repeat(s)",
          f"- FID route: {c.eval.fid_method} (eigh when N <= d, else sqrtm)", ""]
    return "\n".join(L)


def _steps_text(c) -> str:
    if c.finetune.max_steps > 0:
        return f"{c.finetune.max_steps} optimizer steps per strategy"
    return f"{c.finetune.epochs} epochs per strategy"


# ------------------------------------------------------------------------ command line


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
    return Study(config, workdir).run()


def main(argv=None) -> int:
    from jaxmed.cli import ConfigError, enable_compilation_cache, parse

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, args = parse(argv, "python -m jaxmed.study", __doc__.split("\n\n")[0])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    enable_compilation_cache()
    try:
        out = run_study(config, args.workdir)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in out.items() if k != "findings"}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
