"""Frechet distance between Gaussian fits of features (FID), float64 numpy/scipy, no torch.

``frechet_distance`` is pytorch-fid's ``calculate_frechet_distance``:

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))

with ``scipy.linalg.sqrtm``; when the product's root is not finite, ``eps`` is added to both
diagonals and the root retaken; a complex root whose diagonal has an imaginary part above
1e-3 is an error, a smaller one is discarded.

``method="eigh"`` computes the same trace exactly but without the non-symmetric ``sqrtm``:
with factors ``S_i = F_i^T F_i``, the nonzero eigenvalues of S1 S2 are those of the
symmetric PSD ``G G^T`` (or ``G^T G``), ``G = F1 F2^T``, so ``tr sqrt(S1 S2)`` is the sum of
the square roots of its ``eigvalsh``. ``F_i`` is the centred features / sqrt(N - 1) when
N <= d (no d x d matrix is formed: the eigenproblem is N1 x N2-sized) and the Cholesky
factor of ``S_i`` otherwise (an ``eigh`` factor if ``S_i`` is singular). It is real by
construction and cheaper than ``sqrtm``, which always works on a d x d matrix; with
N <= d the ``eigh`` route's eigenproblem is only N1 x N2. The two agree to
~1e-9 relative for well-conditioned covariances and ~1e-6 for rank-deficient ones, where
``sqrtm`` itself is noisy. pytorch-fid's route stays the default, for comparability.

With N <= d samples a covariance has rank <= N - 1 < d: ``feature_stats`` then warns
(`RankDeficientWarning`) -- FID from so few samples is strongly biased upwards and
``sqrtm`` returns noisy imaginary parts. pytorch-fid recommends N >= 2048 for 2048-d
features.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
from scipy import linalg

METHODS = ("sqrtm", "eigh")


class RankDeficientWarning(UserWarning):
    """A sample covariance from N <= d samples is singular (rank <= N - 1)."""


def _as_features(x: Any, name: str) -> np.ndarray:
    f = np.asarray(x)
    if f.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, d) array; got shape {f.shape}")
    if f.shape[0] == 0 or f.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"{name}: a covariance needs at least 2 samples; got N={f.shape[0]}")
    if not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric; got dtype {f.dtype}")
    f = f.astype(np.float64, copy=False)
    if not np.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or inf")
    return f


def _warn_rank(n: int, d: int, name: str) -> None:
    if n <= d:
        warnings.warn(
            f"{name}: the covariance of N={n} samples in d={d} dimensions is rank-deficient "
            f"(rank <= N - 1 = {n - 1} < d); FID from N <= d samples is strongly biased and "
            f"sqrtm becomes ill-conditioned -- use N > d (pytorch-fid recommends N >= 2048)",
            RankDeficientWarning,
            stacklevel=3,
        )


def feature_stats(features: Any, *, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(N, d) features -> (mu (d,), sigma (d, d)), float64, sigma with ddof=1 (np.cov).

    Warns `RankDeficientWarning` when N <= d.
    """
    f = _as_features(features, name)
    n, d = f.shape
    _warn_rank(n, d, name)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray,
               n: int | None = None) -> None:
    """Write ``mu`` / ``sigma`` as pytorch-fid's ``.npz`` statistics file (and ``n``, the
    number of samples, when given: pytorch-fid ignores it; `choose_method` reads it)."""
    extra = {} if n is None else {"n": np.int64(n)}
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)


def choose_method(method: str, n1: int | None, n2: int | None, d: int) -> str:
    """The route ``method`` (auto, sqrtm or eigh) takes for sets of n1 and n2 samples in d
    dimensions: auto is pytorch-fid's sqrtm when both have N > d (an unknown N counts as
    such), else eigh (exact where the covariances are rank-deficient)."""
    if method not in ("auto", *METHODS):
        raise ValueError(f"fid method must be auto or one of {METHODS}; got {method!r}")
    if method != "auto":
        return method
    return "sqrtm" if all(n is None or n > d for n in (n1, n2)) else "eigh"


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read pytorch-fid's ``.npz`` statistics (keys ``mu`` and ``sigma``)."""
    with np.load(path) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing {missing}; has {z.files}")
        return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)


def _check_stats(mu1, sigma1, mu2, sigma2):
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.size == 0 or mu2.size == 0:
        raise ValueError(f"empty statistics: mu1 shape {mu1.shape}, mu2 shape {mu2.shape}")
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ or are not 1-D: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} has shape {s.shape}; expected ({d}, {d}) to match mu")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
    return mu1, sigma1, mu2, sigma2


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # scipy < 1.16 warns "Matrix is singular and may not have a square root."; we
        # handle that case below as pytorch-fid does (a non-finite root -> eps offset).
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        try:
            return linalg.sqrtm(a)
        except (linalg.LinAlgError, ValueError):
            return np.full_like(a, np.nan)


def _trace_sqrt_sqrtm(sigma1, sigma2, eps: float) -> float:
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov "
            "estimates",
            RuntimeWarning,
            stacklevel=3,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"Imaginary component {m} in sqrtm(sigma1 @ sigma2)")
        covmean = covmean.real
    return float(np.trace(covmean))


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """F (r, d) with F^T F = sigma: Cholesky, or eigh (clipped at 0) when sigma is singular."""
    try:
        return np.linalg.cholesky(sigma).T
    except np.linalg.LinAlgError:
        w, u = np.linalg.eigh(sigma)
        keep = w > 0
        return np.sqrt(w[keep])[:, None] * u[:, keep].T


def _trace_sqrt_factors(f1: np.ndarray, f2: np.ndarray) -> float:
    """tr sqrt(F1^T F1 F2^T F2) = sum of the singular values of G = F1 F2^T."""
    if f1.shape[0] == 0 or f2.shape[0] == 0:
        return 0.0
    g = f1 @ f2.T
    gram = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, *,
                     method: str = "sqrtm") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``method="sqrtm"``: pytorch-fid's computation (see the module docstring);
    ``method="eigh"``: the same trace from a symmetric eigenproblem (real, faster).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_sqrtm(sigma1, sigma2, eps)
    else:
        tr_covmean = _trace_sqrt_factors(_psd_factor(sigma1), _psd_factor(sigma2))
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features1: Any, features2: Any, eps: float = 1e-6, *,
                      method: str = "sqrtm") -> float:
    """FID between two (N_i, d) feature sets (e.g. Inception pool3, or a domain model's).

    Warns `RankDeficientWarning` for a set with N_i <= d; ValueError for empty sets or a
    dimension mismatch.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    f1 = _as_features(features1, "features1")
    f2 = _as_features(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape} vs {f2.shape}")
    if method == "sqrtm":
        mu1, s1 = feature_stats(f1, name="features1")
        mu2, s2 = feature_stats(f2, name="features2")
        return frechet_distance(mu1, s1, mu2, s2, eps, method="sqrtm")
    d = f1.shape[1]
    factors, traces, means = [], [], []
    for name, f in (("features1", f1), ("features2", f2)):
        n = f.shape[0]
        _warn_rank(n, d, name)
        mu = f.mean(axis=0)
        if n <= d:  # low-rank factor straight from the centred samples
            fac = (f - mu) / np.sqrt(n - 1.0)
            tr = float(np.einsum("ij,ij->", fac, fac))
        else:
            sigma = np.cov(f, rowvar=False)
            fac, tr = _psd_factor(sigma), float(np.trace(sigma))
        factors.append(fac)
        traces.append(tr)
        means.append(mu)
    diff = means[0] - means[1]
    return float(diff.dot(diff) + traces[0] + traces[1] - 2.0 * _trace_sqrt_factors(*factors))
