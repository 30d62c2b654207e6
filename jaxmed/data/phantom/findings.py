"""The findings: each label drawn as a physical change of the line integral P.

Each function adds one finding to P (in place) where radiologists look for it, from its own
random stream, and records its parameters in ``info``; `draw_findings` applies a film's
labels in a fixed order (see the package docstring for what each finding looks like).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage as ndi

from jaxmed.data.labels import LABELS
from jaxmed.data.phantom.anatomy import FOV_MM, MU_W, Patient, assets
from jaxmed.data.phantom.draw import Canvas, blob, catmull, grid, offset, poly, smooth_noise


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


def scale_heart(P, m, pt: Patient, cardiomegaly: bool, info: dict):
    """Rescale the cardiac silhouette about the midline to the target CTR."""
    n, lm = m["n"], m["lm"]
    target = pt.ctr_enlarged if cardiomegaly else pt.ctr_normal
    # AP films magnify the heart: keep the pose's magnification relative to the PA base.
    base_pa = assets()[1][0]["lm"]["ctr"]
    target = target * lm["ctr"] / base_pa
    s = target / lm["ctr"]
    sy = 1.0 + (0.35 if s > 1 else 0.15) * (s - 1.0)
    ax, ay = lm["midline_x"] * n, lm["heart"]["y1"] * n
    yy, xx = grid(n)
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
    yy, xx = grid(n)
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
    yy, xx = grid(n)
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
    yy, xx = grid(n)
    sev = r.uniform(0.55, 1.0)
    tex = 0.75 + 0.25 * np.tanh(smooth_noise(r, n, 24))
    haze = np.zeros((n, n), np.float32)
    for side in ("R", "L"):
        hx, hy = np.array(lm[f"hilum_{side}"]) * n
        ext = lm[f"lung_{side}"]
        wdt = (ext["x1"] - ext["x0"]) * n
        # bat-wing: centred a little lateral of the hilum, sparing the periphery
        cx = hx + (-0.12 if side == "R" else 0.12) * wdt
        b = blob(n, cx, hy + 0.03 * n, 0.42 * wdt, 0.24 * n, power=2.2)
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
    cv = Canvas(n)
    for side in ("R", "L"):
        cpx, cpy = np.array(lm[side]["cp_angle"]) * n
        for _ in range(int(r.integers(4, 9)) if sev > 0.7 else int(r.integers(0, 4))):
            y = cpy - r.uniform(0.02, 0.16) * n
            length = r.uniform(0.015, 0.035) * n
            xs = cpx + (1 if side == "R" else -1) * r.uniform(0.0, 0.02) * n
            xe = xs + (length if side == "R" else -length)
            cv.stroke(catmull(np.array([[xs, y], [xe, y + r.normal(0, 0.002 * n)]]), 0.5),
                      0.25 + 0.002 * n, 0.10 * sev)
    P += cv.render()
    info["edema"] = dict(severity=float(sev))


def _patchy(P, m, r, n_blobs, strength, info_key, info):
    n = m["n"]
    yy, xx = grid(n)
    fields = (m["fieldR"], m["fieldL"])
    tex = 0.7 + 0.3 * np.tanh(smooth_noise(r, n, 20))
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
        b = 0.6 * blob(n, cx, cy, rad * r.uniform(0.8, 1.4), rad, r.uniform(0, np.pi), 2.0)
        for _ in range(int(r.integers(3, 7))):
            sx, sy = cx + r.normal(0, 0.6 * rad), cy + r.normal(0, 0.5 * rad)
            sr = rad * r.uniform(0.45, 0.8)
            b = np.maximum(b, blob(n, sx, sy, sr * r.uniform(0.8, 1.5), sr,
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
        w = blob(n, cx, cy, r.uniform(0.07, 0.12) * n, r.uniform(0.06, 0.1) * n,
                  r.uniform(0, np.pi), 2.0)
    else:
        w = np.ones((n, n), np.float32)
    frac = r.uniform(0.55, 0.85)
    tex = 0.85 + 0.15 * np.tanh(smooth_noise(r, n, 32))
    occ = np.clip(T / max(float(T.max()), 1.0) * 2.5, 0, 1)  # where the lobe is in the beam
    amount = frac * w * tex * occ
    amount = ndi.gaussian_filter(amount, 0.006 * n)
    P += MU_W * 0.9 * amount * np.maximum(ndi.gaussian_filter(T, 0.01 * n), 0) * 1.4
    # air bronchograms: a few dark branching lines within the consolidation
    cv = Canvas(n)
    hil = np.array(m["lm"]["hilum_" + lobe[0]]) * n
    for _ in range(int(r.integers(2, 5))):
        tgt = np.array([cx, cy]) + r.normal(0, 0.04 * n, 2)
        mids = hil + (tgt - hil) * np.array([[0.45], [0.75], [1.0]])
        mids += r.normal(0, 0.01 * n, mids.shape)
        cv.stroke(catmull(np.vstack([hil + (tgt - hil) * 0.3, mids]), 0.5), 0.6 + 0.004 * n,
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
        P += 0.22 * blob(n, cx, cy, rad, rad, 0, 4.0)
    else:
        ys2 = ys[ys > np.percentile(ys, 55)]
        xs2 = xs[ys > np.percentile(ys, 55)]
        j = int(r.integers(len(ys2)))
        cx, cy = xs2[j] + 0.5, ys2[j] + 0.5
        P += 0.16 * blob(n, cx, cy, r.uniform(0.05, 0.08) * n, 0.008 * n + 0.6,
                          r.normal(0, 0.15), 2.0)
    info["other"] = dict(kind=kind, center=(float(cx), float(cy)))


def _devices(P, m, r, heart_tf, labels_vec, info):
    n, lm = m["n"], m["lm"]
    mm = n / FOV_MM  # pixels per mm
    cv = Canvas(n)
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
        tr = poly(lm["trachea"], n)
        tip_y = carina[1] - r.uniform(30, 70) * mm
        pts = [np.array([tr[0, 0] + r.normal(0, 2) * mm, -0.05 * n])]
        pts += [p for p in tr if p[1] < tip_y]
        pts.append(np.array([np.interp(tip_y, tr[:, 1], tr[:, 0]), tip_y]))
        path = catmull(np.array(pts), 0.5)
        cv.stroke(offset(path, 4.5 * mm), 1.2 * mm, 0.10)
        cv.stroke(offset(path, -4.5 * mm), 1.2 * mm, 0.10)
        cv.stroke(offset(path, 2.5 * mm), 1.3 * mm, 1.2)   # radio-opaque stripe
    if has["ngt"]:
        es = poly(lm["esophagus"], n)
        st = lm["stomach_ext"]
        gx = (st["x0"] + r.uniform(0.45, 0.7) * (st["x1"] - st["x0"])) * n
        gy = min((st["y0"] + r.uniform(0.1, 0.25) * (st["y1"] - st["y0"])) * n, 0.97 * n)
        pts = [np.array([es[0, 0], -0.05 * n])] + list(es)
        pts += [np.array([gx - 0.03 * n, gy - 0.01 * n]), np.array([gx, gy]),
                np.array([gx + 0.02 * n, gy - 0.03 * n])]
        path = catmull(np.array(pts), 0.5)
        cv.stroke(path, 3.0 * mm, 0.9)
    if has["cvc"]:
        side = "R" if r.random() < 0.7 else "L"
        v = poly(lm[f"brachio_v_{side}"], n)
        svc = poly(lm["svc"], n)
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
        path = catmull(np.array(pts), 0.5)
        cv.stroke(path, 1.8 * mm, 1.0)
    if has["pacer"]:
        side = "L" if r.random() < 0.85 else "R"
        cl = lm[f"clav_{side}"]
        gx = (cl["x0"] + (0.65 if side == "L" else 0.35) * (cl["x1"] - cl["x0"])) * n
        gy = cl["y1"] * n + r.uniform(25, 45) * mm
        gw, gh = r.uniform(42, 52) * mm, r.uniform(45, 58) * mm
        yy, xx = grid(n)
        ang = r.normal(0, 0.25)
        u = ((xx - gx) * np.cos(ang) + (yy - gy) * np.sin(ang)) / (gw / 2)
        w = (-(xx - gx) * np.sin(ang) + (yy - gy) * np.cos(ang)) / (gh / 2)
        sq = (np.abs(u) ** 3 + np.abs(w) ** 3) ** (1 / 3)  # rounded rectangle
        body = 1.0 / (1.0 + np.exp(np.clip((sq - 1.0) * 14, -30, 30)))
        hd = np.maximum(np.abs(u) / 0.6, np.abs(w + 1.2) / 0.25)
        header = 1.0 / (1.0 + np.exp(np.clip((hd - 1.0) * 12, -30, 30)))
        P += 3.0 * body + 0.9 * header
        v = poly(lm[f"brachio_v_{side}"], n)
        svc = poly(lm["svc"], n)
        ra = heart_pt(0.12, 0.35)
        rv = heart_pt(0.65, 0.88)
        top = np.array([gx, gy - gh * 0.62])
        loop = top + np.array([(-1 if side == "L" else 1) * 0.05 * n, 0.02 * n])
        for tip in (ra, rv):
            mid = svc[-1] + (tip - svc[-1]) * 0.5 + r.normal(0, 0.01 * n, 2)
            pts = [top, loop, v[len(v) // 3], v[-1]] + [svc[len(svc) // 2], svc[-1], mid, tip]
            path = catmull(np.array(pts), 0.5) + r.normal(0, 0.2, 1)
            cv.stroke(path, 2.2 * mm, 1.1)
            P += 1.5 * blob(n, tip[0], tip[1], 3 * mm, 3 * mm, 0, 2)
    if has["ecg"]:
        for _ in range(int(r.integers(2, 5))):
            ex = r.choice([r.uniform(0.08, 0.3), r.uniform(0.7, 0.92)]) * n
            ey = r.uniform(0.08, 0.75) * n
            rad = 6.0 * mm
            t = np.linspace(0, 2 * np.pi, 80)
            ring = np.stack([ex + rad * np.cos(t), ey + rad * np.sin(t)], 1)
            cv.stroke(ring, 1.0 * mm, 0.25)
            P += 1.2 * blob(n, ex, ey, 2.2 * mm, 2.2 * mm, 0, 4)
            out = np.array([ex + r.normal(0, 0.2) * n, -0.05 * n if ey < 0.4 * n else 1.05 * n])
            mid = (np.array([ex, ey]) + out) / 2 + r.normal(0, 0.06 * n, 2)
            cv.stroke(catmull(np.array([[ex, ey], mid, out]), 0.5), 1.0 * mm, 0.35)
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
        path = catmull(pts, 0.5)
        cv.stroke(offset(path, 5 * mm), 1.2 * mm, 0.12)
        cv.stroke(offset(path, -5 * mm), 1.2 * mm, 0.12)
        cv.stroke(offset(path, 3 * mm), 1.5 * mm, 0.7)
    P += cv.render()
    info["devices"] = sorted(k for k, v in has.items() if v)


def draw_findings(P, m, lv, st, heart_tf, info):
    """Add the findings of label vector ``lv`` (8, `LABELS` order) to P, each from its stream.

    The heart is sized before this (`scale_heart`): the film's window is set from the film
    without findings, heart included.
    """
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
    if lv[LABELS.index("Support Devices")]:
        _devices(P, m, st["Support Devices"], heart_tf, lv, info)
