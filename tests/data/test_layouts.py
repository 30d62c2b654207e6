"""Where the images are: the CheXpert layouts resolve from any of the usual image roots,
several path rewrites apply in order, and nothing resolving (or nothing readable) is one
message naming what was tried."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from jaxmed.data import Batches, read_chexpert_csv
from jaxmed.data.layouts import LAYOUTS, parse_rewrites, resolve_paths
from jaxmed.errors import UserError
from tests.helpers import CSV_HEADER

REL = "train/patient00001/study1/view1_frontal.jpg"


def _tree(base, layout):
    f = base / layout / REL
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"x")
    return str(f)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("csv_prefix", ["CheXpert-v1.0/", "same", ""])
@pytest.mark.parametrize("root_is_folder", [False, True])
def test_each_chexpert_layout_resolves(tmp_path, layout, csv_prefix, root_is_folder):
    """On disk: <base>/<layout>/train/...; the CSV names the original folder, the same
    folder, or no folder; image_root is <base> or <base>/<layout>."""
    want = _tree(tmp_path, layout)
    prefix = layout + "/" if csv_prefix == "same" else csv_prefix
    root = str(tmp_path / layout) if root_is_folder else str(tmp_path)
    assert resolve_paths([prefix + REL], root, "t.csv", require=True) == [want]


def test_chexpert_csv_resolves_and_nothing_resolving_names_what_was_tried(tmp_path):
    want = _tree(tmp_path / "data", "CheXpert-v1.0_512x512")
    csv = tmp_path / "train.csv"
    csv.write_text(CSV_HEADER + "\n" + f"CheXpert-v1.0/{REL},F,60,Frontal,PA,"
                   + ",".join(["0"] * 8) + "\n")
    rec = read_chexpert_csv(str(csv), str(tmp_path / "data" / "CheXpert-v1.0_512x512"))
    assert rec.paths == [want]
    with pytest.raises(UserError) as e:
        read_chexpert_csv(str(csv), str(tmp_path / "nowhere"), require_images=True)
    msg = str(e.value)
    assert "none of the first 1 images exists" in msg and str(tmp_path / "nowhere") in msg
    for layout in LAYOUTS[1:]:
        assert f"{layout}/ in image_root" in msg
    assert "data.path_rewrite" in msg
    # without require_images (a reader of labels alone): the paths as given
    assert read_chexpert_csv(str(csv), str(tmp_path / "nowhere")).paths == [
        os.path.join(str(tmp_path / "nowhere"), f"CheXpert-v1.0/{REL}")]


def test_several_path_rewrites():
    assert parse_rewrites("a/=>b/; /old=>/new") == [("a/", "b/"), ("/old", "/new")]
    assert parse_rewrites("") == []
    with pytest.raises(UserError, match="old=>new"):
        parse_rewrites("a=>b;no arrow")


def test_every_image_unreadable_is_one_message(tmp_path, caplog):
    n = 12
    for i in range(n):
        (tmp_path / f"{i}.png").write_bytes(b"not a png")
    csv = tmp_path / "t.csv"
    csv.write_text(CSV_HEADER + "\n" + "".join(
        f"{i}.png,F,60,Frontal,PA," + ",".join(["0"] * 8) + "\n" for i in range(n)))
    rec = read_chexpert_csv(str(csv))
    caplog.set_level(logging.WARNING)
    with Batches(rec, 4, resolution=8, on_bad_image="skip", num_workers=2,
                 process_index=0, process_count=1, seed=0) as it:
        with pytest.raises(UserError) as e:
            next(it)
    msg = str(e.value)
    assert "every image tried (12" in msg and "was unreadable" in msg
    assert str(tmp_path) in msg and ".png" in msg and "data.image_root" in msg
    per_file = [r for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(per_file) == 5  # the rest counted, not listed
    assert np.any(["counted, not listed" in r.getMessage() for r in caplog.records])
