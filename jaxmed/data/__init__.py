"""Data readers and the training input pipeline.

Readers produce `Records` (paths, labels, CSV rows; no pixels):
  - `read_chexpert_csv`: the study's / CheXpert's CSV format.
  - `read_folder_csv`: a CSV of paths with a caption column or label columns.
  - `read_image_folder`: a bare folder of images with one caption.
  - `read_tfds_chexpert`: TFDS's chexpert builder (optional: ``pip install jaxmed[tfds]``).
`Batches` turns records into shuffled, per-process, resumable batches, and
`prefetch_to_device` puts them on the mesh.
"""

from jaxmed.data.captions import (
    NORMAL_CAPTION,
    Captioner,
    all_caption_variants,
    caption_from_labels,
)
from jaxmed.data.chexpert import (
    BadImageError,
    Records,
    image_from_array,
    load_image,
    read_chexpert_csv,
)
from jaxmed.data.folder import read_folder_csv, read_image_folder
from jaxmed.data.pipeline import Batches, prefetch_to_device
from jaxmed.data.tfds import read_tfds_chexpert

READERS = {
    "chexpert": read_chexpert_csv,
    "folder_csv": read_folder_csv,
    "folder": read_image_folder,
    "tfds": read_tfds_chexpert,
}


def read_records(kind: str, *args, **kwargs) -> Records:
    """Dispatch to a reader by name: one of ``READERS``."""
    if kind not in READERS:
        raise ValueError(f"unknown data source {kind!r}; choose one of {sorted(READERS)}")
    return READERS[kind](*args, **kwargs)


__all__ = [
    "NORMAL_CAPTION",
    "READERS",
    "BadImageError",
    "Batches",
    "Captioner",
    "Records",
    "all_caption_variants",
    "caption_from_labels",
    "image_from_array",
    "load_image",
    "prefetch_to_device",
    "read_chexpert_csv",
    "read_folder_csv",
    "read_image_folder",
    "read_records",
    "read_tfds_chexpert",
]
