"""Drawing primitives of the phantom: pixel grids, smooth noise, soft blobs, splines, strokes.

Nothing here knows anatomy: the anatomy (`anatomy`), the findings (`findings`) and the film
(`film`) draw with these in pixel coordinates of an n x n image.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from scipy import ndimage as ndi


@functools.lru_cache(maxsize=8)
def grid(n: int):
    c = np.arange(n, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return yy, xx


def smooth_noise(r: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Resolution-independent smooth noise (zero mean, unit-ish std), `cells` per side."""
    g = r.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((n, n), Image.Resampling.BICUBIC),
                      dtype=np.float32)


def blur_big(a: np.ndarray, sigma: float) -> np.ndarray:
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


def blob(n, cx, cy, rx, ry, angle=0.0, power=2.0):
    """Soft elliptical blob (1 inside, smooth falloff); centre/radii in pixels."""
    yy, xx = grid(n)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * ca + (yy - cy) * sa) / max(rx, 1e-3)
    v = (-(xx - cx) * sa + (yy - cy) * ca) / max(ry, 1e-3)
    d = u * u + v * v
    return np.exp(-(d ** (power / 2.0)))


def catmull(pts: np.ndarray, step: float) -> np.ndarray:
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


def offset(path: np.ndarray, d: float) -> np.ndarray:
    t = np.gradient(path, axis=0)
    t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)
    nrm = np.stack([-t[:, 1], t[:, 0]], 1)
    return path + d * nrm


class Canvas:
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


def poly(lm_pts, n) -> np.ndarray:
    return np.asarray(lm_pts, dtype=np.float64) * n
