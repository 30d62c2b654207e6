"""The phantom's datasets: CheXpert-like label draws, CheXpert-format folders, the CLI.

Labels are drawn with CheXpert's marginals and co-occurrence (`sample_labels`); each
patient's studies are rendered (`film.render`) into ``phantom/{split}/...`` PNGs with split
CSVs in the study's format (`make_dataset`), once per parameter set (`ensure_dataset`).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy.special import ndtr, ndtri

from jaxmed.data.labels import CSV_COLUMNS, LABELS
from jaxmed.data.phantom.anatomy import ASSET_DIR, Patient, as_generator, sample_patient, streams
from jaxmed.data.phantom.film import render, sample_study
from jaxmed.data.phantom.findings import labels_to_vector
from jaxmed.files import write_json
from jaxmed.logging_utils import progress as progress_bar

PATHOLOGIES: tuple[str, ...] = LABELS[1:7]

# Positive rates of the 8 labels in CheXpert's training labels, uncertain (-1) and blank
# counted as 0 as the study does. Source: Irvin et al., "CheXpert: A Large Chest Radiograph
# Dataset with Uncertainty Labels and Expert Comparison", AAAI 2019, Table 1 (positive
# counts over the training set), rounded toward the frontal-image rates of the CheXpert
# v1.0 train.csv (No Finding ~9%, Cardiomegaly ~12%, Lung Opacity ~47%, Edema ~24%,
# Pneumonia ~3%, Pneumothorax ~9%, Pleural Effusion ~39%, Support Devices ~52%).
# They could not be re-counted offline here; change them if you have the CSV.
PREVALENCE: dict[str, float] = dict(zip(LABELS, (
    0.09,  # No Finding
    0.12,  # Cardiomegaly
    0.47,  # Lung Opacity
    0.24,  # Edema
    0.027,  # Pneumonia
    0.087,  # Pneumothorax
    0.39,  # Pleural Effusion
    0.52,  # Support Devices
), strict=True))
# Label co-occurrence: a two-factor Gaussian copula. Factor 1 ~ "heart failure" (links
# Cardiomegaly, Edema, Effusion), factor 2 ~ "inpatient / ICU" (links devices with edema,
# effusion, opacity and pneumothorax). Marginals are exact whatever the loadings.
_LOADINGS: dict[str, tuple[float, float]] = {
    "Cardiomegaly": (0.55, 0.10),
    "Lung Opacity": (0.15, 0.45),
    "Edema": (0.60, 0.35),
    "Pneumothorax": (-0.10, 0.35),
    "Pleural Effusion": (0.45, 0.40),
    "Support Devices": (0.10, 0.70),
}


def _copula_parts():
    names = list(_LOADINGS)
    A = np.array([_LOADINGS[k] for k in names])
    thr = np.array([ndtri(1.0 - PREVALENCE[k]) for k in names])
    return names, A, thr


@functools.lru_cache(maxsize=1)
def _p_no_pathology() -> float:
    """P(none of the 5 latent pathologies) under the copula, by Gauss-Hermite quadrature."""
    names, A, thr = _copula_parts()
    x, w = np.polynomial.hermite_e.hermegauss(40)
    w = w / w.sum()
    f1, f2 = np.meshgrid(x, x, indexing="ij")
    ww = np.outer(w, w)
    p = np.ones_like(f1)
    for i, k in enumerate(names):
        if k == "Support Devices":
            continue
        s = np.sqrt(max(1e-9, 1.0 - A[i] @ A[i]))
        p = p * ndtr((thr[i] - A[i, 0] * f1 - A[i, 1] * f2) / s)
    return float((p * ww).sum())


def sample_labels(n: int, rng=None) -> np.ndarray:
    """Draw n label vectors (n, 8) int8 in `LABELS` order with CheXpert-like co-occurrence.

    Marginals follow `PREVALENCE`; Pneumonia is only drawn with Lung Opacity (CheXpert's
    hierarchy); No Finding is only drawn when no pathology is present, with the rate that
    makes its marginal match; Support Devices are independent of No Finding.
    """
    r = as_generator(rng)
    names, A, thr = _copula_parts()
    f = r.standard_normal((n, 2))
    e = r.standard_normal((n, len(names)))
    z = f @ A.T + e * np.sqrt(np.clip(1.0 - (A**2).sum(1), 1e-9, None))
    out = np.zeros((n, len(LABELS)), np.int8)
    for i, k in enumerate(names):
        out[:, LABELS.index(k)] = z[:, i] > thr[i]
    lo = LABELS.index("Lung Opacity")
    pn = LABELS.index("Pneumonia")
    p_pn = PREVALENCE["Pneumonia"] / PREVALENCE["Lung Opacity"]
    out[:, pn] = (out[:, lo] == 1) & (r.random(n) < p_pn)
    path_idx = [LABELS.index(k) for k in PATHOLOGIES]
    none = out[:, path_idx].sum(1) == 0
    q = min(1.0, PREVALENCE["No Finding"] / _p_no_pathology())
    out[:, 0] = none & (r.random(n) < q)
    return out


def _fmt(v) -> str:
    return "1.0" if v else "0.0"


def make_dataset(out_dir: str, n_patients: int = 100, images_per_patient: int = 2,
                 resolution: int = 256, seed: int = 0,
                 splits: Sequence[float] = (0.7, 0.15, 0.15), progress: bool = True) -> dict:
    """Write a CheXpert-format phantom dataset.

    Layout: ``out_dir/phantom/{train,valid,test}/patientNNNNN/studyK/view1_frontal.png`` and
    ``out_dir/{train,valid,test}.csv`` with the study's columns; ``Path`` is relative to
    out_dir. Splits are by patient (no patient in two splits). Each study of a patient
    has its own labels (drawn by `sample_labels`), pose and exposure; the patient's
    anatomy, sex and age are shared. Returns {split: csv path}.
    """
    if len(splits) != 3 or any(s < 0 for s in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be 3 non-negative fractions, got {splits}")
    if n_patients < 1 or images_per_patient < 1:
        raise ValueError("n_patients and images_per_patient must be >= 1")
    root = np.random.SeedSequence(int(seed))
    s_split, s_labels, s_pat, s_img = (np.random.default_rng(s) for s in root.spawn(4))
    fr = np.asarray(splits, np.float64) / float(sum(splits))
    counts = np.floor(fr * n_patients).astype(int)
    for i in np.argsort(-(fr * n_patients - counts))[: n_patients - counts.sum()]:
        counts[i] += 1
    order = s_split.permutation(n_patients)
    split_of = np.empty(n_patients, dtype=object)
    names = ("train", "valid", "test")
    start = 0
    for name, c in zip(names, counts):
        split_of[order[start:start + c]] = name
        start += c
    labels = sample_labels(n_patients * images_per_patient, s_labels)
    img_seeds = s_img.integers(2**62, size=n_patients * images_per_patient)
    pat_seeds = s_pat.integers(2**62, size=n_patients)
    rows: dict[str, list] = {k: [] for k in names}
    os.makedirs(out_dir, exist_ok=True)
    bar = progress_bar(total=n_patients * images_per_patient, desc="phantom", unit="img",
                       enabled=progress)
    for p in range(n_patients):
        pt = sample_patient(int(pat_seeds[p]))
        split = split_of[p]
        for s in range(images_per_patient):
            k = p * images_per_patient + s
            lv = labels[k]
            r = streams(int(img_seeds[k]))
            sd = bool(lv[LABELS.index("Support Devices")])
            study = sample_study(r["study"], devices=sd)
            img = render(lv, resolution, int(img_seeds[k]), pt, study=study)
            rel = f"phantom/{split}/patient{p + 1:05d}/study{s + 1}/view1_frontal.png"
            dst = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            Image.fromarray(img).save(dst, compress_level=1)
            rows[split].append([rel, pt.sex, str(pt.age), "Frontal", study["view"]]
                               + [_fmt(v) for v in lv])
            bar.update(1)
    bar.close()
    paths = {}
    for name in names:
        path = os.path.join(out_dir, f"{name}.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            w.writerows(rows[name])
        paths[name] = path
    return paths


DATASET_MARKER = "phantom_dataset.json"


def _assets_version() -> str:
    """A short hash of the asset metadata: a rebuilt asset set invalidates old datasets."""
    with open(os.path.join(ASSET_DIR, "meta.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def ensure_dataset(out_dir: str, n_patients: int = 100, resolution: int = 256, seed: int = 0,
                   images_per_patient: int = 2,
                   splits: Sequence[float] = (0.7, 0.15, 0.15),
                   progress: bool = True) -> dict:
    """`make_dataset` once: reuse ``out_dir`` when its marker records the same parameters.

    The marker (``phantom_dataset.json``, written last, atomically) holds the parameters
    and the asset version; a folder without it, or with other parameters, or with a split
    CSV missing, is (re)generated. Returns {split: csv path}.
    """
    meta = {"format": "jaxmed.phantom/1", "n_patients": int(n_patients),
            "images_per_patient": int(images_per_patient), "resolution": int(resolution),
            "seed": int(seed), "splits": [float(s) for s in splits],
            "assets": _assets_version()}
    marker = os.path.join(out_dir, DATASET_MARKER)
    paths = {k: os.path.join(out_dir, f"{k}.csv") for k in ("train", "valid", "test")}
    try:
        with open(marker) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if old == meta and all(os.path.isfile(p) for p in paths.values()):
        return paths
    if os.path.exists(marker):
        os.remove(marker)  # a half-rewritten folder is never taken for the old dataset
    paths = make_dataset(out_dir, n_patients, images_per_patient, resolution, seed,
                         tuple(splits), progress=progress)
    write_json(marker, meta, indent=1)
    return paths


def make_combination_csv(labels: Iterable, counts, path: str | None = None) -> list[dict]:
    """Rows for the synthesis step's combination CSV: the 8 label columns + ``count``.

    `labels`: an iterable of label sets (each a dict, vector of 8 or list of names);
    `counts`: one int for all, or one per label set. Writes `path` if given.
    """
    labels = list(labels)
    cnt = [int(counts)] * len(labels) if np.isscalar(counts) else [int(c) for c in counts]
    if len(cnt) != len(labels):
        raise ValueError(f"{len(labels)} label sets but {len(cnt)} counts")
    rows = []
    for lab, c in zip(labels, cnt):
        v = labels_to_vector(lab)
        if v[0] and v[1:7].any():
            raise ValueError(f"'No Finding' cannot be combined with pathologies: {lab}")
        rows.append({**{k: int(x) for k, x in zip(LABELS, v)}, "count": c})
    if path is not None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*LABELS, "count"])
            w.writeheader()
            w.writerows(rows)
    return rows


def contact_sheet(path: str | None = None, resolution: int = 256, seed: int = 3,
                  patient: Patient | None = None, view: str | None = "PA") -> Image.Image:
    """One film per finding next to the normal film of the same patient and study, labelled.

    Panels: No Finding, then each finding alone (Pneumonia with Lung Opacity), same seed.
    """
    st = streams(seed)
    pt = patient or sample_patient(st["patient"])
    study = sample_study(st["study"], view=view)
    panels = [("Pneumonia (+ Lung Opacity)", ["Pneumonia", "Lung Opacity"])
              if k == "Pneumonia" else (k, [k]) for k in LABELS]
    n = int(resolution)
    cols = 4
    rows_ = (len(panels) + cols - 1) // cols
    pad = max(14, n // 14)
    sheet = Image.new("L", (cols * n, rows_ * (n + pad)), 0)
    draw = ImageDraw.Draw(sheet)
    for i, (title, labs) in enumerate(panels):
        img = render(labs, n, seed, pt, study=study)
        x, y = (i % cols) * n, (i // cols) * (n + pad)
        sheet.paste(Image.fromarray(img), (x, y + pad))
        draw.text((x + 4, y + 2), title, fill=255)
    if path is not None:
        sheet.save(path)
    return sheet


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m jaxmed.data.phantom",
        description="Write a CheXpert-format phantom chest X-ray dataset (PNG + CSV).")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--images-per-patient", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", type=float, nargs=3, default=(0.7, 0.15, 0.15))
    ap.add_argument("--sheet", default=None, help="also write a labelled contact sheet PNG")
    args = ap.parse_args(argv)
    paths = make_dataset(args.out, args.patients, args.images_per_patient, args.resolution,
                         args.seed, tuple(args.splits))
    for k, v in paths.items():
        print(f"{k}: {v}")
    if args.sheet:
        contact_sheet(args.sheet, resolution=min(args.resolution, 512), seed=args.seed)
        print(f"sheet: {args.sheet}")


if __name__ == "__main__":
    main()
