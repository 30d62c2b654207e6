"""Encode once, train many: the caches give the same training, and stale caches are rebuilt."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import pytest
from PIL import Image

from jaxmed import train
from jaxmed.cache import LatentCache, TextCache, params_hash
from jaxmed.data import Batches, read_chexpert_csv
from jaxmed.strategies.base import flatten
from tests.helpers import write_chexpert_dataset
from tests.train_worker import config as make_config


@pytest.fixture(scope="module")
def csv200(tmp_path_factory):
    return write_chexpert_dataset(str(tmp_path_factory.mktemp("data200")), n=200, size=32)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "lora"])
def test_cached_training_equals_encoding_on_the_fly(name, tiny_sd_folder, csv200, tmp_path,
                                                    capsys):
    runs = {}
    for mode in ("off", "on"):
        c = make_config(name, tiny_sd_folder, csv200, **{
            "train.max_steps": 3, "cache.latents": mode, "cache.text": mode,
            "data.caption_dropout": 0.25, "log.every_steps": 1,
            # unet: the full pre-encode asked for; lora: the images the 3 steps read
            "cache.prefill": name == "unet"})
        trainer = train.Trainer(c, str(tmp_path / mode))
        assert (trainer.latent_cache is not None) == (mode == "on")
        assert (trainer.text_cache is not None) == (mode == "on")
        summary = trainer.run()
        with open(tmp_path / mode / "metrics.jsonl") as f:
            losses = [json.loads(line)["loss"] for line in f]
        runs[mode] = (losses, flatten(jax.device_get(trainer.state.trainable)))
    # a 3-step run on a 200-image CSV encoded exactly the images its batches read
    batches = Batches(trainer.records, trainer.global_batch, seed=c.seed, process_index=0,
                      process_count=1)
    read = {int(p) for s in range(3) for p in batches.global_positions(0, s)}
    assert len(read) == 3 * trainer.global_batch == 12
    encoded = set(np.flatnonzero(trainer.latent_cache.done).tolist())
    assert encoded == (set(range(200)) if name == "unet" else read)
    # the summary's rate: every image of the run over the run's wall time, said so
    assert summary["images"] == 12
    assert summary["images_per_second"] == pytest.approx(12 / summary["train_seconds"],
                                                         rel=0.02)
    out = capsys.readouterr().out
    assert "12 images in" in out and "img/s over the whole run" in out
    (l_off, p_off), (l_on, p_on) = runs["off"], runs["on"]
    assert len(l_off) == 3
    np.testing.assert_allclose(l_on, l_off, atol=1e-6, rtol=0)
    worst = max(float(np.max(np.abs(p_on[k] - p_off[k]))) for k in p_off)
    assert worst <= 1e-6, f"{name}: params differ by {worst}"


def _encode(scale):
    # A stand-in encoder (its params unused): a pure function of the images, cheap to compile.
    def f(params, x):
        small = jax.image.resize(x, (x.shape[0], x.shape[1] // 4, x.shape[2] // 4, 3), "linear")
        return small * scale, small[..., :1] * 0 - 1.0 + small
    return f


def _build(cache_dir, records, scale=1.0, resolution=32):
    return LatentCache.build_or_load(
        str(cache_dir), records, _encode(scale), {}, params_hash({"s": np.float32(scale)}),
        resolution=resolution, batch_size=4, progress=False, workers=2)


def test_stale_cache_is_detected_and_rebuilt(tmp_path, caplog):
    csv = write_chexpert_dataset(str(tmp_path / "data"), n=6, size=36)
    records = read_chexpert_csv(csv)
    cache_dir = tmp_path / "cache"
    first = _build(cache_dir, records)
    assert isinstance(first.mean, np.memmap) and first.mean.shape == (6, 8, 8, 3)
    mtime = os.path.getmtime(os.path.join(first.folder, "mean.npy"))
    expected = np.asarray(_encode(1.0)({}, np.stack([records.load(i, 32) for i in range(6)]))[0])
    np.testing.assert_allclose(first.get(np.arange(6))["latent_mean"], expected, atol=1e-6)

    # unchanged: reused, not rewritten
    caplog.set_level("INFO", logger="jaxmed.cache")
    again = _build(cache_dir, records)
    assert os.path.getmtime(os.path.join(again.folder, "mean.npy")) == mtime
    assert "using" in caplog.text

    # a changed image
    time.sleep(0.01)
    path = records.paths[3]
    Image.fromarray(np.full((36, 36), 200, np.uint8)).save(path)
    caplog.clear()
    rebuilt = _build(cache_dir, read_chexpert_csv(csv))
    assert "the images changed" in caplog.text
    assert not np.allclose(rebuilt.get(np.array([3]))["latent_mean"], expected[3:4])
    np.testing.assert_allclose(rebuilt.get(np.array([2]))["latent_mean"], expected[2:3],
                               atol=1e-6)

    # a changed resolution
    caplog.clear()
    res = _build(cache_dir, read_chexpert_csv(csv), resolution=64)
    assert "the resolution changed" in caplog.text and res.mean.shape == (6, 16, 16, 3)

    # changed VAE weights
    caplog.clear()
    _build(cache_dir, read_chexpert_csv(csv), scale=2.0, resolution=64)
    assert "the VAE weights changed" in caplog.text


def test_killed_build_is_never_used(tmp_path):
    csv = write_chexpert_dataset(str(tmp_path / "data"), n=4, size=32)
    records = read_chexpert_csv(csv)
    cache = _build(tmp_path / "cache", records)
    # every file renamed into place, nothing temporary left behind
    assert sorted(os.listdir(cache.folder)) == ["done.npy", "logvar.npy", "mean.npy",
                                                "meta.json", "valid.npy"]
    os.remove(os.path.join(cache.folder, "meta.json"))  # as if killed before completion
    with pytest.raises(FileNotFoundError):
        LatentCache(cache.folder)
    assert _build(tmp_path / "cache", records).meta["count"] == 4


def test_text_cache_holds_every_variant_and_rejects_others(tmp_path):
    captions = ["", "Chest X-ray showing Edema", "Normal chest X-ray with no significant findings"]
    calls = []

    def encode(params, ids):
        return ids.astype(np.float32)[..., None] * params

    ones = np.ones((1, 1, 2), np.float32)

    def tokenize(texts):
        calls.append(len(texts))  # called once per batch of captions encoded
        return np.array([[len(t), 1, 2] for t in texts], np.int32)

    cache = TextCache.build_or_load(str(tmp_path), "src.csv", captions, encode, ones, tokenize,
                                    "h1")
    np.testing.assert_array_equal(cache.lookup(["Chest X-ray showing Edema"])[0, :, 0],
                                  [25, 1, 2])
    with pytest.raises(KeyError, match="not in the text cache"):
        cache.lookup(["Chest X-ray showing Pneumonia"])
    n = len(calls)
    TextCache.build_or_load(str(tmp_path), "src.csv", captions, encode, ones, tokenize, "h1")
    assert len(calls) == n  # reused
    TextCache.build_or_load(str(tmp_path), "src.csv", captions, encode, ones, tokenize, "h2")
    assert len(calls) > n  # rebuilt for a changed text encoder


def test_lazy_cache_encodes_what_is_read_and_keeps_it(tmp_path):
    csv = write_chexpert_dataset(str(tmp_path / "data"), n=6, size=36)
    records = read_chexpert_csv(csv)
    full = np.asarray(_encode(1.0)({}, np.stack([records.load(i, 32) for i in range(6)]))[0])
    lazy = LatentCache.build_or_load(
        str(tmp_path / "cache"), records, _encode(1.0), {}, params_hash({"s": np.float32(1)}),
        resolution=32, batch_size=4, progress=False, workers=2, positions=[1, 4])
    assert np.flatnonzero(lazy.done).tolist() == [1, 4]
    np.testing.assert_allclose(lazy.get(np.array([4, 1]))["latent_mean"], full[[4, 1]],
                               atol=1e-6)
    np.testing.assert_allclose(lazy.get(np.array([5]))["latent_mean"], full[[5]], atol=1e-6)
    assert lazy.num_encoded == 3  # 5 encoded when first read
    # a later run reuses the entries (published in done.npy) and encodes only the rest
    again = LatentCache.build_or_load(
        str(tmp_path / "cache"), records, _encode(1.0), {}, params_hash({"s": np.float32(1)}),
        resolution=32, batch_size=4, progress=False, workers=2, positions=[])
    assert np.flatnonzero(again.done).tolist() == [1, 4, 5]
    whole = _build(tmp_path / "cache", records)  # positions=None: the full pre-encode
    assert whole.num_encoded == 6
    np.testing.assert_allclose(whole.get(np.arange(6))["latent_mean"], full, atol=1e-6)
