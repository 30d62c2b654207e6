"""jaxmed.storage: a ``gs://`` workdir is never made a local path, and what jaxmed writes
there (JSON, PNGs, metrics, a staged export) goes through epath. No bucket here: the
``bucket`` fixture serves ``gs://`` from a local folder by swapping epath's backend for
the ``gs`` scheme, so every byte written to ``gs://...`` took the URL route (a local path
would not land in that folder). Orbax's array data goes through tensorstore, which talks
to GCS itself and cannot be pointed at that folder: the checkpoint test checks orbax is
handed the URL untouched."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from PIL import Image

from jaxmed import checkpoint, files, storage
from jaxmed.logging_utils import MetricWriter, read_metrics
from jaxmed.sample import MANIFEST, _check_manifest, png_ok


class _LocalBucket(epath_backend._OsPathBackend):
    """epath's backend for gs://, on a local folder: gs://b/x is ROOT/b/x."""

    def __init__(self, root: str):
        self.root = root

    def _p(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith("gs://"), path
        return os.path.join(self.root, path[len("gs://"):])

    def _url(self, local) -> str:
        return "gs://" + os.path.relpath(os.fspath(local), self.root)

    def open(self, path, mode):
        if "w" in mode:  # an object store has no folders to create first
            os.makedirs(os.path.dirname(self._p(path)), exist_ok=True)
        return super().open(self._p(path), mode)

    def exists(self, path):
        return super().exists(self._p(path))

    def isdir(self, path):
        return super().isdir(self._p(path))

    def listdir(self, path):
        return super().listdir(self._p(path))

    def glob(self, path):
        return [self._url(p) for p in super().glob(self._p(path))]

    def walk(self, top, **kw):
        for root, dirs, names in super().walk(self._p(top), **kw):
            yield self._url(root), dirs, names

    def makedirs(self, path, **kw):
        return super().makedirs(self._p(path), **kw)

    def mkdir(self, path, **kw):
        return super().mkdir(self._p(path), **kw)

    def rmtree(self, path):
        return super().rmtree(self._p(path))

    def remove(self, path):
        return super().remove(self._p(path))

    def rename(self, path, dst):
        raise AssertionError("jaxmed renames nothing on an object store")

    replace = rename

    def copy(self, path, dst, overwrite):
        return super().copy(self._p(path), self._p(dst), overwrite)

    def stat(self, path):
        return super().stat(self._p(path))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://bucket/... served from the folder this yields (tmp_path/gcs/bucket); local
    temporaries in tmp_path/tmp, checked empty afterwards."""
    root = tmp_path / "gcs"
    (root / "bucket").mkdir(parents=True)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", _LocalBucket(str(root)))
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    yield root / "bucket"
    assert os.listdir(tmp_path / "tmp") == [], "local temporaries left behind"


def test_urls_go_through_untouched(tmp_path, monkeypatch):
    assert storage.absolute("gs://bucket/runs/lora/") == "gs://bucket/runs/lora"
    assert storage.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
    assert storage.absolute("runs/x") == os.path.abspath("runs/x")  # local: as before
    # What cannot live in a bucket (memory-mapped caches, the phantom) stays on this host:
    # the workdir itself when local, a stable per-run folder under $JAXMED_CACHE for a URL.
    monkeypatch.setenv("JAXMED_CACHE", str(tmp_path))
    assert storage.local_twin("/data/run") == "/data/run"
    twin = storage.local_twin("gs://bucket/runs/lora")
    assert twin.startswith(str(tmp_path / "runs" / "lora-"))
    assert twin == storage.local_twin("gs://bucket/runs/lora")
    assert twin != storage.local_twin("gs://other/runs/lora")
    with pytest.raises(ValueError, match="cache.dir gs://b/c: this folder must be local"):
        storage.require_local("gs://b/c", "cache.dir")
    storage.require_local("/tmp/c", "cache.dir")
    with pytest.raises(ValueError, match="ftp:// is not a storage"):
        storage.check_url("ftp://host/run")


def test_writes_reach_the_bucket_whole(bucket):
    run = "gs://bucket/runs/a"
    storage.makedirs(run)
    files.write_json(storage.join(run, "config.json"), {"seed": 0})
    files.atomic_write(storage.join(run, "raw.bin"), b"\x00\x01")
    assert json.loads((bucket / "runs/a/config.json").read_text()) == {"seed": 0}
    assert (bucket / "runs/a/raw.bin").read_bytes() == b"\x00\x01"
    assert storage.isfile(storage.join(run, "config.json"))
    assert not storage.isfile(storage.join(run, "missing.json"))
    # A writer that fails leaves the object as it was (nothing uploaded).
    with pytest.raises(RuntimeError), files.atomic_path(storage.join(run, "raw.bin")) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert (bucket / "runs/a/raw.bin").read_bytes() == b"\x00\x01"

    # PNGs (samples, synthesised images) and the sampler's resume checks read them back.
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L")
    png = storage.join(run, "samples/step_0000001.png")
    files.save_image(img, png)
    assert png_ok(png, (8, 8), "L") and not png_ok(png, (16, 16), "L")
    assert np.array_equal(np.asarray(Image.open(bucket / "runs/a/samples/step_0000001.png")),
                          np.asarray(img))
    files.write_json(storage.join(run, MANIFEST), {"steps": 50})
    _check_manifest(run, {"steps": 50})
    with pytest.raises(ValueError, match="other settings"):
        _check_manifest(run, {"steps": 20})

    # A folder written by another library (the diffusers export) is staged and uploaded.
    with storage.staged_dir(storage.join(run, "export")) as folder:
        assert not storage.is_url(folder)
        os.makedirs(os.path.join(folder, "unet"))
        with open(os.path.join(folder, "unet", "config.json"), "w") as f:
            f.write("{}")
    assert (bucket / "runs/a/export/unet/config.json").read_text() == "{}"


def test_metrics_append_across_restarts_on_a_bucket(bucket):
    run = "gs://bucket/runs/m"
    w = MetricWriter(run, tensorboard=False)
    w.write(1, {"loss": 0.5})
    w.write(2, {"loss": 0.25})
    w.close()
    w = MetricWriter(run, tensorboard=False, sync_seconds=0.0)  # a resumed run
    w.write(3, {"loss": 0.125})
    # Uploaded at once (sync_seconds=0), before close: a run killed later keeps it.
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    w.close()
    assert [r["loss"] for r in read_metrics(run)] == [0.5, 0.25, 0.125]
    assert len((bucket / "runs/m/metrics.jsonl").read_text().splitlines()) == 3


def test_checkpointer_hands_orbax_the_url(bucket, monkeypatch):
    seen = {}

    class Manager:  # stands in for orbax's CheckpointManager, which writes via tensorstore
        def __init__(self, directory, options):
            seen["directory"] = directory

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", Manager)
    ckpt = checkpoint.Checkpointer("gs://bucket/runs/c/checkpoints/", async_save=False)
    assert seen["directory"] == ckpt.directory == "gs://bucket/runs/c/checkpoints"
    assert (bucket / "runs/c/checkpoints").is_dir()
