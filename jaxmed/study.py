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

Steps 3-5 of a model run in a background thread while the next model fine-tunes
(``overlap_scoring``; off: one after the other, with the same results).

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
Every compared number carries a 95% interval (`jaxmed.eval.uncertainty`), a real-vs-real
floor (validation vs test films at the same N) sits beside the models, and each finding's
verdict is read off an interval. The results files are written by `jaxmed.study_results`,
the tables arranged by `jaxmed.eval.tables`, the findings judged by `jaxmed.eval.findings`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxmed import cli, files, images, processes, sharding, strategies, study_peers, train
from jaxmed.cli import (
    enable_compilation_cache,
    load_config,
    parse,
    set_override,
    start_distributed,
)
from jaxmed.data import phantom
from jaxmed.data.labels import ALL, CONDITIONS
from jaxmed.diffusion.sampling import check_color
from jaxmed.eval import report
from jaxmed.eval.classifier import (
    ClassifierConfig,
    TrainedClassifier,
    run_regimes,
    train_classifier,
)
from jaxmed.eval.judge import check_judge, read_for_classifier
from jaxmed.eval.tables import BASE
from jaxmed.evaluate import Evaluator, ImageSet, load_images, read_image_set
from jaxmed.kernels.dispatch import prebuild_cpu_kernels
from jaxmed.models.sd import StableDiffusion
from jaxmed.sample import synthesize
from jaxmed.study_results import write_results


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
        # .get: a study_config.json written before the key existed (jaxmed.study_curve)
        self.overlap = bool(config.get("overlap_scoring", True)) and processes.is_main()
        # the background scorer's bars would interleave with fine-tuning's: stage lines only
        self.score_progress = self.progress and not self.overlap

    # ------------------------------------------------------------------ logging
    def stage(self, msg: str) -> None:
        el = time.perf_counter() - self.t0
        # one write per line: the background scorer logs too, and print() writes the text
        # and its newline separately, so two threads' lines could run together
        sys.stdout.write(f"[jaxmed.study {int(el // 60):02d}:{el % 60:04.1f}] {msg}\n")
        sys.stdout.flush()

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def settings_hash(self) -> str:
        """What a model's results depend on (not the model list, logging or description)."""
        d = self.config.to_dict()
        for k in ("strategies", "include_base", "description", "preset", "log",
                  "overlap_scoring"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> dict:
        c = self.config.data
        if c.kind == "phantom":
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
        s = read_image_set(self.data[split], self.data["root"])
        cap = self.config.data.max_test_images if split == "test" else -1
        if cap and cap > 0 and len(s) > cap:
            s = ImageSet(s.paths[:cap], s.labels[:cap], s.label_columns, s.captions[:cap],
                         s.source)
        return s

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(grey uint8 images at the classifier size, 0/1 labels of the conditions)."""
        if split not in self._arrays:
            s = self.image_set(split)
            # the route generated images take to the judge (jaxmed.eval.judge)
            x = read_for_classifier(s.paths, int(self.config.classifier.image_size))
            self._arrays[split] = (x, self._condition_labels(s))
        return self._arrays[split]

    def _condition_labels(self, s) -> np.ndarray:
        idx = [s.label_columns.index(c) for c in self.conditions]
        return np.nan_to_num(s.labels[:, idx], nan=0.0).astype(np.float32)

    # ------------------------------------------------------------------ classifiers
    def classifier_config(self, *, judge: bool):
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
        sd, params = self.base_model()  # docs/STUDY.md "Where jaxmed departs from the study"
        summary["views"] = check_judge(
            clf, self.image_set("test"), self.conditions, resolution=int(
                self.config.data.resolution), color=check_color(self.config.synth.color),
            sd=sd, vae_params=params["vae"], min_macro_auroc=summary["min_macro_auroc"],
            control_dir=self.path("judge_control"))
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
        r = self.config.regimes
        self.stage(f"downstream, real only: fractions {list(r.fractions)} x {r.repeats} "
                   "repeat(s) (strategy-independent, computed once)")
        rows = run_regimes(self.arrays("train"), None, self.arrays("test"), r.fractions,
                           modes=("real",), repeats=int(r.repeats), seeds=self._seeds(),
                           config=self.classifier_config(judge=False),
                           val=self.arrays("valid") if r.use_valid else None,
                           scale_val=bool(r.scale_valid), progress=self.progress)
        report.write_json(path, rows)
        return report.clean(rows)

    def _seeds(self):
        r = self.config.regimes
        return list(r.seeds) if r.seeds else None

    # ------------------------------------------------------------------ models
    def base_model(self):
        if self._sd is None:
            m = self.config.model
            self.stage(f"loading the base model {m.path}")
            self._sd = StableDiffusion.load(m.path, dtype=m.dtype, remat=bool(m.remat),
                                            attention=m.get("attention", "auto"))
        return self._sd

    def finetune_config(self, name: str) -> ml_collections.ConfigDict:
        c, ft = self.config, self.config.finetune
        cfg = load_config(f"{ft.config}:{name}")
        over = {
            "seed": c.seed, "model.path": c.model.path, "model.dtype": c.model.dtype,
            "model.remat": bool(c.model.remat),
            "model.attention": str(c.model.get("attention", "auto")),
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
        sd, params = self.base_model()
        cfg = self.finetune_config(name)
        wd = self.path(name, "train")
        summary_path = os.path.join(wd, "summary.json")
        export = os.path.join(wd, "export")
        want = cfg.train.max_steps
        # Process 0 decides for all: the others fine-tune with it or load the same export.
        if processes.on_main(f"study {name}: reuse the fine-tuning run", lambda: (
                os.path.isfile(summary_path)
                and os.path.isfile(os.path.join(export, "model_index.json"))
                and (want <= 0 or report.read_json(summary_path).get("steps") == want))):
            self.stage(f"{name}: reusing the finished fine-tuning run in {wd}")
            _, tuned = StableDiffusion.load(export, dtype=cfg.model.dtype)
            first = os.path.join(wd, "first_summary.json")
            return tuned, report.read_json(first if os.path.isfile(first) else summary_path)
        self.stage(f"{name}: fine-tuning ({_lr_text(cfg.strategy)})")
        trainer = train.Trainer(cfg, wd, sd=sd, params=params)
        summary = trainer.run()
        tuned = trainer.exported_params()
        if summary.get("resumed_from", 0) == 0:
            if processes.is_main():
                report.write_json(os.path.join(wd, "first_summary.json"), summary)
        else:  # a resumed run: its train time is only the remainder
            summary["note"] = f"resumed from step {summary['resumed_from']}"
        del trainer
        return tuned, summary

    # ------------------------------------------------------------------ per model
    def combinations(self, n: int | None = None) -> str:
        path = self.path("combinations.csv" if n is None else f"combinations_{n}.csv")
        n = int(self.config.synth.per_condition) if n is None else int(n)
        phantom.make_combination_csv([[c] for c in self.conditions], n, path)
        return path

    def evaluator(self, judge):
        if self._evaluator is None:
            e = self.config.eval
            self.stage("evaluator: real test features (computed once)"
                       + ("" if e.inception else "; FID-Inception disabled by the preset"))
            self._evaluator = Evaluator(
                self.image_set("test"), domain_classifier=judge, inception=bool(e.inception),
                inception_weights=e.inception_weights or None, conditions=self.conditions,
                vendi=True, clip=e.clip or None, fid_method=e.fid_method,
                progress=self.score_progress, intervals=int(e.intervals),
                seed=int(self.config.seed),
                inception_batch_size=_even_batch(
                    int(self.config.synth.per_condition) * len(self.conditions)))
            self._evaluator.real_features()
        return self._evaluator

    def make_model(self, name: str) -> dict:
        """Fine-tune ``name`` (nothing for the base) and synthesise its images: the part of a
        model that needs its weights and, under several processes, every process."""
        processes.on_main(study_peers.start(name))  # the other processes join from here
        os.makedirs(self.path(name), exist_ok=True)
        times, t = {}, time.perf_counter()
        sd, base_params = self.base_model()
        if name == BASE:
            params, summary = base_params, {"trainable_params": 0, "train_seconds": 0.0,
                                            "steps": 0}
        else:
            params, summary = self.train_model(name)
        times["train"] = round(time.perf_counter() - t, 1)

        t = time.perf_counter()
        syn = self.synthesize_model(name, params)
        times["synthesis"] = round(time.perf_counter() - t, 1)
        self.sample_grid(name)
        return {"summary": summary, "synthesis": syn, "times": times}

    def score_model(self, name: str, judge, made: dict) -> dict:
        """Evaluate ``name``'s synthetic images, train its downstream classifiers and write
        its done.json: work on files and host arrays only (process 0 alone), which the
        study overlaps with the next model's fine-tuning (``overlap_scoring``)."""
        d, summary, syn = self.path(name), made["summary"], made["synthesis"]
        times = dict(made["times"])
        t = time.perf_counter()
        self.stage(f"{name}: evaluating")
        ev = self.evaluator(judge).evaluate(os.path.join(d, "synth"),
                                            out_dir=os.path.join(d, "eval"))
        times["evaluation"] = round(time.perf_counter() - t, 1)

        t = time.perf_counter()
        regimes = self.synthetic_regimes(name, os.path.join(d, "synth"))
        times["downstream"] = round(time.perf_counter() - t, 1)
        trains = () if name == BASE else tuple(strategies.get(name).trains)
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

    def run_models(self, models: Sequence[str], todo: Sequence[str], judge) -> dict:
        """Every model of ``todo`` made and scored, in order. With ``overlap_scoring`` one
        background thread scores model k while the main thread fine-tunes model k+1: on a
        CPU the scoring's small classifiers and single-threaded compiles leave a core idle
        that fine-tuning then uses. Results are the same either way (tests/test_study.py);
        the per-phase seconds in done.json then overlap."""
        scorer = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxmed-score")
                  if self.overlap else None)
        pending: dict[str, concurrent.futures.Future] = {}
        try:
            for i, m in enumerate(models):
                if m not in todo:
                    continue
                for f in pending.values():  # a failed scoring stops the study now
                    if f.done():
                        f.result()
                self.stage(f"=== {m} ({i + 1}/{len(models)}) ===")
                made = self.make_model(m)
                if scorer is None:
                    pending[m] = concurrent.futures.Future()
                    pending[m].set_result(self.score_model(m, judge, made))
                else:
                    pending[m] = scorer.submit(self.score_model, m, judge, made)
            return {m: f.result() for m, f in pending.items()}
        finally:
            if scorer is not None:
                scorer.shutdown(wait=True, cancel_futures=True)

    def synthesize_model(self, name: str, params, *, out: str | None = None,
                         per_condition: int | None = None) -> dict:
        """``name``'s synthetic set, data parallel over every device (of every process:
        under several processes each calls it; process 0 writes); ``out`` and
        ``per_condition`` for another set with the same settings (`jaxmed.study_curve`)."""
        s = self.config.synth
        n = int(per_condition or s.per_condition) * len(self.conditions)
        self.stage(f"{name}: synthesising {n} images ({s.sampler}, {s.steps} steps, guidance "
                   f"{s.guidance}, seed {s.seed})")
        combos = processes.on_main(f"study {name}: combinations",
                                   lambda: self.combinations(per_condition))
        return synthesize(self.base_model()[0], params, combos, out or self.path(name, "synth"),
                          batch_size=int(s.batch_size), sampler=s.sampler, steps=int(s.steps),
                          guidance=float(s.guidance), seed=int(s.seed),
                          resolution=int(self.config.data.resolution),
                          mesh=sharding.make_mesh(-1, 1, 1), progress=self.progress,
                          micro_batch=int(s.micro_batch) or None, model_id=name,
                          grayscale=check_color(s.color) == "grey", paired_noise=True)

    def synthetic_regimes(self, name: str, synth_dir: str) -> list[dict]:
        r = self.config.regimes
        modes = [m for m in r.modes if m != "real"]
        if not modes:
            return []
        s = read_image_set(synth_dir)
        x = read_for_classifier(s.paths, int(self.config.classifier.image_size))
        y = self._condition_labels(s)
        fr = tuple(r.strategy_fractions) or tuple(r.fractions)
        self.stage(f"{name}: downstream classifiers: {modes} (real fractions {list(fr)}) on "
                   f"{len(x)} synthetic images")
        return report.clean(run_regimes(
            self.arrays("train"), (x, y), self.arrays("test"), fr, modes=tuple(modes),
            repeats=int(r.repeats), seeds=self._seeds(),
            config=self.classifier_config(judge=False),
            val=self.arrays("valid") if r.use_valid else None, scale_val=bool(r.scale_valid),
            progress=self.score_progress))

    def sample_grid(self, name: str) -> str:
        s = read_image_set(self.path(name, "synth"))
        k = int(self.config.synth.grid_per_condition)
        rows, labels = [], []
        for c in self.conditions:
            idx = np.nonzero(s.positives(c))[0][:k]
            rows.append(list(load_images([s.paths[i] for i in idx])))
            labels.append(c)
        return files.save_image(images.grid(rows, row_labels=labels),
                                self.path(name, "samples.png"))

    # ------------------------------------------------------------------ the run
    def log_invocation(self, ran: Sequence[str]) -> None:
        """Append this invocation's wall time to invocations.jsonl (results.md sums them)."""
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
        names = list(self.config.strategies)
        bad = [n for n in names if n not in strategies.names()]
        if bad:
            raise ValueError(f"strategies {bad} are unknown; valid: {strategies.names()}")
        return ([BASE] if self.config.include_base else []) + names

    def run(self) -> dict:
        c = self.config
        models = self.models()
        if not processes.is_main():  # several processes: the others join the global phases
            return study_peers.run_peer(self)
        self.stage(f"study preset {c.preset!r} in {self.workdir}: {len(models)} models "
                   f"({', '.join(models)})")
        report.write_json(self.path("study_config.json"), c.to_dict())
        self.prepare_data()
        todo = processes.on_main(study_peers.PLAN, lambda: [
            m for m in models if not os.path.isfile(self.path(m, "done.json"))])
        for m in models:
            if m not in todo:
                self.stage(f"{m}: finished earlier (done.json), skipped")
                old = report.read_json(self.path(m, "done.json")).get("settings")
                if old is not None and old != self.settings_hash():
                    self.stage(f"WARNING {m}: done.json was written with other settings; "
                               f"its results are kept. Delete {self.path(m)} to redo it.")
        judge = self.judge()
        real_rows = self.real_regimes()
        made = self.run_models(models, todo, judge)
        results = {m: made[m] if m in made else report.read_json(self.path(m, "done.json"))
                   for m in models}
        self.stage("writing results.csv, results.md, plots")
        self.log_invocation(todo)
        out = processes.on_main(study_peers.RESULTS, lambda: write_results(
            self, results, real_rows, judge))
        self.stage(f"finished: {out['md']}")
        return out


# ------------------------------------------------------------------------ helpers


def _lr_text(strategy_cfg) -> str:
    if "lrs" in strategy_cfg and strategy_cfg.lrs is not None:
        return "lr " + ", ".join(f"{k} {float(v):g}" for k, v in strategy_cfg.lrs.items())
    return f"lr {float(strategy_cfg.lr):g}"


def _set(cfg, dotted: str, value) -> None:
    set_override(cfg, dotted, repr(value) if not isinstance(value, str) else value)


def _even_batch(n: int, most: int = 50) -> int:
    """The Inception batch (at most ``most``, pytorch-fid's 50) that splits each model's
    ``n`` generated images into equal batches: the last batch is padded to full size, so 60
    images in batches of 50 would compute 100 (in 30s, 60; the real films pad little)."""
    return -(-n // -(-n // most)) if n > 0 else most


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------ command line


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
    with processes.abort_peers_on_error():  # several processes: none waits on a failed 0
        return Study(config, workdir).run()


def main(argv=None) -> int:
    return cli.main_guard(_main, argv)


def _main(argv: list[str]) -> int:
    cli.setup_logging(logging.WARNING)
    config, args = parse(argv, "python -m jaxmed.study", __doc__.split("\n\n")[0],
                         url_workdir=False)
    enable_compilation_cache()  # first: it tunes malloc before jax starts its backend
    start_distributed()  # $JAXMED_DISTRIBUTED=1: one of several processes
    prebuild_cpu_kernels()  # a cold run's C++ builds overlap the data and the judge
    try:
        out = run_study(config, args.workdir)
    except processes.PeerError as err:  # process 0 failed or went silent: its message
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in out.items() if k != "findings"}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
