"""jaxmed.eval.fid against pytorch-fid's formula, jaxmed.eval.vendi against vendi-score.

Small random features only (d <= 256): a 2048^2 sqrtm takes a minute on this CPU.
"""

import math
import warnings

import jax
import numpy as np
import pytest
from scipy import linalg
from sklearn import preprocessing
from vendi_score import vendi as vendi_pkg

from jaxmed.eval import fid as F
from jaxmed.eval import vendi as V

pytestmark = pytest.mark.filterwarnings(
    "ignore:Please import `csr_matrix`:DeprecationWarning"  # inside vendi-score
)


def _features(n, d, seed=0, rank=None, shift=0.0):
    """Correlated, non-negative-ish features like pooled activations."""
    rng = np.random.default_rng(seed)
    r = rank or d
    mix = rng.standard_normal((r, d)) / np.sqrt(r)
    return np.abs(rng.standard_normal((n, r)) @ mix + shift)


def _pytorch_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (scipy's deprecated disp argument dropped)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


# ------------------------------------------------------------------------------------ FID


def test_frechet_distance_equals_pytorch_fid_full_rank():
    f1, f2 = _features(300, 64, 0), _features(250, 64, 1, shift=0.2)
    mu1, s1 = np.mean(f1, 0), np.cov(f1, rowvar=False)
    mu2, s2 = np.mean(f2, 0), np.cov(f2, rowvar=False)
    ref = _pytorch_fid(mu1, s1, mu2, s2)
    got_mu, got_s = F.feature_stats(f1)
    np.testing.assert_array_equal(got_mu, mu1)
    np.testing.assert_array_equal(got_s, s1)
    assert got_s.dtype == np.float64
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-12)
    assert F.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(ref, rel=1e-9)
    assert F.fid_from_features(f1, f2) == pytest.approx(ref, rel=1e-12)
    assert F.fid_from_features(f1, f2, method="eigh") == pytest.approx(ref, rel=1e-9)
    assert abs(F.fid_from_features(f1, f1, method="eigh")) < 1e-9


def test_fid_rank_deficient_sets_all_routes_agree():
    f1, f2 = _features(30, 256, 2), _features(25, 256, 3, shift=0.1)
    mu1, s1 = np.mean(f1, 0), np.cov(f1, rowvar=False)
    mu2, s2 = np.mean(f2, 0), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        ref = _pytorch_fid(mu1, s1, mu2, s2)
        with pytest.warns(F.RankDeficientWarning):
            sq = F.fid_from_features(f1, f2)
    with pytest.warns(F.RankDeficientWarning):
        sv = F.fid_from_features(f1, f2, method="eigh")
    assert sq == pytest.approx(ref, rel=1e-12)
    assert sv == pytest.approx(ref, rel=1e-6)  # sqrtm of a singular product is noisy


def test_fid_eigh_singular_covariance_and_mixed_sizes():
    # N > d but rank 10 < d = 32: Cholesky fails, the eigh factor takes over.
    f1, f2 = _features(100, 32, 4, rank=10), _features(120, 32, 5, rank=10, shift=0.3)
    f1[:, 16:] = f1[:, :16]  # duplicated columns: exactly singular covariance
    f2[:, 16:] = f2[:, :16]
    mu1, s1 = np.mean(f1, 0), np.cov(f1, rowvar=False)
    mu2, s2 = np.mean(f2, 0), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        ref = _pytorch_fid(mu1, s1, mu2, s2)
    assert F.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(ref, rel=1e-6)
    # one set with N > d, the other with N <= d
    g1, g2 = _features(200, 48, 6), _features(20, 48, 7, shift=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _pytorch_fid(np.mean(g1, 0), np.cov(g1, rowvar=False),
                           np.mean(g2, 0), np.cov(g2, rowvar=False))
        assert F.fid_from_features(g1, g2, method="eigh") == pytest.approx(ref, rel=1e-6)
        assert F.fid_from_features(g2, g1, method="eigh") == pytest.approx(ref, rel=1e-6)


def test_rank_deficient_warning_names_n_and_d():
    with pytest.warns(F.RankDeficientWarning, match=r"N=10 .*d=32.*rank-deficient"):
        F.feature_stats(_features(10, 32))
    with pytest.warns(F.RankDeficientWarning, match=r"N=32 .*d=32"):  # N <= d
        F.feature_stats(_features(32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", F.RankDeficientWarning)
        F.feature_stats(_features(33, 32))
        F.fid_from_features(_features(100, 32), _features(100, 32, 1), method="eigh")


def test_fid_input_errors():
    ok = _features(50, 8)
    for bad, match in [
        (np.zeros((0, 8)), "empty"),
        (np.zeros((5, 0)), "empty"),
        (np.zeros(8), "2-D"),
        (np.zeros((1, 8)), "at least 2 samples"),
        (np.full((5, 8), np.nan), "NaN"),
    ]:
        with pytest.raises(ValueError, match=match):
            F.feature_stats(bad)
        with pytest.raises(ValueError, match=match):
            F.fid_from_features(ok, bad)
    with pytest.raises(ValueError, match="dimensions differ"):
        F.fid_from_features(ok, _features(50, 9))
    with pytest.raises(ValueError, match="empty"):
        F.frechet_distance(np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)))
    with pytest.raises(ValueError, match="sigma2 has shape"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="method"):
        F.fid_from_features(ok, ok, method="eig")


def test_stats_npz_roundtrip(tmp_path):
    mu, s = F.feature_stats(_features(40, 8))
    F.save_stats(tmp_path / "s.npz", mu, s)
    mu2, s2 = F.load_stats(tmp_path / "s.npz")
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(s, s2)


# ---------------------------------------------------------------------------------- Vendi

SHAPES = [(40, 16), (12, 64)]  # n > d (dual by default) and n < d (primal)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("impl", V.IMPLS)
def test_vendi_q1_equals_package(n, d, impl):
    x = _features(n, d, seed=n)
    ref_primal = vendi_pkg.score_X(x)
    ref_dual = vendi_pkg.score_dual(x)
    for form in V.FORMS:
        got = V.vendi_score(x, impl=impl, form=form)
        assert abs(got - ref_primal) <= 1e-6 * ref_primal, form
        assert abs(got - ref_dual) <= 1e-6 * ref_dual, form


@pytest.mark.parametrize("q", [0.5, 2, 3.5, "inf", math.inf])
@pytest.mark.parametrize("n,d", SHAPES)
def test_vendi_general_q_equals_package(q, n, d):
    x = _features(n, d, seed=n + 1)
    xn = preprocessing.normalize(x, axis=1)
    q_pkg = "inf" if q == math.inf else q
    ref_k = vendi_pkg.score_K(xn @ xn.T, q=q_pkg)
    ref_dual = vendi_pkg.score_dual(x, q=q_pkg)
    for form in ("primal", "dual"):
        got = V.vendi_score(x, q, form=form)
        assert abs(got - ref_k) <= 1e-6 * ref_k, (form, got, ref_k)
        assert abs(got - ref_dual) <= 1e-6 * ref_dual, (form, got, ref_dual)


@pytest.mark.parametrize("q", [0, 0.5, 1, 2, "inf"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_vendi_primal_equals_dual(q, n, d):
    x = _features(n, d, seed=7)
    p = V.vendi_score(x, q, form="primal")
    du = V.vendi_score(x, q, form="dual")
    assert abs(p - du) <= 1e-9 * p


@pytest.mark.parametrize("q", [0, 0.5, 1, 2, "inf"])
def test_vendi_identical_rows_is_one(q):
    x = np.tile(_features(1, 32), (20, 1))
    for form in V.FORMS:
        assert V.vendi_score(x, q, form=form) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("q", [0, 0.5, 1, 2, "inf"])
def test_vendi_k_orthogonal_clusters_is_k(k, q):
    d = 8
    rng = np.random.default_rng(k)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0][:, :k].T  # k orthonormal rows
    x = np.repeat(basis * rng.uniform(0.5, 3.0, (k, 1)), 6, axis=0)  # scale: cosine ignores it
    for form in V.FORMS:
        assert V.vendi_score(x, q, form=form) == pytest.approx(k, abs=1e-9)


def test_vendi_q0_counts_rank_not_noise():
    x = np.repeat(_features(4, 64, 9), 5, axis=0)  # 4 distinct rows, each 5 times
    # K / n (20 x 20) has rank 4; its 16 other eigenvalues are rounding noise (+-1e-17)
    assert V.vendi_score(x, 0) == 4.0
    assert V.vendi_score(x, 0, form="dual") == 4.0


def test_vendi_leaves_jax_x64_alone():
    before = jax.config.jax_enable_x64
    V.vendi_score(_features(10, 8))
    assert jax.config.jax_enable_x64 == before
    assert jax.numpy.ones(1).dtype == (np.float64 if before else np.float32)


def test_vendi_kernel_matches_package():
    x = preprocessing.normalize(_features(15, 10, 4), axis=1)
    k = x @ x.T
    assert V.vendi_score_kernel(k) == pytest.approx(vendi_pkg.score_K(k), rel=1e-9)


def test_vendi_input_errors():
    with pytest.raises(ValueError, match="empty"):
        V.vendi_score(np.zeros((0, 8)))
    with pytest.raises(ValueError, match="2-D"):
        V.vendi_score(np.zeros(8))
    with pytest.raises(ValueError, match="q must be"):
        V.vendi_score(_features(5, 4), q=-1)
    with pytest.raises(ValueError, match="q must be"):
        V.vendi_score(_features(5, 4), q="max")
    with pytest.raises(ValueError, match="form"):
        V.vendi_score(_features(5, 4), form="both")
    with pytest.raises(ValueError, match="NaN"):
        V.vendi_score(np.full((3, 4), np.nan))
