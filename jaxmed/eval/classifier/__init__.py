"""Downstream chest X-ray classifiers (Flax) and the data-regime experiment.

The study asks whether synthetic X-rays help a classifier tested on real images when real
data is scarce. This package trains multi-label classifiers with a sigmoid / BCE loss and
runs that experiment. One module per job:

* `networks`  the Flax networks: ``small_cnn`` (`SmallCNN`, the default, fast on CPU),
  ``resnet50`` and ``densenet121`` (torchvision's, same parameter counts and module names);
* `config`    `ClassifierConfig` (JSON round-trips) and the network it names;
* `weights`   torchvision-format state dicts (ImageNet or chest X-ray weights) -> variables;
* `inputs`    any accepted image array -> uint8 grey at ``image_size``; label checks;
* `trained`   `TrainedClassifier`: predictions, pooled features, metrics, save / load;
* `train`     the training loop, `train_classifier`;
* `regimes`   `run_regimes`: fractions of the real training set, synthetic data and both,
  each scored on the real test set.

The names other modules use are re-exported here: ``from jaxmed.eval.classifier import
ClassifierConfig, train_classifier``.
"""

from __future__ import annotations

from jaxmed.eval.classifier.config import ARCHS, ClassifierConfig, build_model, feature_dim
from jaxmed.eval.classifier.inputs import prepare_images, validate_labels
from jaxmed.eval.classifier.networks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DenseNet,
    DenseNet121,
    ResNet,
    ResNet50,
    SmallCNN,
    abstract_variables,
    count_params,
)
from jaxmed.eval.classifier.regimes import run_regimes, subset_order
from jaxmed.eval.classifier.train import init_variables, prng_key, train_classifier
from jaxmed.eval.classifier.trained import TrainedClassifier
from jaxmed.eval.classifier.weights import load_torchvision_state_dict

__all__ = [
    "ARCHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClassifierConfig",
    "DenseNet",
    "DenseNet121",
    "ResNet",
    "ResNet50",
    "SmallCNN",
    "TrainedClassifier",
    "abstract_variables",
    "build_model",
    "count_params",
    "feature_dim",
    "init_variables",
    "load_torchvision_state_dict",
    "prepare_images",
    "prng_key",
    "run_regimes",
    "subset_order",
    "train_classifier",
    "validate_labels",
]
