"""The Vendi diversity score (Friedman & Dieng 2023) of a set of feature vectors, in JAX.

With X the (n, d) features, rows L2-normalised (``normalize=True``; the cosine kernel, as
the study computes it), K = X X^T and lambda the eigenvalues of K / n (they sum to 1):

    VS_q = exp(H_q(lambda)),  H_1 = -sum lambda log lambda  (Shannon; the default),
    H_q = log(sum lambda^q) / (1 - q)                        (order-q Renyi),
    VS_inf = 1 / max(lambda),  VS_0 = number of nonzero eigenvalues.

The nonzero eigenvalues of X X^T / n (n x n, the *primal* form) equal those of X^T X / n
(d x d, the *dual* form); ``form="auto"`` takes the smaller matrix (dual when n > d).
Eigenvalues at or below ``max(lambda) * max(n, d) * eps_float64`` (numerical zeros, often
slightly negative) are dropped for every q -- needed for q < 1, where a numerical zero
raised to a small power is not small, and for q = 0 (the rank). The vendi-score package
keeps everything > 0, so for q = 0 it counts numerical noise; elsewhere the two agree.

Precision: the Gram matrix and its eigenvalues are computed in float64. The spectrum of
K / n has many small eigenvalues whose log-weighted sum is sensitive to float32 rounding
(~1e-7 relative per entry, accumulated over d = 2048), and TPUs have no native float64.
So the computation runs with JAX on the host CPU device under a local ``jax.enable_x64``
context (thread-local; the global x64 flag and the accelerator are untouched), and falls
back to numpy float64 where that API is missing (``impl="numpy"`` forces it). The matrices
are at most min(n, d)^2 = 2048^2, a second or two on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMS = ("auto", "primal", "dual")
IMPLS = ("jax", "numpy")


def _check_q(q: Any) -> float:
    if isinstance(q, str):
        if q.lower() in ("inf", "infinity"):
            return math.inf
        raise ValueError(f"q must be a number >= 0 or 'inf'; got {q!r}")
    q = float(q)
    if not q >= 0:
        raise ValueError(f"q must be >= 0 (or inf); got {q}")
    return q


def _check_features(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D (n, d) array; got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features are empty: shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"features must be numeric; got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return x


def _choose_form(form: str, n: int, d: int) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    if form == "auto":
        return "dual" if n > d else "primal"
    return form


def score_from_eigenvalues(eigenvalues: Any, q: Any = 1.0, *, tol: float | None = None) -> float:
    """exp(order-q Renyi entropy) of a spectrum summing to 1 (float64, numpy)."""
    q = _check_q(q)
    w = np.asarray(eigenvalues, dtype=np.float64).ravel()
    if w.size == 0:
        raise ValueError("no eigenvalues")
    if tol is None:
        tol = max(float(w.max()), 0.0) * w.size * np.finfo(np.float64).eps
    p = w[w > tol]
    if p.size == 0:
        raise ValueError("all eigenvalues are zero: the kernel is zero (all-zero features?)")
    if q == math.inf:
        return float(1.0 / p.max())
    if q == 0:
        return float(p.size)
    if q == 1:
        return float(np.exp(-np.sum(p * np.log(p))))
    return float(np.exp(np.log(np.sum(p**q)) / (1.0 - q)))


def _normalize_np(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0] = 1.0  # as sklearn.preprocessing.normalize: zero rows stay zero
    return x / norms[:, None]


def _spectrum_np(x: np.ndarray, normalize: bool, dual: bool) -> np.ndarray:
    if normalize:
        x = _normalize_np(x)
    n = x.shape[0]
    gram = (x.T @ x) if dual else (x @ x.T)
    return np.linalg.eigvalsh(gram / n)


@functools.partial(jax.jit, static_argnames=("normalize", "dual"))
def _spectrum_jax(x: jax.Array, normalize: bool, dual: bool) -> jax.Array:
    if normalize:
        norms = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
        x = x / jnp.where(norms == 0, 1.0, norms)
    n = x.shape[0]
    hp = jax.lax.Precision.HIGHEST
    gram = jnp.matmul(x.T, x, precision=hp) if dual else jnp.matmul(x, x.T, precision=hp)
    return jnp.linalg.eigvalsh(gram / n)


def _jax_float64_cpu_available() -> bool:
    try:
        jax.devices("cpu")
    except RuntimeError:
        return False
    return bool(jax.config.jax_enable_x64) or hasattr(jax, "enable_x64")


@contextlib.contextmanager
def _float64_cpu():
    """JAX computes float64 on the host CPU inside; global flags are restored after."""
    with contextlib.ExitStack() as stack:
        if not jax.config.jax_enable_x64:
            stack.enter_context(jax.enable_x64(True))
        stack.enter_context(jax.default_device(jax.devices("cpu")[0]))
        yield


def spectrum(features: Any, *, normalize: bool = True, form: str = "auto",
             impl: str = "jax") -> np.ndarray:
    """Eigenvalues (float64, ascending) of K / n (primal) or X^T X / n (dual)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    x = _check_features(features)
    dual = _choose_form(form, *x.shape) == "dual"
    if impl == "numpy" or not _jax_float64_cpu_available():
        return _spectrum_np(x, normalize, dual)
    with _float64_cpu():
        w = _spectrum_jax(jnp.asarray(x, dtype=jnp.float64), normalize, dual)
        assert w.dtype == jnp.float64, w.dtype
        return np.asarray(w, dtype=np.float64)


def vendi_score(features: Any, q: Any = 1.0, *, normalize: bool = True, form: str = "auto",
                impl: str = "jax") -> float:
    """Vendi score of (n, d) features with the cosine kernel (``normalize=True``).

    ``q``: 1 (Shannon, default), any q >= 0, ``inf`` / ``"inf"``. ``form``: ``"auto"``
    (dual when n > d), ``"primal"`` or ``"dual"``. Returns a float in [1, min(n, d)].
    """
    q = _check_q(q)
    return score_from_eigenvalues(spectrum(features, normalize=normalize, form=form, impl=impl),
                                  q)


def vendi_score_kernel(kernel: Any, q: Any = 1.0) -> float:
    """Vendi score of a precomputed (n, n) similarity matrix with unit diagonal (float64)."""
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] == 0:
        raise ValueError(f"kernel must be a non-empty square (n, n) matrix; got {k.shape}")
    if not np.isfinite(k).all():
        raise ValueError("kernel contains NaN or inf")
    return score_from_eigenvalues(np.linalg.eigvalsh(k / k.shape[0]), q)
