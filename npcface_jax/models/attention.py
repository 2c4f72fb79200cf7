"""Residual Attention Networks (Wang et al. 2017): Attention-56 and -92.

The ImageNet design (pre-activation bottleneck units; attention modules
with p = 1, t = 2, r = 1: a trunk of two units beside a soft-mask branch
that max-pools down and upsamples back, mask M in (0, 1) applied as
(1 + M) * trunk) with stages of 1, 1, 1 (Attention-56) and 1, 2, 3
(Attention-92) modules at 256, 512 and 1024 channels, then three units at
2048 channels.

Adaptation to 112x112 faces, as FaceX-Zoo trains it: the stem is the 7x7
stride-2 conv + BN + ReLU without the max-pool, so the stages run at the
ImageNet network's resolutions (56, 28, 14, then 7); the mask branches pool
to 7x7 in every stage and upsample bilinearly with aligned corners (PyTorch's
UpsamplingBilinear2d); the ImageNet classifier is replaced by the IR
ResNets' face head (BN, dropout, flatten 7x7x2048, linear to 512, BN).
Parameters at 512-d: 81,143,488 (Attention-56) and 101,799,104
(Attention-92), 4,608 more than FaceX-Zoo's AttentionNet (81,138,880 and
101,794,496), whose head has no BN before the flatten and no bias in the
linear layer. The 7x7x2048 -> 512 linear layer alone holds 51.4M of them;
the body matches the ImageNet networks' 31.9M / 51.3M less their 2M
classifier.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from npcface_jax.models.layers import (Conv, EmbeddingHead, batch_norm,
                                       channels, check_face_size)

Dtype = Any


def _interpolation(n_out: int, n_in: int) -> np.ndarray:
  """(n_out, n_in) bilinear weights with aligned corners: output i samples
  input position i * (n_in - 1) / (n_out - 1)."""
  pos = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
  low = np.minimum(np.floor(pos).astype(int), n_in - 1)
  high = np.minimum(low + 1, n_in - 1)
  frac = pos - low
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), low), 1 - frac)
  np.add.at(m, (np.arange(n_out), high), frac)
  return m


def upsample_bilinear(x, height: int, width: int):
  """NHWC bilinear resize with aligned corners, as two small matrix
  products (jax.image.resize uses half-pixel centres instead)."""
  rows = jnp.asarray(_interpolation(height, x.shape[1]), x.dtype)
  cols = jnp.asarray(_interpolation(width, x.shape[2]), x.dtype)
  return jnp.einsum('oh,pw,bhwc->bopc', rows, cols, x)


def _max_pool(x):
  return nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))


class _Unit(nn.Module):
  """Pre-activation bottleneck: BN-ReLU-1x1(c/4), BN-ReLU-3x3(c/4, stride),
  BN-ReLU-1x1(c); where the shape changes the shortcut is a (strided) 1x1
  conv of the pre-activated input."""

  features: int
  stride: int = 1
  impl: str = 'auto'
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(Conv, impl=self.impl, dtype=self.dtype)
    def bn_relu(y):
      return nn.relu(batch_norm(train, self.dtype, self.impl)(y))

    pre = bn_relu(x)
    y = conv(self.features // 4)(pre)
    y = conv(self.features // 4, 3, self.stride)(bn_relu(y))
    y = conv(self.features)(bn_relu(y))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.stride)(pre)
    return x + y


class _AttentionModule(nn.Module):
  """Trunk (two units) times (1 + soft mask); the mask branch max-pools
  ``levels`` times (a unit after each pool and a skip unit on each level
  but the deepest, two units at the deepest) and comes back up by bilinear
  upsampling, adding the level's features and its skip on the way."""

  levels: int
  impl: str = 'auto'
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    def unit(y):
      return _Unit(c, impl=self.impl, dtype=self.dtype)(y, train)

    x = unit(x)
    trunk = unit(unit(x))
    down, skips, y = [], [], x
    for _ in range(self.levels - 1):
      y = unit(_max_pool(y))
      down.append(y)
      skips.append(unit(y))
    y = unit(unit(_max_pool(y)))
    for features, skip in zip(reversed(down), reversed(skips)):
      y = upsample_bilinear(y, *features.shape[1:3]) + features + skip
      y = unit(y)
    y = upsample_bilinear(y, *trunk.shape[1:3]) + trunk
    conv = functools.partial(Conv, c, impl=self.impl, dtype=self.dtype)
    mask = conv()(nn.relu(batch_norm(train, self.dtype, self.impl)(y)))
    mask = conv()(nn.relu(batch_norm(train, self.dtype, self.impl)(mask)))
    return unit((1 + nn.sigmoid(mask)) * trunk)


class ResidualAttentionNet(nn.Module):
  """``(images NHWC 112x112, train) -> embedding (B, embedding_dim)``."""

  stages: Sequence[int] = (1, 1, 1)  # attention modules per stage
  embedding_dim: int = 512
  dropout: float = 0.0
  width: float = 1.0  # multiplies every channel count (reduced nets)
  impl: str = 'auto'
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, images, train: bool):
    check_face_size('ResidualAttentionNet', images)
    c = functools.partial(channels, width=self.width)
    unit = functools.partial(_Unit, impl=self.impl, dtype=self.dtype)
    x = images.astype(self.dtype or images.dtype)
    x = Conv(c(64), 7, 2, impl=self.impl, dtype=self.dtype)(x)    # 56x56
    x = nn.relu(batch_norm(train, self.dtype, self.impl)(x))
    x = unit(c(256))(x, train)
    # Stage s runs at 56 / 2**s and its masks pool 3 - s times (to 7x7).
    for stage, count in enumerate(self.stages):
      if stage:
        x = unit(c(256 << stage), stride=2)(x, train)            # 28, 14
      for _ in range(count):
        x = _AttentionModule(3 - stage, self.impl, self.dtype)(x, train)
    for stride in (2, 1, 1):
      x = unit(c(2048), stride)(x, train)                         # 7x7
    return EmbeddingHead(self.embedding_dim, self.dropout, self.dtype,
                         self.impl)(x, train)


attention56 = functools.partial(ResidualAttentionNet, stages=(1, 1, 1))
attention92 = functools.partial(ResidualAttentionNet, stages=(1, 2, 3))
