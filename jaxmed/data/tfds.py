"""TFDS's ``chexpert`` builder as an optional record source.

``tensorflow_datasets`` is imported only inside `read_tfds_chexpert` (``pip install
jaxmed[tfds]``). CheXpert cannot be downloaded by TFDS: after agreeing to its licence,
put the ``CheXpert-v1.0-small`` folder (train/, valid/, train.csv, valid.csv) in TFDS's
manual_dir (default ``~/tensorflow_datasets/downloads/manual``) and the builder prepares it.

TFDS's features: ``name`` (the CSV ``Path``), ``image``, ``label`` (a sequence over the 14
CheXpert observations in train.csv's column order, each a ClassLabel with names
``uncertain, positive, negative, unmentioned`` = 0, 1, 2, 3) and, since 3.1.0,
``image_view`` (``frontal``=0 / ``lateral``=1). `tfds_labels_to_study` maps those codes to
the study's columns with the uncertainty policy of `jaxmed.data.chexpert`.

The dataset is prepared in the ``array_record`` file format so that images can be read by
index (``builder.as_data_source``), which the shuffling, sharded, resumable pipeline needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxmed.data.chexpert import Records, convert_labels
from jaxmed.data.labels import LABELS

# The 14 observations, in CheXpert's CSV order (TFDS's ``label`` sequence order).
CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# TFDS ClassLabel code -> raw CheXpert value (NaN = blank / unmentioned).
_CODE_TO_RAW = np.array([-1.0, 1.0, 0.0, np.nan], dtype=np.float32)

INSTALL_HINT = (
    "the TFDS reader needs tensorflow_datasets (and tensorflow): `pip install jaxmed[tfds]`. "
    "CheXpert must also be downloaded manually (it needs a licence agreement): put the "
    "CheXpert-v1.0-small folder into TFDS's manual_dir (default "
    "~/tensorflow_datasets/downloads/manual), or use read_chexpert_csv on the files directly."
)


def tfds_labels_to_study(codes, label_columns: Sequence[str] = LABELS,
                         uncertain: str = "zeros") -> np.ndarray:
    """TFDS label codes (..., 14) -> (..., L) float32 in the study's columns."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.shape[-1] != len(CHEXPERT_OBSERVATIONS):
        raise ValueError(f"expected {len(CHEXPERT_OBSERVATIONS)} TFDS label codes, "
                         f"got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > 3):
        raise ValueError("TFDS chexpert label codes must be in 0..3")
    missing = [c for c in label_columns if c not in CHEXPERT_OBSERVATIONS]
    if missing:
        raise ValueError(f"label column(s) {missing} are not CheXpert observations "
                         f"{list(CHEXPERT_OBSERVATIONS)}")
    cols = [CHEXPERT_OBSERVATIONS.index(c) for c in label_columns]
    return convert_labels(_CODE_TO_RAW[codes[..., cols]], uncertain)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return tfds


def read_tfds_chexpert(
    split: str = "train",
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    label_columns: Sequence[str] = LABELS,
    uncertain: str = "zeros",
    frontal_only: bool = True,
    download_and_prepare: bool = True,
) -> Records:
    """`Records` backed by TFDS's ``chexpert`` builder (images read by index).

    Raises ImportError with install instructions when tensorflow_datasets is missing.
    """
    tfds = _import_tfds()
    builder = tfds.builder("chexpert", data_dir=data_dir, file_format="array_record")
    if download_and_prepare:
        cfg = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
        builder.download_and_prepare(download_config=cfg)
    source = builder.as_data_source(split=split)
    n = len(source)
    names, codes, views = [], [], []
    # A metadata pass by index (same order as `source`) without decoding images.
    meta = builder.as_data_source(split=split,
                                  decoders={"image": tfds.decode.SkipDecoding()})
    has_view = "image_view" in builder.info.features
    for i in range(len(meta)):
        ex = meta[i]
        name = ex["name"]
        names.append(name.decode() if isinstance(name, bytes) else str(name))
        codes.append(np.asarray(ex["label"]))
        views.append(int(ex["image_view"]) if has_view else 0)
    if len(names) != n:
        raise RuntimeError(f"TFDS chexpert/{split}: {len(names)} metadata rows, {n} images")
    labels = tfds_labels_to_study(np.stack(codes), label_columns, uncertain)
    keep = np.arange(n)
    if frontal_only:
        if not has_view:
            raise ValueError("this TFDS chexpert version has no image_view feature; "
                             "pass frontal_only=False")
        keep = np.flatnonzero(np.asarray(views) == 0)

    def loader(i: int, _keep=keep) -> np.ndarray:
        return np.asarray(source[int(_keep[i])]["image"])

    return Records(paths=[names[i] for i in keep], labels=labels[keep], rows=keep,
                   label_columns=tuple(label_columns), source=f"tfds:chexpert/{split}",
                   loader=loader)
