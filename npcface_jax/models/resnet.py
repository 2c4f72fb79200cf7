"""ResNet-50/100 in ArcFace's "IR" form, and the SE variant.

insightface's iresnet (arcface_torch/backbones/iresnet.py): a 3x3 stride-1
stem to 64 + BN + PReLU at 112x112; units BN-conv3x3-BN-PReLU-conv3x3(stride)
-BN with a 1x1-conv + BN shortcut where the shape changes, the stride in
the second conv; stages of 64, 128, 256, 512 channels, each starting with
stride 2 (56, 28, 14, 7); then BN, dropout, flatten, linear to 512, BN.
Units [3, 4, 14, 3] (ResNet-50) and [3, 13, 30, 3] (insightface's
"iresnet100", the paper's ResNet-100/101). The SE variant adds a
squeeze-excitation (reduction 16, no biases, as face.evoLVe's IR-SE) on
each unit's residual branch.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from npcface_jax.models.layers import (Conv, EmbeddingHead, PReLU, batch_norm,
                                       channels, check_face_size)

Dtype = Any


class _SqueezeExcite(nn.Module):
  reduction: int = 16
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2))
    s = nn.relu(nn.Dense(c // self.reduction, use_bias=False,
                         dtype=self.dtype)(s))
    s = nn.sigmoid(nn.Dense(c, use_bias=False, dtype=self.dtype)(s))
    return x * s[:, None, None, :]


class _Unit(nn.Module):
  features: int
  stride: int
  se: bool = False
  impl: str = 'auto'
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(Conv, impl=self.impl, dtype=self.dtype)
    bn = functools.partial(batch_norm, train, self.dtype, self.impl)
    y = bn()(x)
    y = conv(self.features, 3)(y)
    y = PReLU()(bn()(y))
    y = conv(self.features, 3, self.stride)(y)
    y = bn()(y)
    if self.se:
      y = _SqueezeExcite(dtype=self.dtype)(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = bn()(conv(self.features, 1, self.stride)(x))
    return x + y


class IResNet(nn.Module):
  """``(images NHWC 112x112, train) -> embedding (B, embedding_dim)``."""

  units: Sequence[int] = (3, 4, 14, 3)
  se: bool = False
  embedding_dim: int = 512
  dropout: float = 0.0
  width: float = 1.0  # multiplies every channel count (reduced nets)
  impl: str = 'auto'
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, images, train: bool):
    check_face_size('IResNet', images)
    c = functools.partial(channels, width=self.width)
    x = images.astype(self.dtype or images.dtype)
    x = Conv(c(64), 3, impl=self.impl, dtype=self.dtype)(x)
    x = PReLU()(batch_norm(train, self.dtype, self.impl)(x))
    for features, units in zip((64, 128, 256, 512), self.units):
      for i in range(units):
        x = _Unit(c(features), 2 if i == 0 else 1, self.se, self.impl,
                  self.dtype)(x, train)
    return EmbeddingHead(self.embedding_dim, self.dropout, self.dtype,
                         self.impl)(x, train)


resnet50 = functools.partial(IResNet, units=(3, 4, 14, 3))
resnet101 = functools.partial(IResNet, units=(3, 13, 30, 3))
se_resnet50 = functools.partial(IResNet, units=(3, 4, 14, 3), se=True)
