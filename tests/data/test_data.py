"""Data readers and the input pipeline, on a tiny CheXpert-format dataset built in tmp_path."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from jaxmed.data import (
    NORMAL_CAPTION,
    READERS,
    BadImageError,
    Batches,
    Captioner,
    all_caption_variants,
    build_records,
    caption_from_labels,
    load_image,
    prefetch_to_device,
    read_chexpert_csv,
    read_folder_csv,
    read_image_folder,
    read_records,
)
from jaxmed.data.labels import LABELS
from jaxmed.data.tfds import read_tfds_chexpert, tfds_labels_to_study
from tests.helpers import CSV_HEADER

RES = 32
# (view, labels in LABELS order) per CSV row; rows 3 and 7 are lateral.
ROWS = [
    ("Frontal", [1, 0, 0, 0, 0, 0, 0, 0]),
    ("Frontal", [0, 1, 0, 1, 0, 0, 0, 0]),
    ("Frontal", [0, 0, 0, 0, 0, 0, 0, 0]),
    ("Lateral", [0, 0, 1, 0, 0, 0, 0, 0]),
    ("Frontal", [0, 0, 0, 0, 0, 0, 1, 1]),
    ("Frontal", [1, 0, 0, 0, 0, 0, 0, 1]),
    ("Frontal", [0, 1, 1, 1, 1, 1, 1, 1]),
    ("Lateral", [0, 0, 0, 0, 0, 0, 0, 0]),
    ("Frontal", [0, 0, 0, 0, 1, 0, 0, 0]),
    ("Frontal", [0, 0, 0, 0, 0, 1, 0, 0]),
]
FRONTAL_ROWS = [i for i, (v, _) in enumerate(ROWS) if v == "Frontal"]
REWRITE = ("CheXpert-v1.0/", "CheXpert-v1.0_512x512/")


def _csv_path(i):
    view = "frontal" if ROWS[i][0] == "Frontal" else "lateral"
    return f"CheXpert-v1.0/train/patient{i:05d}/study1/view1_{view}.png"


def _write_csv(path, rows=ROWS, header=CSV_HEADER, paths=None):
    lines = [header]
    for i, (view, lab) in enumerate(rows):
        p = paths[i] if paths else _csv_path(i)
        lines.append(f"{p},Male,50,{view},AP," + ",".join(str(v) for v in lab))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """CSV + PNGs of assorted sizes (row 2 is 16-bit) under the rewritten root."""
    root = tmp_path_factory.mktemp("chexpert")
    rng = np.random.default_rng(0)
    for i in range(len(ROWS)):
        f = root / _csv_path(i).replace(*REWRITE)
        f.parent.mkdir(parents=True, exist_ok=True)
        h, w = 20 + 7 * i, 45 - 2 * i
        if i == 2:
            a = rng.integers(0, 65536, size=(h, w), dtype=np.uint16)
        else:
            a = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        Image.fromarray(a).save(f)
    csv = _write_csv(root / "train.csv")
    return root, csv


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from jaxmed.models.tokenizer import build_clip_bpe_tokenizer, open_clip_bpe_path

    return build_clip_bpe_tokenizer(open_clip_bpe_path(), str(tmp_path_factory.mktemp("tok")))


def _records(dataset, **kw):
    root, csv = dataset
    return read_chexpert_csv(csv, str(root), path_replace=REWRITE, **kw)


def _batches(records, batch_size=4, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("num_workers", 2)
    return Batches(records, batch_size, resolution=RES, **kw)


# ------------------------------------------------------------------ captions
def test_caption_rule_exact_strings():
    assert caption_from_labels([0] * 8) == NORMAL_CAPTION
    assert NORMAL_CAPTION == "Normal chest X-ray with no significant findings"
    # No Finding is a label column like the others (docs/STUDY.md "Data", read literally).
    assert caption_from_labels([1, 0, 0, 0, 0, 0, 0, 0]) == "Chest X-ray showing No Finding"
    assert (caption_from_labels([0, 1, 0, 1, 0, 0, 0, 0])
            == "Chest X-ray showing Cardiomegaly, Edema")
    assert (caption_from_labels([1, 0, 0, 0, 0, 0, 0, 1])
            == "Chest X-ray showing No Finding, Support Devices")
    assert caption_from_labels([0, 1, 1, 1, 1, 1, 1, 1]) == (
        "Chest X-ray showing Cardiomegaly, Lung Opacity, Edema, Pneumonia, Pneumothorax, "
        "Pleural Effusion, Support Devices"
    )
    # uncertain (-1) and ignored (NaN) are not positive
    assert caption_from_labels([0, -1, np.nan, 0, 0, 0, 0, 0]) == NORMAL_CAPTION


def test_caption_templates_dropout_and_variants():
    cap = Captioner(templates=["{findings} seen", "X-ray: {findings}"], dropout=0.3, seed=7)
    lab = np.array([0, 1, 0, 0, 0, 0, 0, 0])
    draws = [cap(lab, epoch=0, index=i) for i in range(4000)]
    assert draws == [cap(lab, epoch=0, index=i) for i in range(4000)]  # reproducible
    frac = np.mean([d == "" for d in draws])
    assert abs(frac - 0.3) < 0.03
    assert set(draws) == {"", "Cardiomegaly seen", "X-ray: Cardiomegaly"}
    other = [Captioner(templates=cap.templates, dropout=0.3, seed=8)(lab, index=i)
             for i in range(4000)]
    assert other != draws
    assert cap(np.zeros(8), index=1, epoch=5) in ("", NORMAL_CAPTION)
    m = np.array([r for _, r in ROWS])
    variants = all_caption_variants(m, cap.templates, 0.3)
    assert "" in variants and NORMAL_CAPTION in variants
    assert "Cardiomegaly, Edema seen" in variants
    assert len(variants) == 1 + 1 + 2 * (len({tuple(r) for r in m.tolist()}) - 1)
    assert cap.variants(m) == variants
    assert all_caption_variants(m) == sorted({caption_from_labels(r) for r in m})
    with pytest.raises(ValueError, match="findings"):
        Captioner(templates=["no field"])


# ------------------------------------------------------------------ CSV reader
def test_path_rewrite_and_frontal_filter(dataset):
    root, _ = dataset
    rec = _records(dataset)
    assert len(rec) == len(FRONTAL_ROWS)
    assert rec.rows.tolist() == FRONTAL_ROWS
    assert all("CheXpert-v1.0_512x512/" in p and os.path.isfile(p) for p in rec.paths)
    assert rec.paths[0] == os.path.join(str(root), _csv_path(0).replace(*REWRITE))
    np.testing.assert_array_equal(rec.labels, np.array([ROWS[i][1] for i in FRONTAL_ROWS]))
    assert len(_records(dataset, frontal_only=False)) == len(ROWS)
    rx = read_chexpert_csv(dataset[1], str(root), path_regex=[(r"^CheXpert-v1\.0/",
                                                               "CheXpert-v1.0_512x512/")])
    assert rx.paths == rec.paths
    assert read_records("chexpert", dataset[1], str(root), path_replace=REWRITE).paths == rec.paths


def test_missing_label_column_names_it(tmp_path):
    header = CSV_HEADER.replace(",Edema", "")
    rows = [(v, lab[:3] + lab[4:]) for v, lab in ROWS]
    csv = _write_csv(tmp_path / "bad.csv", rows, header)
    with pytest.raises(ValueError) as e:
        read_chexpert_csv(csv)
    msg = str(e.value)
    assert "'Edema'" in msg and csv in msg and "Pleural Effusion" in msg  # found columns


def test_uncertainty_policies(tmp_path):
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema"
    csv = tmp_path / "raw.csv"
    csv.write_text(header + "\na.png,F,1,Frontal,PA,,-1.0,1.0\nb.png,F,1,Frontal,PA,1.0,,0\n")
    cols = ("No Finding", "Cardiomegaly", "Edema")
    z = read_chexpert_csv(str(csv), label_columns=cols)
    np.testing.assert_array_equal(z.labels, [[0, 0, 1], [1, 0, 0]])
    o = read_chexpert_csv(str(csv), label_columns=cols, uncertain="ones")
    np.testing.assert_array_equal(o.labels, [[0, 1, 1], [1, 0, 0]])
    ig = read_chexpert_csv(str(csv), label_columns=cols, uncertain="ignore")
    assert np.isnan(ig.labels[0, 1]) and ig.labels[0, 2] == 1 and ig.labels[1, 1] == 0
    csv.write_text(header + "\na.png,F,1,Frontal,PA,0,2,1\n")
    with pytest.raises(ValueError, match=r"row 0, column 'Cardiomegaly'"):
        read_chexpert_csv(str(csv), label_columns=cols)


def test_tfds_label_conversion():
    codes = np.full((2, 14), 2)  # negative
    codes[0, 0] = 1  # No Finding positive
    codes[1, 2] = 0  # Cardiomegaly uncertain
    codes[1, 13] = 3  # Support Devices unmentioned
    np.testing.assert_array_equal(tfds_labels_to_study(codes)[0], [1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(tfds_labels_to_study(codes, uncertain="ones")[1],
                                  [0, 1, 0, 0, 0, 0, 0, 0])


def test_tfds_missing_gives_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError) as e:
        read_tfds_chexpert("train")
    assert "pip install jaxmed[tfds]" in str(e.value) and "manual_dir" in str(e.value)


# ------------------------------------------------------------------ images
def test_images_resized_normalised_three_channels(dataset):
    rec = _records(dataset)
    for i in range(len(rec)):
        x = rec.load(i, RES)
        assert x.shape == (RES, RES, 3) and x.dtype == np.float32
        assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05
        np.testing.assert_array_equal(x[..., 0], x[..., 1])
        np.testing.assert_array_equal(x[..., 0], x[..., 2])
    # 8-bit: exactly PIL's bilinear resize of the RGB image (the authors' transform)
    with Image.open(rec.paths[0]) as im:
        ref = np.asarray(im.convert("RGB").resize((RES, RES), Image.BILINEAR)) / 127.5 - 1
    np.testing.assert_allclose(rec.load(0, RES), ref, atol=1e-6)
    # 16-bit: scaled by 1/65535, not clipped to 8 bits
    i16 = rec.rows.tolist().index(2)
    with Image.open(rec.paths[i16]) as im:
        assert im.mode.startswith("I")
        a = np.asarray(im).astype(np.float32) / 65535
    x = rec.load(i16, (a.shape[0], a.shape[1]))  # same size: no resampling
    np.testing.assert_allclose(x[..., 0], a * 2 - 1, atol=1e-6)


def test_rgb_and_rgba_images(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (10, 12, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = load_image(str(tmp_path / "a.png"), (10, 12))
    np.testing.assert_allclose(x, rgba[..., :3] / 127.5 - 1, atol=1e-6)
    assert load_image(str(tmp_path / "a.png"), 8).shape == (8, 8, 3)


# ------------------------------------------------------------------ bad images
def _dataset_with_missing(dataset, tmp_path, missing_row=4):
    root, csv = dataset
    paths = [_csv_path(i) for i in range(len(ROWS))]
    paths[missing_row] = "CheXpert-v1.0/train/patient99999/study1/view1_frontal.png"
    csv2 = _write_csv(tmp_path / "missing.csv", paths=paths)
    return read_chexpert_csv(csv2, str(root), path_replace=REWRITE), csv2


def test_missing_image_error_names_path_and_row(dataset, tmp_path):
    rec, csv2 = _dataset_with_missing(dataset, tmp_path)
    with pytest.raises(BadImageError) as e:
        rec.load(rec.rows.tolist().index(4), RES)
    msg = str(e.value)
    assert "patient99999" in msg and "CSV row 4" in msg and csv2 in msg
    with _batches(rec, batch_size=8, shuffle=False) as it:
        with pytest.raises(BadImageError, match="CSV row 4"):
            next(it)


def test_skip_mode_counts_and_keeps_batches_full(dataset, tmp_path, caplog):
    rec, _ = _dataset_with_missing(dataset, tmp_path)
    bad_pos = rec.rows.tolist().index(4)
    with _batches(rec, batch_size=2, shuffle=False, on_bad_image="skip", num_epochs=2) as it:
        batches = list(it)
    assert len(batches) == 2 * it.steps_per_epoch == 8
    for b in batches:
        assert b["image"].shape == (2, RES, RES, 3) and b["index"].shape == (2,)
        assert 4 not in b["index"].tolist()
        assert len(set(b["index"].tolist())) == 2
    assert it.num_skipped == 2 and list(it.bad_images) == [rec.paths[bad_pos]]
    assert sum("patient99999" in r.getMessage() for r in caplog.records) == 1  # logged once
    # the slot is filled from the next records of the share: (4 -> 5) then 6 at step 2
    assert batches[1]["index"].tolist() == [FRONTAL_ROWS[2], FRONTAL_ROWS[4]]


# ------------------------------------------------------------------ pipeline
def test_batch_contents_and_tokens(dataset, tokenizer):
    from jaxmed.models.tokenizer import tokenize

    class Counting:  # records every text the pipeline tokenises
        seen: list = []

        def __call__(self, texts, **kw):
            self.seen.extend(texts)
            return tokenizer(texts, **kw)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    rec = _records(dataset)
    counting = Counting()
    with _batches(rec, batch_size=4, tokenizer=counting, return_captions=True,
                  num_epochs=3) as it:
        batches = list(it)
    assert len(counting.seen) == len(set(counting.seen))  # once per distinct caption
    assert set(counting.seen) == {c for x in batches for c in x["caption"]}
    b = batches[0]
    assert b["image"].shape == (4, RES, RES, 3) and b["image"].dtype == np.float32
    assert b["input_ids"].shape == (4, 77) and b["input_ids"].dtype == np.int32
    assert b["labels"].shape == (4, 8) and b["labels"].dtype == np.float32
    assert b["index"].dtype == np.int64
    for row, lab, cap in zip(b["index"], b["labels"], b["caption"]):
        np.testing.assert_array_equal(lab, ROWS[row][1])
        assert cap == caption_from_labels(ROWS[row][1])
    for x in batches:
        np.testing.assert_array_equal(x["input_ids"], tokenize(tokenizer, x["caption"]))


def test_deterministic_shuffle(dataset):
    rec = _records(dataset)
    order = lambda seed: [b["index"].tolist() for b in _batches(rec, 2, seed=seed,
                                                                 num_epochs=2)]
    a, b, c = order(3), order(3), order(4)
    assert a == b and a != c
    spe = len(rec) // 2
    e0, e1 = sum(a[:spe], []), sum(a[spe:], [])
    assert sorted(e0) == sorted(e1) == FRONTAL_ROWS and e0 != e1


def test_two_processes_read_disjoint_halves(dataset):
    rec = _records(dataset)
    full = _batches(rec, 4, seed=1, process_count=1, num_epochs=1)
    p0 = _batches(rec, 4, seed=1, process_index=0, process_count=2, num_epochs=1)
    p1 = _batches(rec, 4, seed=1, process_index=1, process_count=2, num_epochs=1)
    for g, a, b in zip(full, p0, p1):
        assert a["image"].shape[0] == b["image"].shape[0] == 2
        assert not set(a["index"].tolist()) & set(b["index"].tolist())
        np.testing.assert_array_equal(np.concatenate([a["index"], b["index"]]), g["index"])
        np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), g["image"])
    with pytest.raises(ValueError, match="multiple of the process count"):
        _batches(rec, 3, process_count=2)


def test_resume_from_state_dict(dataset):
    rec = _records(dataset)
    ref = [b["index"].tolist() for b in _batches(rec, 2, seed=5, num_epochs=3)]
    it = _batches(rec, 2, seed=5, num_epochs=3, prefetch=3)
    head = [next(it)["index"].tolist() for _ in range(5)]  # into epoch 1
    state = it.state_dict()
    assert (state["epoch"], state["step"]) == (1, 1)
    it.close()
    resumed = _batches(rec, 2, seed=5, num_epochs=3)
    resumed.load_state_dict(state)
    tail = [b["index"].tolist() for b in resumed]
    assert head + tail == ref
    # loading a state into a running iterator rewinds it too
    it2 = _batches(rec, 2, seed=5, num_epochs=3)
    next(it2), next(it2)
    it2.load_state_dict({"epoch": 0, "step": 0})
    assert [b["index"].tolist() for b in it2] == ref
    with pytest.raises(ValueError, match="seed"):
        _batches(rec, 2, seed=6).load_state_dict(state)


def test_caption_dropout_in_batches_is_reproducible(dataset, tokenizer):
    rec = _records(dataset)
    caps = lambda: [c for b in _batches(rec, 2, num_epochs=40, return_captions=True,
                                        captioner=Captioner(dropout=0.25, seed=1))
                    for c in b["caption"]]
    a = caps()
    assert a == caps()
    assert abs(np.mean([c == "" for c in a]) - 0.25) < 0.07
    it = _batches(rec, 2, tokenizer=tokenizer, captioner=Captioner(dropout=0.5))
    assert "" in it.caption_variants()


def test_prefetch_to_device_sharding(dataset):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    rec = _records(dataset)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sh = NamedSharding(mesh, PartitionSpec("data"))
    n = len(jax.devices())
    it = _batches(rec, 2 * n if 2 * n <= len(rec) else n, num_epochs=1, return_captions=True)
    out = list(prefetch_to_device(it, 2, sh))
    assert len(out) == it.steps_per_epoch
    for b in out:
        for k in ("image", "labels", "index"):
            assert isinstance(b[k], jax.Array) and b[k].sharding == sh
        assert isinstance(b["caption"], list)
    np.testing.assert_array_equal(np.asarray(out[0]["index"]), it.batch_at(0, 0)["index"])


# ------------------------------------------------------------------ folder readers
def test_folder_csv_and_image_folder(dataset, tmp_path):
    root, _ = dataset
    p0 = _csv_path(0).replace(*REWRITE)
    p1 = _csv_path(1).replace(*REWRITE)
    (tmp_path / "caps.csv").write_text(f"path,caption\n{p0},a lung\n{p1},\"a, heart\"\n")
    r = read_folder_csv(str(tmp_path / "caps.csv"), str(root))
    assert r.captions == ["a lung", "a, heart"] and r.labels.shape == (2, 0)
    b = _batches(r, 2, return_captions=True, shuffle=False).batch_at(0, 0)
    assert b["caption"] == ["a lung", "a, heart"] and b["image"].shape == (2, RES, RES, 3)
    (tmp_path / "labs.csv").write_text(
        "path," + ",".join(LABELS) + f"\n{p0},0,1,0,0,0,0,0,0\n{p1},0,0,0,0,0,0,0,0\n")
    r = read_folder_csv(str(tmp_path / "labs.csv"), str(root))
    b = _batches(r, 2, return_captions=True, shuffle=False).batch_at(0, 0)
    assert b["caption"] == ["Chest X-ray showing Cardiomegaly", NORMAL_CAPTION]
    (tmp_path / "none.csv").write_text(f"path,other\n{p0},1\n")
    with pytest.raises(ValueError, match="No Finding"):
        read_folder_csv(str(tmp_path / "none.csv"), str(root))
    f = read_image_folder(str(root), caption="CXR")
    assert len(f) == len(ROWS) and set(f.captions) == {"CXR"}
    b = _batches(f, 4, return_captions=True).batch_at(0, 0)
    assert b["labels"].shape == (4, 0) and b["caption"] == ["CXR"] * 4



def test_one_dispatch_for_readers_and_the_training_config(dataset, tmp_path):
    """`data.kind` and `read_records` name the same readers: ``folder`` is a CSV of paths."""
    import ml_collections

    root, csv = dataset
    assert READERS["folder"] is read_folder_csv and READERS["chexpert"] is read_chexpert_csv
    p0 = _csv_path(0).replace(*REWRITE)
    (tmp_path / "caps.csv").write_text(f"path,caption\n{p0},a lung\n{p0},a heart\n")
    config = ml_collections.ConfigDict({"seed": 0, "data": {
        "kind": "folder", "csv": str(tmp_path / "caps.csv"), "image_root": str(root),
        "path_rewrite": "", "max_images": 1, "uncertain": "zeros", "frontal_only": True,
        "resolution": 32, "tfds_split": "train", "phantom_dir": "", "phantom_patients": 2}})
    r = build_records(config, str(tmp_path))
    assert r.captions == ["a lung"] and r.paths == [os.path.join(str(root), p0)]
    assert read_records("folder", str(tmp_path / "caps.csv"), str(root)).captions == [
        "a lung", "a heart"]
    config.data.update(kind="chexpert", csv=csv, image_root=str(root), max_images=-1,
                       path_rewrite="=>".join(REWRITE))
    assert build_records(config, str(tmp_path)).paths == _records(dataset).paths
    config.data.path_rewrite = "no arrow"
    with pytest.raises(ValueError, match="old=>new"):
        build_records(config, str(tmp_path))
    config.data.update(path_rewrite="", csv="")
    with pytest.raises(ValueError, match="data.csv"):
        build_records(config, str(tmp_path))
    config.data.update(kind="phantom", phantom_dir=str(tmp_path / "phantom"),
                       phantom_patients=3, max_images=2)
    r = build_records(config, str(tmp_path))
    assert len(r) == 2 and all(os.path.isfile(p) for p in r.paths)
    assert r.source == str(tmp_path / "phantom" / "train.csv")
    config.data.kind = "image_folder"
    with pytest.raises(ValueError, match="choose phantom, chexpert, folder or tfds"):
        build_records(config, str(tmp_path))
    with pytest.raises(ValueError, match="unknown data source"):
        read_records("folder_csv", csv)


def test_abandoned_iterator_stops_its_thread(dataset):
    import gc

    it = _batches(_records(dataset), 2, prefetch=1)
    next(it)
    thread = it._thread
    del it
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
