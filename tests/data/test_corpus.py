"""The non-medical pretraining corpus and the committed tiny foundation model (jaxmed:tiny-sd)."""

import csv
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")

from jaxmed.data import corpus  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

ASSET = os.path.join(ROOT, "jaxmed", "assets", "tiny-sd")
MEDICAL_WORDS = ("x-ray", "xray", "chest", "radiograph", "lung", "medical", "retina", "cell",
                 "tissue", "microscop", "phantom", "mri", "ct scan", "kidney", "brain")


def _read(folder):
    with open(os.path.join(folder, "captions.csv")) as f:
        rows = list(csv.DictReader(f))
    pix = [np.asarray(Image.open(os.path.join(folder, r["path"]))) for r in rows]
    return rows, pix


def test_corpus_is_deterministic_and_extends(tmp_path):
    a = corpus.make_corpus(str(tmp_path / "a"), 10, 32, seed=3, progress=False)
    b = corpus.make_corpus(str(tmp_path / "b"), 10, 32, seed=3, progress=False)
    c = corpus.make_corpus(str(tmp_path / "c"), 14, 32, seed=3, progress=False)
    d = corpus.make_corpus(str(tmp_path / "d"), 10, 32, seed=4, progress=False)
    ra, pa = _read(os.path.dirname(a))
    rb, pb = _read(os.path.dirname(b))
    rc, pc = _read(os.path.dirname(c))
    rd, pd = _read(os.path.dirname(d))
    assert ra == rb and all(np.array_equal(x, y) for x, y in zip(pa, pb))
    assert ra == rc[:10] and all(np.array_equal(x, y) for x, y in zip(pa, pc))  # i <- (seed, i)
    assert ra != rd
    assert all(p.shape == (32, 32, 3) and p.dtype == np.uint8 for p in pa)
    meta = json.load(open(tmp_path / "a" / "corpus.json"))
    assert meta["n_images"] == 10 and sum(meta["counts"].values()) == 10
    # ensure_corpus reuses a complete corpus with the same settings
    mtime = os.path.getmtime(a)
    assert corpus.ensure_corpus(str(tmp_path / "a"), 10, 32, 3, progress=False) == a
    assert os.path.getmtime(a) == mtime


def test_corpus_excludes_medical_images_and_captions_are_meaningful(tmp_path):
    names = {s.name for s in corpus.SOURCES}
    assert not names & corpus.EXCLUDED
    for bad in ("retina", "microaneurysms", "cell", "immunohistochemistry",
                "shepp_logan_phantom", "kidney", "lily", "brain"):
        assert bad in corpus.EXCLUDED
    bad_source = corpus.Source("retina", lambda: [], ("an eye",), "photo", "x")
    with pytest.raises(ValueError, match="excluded"):
        corpus.available_sources([bad_source])
    path = corpus.make_corpus(str(tmp_path / "c"), 48, 32, seed=0, progress=False)
    rows, _ = _read(os.path.dirname(path))
    assert {r["source"] for r in rows} <= names
    assert len({r["source"] for r in rows}) >= 10
    for r in rows:
        cap = r["caption"].strip()
        assert cap and len(cap.split()) >= 2 and "{" not in cap
        assert not any(w in cap.lower() for w in MEDICAL_WORDS), cap
    from jaxmed.data import read_folder_csv

    recs = read_folder_csv(path)  # what data.kind=folder reads
    assert len(recs) == 48 and recs.captions[0] == rows[0]["caption"]


def test_patches_and_scaling_factor(tmp_path):
    from jaxmed.models import tiny

    path = corpus.make_corpus(str(tmp_path / "c"), 6, 32, seed=0, progress=False)
    pcsv = corpus.make_patches(path, str(tmp_path / "p"), 16, seed=0, progress=False)
    rows, pix = _read(os.path.dirname(pcsv))
    assert len(rows) == 6 and all(p.shape == (16, 16, 3) for p in pix)
    model = tiny.write_random_pipeline(str(tmp_path / "m"), "test", 32)
    s = corpus.latent_scaling_factor(model, path, resolution=32, batch=4)
    assert s["images"] == 6 and np.isfinite(s["std"]) and s["std"] > 0
    assert s["scaling_factor"] == pytest.approx(1 / s["std"])
    corpus.set_scaling_factor(model, s["scaling_factor"])
    cfg = json.load(open(os.path.join(model, "vae", "config.json")))
    assert cfg["scaling_factor"] == pytest.approx(s["scaling_factor"])


def _safetensors_dtypes(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.skipif(not os.path.isfile(os.path.join(ASSET, "model_index.json")),
                    reason="jaxmed/assets/tiny-sd not built (python launch/pretrain_tiny.py)")
def test_committed_tiny_sd_loads_and_samples():
    import jax

    from jaxmed.diffusion.sampling import generate
    from jaxmed.models import weights
    from jaxmed.models.sd import StableDiffusion, resolve

    assert os.path.samefile(resolve("jaxmed:tiny-sd"), ASSET)
    total = sum(os.path.getsize(os.path.join(dp, f))
                for dp, _, fs in os.walk(ASSET) for f in fs)
    assert total <= 30 * 2**20, f"{total / 2**20:.1f} MiB"
    for name in ("unet", "vae", "text_encoder"):
        files = [f for f in os.listdir(os.path.join(ASSET, name)) if f.endswith(".safetensors")]
        assert files, name
        for f in files:
            assert _safetensors_dtypes(os.path.join(ASSET, name, f)) == {"F16"}, (name, f)
    assert os.path.isfile(os.path.join(ASSET, "README.md"))

    pipe = weights.load_pipeline(ASSET)  # the reader SD 1.5 goes through
    leaves = jax.tree_util.tree_leaves(pipe.params)
    assert leaves and all(x.dtype == np.float32 for x in leaves)
    scale = pipe.configs["vae"].scaling_factor
    assert 0.05 < scale < 20 and scale != 0.18215  # measured on the corpus

    sd, params = StableDiffusion.load("jaxmed:tiny-sd")
    ids = np.asarray(sd.tokenize(["a photo of a cat"]))
    assert ids.shape == (1, 77)
    images = generate(sd, params, ["a photo of a cat", ""], sampler="pndm", num_steps=2,
                      guidance_scale=5.0, height=64, width=64, seed=0)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    z = np.zeros((1, 8, 8, 4), np.float32)
    x = np.asarray(sd.decode_latents(params["vae"], z))
    assert np.isfinite(x).all()
