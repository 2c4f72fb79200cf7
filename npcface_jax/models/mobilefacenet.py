"""MobileFaceNet (Chen et al. 2018) as face recognition trains it.

The form of FaceX-Zoo's and insightface's PyTorch code: 112x112 input,
conv 3x3/2 to 64, depthwise 3x3, three bottleneck stages (expansion 128,
256, 512 channels; 1+4, 1+6, 1+2 blocks), 1x1 to 512, global depthwise 7x7
(GDC) + BN, linear 512 without bias + BN. Every conv is followed by BN and
PReLU except the bottlenecks' projections and the GDC (linear). Parameters:
1,200,512 with PReLU, 1,192,960 without (tested).

For tests and demos, ``width`` scales every channel count of the body
(to multiples of 8; the embedding stays ``embedding_dim``) and any square
input whose side is a multiple of 16 is taken: the network downsamples by
16 and the GDC's kernel is the final map's side, so it still reduces to
1x1. The defaults (width 1, 112x112) are the network above.

Released variants load onto the same network through options: arcface_torch's
"mbf" doubles the body's channels (``stem=128, stages=(128, 256, 256)``),
its second conv grouped by 2 channels (``stem_groups=64``), the bottlenecks'
expansions unchanged; its "mbf_large" (``blocks=(2, 8, 12, 4)``, 4x the
channels) replaces that conv with residual blocks; insightface's MXNet
"y1" has BatchNorm's eps 1e-3 in its body (``bn_epsilon``) but 2e-5 in
the embedding's final BatchNorm (``head_bn_epsilon``: symbol_utils' fc1),
and a bias on the linear (``fc_bias``).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from npcface_jax.models.layers import (Conv, DepthwiseConv, PReLU, batch_norm,
                                       channels)

Dtype = Any


class _ConvBN(nn.Module):
  """Conv (dense or depthwise) + BN (+ PReLU unless linear)."""

  features: int
  kernel_size: int = 1
  stride: int = 1
  depthwise: bool = False
  linear: bool = False
  padding: int | None = None
  impl: str = 'auto'
  dtype: Dtype | None = None
  bn_epsilon: float = 1e-5
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    if self.depthwise:
      x = DepthwiseConv(self.kernel_size, self.stride, self.padding,
                        impl=self.impl, dtype=self.dtype)(x)
    else:
      x = Conv(self.features, self.kernel_size, self.stride, self.padding,
               impl=self.impl, dtype=self.dtype, groups=self.groups)(x)
    x = batch_norm(train, self.dtype, self.impl, self.bn_epsilon)(x)
    return x if self.linear else PReLU()(x)


class _Bottleneck(nn.Module):
  """1x1 expand + BN + PReLU, depthwise 3x3 + BN + PReLU, 1x1 project + BN;
  a residual connection when shapes allow (FaceX-Zoo's Depth_Wise)."""

  features: int
  expansion: int
  stride: int = 1
  residual: bool = False
  impl: str = 'auto'
  dtype: Dtype | None = None
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(_ConvBN, impl=self.impl, dtype=self.dtype,
                             bn_epsilon=self.bn_epsilon)
    y = conv(self.expansion)(x, train)
    y = conv(self.expansion, 3, self.stride, depthwise=True)(y, train)
    y = conv(self.features, linear=True)(y, train)
    return x + y if self.residual else y


def _gdc_kernel(images) -> int:
  """The final map's side, the GDC's kernel: the input's side / 16, which
  the four stride-2 convolutions reach exactly only for such sides."""
  h, w = images.shape[1:3]
  if h != w or h % 16 or not h:
    raise ValueError('MobileFaceNet takes square images whose side is a '
                     f'multiple of 16 (112 is standard), got {h}x{w}')
  return h // 16


class MobileFaceNet(nn.Module):
  """``(images NHWC 112x112, train) -> embedding (B, embedding_dim)``;
  ``width`` and other square sizes (multiples of 16) give reduced nets."""

  embedding_dim: int = 512
  width: float = 1.0  # multiplies the body's channel counts
  impl: str = 'auto'
  dtype: Dtype | None = None  # compute dtype; parameters stay float32
  stem: int = 64  # the first two convs' channels
  stem_groups: int | None = None  # the second conv's groups (None: depthwise)
  stages: Sequence[int] = (64, 128, 128)  # each downsampling stage's output
  blocks: Sequence[int] = (1, 4, 6, 2)  # [0] > 1: residual blocks at the stem
  bn_epsilon: float = 1e-5
  fc_bias: bool = False
  head_bn_epsilon: float | None = None  # the last BN's eps; None: bn_epsilon

  @nn.compact
  def __call__(self, images, train: bool):
    gdc = _gdc_kernel(images)
    if not self.width > 0:
      raise ValueError(f'MobileFaceNet width must be positive, got '
                       f'{self.width}')
    if len(self.stages) != 3 or len(self.blocks) != 4 or min(self.blocks) < 1:
      raise ValueError('MobileFaceNet takes 3 stages and 4 block counts >= 1, '
                       f'got stages={self.stages}, blocks={self.blocks}')
    c = functools.partial(channels, width=self.width)
    conv = functools.partial(_ConvBN, impl=self.impl, dtype=self.dtype,
                             bn_epsilon=self.bn_epsilon)
    block = functools.partial(_Bottleneck, impl=self.impl, dtype=self.dtype,
                              bn_epsilon=self.bn_epsilon)
    x = images.astype(self.dtype or images.dtype)
    x = conv(c(self.stem), 3, 2)(x, train)                # side / 2
    if self.blocks[0] > 1:
      for _ in range(self.blocks[0]):
        x = block(c(self.stem), c(128), residual=True)(x, train)
    elif self.stem_groups is None:
      x = conv(c(self.stem), 3, 1, depthwise=True)(x, train)
    else:
      x = conv(c(self.stem), 3, 1, groups=self.stem_groups)(x, train)
    # (channels, expansion of the downsampling block, of the residual
    # blocks, residual blocks): the last stage expands 512 then 256.
    for features, down, expansion, repeats in zip(
        self.stages, (128, 256, 512), (128, 256, 256), self.blocks[1:]):
      x = block(c(features), c(down), stride=2)(x, train)  # / 4, 8, 16
      for _ in range(repeats):
        x = block(c(features), c(expansion), residual=True)(x, train)
    x = conv(c(512))(x, train)
    x = conv(c(512), gdc, depthwise=True, linear=True, padding=0)(x, train)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.embedding_dim, use_bias=self.fc_bias,
                 dtype=self.dtype)(x)
    eps = (self.bn_epsilon if self.head_bn_epsilon is None else
           self.head_bn_epsilon)
    return batch_norm(train, self.dtype, self.impl, eps)(x).astype(
        jnp.float32)
