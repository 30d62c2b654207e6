"""One dispatch from a data source's name to its `Records`.

The names are the values of the training config's ``data.kind``:

  ``phantom``   the chest-radiograph phantom, generated once into a folder (`read_phantom`);
  ``chexpert``  a CheXpert-format CSV, the study's split files (`read_chexpert_csv`);
  ``folder``    a CSV of image paths with a caption column or label columns
                (`read_folder_csv`; what `jaxmed.data.corpus` writes);
  ``tfds``      TFDS's ``chexpert`` builder (`read_tfds_chexpert`).

`read_records(kind, ...)` calls a reader by name with the reader's own arguments;
`build_records(config, workdir, split)` turns a training config's ``data`` block into that
call (what ``python -m jaxmed.train`` reads). A bare folder of images with one caption
(`read_image_folder`) is a reader without a name here: no config selects it.
"""

from __future__ import annotations

import os

import ml_collections

from jaxmed.data import phantom
from jaxmed.data.chexpert import Records, read_chexpert_csv
from jaxmed.data.folder import read_folder_csv
from jaxmed.data.layouts import parse_rewrites
from jaxmed.data.tfds import read_tfds_chexpert


def read_phantom(
    folder: str,
    split: str = "train",
    *,
    n_patients: int = 100,
    resolution: int = 256,
    seed: int = 0,
    uncertain: str = "zeros",
    frontal_only: bool = True,
    max_records: int | None = None,
    progress: bool = True,
) -> Records:
    """Records of ``split`` of the phantom dataset in ``folder`` (generated there once)."""
    csv = phantom.ensure_dataset(folder, n_patients=n_patients, resolution=resolution,
                                 seed=seed, progress=progress)[split]
    return read_chexpert_csv(csv, folder, uncertain=uncertain, frontal_only=frontal_only,
                             max_records=max_records)


READERS = {
    "phantom": read_phantom,
    "chexpert": read_chexpert_csv,
    "folder": read_folder_csv,
    "tfds": read_tfds_chexpert,
}


def read_records(kind: str, *args, **kwargs) -> Records:
    """Dispatch to a reader by name: one of ``READERS``."""
    if kind not in READERS:
        raise ValueError(f"unknown data source {kind!r}; choose one of {sorted(READERS)}")
    return READERS[kind](*args, **kwargs)


def build_records(config: ml_collections.ConfigDict, workdir: str,
                  split: str = "train") -> Records:
    """The configured dataset's `Records` for ``split`` ('train' | 'valid' | 'test').

    ``split`` picks the phantom's split; the CSV sources read ``data.csv`` and TFDS reads
    ``data.tfds_split``. ``data.max_images > 0`` keeps the first N records.
    """
    d = config.data
    max_records = d.max_images if d.max_images and d.max_images > 0 else None
    rewrite = parse_rewrites(d.path_rewrite)
    if d.kind not in READERS:
        raise ValueError(f"data.kind={d.kind!r}: choose phantom, chexpert, folder or tfds")
    if d.kind == "phantom":
        folder = d.phantom_dir or os.path.join(workdir, "phantom-data")
        return read_records("phantom", folder, split, n_patients=d.phantom_patients,
                            resolution=max(d.resolution, 64), seed=config.seed,
                            uncertain=d.uncertain, frontal_only=d.frontal_only,
                            max_records=max_records)
    if d.kind == "chexpert":
        if not d.csv:
            raise ValueError("data.kind=chexpert needs --config.data.csv=PATH (the study's CSV "
                             "format) and usually --config.data.image_root=DIR")
        return read_records("chexpert", d.csv, d.image_root or None, uncertain=d.uncertain,
                            frontal_only=d.frontal_only, path_replace=rewrite,
                            max_records=max_records, require_images=True)
    if d.kind == "folder":
        if not d.csv:
            raise ValueError("data.kind=folder needs --config.data.csv=PATH with a path column "
                             "and a caption column or label columns")
        records = read_records("folder", d.csv, d.image_root or None, path_replace=rewrite)
    else:
        records = read_records("tfds", split=d.tfds_split, uncertain=d.uncertain,
                               frontal_only=d.frontal_only)
    return records.subset(slice(0, max_records)) if max_records else records
