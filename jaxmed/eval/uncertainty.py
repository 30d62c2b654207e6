"""Uncertainty of the study's metrics: KID, bootstrap intervals, paired differences.

docs/STUDY.md "Metrics": every number the study compares comes from a finite sample of
generated and real images, so each carries a 95% interval here.

* KID: the unbiased MMD^2 between two feature sets with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets of ``m = min(N_real, N_gen,
  subset_size)`` images drawn without replacement from each side, as clean-fid's
  ``kernel_distance`` and torchmetrics' ``KernelInceptionDistance`` do (mean and the SD over
  subsets, torchmetrics' population SD).
* Intervals for FID, KID and Vendi: FID and Vendi depend on how many *distinct* images a
  set holds (FID falls and Vendi rises with N), so a with-replacement bootstrap, whose
  resamples repeat images, shifts them: on a simulated case its percentile interval of
  FID missed the point estimate altogether (0% coverage). These intervals therefore come
  from half-samples: ``B`` replicates draw half of the real and half of the generated
  images without replacement (independently), and the interval is the full-sample value
  plus the 2.5 / 97.5% quantiles of the replicates' deviations from their mean (the
  delete-N/2 jackknife, whose spread at m = N/2 matches the spread at N); Vendi, which
  scales with N, on the log scale. Simulated coverage of 95% intervals (100 cases, d = 64,
  90 real vs 30 generated): FID 0.96, FID difference of two models 0.95, KID 0.99, Vendi
  0.92; the test `tests/eval/test_uncertainty.py` checks it. Replicates are computed on
  Gram matrices (an ``N_r x N_g`` problem, not ``d x d``), so a few hundred cost seconds:
  FID's ``tr sqrt(S_r S_g)`` is the nuclear norm of the doubly centred cross-Gram
  ``X_r X_g^T / sqrt((N_r - 1)(N_g - 1))``; KID's replicate is the unbiased U-statistic
  on all images of the half-samples; Vendi's is the spectrum of the cosine kernel.
  `bootstrap` is the ordinary percentile bootstrap, for statistics such as an AUROC that
  do not depend on the number of distinct images; `bootstrap_groups` the same over whole
  groups (clustered data: the six images of one noise seed), as weights, so several
  models' statistics share one set of resamples. Both draw through `resample_indices`.
* Paired permutation test (`sign_flip_p_value`): for a paired difference that is a sum of
  per-group terms, each term's sign flipped at random under H0 (exact when 2^G is small);
  finding 2 reads it beside the group bootstrap, whose percentile interval is too narrow
  with ten seeds (`jaxmed.eval.findings.paired_verdict`).
* Paired comparisons: one set of replicate indices shared by every model (all models are
  sampled from the same prompts and initial noise, so generated image i of two models is a
  pair) gives intervals for differences of FIDs, and so for rankings of strategy families.
* Downstream classifiers: the mean (`mean_interval`) and the mean paired difference over
  seeds x repeats, with a t interval.

A verdict (`jaxmed.eval.findings`) reads an interval: it excludes zero in the claimed
direction, in the opposite one, or neither.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from jaxmed.eval.fid import RankDeficientWarning, fid_from_features

LEVEL = 0.95
# Replicates per interval: enough for stable 2.5/97.5% quantiles, cheap on features.
DEFAULT_B = 400
# Largest set for the Gram-matrix routes (an N x N float64 matrix); above it the
# replicates work in feature space, one at a time.
GRAM_MAX = 6000
_CHUNK = 64


# ------------------------------------------------------------------------ intervals


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate and its ``level`` interval (NaN bounds when not computable)."""

    value: float
    lo: float
    hi: float
    level: float = LEVEL
    n_boot: int = 0

    def excludes_zero(self) -> int:
        """+1 when the interval lies above 0, -1 below, 0 when it contains 0 (or is NaN)."""
        if self.lo > 0:
            return 1
        if self.hi < 0:
            return -1
        return 0

    def to_dict(self) -> dict:
        return {"value": _f(self.value), "lo": _f(self.lo), "hi": _f(self.hi),
                "level": self.level, "n_boot": self.n_boot}

    @classmethod
    def from_dict(cls, d: Mapping) -> Interval:
        def g(k):
            v = d.get(k)
            return math.nan if v is None else float(v)
        return cls(g("value"), g("lo"), g("hi"), float(d.get("level", LEVEL)),
                   int(d.get("n_boot", 0)))


def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def percentile_interval(replicates: Any, level: float = LEVEL) -> tuple[float, float]:
    """(lo, hi): the (1 - level)/2 and (1 + level)/2 quantiles of the finite replicates."""
    r = np.asarray(replicates, np.float64).ravel()
    r = r[np.isfinite(r)]
    if r.size < 2:
        return math.nan, math.nan
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(r, [a, 1.0 - a])
    return float(lo), float(hi)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(b, n) how often each original index appears in each replicate."""
    b = idx.shape[0]
    c = np.zeros((b, n), np.float64)
    np.add.at(c, (np.arange(b)[:, None], idx), 1.0)
    return c


def resample_indices(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """(m, n) row indices, each row a with-replacement resample of range(n): the one draw
    every ordinary bootstrap here uses (rows of consecutive draws from ``rng``)."""
    return rng.integers(0, n, size=(m, n))


def bootstrap(stat: Callable[..., float], *samples: np.ndarray, b: int = DEFAULT_B,
              seed: int = 0, level: float = LEVEL) -> Interval:
    """Percentile interval of ``stat(*samples)``, resampling each sample independently (rows
    with replacement). The generic route for any statistic (e.g. an alignment AUROC:
    ``bootstrap(macro_auroc, labels_and_scores)`` with the rows kept together)."""
    rng = np.random.default_rng(seed)
    value = float(stat(*samples))
    reps = np.empty(b)
    for i in range(b):
        reps[i] = stat(*[s[resample_indices(rng, len(s), 1)[0]] for s in samples])
    return Interval(value, *percentile_interval(reps, level), level, b)


def group_weights(n_groups: int, b: int, seed: int = 0, chunk: int = 100):
    """Yields (m, n_groups) float weights, ``b`` rows in all, ``chunk`` at a time: row r
    counts how often each group was drawn in resample r (n_groups draws with
    replacement). The same ``(n_groups, b, seed)`` gives the same resamples, so statistics
    of several models computed from one call's weights are paired."""
    rng = np.random.default_rng(seed)
    for start in range(0, b, chunk):  # bounded memory: (chunk, G) weights at a time
        idx = resample_indices(rng, n_groups, min(chunk, b - start))
        yield _counts(idx, n_groups)


def group_replicates(stat_w: Callable[[np.ndarray], Any], n_groups: int, *,
                     b: int = DEFAULT_B, seed: int = 0) -> np.ndarray:
    """(b,) values of ``stat_w(weights (m, G)) -> (m,)`` over resamples of whole groups
    (`group_weights`)."""
    return np.concatenate([np.asarray(stat_w(w), np.float64).reshape(-1)
                           for w in group_weights(n_groups, b, seed)])


def bootstrap_groups(stat_w: Callable[[np.ndarray], Any], n_groups: int, *,
                     b: int = DEFAULT_B, seed: int = 0, level: float = LEVEL,
                     value: float | None = None) -> Interval:
    """Percentile interval of a statistic of weighted groups over resamples of whole groups:
    the bootstrap for clustered data (e.g. the images of one noise seed, which differ only
    by prompt; `jaxmed.eval.alignment`). ``stat_w`` maps (m, G) weights to (m,) values;
    ``value`` (default: ``stat_w`` at unit weights) is the point estimate. Fewer than two
    groups give NaN bounds."""
    if value is None:
        value = float(np.asarray(stat_w(np.ones((1, n_groups)))).reshape(-1)[0]) \
            if n_groups >= 1 else math.nan
    if n_groups < 2:
        return Interval(float(value), math.nan, math.nan, level, 0)
    reps = group_replicates(stat_w, n_groups, b=b, seed=seed)
    return Interval(float(value), *percentile_interval(reps, level), level, b)


def sign_flip_p_value(contrib: Any, value: float | None = None, *, n_perm: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """One-sided p-values (above, below) of the paired sign-flip permutation test.

    ``contrib``: (G,) each group's additive contribution to a paired difference statistic
    ``T = sum_g contrib_g`` (``value``, default that sum). Under H0 each group's pair is
    exchangeable, so its contribution is as likely negated: the null is ``sum_g s_g
    contrib_g`` over random signs s (all 2^G when that is <= ``n_perm``, exact). p_above =
    P(T_null >= T), p_below = P(T_null <= T), each counting the observed statistic once."""
    c = np.asarray(contrib, np.float64).reshape(-1)
    t = float(c.sum()) if value is None else float(value)
    g = c.size
    if g == 0 or not math.isfinite(t):
        return math.nan, math.nan
    tol = 1e-12 * max(1.0, float(np.abs(c).sum()))
    if 2 ** g <= n_perm:  # every sign pattern, the identity among them
        s = 1 - 2 * ((np.arange(2 ** g)[:, None] >> np.arange(g)) & 1)
        null = s @ c
        return float(np.mean(null >= t - tol)), float(np.mean(null <= t + tol))
    s = 1 - 2 * np.random.default_rng(seed).integers(0, 2, size=(n_perm, g))
    null = s @ c
    return (float((1 + np.sum(null >= t - tol)) / (1 + n_perm)),
            float((1 + np.sum(null <= t + tol)) / (1 + n_perm)))


# ------------------------------------------------------------------------ KID


def poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The KID kernel (x.y / d + 1)^3 (clean-fid, torchmetrics, Binkowski et al. 2018)."""
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 from kernel blocks (..., m, m), (..., n, n), (..., m, n)."""
    m, n = kxx.shape[-1], kyy.shape[-1]
    sxx = kxx.sum((-1, -2)) - np.trace(kxx, axis1=-2, axis2=-1)
    syy = kyy.sum((-1, -2)) - np.trace(kyy, axis1=-2, axis2=-1)
    return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * kxy.sum((-1, -2)) / (m * n)


def kid(real: Any, gen: Any, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """(mean, SD over subsets) of KID between two (N, d) feature sets (module docstring)."""
    xr = _features(real, "real")
    xg = _features(gen, "generated")
    m = min(xr.shape[0], xg.shape[0], int(subset_size))
    if m < 2:
        raise ValueError(f"KID needs >= 2 images per side; got {xr.shape[0]} real, "
                         f"{xg.shape[0]} generated")
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(xr.shape[0], m, replace=False), rng.choice(xg.shape[0], m,
                                                                    replace=False))
             for _ in range(subsets)]
    vals = np.empty(subsets)
    if max(xr.shape[0], xg.shape[0]) <= GRAM_MAX:  # each kernel entry computed once
        kxx, kyy, kxy = _kernels(xr, xg)
        for s, (iy, ix) in enumerate(draws):
            vals[s] = mmd2_unbiased(kxx[np.ix_(ix, ix)], kyy[np.ix_(iy, iy)],
                                    kxy[np.ix_(ix, iy)])
    else:
        for s, (iy, ix) in enumerate(draws):
            y, x = xr[iy], xg[ix]
            vals[s] = mmd2_unbiased(poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y))
    return float(vals.mean()), float(vals.std())


def _features(x: Any, name: str) -> np.ndarray:
    f = np.asarray(x, np.float64)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"{name} features must be a non-empty (N, d) array; got {f.shape}")
    return f


# ------------------------------------------------------------------------ replicates


def half_samples(n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """(b, n // 2) indices: each row a half of range(n) drawn without replacement."""
    return np.argsort(rng.random((b, n)), axis=1)[:, :n // 2]


class HalfSamples:
    """Replicate indices shared by every comparison: ``real`` (b, N_r // 2) and ``gen``
    (b, N_g // 2) rows, drawn once from ``seed``. Using one object for several models makes
    their replicates paired (the same real half, the same generated image indices: image i
    of every model starts from the same noise and prompt)."""

    def __init__(self, n_real: int, n_gen: int, b: int = DEFAULT_B, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.b = int(b)
        self.n_real, self.n_gen = int(n_real), int(n_gen)
        self.real = half_samples(self.n_real, self.b, rng)
        self.gen = half_samples(self.n_gen, self.b, rng)

    @property
    def usable(self) -> bool:
        """Both halves hold >= 2 images (a covariance / an unbiased MMD needs 2)."""
        return self.n_real // 2 >= 2 and self.n_gen // 2 >= 2


def centred_interval(replicates: Any, value: float, level: float = LEVEL, *,
                     log: bool = False) -> Interval:
    """``value`` plus the quantiles of the replicates' deviations from their mean (on the
    log scale when ``log``); see the module docstring."""
    r = np.asarray(replicates, np.float64).ravel()
    r = r[np.isfinite(r)]
    value = float(value)
    if r.size < 2 or not math.isfinite(value) or (log and (value <= 0 or (r <= 0).any())):
        return Interval(value, math.nan, math.nan, level, int(r.size))
    if log:
        lr = np.log(r)
        lo, hi = percentile_interval(lr - lr.mean() + math.log(value), level)
        return Interval(value, math.exp(lo), math.exp(hi), level, int(r.size))
    lo, hi = percentile_interval(r - r.mean() + value, level)
    return Interval(value, lo, hi, level, int(r.size))


def fid_replicates(real: Any, gen: Any, idx_real: np.ndarray, idx_gen: np.ndarray
                   ) -> np.ndarray:
    """FID of each replicate (``idx_*``: (b, N) indices into the feature rows)."""
    xr, xg = _features(real, "real"), _features(gen, "generated")
    nr, ng = idx_real.shape[1], idx_gen.shape[1]
    if nr < 2 or ng < 2:
        return np.full(idx_real.shape[0], np.nan)
    if max(xr.shape[0], xg.shape[0]) > GRAM_MAX:
        return np.array([fid_from_features(xr[a], xg[g], method="eigh")
                         for a, g in zip(idx_real, idx_gen, strict=True)])
    grr, ggg, grg = xr @ xr.T, xg @ xg.T, xr @ xg.T
    out = []
    for s in range(0, idx_real.shape[0], _CHUNK):
        ir, ig = idx_real[s:s + _CHUNK], idx_gen[s:s + _CHUNK]
        cr, cg = _counts(ir, xr.shape[0]) / nr, _counts(ig, xg.shape[0]) / ng
        # |mu_r|^2, |mu_g|^2, mu_r.mu_g and the mean squared norms, from the Grams
        mrr = np.einsum("bi,ij,bj->b", cr, grr, cr)
        mgg = np.einsum("bi,ij,bj->b", cg, ggg, cg)
        mrg = np.einsum("bi,ij,bj->b", cr, grg, cg)
        tr_r = (cr @ np.diag(grr) - mrr) * nr / (nr - 1)
        tr_g = (cg @ np.diag(ggg) - mgg) * ng / (ng - 1)
        # centred cross-Gram of the replicate: rows/cols of grg, minus their means
        a = grg[ir[:, :, None], ig[:, None, :]]
        a = (a - a.mean(2, keepdims=True) - a.mean(1, keepdims=True)
             + a.mean((1, 2), keepdims=True)) / math.sqrt((nr - 1) * (ng - 1))
        sq = a.transpose(0, 2, 1) @ a if ng <= nr else a @ a.transpose(0, 2, 1)
        nuc = np.sqrt(np.clip(np.linalg.eigvalsh(sq), 0.0, None)).sum(-1)
        out.append(mrr + mgg - 2 * mrg + tr_r + tr_g - 2 * nuc)
    return np.concatenate(out)


def _pair_sums(k: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum over pairs of distinct original images, number of such pairs) per replicate."""
    tot = np.einsum("bi,ij,bj->b", c, k, c) - (c * c) @ np.diag(k)
    pairs = c.sum(1) ** 2 - (c * c).sum(1)
    return tot, pairs


def kid_replicates(real: Any, gen: Any, idx_real: np.ndarray, idx_gen: np.ndarray
                   ) -> np.ndarray:
    """The full-sample unbiased MMD^2 (polynomial kernel) of each replicate; pairs of an
    image with a copy of itself are left out (see the module docstring)."""
    xr, xg = _features(real, "real"), _features(gen, "generated")
    if max(xr.shape[0], xg.shape[0]) > GRAM_MAX:
        return np.array([float(mmd2_unbiased(*_kernels(xr[a], xg[g])))
                         for a, g in zip(idx_real, idx_gen, strict=True)])
    kyy, kxx, kxy = poly_kernel(xr, xr), poly_kernel(xg, xg), poly_kernel(xg, xr)
    out = []
    for s in range(0, idx_real.shape[0], _CHUNK):
        cr = _counts(idx_real[s:s + _CHUNK], xr.shape[0])
        cg = _counts(idx_gen[s:s + _CHUNK], xg.shape[0])
        sxx, pxx = _pair_sums(kxx, cg)
        syy, pyy = _pair_sums(kyy, cr)
        sxy = np.einsum("bi,ij,bj->b", cg, kxy, cr) / (cg.sum(1) * cr.sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(sxx / pxx + syy / pyy - 2 * sxy)
    return np.concatenate(out)


def _kernels(xr, xg):
    return poly_kernel(xg, xg), poly_kernel(xr, xr), poly_kernel(xg, xr)


def vendi_replicates(gen: Any, idx_gen: np.ndarray) -> np.ndarray:
    """Vendi (q=1, cosine kernel) of each resample of the generated set (a repeated image
    counts as often as it is drawn, exactly as duplicated rows would)."""
    x = _features(gen, "generated")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n, d = x.shape
    out = []
    for s in range(0, idx_gen.shape[0], _CHUNK):
        c = _counts(idx_gen[s:s + _CHUNK], n) / idx_gen.shape[1]
        if n <= d or n <= GRAM_MAX // 4:
            k = x @ x.T
            r = np.sqrt(c)
            lam = np.linalg.eigvalsh(r[:, :, None] * k[None] * r[:, None, :])
        else:  # dual: X^T diag(c) X, d x d
            lam = np.linalg.eigvalsh(np.einsum("ni,bn,nj->bij", x, c, x))
        lam = np.clip(lam, 0.0, None)
        lam = lam / lam.sum(-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(lam > 0, lam * np.log(lam), 0.0).sum(-1)
        out.append(np.exp(h))
    return np.concatenate(out)


# ------------------------------------------------------------------------ one row


def metric_intervals(real: Any, gen: Any, *, b: int = DEFAULT_B, seed: int = 0,
                     level: float = LEVEL, fid: float | None = None,
                     vendi: float | None = None, kid_subsets: int = 100,
                     kid_subset_size: int = 1000) -> dict[str, Any]:
    """Intervals of one (real, generated) feature pair: 'fid', 'kid' and 'vendi' Intervals
    (FID / Vendi around the given point values, else recomputed; KID the subset mean) and
    'kid_sd' (the SD over KID's subsets). Keys are missing when a set is too small: FID and
    KID need >= 2 images per side (their bounds >= 4), Vendi >= 1 (bounds >= 4)."""
    xr, xg = np.asarray(real, np.float64), np.asarray(gen, np.float64)
    if xr.ndim != 2 or xg.ndim != 2:
        raise ValueError(f"features must be (N, d) arrays; got {xr.shape} and {xg.shape}")
    hs = HalfSamples(xr.shape[0], xg.shape[0], b, seed)
    out: dict[str, Any] = {}
    if xr.shape[0] >= 2 and xg.shape[0] >= 2:
        if fid is None:
            with warnings.catch_warnings():  # N <= d is the caller's to report
                warnings.simplefilter("ignore", RankDeficientWarning)
                fid = fid_from_features(xr, xg, method="eigh")
        f = float(fid)
        k, ksd = kid(xr, xg, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        if hs.usable:
            iv = centred_interval(fid_replicates(xr, xg, hs.real, hs.gen), f, level)
            # FID is a squared distance: a centred bound below 0 says "0"
            out["fid"] = dataclasses.replace(iv, lo=max(iv.lo, 0.0))
            out["kid"] = centred_interval(kid_replicates(xr, xg, hs.real, hs.gen), k, level)
        else:
            out["fid"] = Interval(f, math.nan, math.nan, level)
            out["kid"] = Interval(k, math.nan, math.nan, level)
        out["kid_sd"] = ksd
    if xg.shape[0] >= 1:
        v = vendi_value(xg) if vendi is None else float(vendi)
        reps = vendi_replicates(xg, hs.gen) if xg.shape[0] // 2 >= 2 else []
        out["vendi"] = centred_interval(reps, v, level, log=True)
    return out


def vendi_value(gen: Any) -> float:
    """Vendi (q=1, cosine kernel) of the whole set, by the same code as its replicates."""
    x = _features(gen, "generated")
    return float(vendi_replicates(x, np.arange(x.shape[0])[None])[0])


# ------------------------------------------------------------------------ differences


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of independent runs (e.g. seeds x repeats of a downstream classifier) with a t
    interval; NaNs left out; a single run gives NaN bounds (no spread to estimate)."""
    d = np.asarray(values, np.float64).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        return Interval(math.nan, math.nan, math.nan, level)
    m = float(d.mean())
    if d.size < 2:
        return Interval(m, math.nan, math.nan, level)
    half = float(sps.t.ppf((1 + level) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return Interval(m, m - half, m + half, level, 0)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL
                      ) -> Interval:
    """Mean of a_i - b_i over paired runs (same seed / repeat) with a t interval; a single
    pair gives NaN bounds (no spread to estimate)."""
    return mean_interval(np.asarray(a, np.float64) - np.asarray(b, np.float64), level)


def difference_interval(reps_a: np.ndarray, reps_b: np.ndarray, value_a: float,
                        value_b: float, level: float = LEVEL) -> Interval:
    """a - b from paired replicates (the same `HalfSamples` for both)."""
    return centred_interval(np.asarray(reps_a) - np.asarray(reps_b), value_a - value_b, level)


def fmt_interval(iv: Interval | Mapping | None, digits: int = 3) -> str:
    """``value [lo, hi]`` (the results tables' form), or the value alone without bounds."""
    if iv is None:
        return ""
    if isinstance(iv, Mapping):
        iv = Interval.from_dict(iv)
    if not math.isfinite(iv.value):
        return ""
    v = _g(iv.value, digits)
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return v
    return f"{v} [{_g(iv.lo, digits)}, {_g(iv.hi, digits)}]"


def _g(x: float, digits: int) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"
    return f"{x:.{max(1, digits - 1)}e}"


# ------------------------------------------------------------------------ alignment


def macro_auroc_replicates(probs: Any, labels: Any, idx: np.ndarray) -> np.ndarray:
    """Macro AUROC (mean over conditions of the AUROC of probability k against prompt label
    k; ties count 1/2; NaN labels and conditions without both classes left out) of each
    replicate's rows ``idx`` (b, m). ``idx = np.arange(n)[None]`` gives the point value."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.float64)
    if p.shape != y.shape or p.ndim != 2:
        raise ValueError(f"probs {p.shape} and labels {y.shape} must both be (N, C)")
    out = []
    for s in range(0, idx.shape[0], _CHUNK):
        ii = idx[s:s + _CHUNK]
        aucs = []
        for k in range(p.shape[1]):
            pk, yk = p[ii, k], y[ii, k]
            pos = (yk == 1).astype(np.float64)
            neg = (yk == 0).astype(np.float64)
            cmp = np.sign(pk[:, :, None] - pk[:, None, :]) * 0.5 + 0.5  # 1, 1/2, 0
            num = np.einsum("bi,bij,bj->b", pos, cmp, neg)
            den = pos.sum(1) * neg.sum(1)
            with np.errstate(invalid="ignore", divide="ignore"):
                aucs.append(np.where(den > 0, num / den, np.nan))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a replicate with no class pair
            out.append(np.nanmean(np.stack(aucs, 1), axis=1))
    return np.concatenate(out)
