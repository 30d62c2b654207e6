"""The study's labels, defined once (docs/STUDY.md "Data" and "Metrics").

Every module that names a CheXpert label column, a study condition or the CSV header
imports it from here; `tests/test_house.py` fails if a second definition appears.
"""

from __future__ import annotations

# The study's eight label columns, in CSV column order (docs/STUDY.md "Data").
LABELS: tuple[str, ...] = (
    "No Finding",
    "Cardiomegaly",
    "Lung Opacity",
    "Edema",
    "Pneumonia",
    "Pneumothorax",
    "Pleural Effusion",
    "Support Devices",
)

# The columns before the labels in the authors' CSVs.
META_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
CSV_COLUMNS: tuple[str, ...] = META_COLUMNS + LABELS

# The six conditions the study scores per condition (docs/STUDY.md "Metrics"), in the
# order the paper's tables use.
CONDITIONS: tuple[str, ...] = (
    "Cardiomegaly",
    "Lung Opacity",
    "Edema",
    "No Finding",
    "Pneumothorax",
    "Pleural Effusion",
)

# The pooled row that follows the six conditions in every metrics table.
ALL = "all"
