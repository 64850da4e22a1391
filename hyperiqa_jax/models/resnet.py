"""ResNet-50 backbone in torchvision's layout, for the original HyperIQA (C0).

Returns the four NHWC stage maps (layer1..layer4: 56x56x256, 28x28x512,
14x14x1024, 7x7x2048 for a 224 input). Parameter names follow torchvision
(`conv1`, `bn1`, `layer{i}_{j}/conv2`, `layer{i}_{j}/downsample_conv`, ...), so
conversion is a rename plus transposes (`weights_conversion/hyperiqa.py`).

BatchNorm behaves as PyTorch's BatchNorm2d: batch statistics while training,
running averages at evaluation, running variance updated with the unbiased
batch variance, momentum 0.1, eps 1e-5. Running averages live in the
'batch_stats' collection (pass `mutable=['batch_stats']` when training).
"""

from functools import partial

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class BatchNorm(nn.Module):
    """PyTorch BatchNorm2d over the last (channel) axis of an NHWC map."""

    momentum: float = 0.1  # PyTorch convention: weight of the new batch statistic.
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        if train:
            x32 = x.astype(jnp.float32)
            mean = x32.mean(axis=(0, 1, 2))
            var = jnp.square(x32 - mean).mean(axis=(0, 1, 2))  # biased: used to normalise.
            if not self.is_initializing():
                count = x.size // channels
                unbiased = var * count / max(count - 1, 1)
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        inv = lax.rsqrt(var + self.epsilon) * scale
        return ((x.astype(jnp.float32) - mean) * inv + bias).astype(self.dtype)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride, torchvision v1.5) -> 1x1 x4, residual."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = partial(BatchNorm, dtype=self.dtype)
        y = conv(self.planes, (1, 1), name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y, train))
        y = conv(self.planes, (3, 3), strides=(self.stride, self.stride),
                 padding=((1, 1), (1, 1)), name="conv2")(y)
        y = nn.relu(norm(name="bn2")(y, train))
        y = conv(self.planes * 4, (1, 1), name="conv3")(y)
        y = norm(name="bn3")(y, train)
        if self.downsample:
            x = conv(self.planes * 4, (1, 1), strides=(self.stride, self.stride),
                     name="downsample_conv")(x)
            x = norm(name="downsample_bn")(x, train)
        return nn.relu(y + x)


class ResNet50(nn.Module):
    """torchvision ResNet-50 without the classifier; returns (layer1, ..., layer4)."""

    layers: tuple[int, ...] = (3, 4, 6, 3)
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # "block": recompute each bottleneck's activations in the backward.

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return (256, 512, 1024, 2048)

    @nn.compact
    def __call__(self, images, train: bool = False) -> tuple:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
        x = nn.Conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                    dtype=self.dtype, name="conv1")(images.astype(self.dtype))
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        if self.remat not in ("none", "block"):
            raise ValueError(f"remat must be 'none' or 'block', got {self.remat!r}")
        # Argument 2 of Bottleneck's __call__ (self counts), `train`, is a Python bool.
        block = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat == "block" else Bottleneck
        features = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers)):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = block(planes, stride, downsample=j == 0, dtype=self.dtype,
                          name=f"layer{i + 1}_{j}")(x, train)
            features.append(x)
        return tuple(features)
