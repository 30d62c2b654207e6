"""The film: the study's pose and exposure, the warp, film processing, and `render`.

A film is the line integral P of the patient's anatomy plus the findings, warped by the
patient's shape and the study's pose, then processed as a digital radiograph is
(dynamic-range compression, edge enhancement, window, gamma, blur, quantum noise) to uint8.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from scipy import ndimage as ndi

from jaxmed.data.labels import LABELS
from jaxmed.data.phantom.anatomy import (
    Patient,
    add_breasts,
    as_generator,
    assets,
    maps,
    sample_patient,
    shape_field,
    streams,
)
from jaxmed.data.phantom.draw import blur_big, grid
from jaxmed.data.phantom.findings import draw_findings, labels_to_vector, scale_heart


def sample_study(rng=None, view: str | None = None, devices: bool = False) -> dict:
    """Per-film acquisition parameters (pose, exposure, processing, noise)."""
    r = as_generator(rng)
    _, poses = assets()
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


def _warp_coords(n, pt: Patient, study: dict, jitter: bool):
    """Output pixel -> base pixel coordinates (patient shape + study pose)."""
    yy, xx = grid(n)
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
        dx, dy = shape_field(pt, n)
        bx, by = bx + dx, by + dy
    return by, bx


def _forward_point(p, n, pt, study, jitter):
    """Base pixel -> output pixel (inverse of _warp_coords, by fixed-point iteration)."""
    c = n / 2.0
    if jitter:
        ang = np.deg2rad(study["rotation"])
        sc = study["scale"]
        tx, ty = study["shift"][0] * n, study["shift"][1] * n
        dx, dy = shape_field(pt, n)
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


def _film(P, P0_small, field_small, study, r_noise, n):
    """Line integral -> processed uint8 film."""
    # dynamic range compression (large-scale unsharp mask), window from the finding-free film
    sig = 0.06 * n
    G = blur_big(P, sig)
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
    st = streams(rng)
    pt = patient if isinstance(patient, Patient) else (
        Patient(**patient) if isinstance(patient, Mapping) else sample_patient(st["patient"]))
    sd = bool(lv[LABELS.index("Support Devices")])
    if study is None:
        study = sample_study(st["study"], view=view, devices=sd)
    m = maps(study["pose"], n)
    info: dict = dict(labels=dict(zip(LABELS, lv.tolist())), view=study["view"],
                      pose=m["name"], study=study, patient=dataclasses.asdict(pt))

    P = pt.habitus * m["soft"] + pt.bone * m["bone"] + pt.lung_texture * m["lung"]
    P = P + (1.0 - pt.lung_texture) * ndi.gaussian_filter(m["lung"], 0.01 * n)
    add_breasts(P, m, pt)
    heart_tf = scale_heart(P, m, pt, bool(lv[1]), info)
    # finding-free film for the window (subsampled)
    step = max(1, n // 64)
    P0_small = P[: n - n % step, : n - n % step].reshape(
        n // step, step, n // step, step).mean((1, 3))
    field_small = (m["fieldR"] | m["fieldL"])[: n - n % step: step, : n - n % step: step]

    draw_findings(P, m, lv, st, heart_tf, info)

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
