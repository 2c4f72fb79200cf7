"""The IR ResNets (18 to 200 layers) in ArcFace's form, and the SE variant.

insightface's iresnet (arcface_torch/backbones/iresnet.py): a 3x3 stride-1
stem to 64 + BN + PReLU at 112x112; units BN-conv3x3-BN-PReLU-conv3x3(stride)
-BN with a 1x1-conv + BN shortcut where the shape changes, the stride in
the second conv; stages of 64, 128, 256, 512 channels, each starting with
stride 2 (56, 28, 14, 7); then BN, dropout, flatten, linear to 512, BN.
Units [3, 4, 14, 3] (ResNet-50) and [3, 13, 30, 3] (insightface's
"iresnet100", the paper's ResNet-100/101); arcface_torch's 18, 34 and 200
too. The SE variant adds a squeeze-excitation (reduction 16, no biases, as
face.evoLVe's IR-SE) on each unit's residual branch.

Where released networks differ, an option, so that their weights load
onto this one network: ``bn_epsilon`` (1e-5 in PyTorch, 2e-5 in
insightface's MXNet models) and ``shortcut``: 'conv' puts a 1x1 conv + BN
on the shortcut wherever the stride or the channels change (insightface,
MXNet and arcface_torch); 'subsample', face.evoLVe's form (FaceX-Zoo,
AdaFace), takes every second pixel instead (its MaxPool2d(1, 2)) where only
the stride changes; ``middle_bn=False`` drops the BN between a unit's first
conv and its PReLU, as face.evoLVe's and FaceX-Zoo's IR do (AdaFace's has
it).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

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
  bn_epsilon: float = 1e-5
  shortcut: str = 'conv'
  middle_bn: bool = True
  unbiased_running_var: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(Conv, impl=self.impl, dtype=self.dtype)
    bn = functools.partial(batch_norm, train, self.dtype, self.impl,
                           self.bn_epsilon, self.unbiased_running_var)
    y = bn()(x)
    y = conv(self.features, 3)(y)
    y = PReLU()(bn()(y) if self.middle_bn else y)
    y = conv(self.features, 3, self.stride)(y)
    y = bn()(y)
    if self.se:
      y = _SqueezeExcite(dtype=self.dtype)(y)
    if x.shape[-1] == self.features and self.shortcut == 'subsample':
      # lax.slice: a strided index lowers to a gather, which ONNX lacks.
      x = lax.slice(x, (0, 0, 0, 0), x.shape, (1, self.stride, self.stride,
                                                1))
    elif self.stride != 1 or x.shape[-1] != self.features:
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
  bn_epsilon: float = 1e-5
  shortcut: str = 'conv'  # or 'subsample' (face.evoLVe's), module docstring
  middle_bn: bool = True
  # BatchNorm's running variance from the unbiased batch variance, as
  # PyTorch keeps it (layers.BatchNorm); training's forward is unchanged.
  unbiased_running_var: bool = False

  @nn.compact
  def __call__(self, images, train: bool):
    check_face_size('IResNet', images)
    if self.shortcut not in ('conv', 'subsample'):
      raise ValueError(f"IResNet shortcut must be 'conv' or 'subsample', "
                       f'got {self.shortcut!r}')
    c = functools.partial(channels, width=self.width)
    x = images.astype(self.dtype or images.dtype)
    x = Conv(c(64), 3, impl=self.impl, dtype=self.dtype)(x)
    x = PReLU()(batch_norm(train, self.dtype, self.impl, self.bn_epsilon,
                           self.unbiased_running_var)(x))
    for features, units in zip((64, 128, 256, 512), self.units):
      for i in range(units):
        x = _Unit(c(features), 2 if i == 0 else 1, self.se, self.impl,
                  self.dtype, self.bn_epsilon, self.shortcut,
                  self.middle_bn, self.unbiased_running_var)(x, train)
    return EmbeddingHead(self.embedding_dim, self.dropout, self.dtype,
                         self.impl, self.bn_epsilon,
                         self.unbiased_running_var)(x, train)


# arcface_torch's iresnet18 ... iresnet200 (resnet101 is its iresnet100).
resnet18 = functools.partial(IResNet, units=(2, 2, 2, 2))
resnet34 = functools.partial(IResNet, units=(3, 4, 6, 3))
resnet50 = functools.partial(IResNet, units=(3, 4, 14, 3))
resnet101 = functools.partial(IResNet, units=(3, 13, 30, 3))
resnet200 = functools.partial(IResNet, units=(6, 26, 60, 6))
se_resnet50 = functools.partial(IResNet, units=(3, 4, 14, 3), se=True)
