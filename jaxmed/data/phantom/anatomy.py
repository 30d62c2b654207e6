"""The phantom's anatomy: the CT's base DRRs, the patient, and the random streams.

The base DRRs of each pose (``jaxmed/assets/phantom/``, built by
``launch/make_phantom_assets.py``) are read once and resampled to the film's resolution
(`maps`). A `Patient` rescales them (habitus, bone density, thorax shape, breast shadows, a
smooth non-rigid shape change); the heart's size is a finding's business (`findings`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from jaxmed.data.labels import LABELS
from jaxmed.data.phantom.draw import blob, grid, smooth_noise

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "assets", "phantom")
MU_W = 0.0205  # 1/mm, water at the film's effective energy (as in the asset script)
FOV_MM = 325.0  # width of the base field of view, mm


@functools.lru_cache(maxsize=1)
def assets():
    """(meta.json, one dict per pose with its attenuation and thickness maps), read once."""
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
    return len(assets()[1])


def _resize(a: np.ndarray, n: int) -> np.ndarray:
    if a.shape == (n, n):
        return np.array(a, dtype=np.float32)
    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    filt = Image.Resampling.BOX if n < a.shape[0] else Image.Resampling.BICUBIC
    return np.asarray(im.resize((n, n), filt), dtype=np.float32)


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
def maps(pose: int, n: int) -> dict:
    """Base-frame maps of one pose at resolution n (cached; treat as read-only)."""
    meta, poses = assets()
    p = poses[pose]
    soft, bone, lung = (_resize(p["attn"][c], n) for c in range(3))
    heart, rul, rml, rll, lul, lll = (np.maximum(_resize(p["thick"][c], n), 0) for c in range(6))
    TR, TL = rul + rml + rll, lul + lll
    yy, xx = grid(n)
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
    r = as_generator(rng)
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


def as_generator(rng) -> np.random.Generator:
    """An int seed, a SeedSequence or a Generator (used as is) -> a Generator."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, np.random.SeedSequence):
        return np.random.default_rng(rng)
    return np.random.default_rng(0 if rng is None else int(rng))


def streams(rng) -> dict[str, np.random.Generator]:
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


def add_breasts(P, m, pt: Patient):
    if pt.breast > 0:
        P += MU_W * 30.0 * pt.breast * _breast_map(m["name"], m["n"])


@functools.lru_cache(maxsize=48)
def _breast_map(pose_name: str, n: int) -> np.ndarray:
    _, poses = assets()
    lm = next(p["lm"] for p in poses if p["name"] == pose_name)
    yy, _ = grid(n)
    out = np.zeros((n, n), np.float32)
    for side in ("R", "L"):
        ext = lm[f"lung_{side}"]
        cx = (ext["x0"] + (0.35 if side == "R" else 0.65) * (ext["x1"] - ext["x0"])) * n
        cy = lm[side]["apex"][1] * n + 0.02 * n
        b = blob(n, cx, cy, 0.17 * n, 0.13 * n, 0, 3.0)
        out += b * (yy > cy - 0.05 * n)  # the lower half-dome casts the shadow
    out = ndi.gaussian_filter(out, 0.02 * n)
    out.setflags(write=False)
    return out


def shape_field(pt: Patient, n: int):
    return _shape_field_cached(pt.shape_seed, n)


@functools.lru_cache(maxsize=256)
def _shape_field_cached(seed: int, n: int):
    r = np.random.default_rng(seed)
    dx = smooth_noise(r, n, 4) * 0.012 * n
    dy = smooth_noise(r, n, 4) * 0.012 * n
    return dx, dy
