"""The classifier networks in Flax: `SmallCNN` and torchvision's ResNet-50 / DenseNet-121.

* ``small_cnn``  `SmallCNN`: four conv / GroupNorm / ReLU stages, global average pool,
  linear head. Fast on CPU; the default.
* ``resnet50``   `ResNet`  (torchvision's ResNet-50 v1.5: stride on the 3x3 conv).
* ``densenet121`` `DenseNet` (torchvision's DenseNet-121, growth 32, blocks 6/12/24/16).

The two standard networks are built like torchvision's (same parameter counts, BatchNorm
with running statistics, same module names), so a torchvision-format state dict loads with
`jaxmed.eval.classifier.weights.load_torchvision_state_dict`. Every network takes
(B, H, W, 1 or 3) images in [0, 1], repeats a grey image to 3 channels and normalises it
with ImageNet's mean / std (what torchvision weights expect); its ``features`` method
returns the pooled features (2048-d, 1024-d, ``widths[-1]``) for a domain FID.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.models.layers import Conv, GroupNorm, Linear

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_NORM_AXES = ("norm",)


def _to_network_input(x: jax.Array) -> jax.Array:
    """(B, H, W, 1 or 3) in [0, 1] -> 3 channels normalised with ImageNet mean / std."""
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise ValueError(f"networks take 1- or 3-channel images; got {x.shape[-1]} channels")
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std


def _pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _batch_norm(name: str, train: bool, dtype) -> nn.BatchNorm:
    # torch's momentum 0.1 is flax's 0.9 (weight of the old running value).
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, _NORM_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, _NORM_AXES),
        name=name,
    )


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class SmallCNN(nn.Module):
    """Stages of [conv3x3 stride 2, GroupNorm, ReLU, conv3x3, GroupNorm, ReLU], pool, linear."""

    num_labels: int = 8
    widths: tuple[int, ...] = (32, 64, 128, 256)
    num_groups: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False):
        del train  # GroupNorm: no train / eval difference
        x = _to_network_input(x).astype(self.dtype)
        for i, w in enumerate(self.widths):
            for part, stride in (("a", 2), ("b", 1)):
                x = Conv(w, 3, strides=stride, padding=1, use_bias=False, dtype=self.dtype,
                         kernel_init=_kaiming_fan_out, name=f"stage{i}_conv_{part}")(x)
                x = GroupNorm(self.num_groups, 1e-5, dtype=self.dtype,
                              name=f"stage{i}_norm_{part}")(x)
                x = nn.relu(x)
        feats = _pool(x)
        if features_only:
            return feats
        return Linear(self.num_labels, dtype=jnp.float32, name="head")(feats)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self(x, train=train, features_only=True)


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (v1.5: the stride sits on the 3x3 conv)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                                 kernel_init=_kaiming_fan_out)
        out = conv(self.planes, 1, padding=0, name="conv1")(x)
        out = nn.relu(_batch_norm("bn1", train, self.dtype)(out))
        out = conv(self.planes, 3, strides=self.stride, padding=1, name="conv2")(out)
        out = nn.relu(_batch_norm("bn2", train, self.dtype)(out))
        out = conv(self.planes * 4, 1, padding=0, name="conv3")(out)
        out = _batch_norm("bn3", train, self.dtype)(out)
        identity = x
        if self.downsample:
            identity = conv(self.planes * 4, 1, strides=self.stride, padding=0,
                            name="downsample_0")(x)
            identity = _batch_norm("downsample_1", train, self.dtype)(identity)
        return nn.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's bottleneck ResNet; the defaults are ResNet-50 (2048-d features)."""

    num_labels: int = 8
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False):
        x = _to_network_input(x).astype(self.dtype)
        x = Conv(64, 7, strides=2, padding=3, use_bias=False, dtype=self.dtype,
                 kernel_init=_kaiming_fan_out, name="conv1")(x)
        x = nn.relu(_batch_norm("bn1", train, self.dtype)(x))
        x = _max_pool_3x3_s2(x)
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                x = Bottleneck(64 * 2**i, stride=2 if (i > 0 and j == 0) else 1,
                               downsample=(j == 0), dtype=self.dtype,
                               name=f"layer{i + 1}_{j}")(x, train)
        feats = _pool(x)
        if features_only:
            return feats
        return Linear(self.num_labels, dtype=jnp.float32, name="fc")(feats)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self(x, train=train, features_only=True)


class DenseLayer(nn.Module):
    growth_rate: int
    bn_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                                 kernel_init=_kaiming_fan_in)
        y = nn.relu(_batch_norm("norm1", train, self.dtype)(x))
        y = conv(self.bn_size * self.growth_rate, 1, padding=0, name="conv1")(y)
        y = nn.relu(_batch_norm("norm2", train, self.dtype)(y))
        return conv(self.growth_rate, 3, padding=1, name="conv2")(y)


class DenseBlock(nn.Module):
    num_layers: int
    growth_rate: int
    bn_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for j in range(self.num_layers):
            y = DenseLayer(self.growth_rate, self.bn_size, self.dtype,
                           name=f"denselayer{j + 1}")(x, train)
            x = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
        return x


class Transition(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.relu(_batch_norm("norm", train, self.dtype)(x))
        x = Conv(self.features, 1, padding=0, use_bias=False, dtype=self.dtype,
                 kernel_init=_kaiming_fan_in, name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
    """torchvision's DenseNet; the defaults are DenseNet-121 (1024-d features)."""

    num_labels: int = 8
    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False):
        x = _to_network_input(x).astype(self.dtype)
        x = Conv(self.num_init_features, 7, strides=2, padding=3, use_bias=False,
                 dtype=self.dtype, kernel_init=_kaiming_fan_in, name="conv0")(x)
        x = nn.relu(_batch_norm("norm0", train, self.dtype)(x))
        x = _max_pool_3x3_s2(x)
        c = self.num_init_features
        for i, n in enumerate(self.block_config):
            x = DenseBlock(n, self.growth_rate, self.bn_size, self.dtype,
                           name=f"denseblock{i + 1}")(x, train)
            c += n * self.growth_rate
            if i != len(self.block_config) - 1:
                c //= 2
                x = Transition(c, self.dtype, name=f"transition{i + 1}")(x, train)
        x = nn.relu(_batch_norm("norm5", train, self.dtype)(x))
        feats = _pool(x)
        if features_only:
            return feats
        return Linear(self.num_labels, dtype=jnp.float32, name="classifier")(feats)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self(x, train=train, features_only=True)


def ResNet50(num_labels: int = 8, dtype: Any = jnp.float32) -> ResNet:  # noqa: N802
    return ResNet(num_labels=num_labels, stage_sizes=(3, 4, 6, 3), dtype=dtype)


def DenseNet121(num_labels: int = 8, dtype: Any = jnp.float32) -> DenseNet:  # noqa: N802
    return DenseNet(num_labels=num_labels, growth_rate=32, block_config=(6, 12, 24, 16),
                    num_init_features=64, dtype=dtype)


def abstract_variables(model: nn.Module, image_size: int = 64) -> dict:
    """Shapes of ``{'params', 'batch_stats'?}`` without computing anything (unboxed)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 1), jnp.float32)
    init = functools.partial(model.init, train=False)
    return nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), x))


def count_params(model: nn.Module) -> int:
    """Trainable parameters (the ``params`` collection; BatchNorm running stats excluded)."""
    leaves = jax.tree_util.tree_leaves(abstract_variables(model)["params"])
    return int(sum(math.prod(p.shape) for p in leaves))
