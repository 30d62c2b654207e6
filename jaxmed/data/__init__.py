"""Data readers and the training input pipeline.

Readers produce `Records` (paths, labels, CSV rows; no pixels):
  - `read_chexpert_csv`: the study's / CheXpert's CSV format.
  - `read_folder_csv`: a CSV of paths with a caption column or label columns.
  - `read_image_folder`: a bare folder of images with one caption.
  - `read_tfds_chexpert`: TFDS's chexpert builder (optional: ``pip install jaxmed[tfds]``).
  - `read_phantom`: the chest-radiograph phantom (`jaxmed.data.phantom`), made once.
`read_records` dispatches by the source's name (``data.kind``) and `build_records` reads a
training config's ``data`` block (`jaxmed.data.sources`). `Batches` turns records into
shuffled, per-process, resumable batches, and `prefetch_to_device` puts them on the mesh.
The labels, the six conditions and the CSV header are in `jaxmed.data.labels`.
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
from jaxmed.data.sources import READERS, build_records, read_phantom, read_records
from jaxmed.data.tfds import read_tfds_chexpert

__all__ = [
    "NORMAL_CAPTION",
    "READERS",
    "BadImageError",
    "Batches",
    "Captioner",
    "Records",
    "all_caption_variants",
    "build_records",
    "caption_from_labels",
    "image_from_array",
    "load_image",
    "prefetch_to_device",
    "read_chexpert_csv",
    "read_folder_csv",
    "read_image_folder",
    "read_phantom",
    "read_records",
    "read_tfds_chexpert",
]
