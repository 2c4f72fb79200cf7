"""VGG-19 with BatchNorm, adapted to 112x112 faces.

The sixteen 3x3 conv + BN + ReLU layers of VGG-19 (Simonyan & Zisserman,
configuration E) in stages of 64, 128, 256, 512, 512 channels. Adaptation
for 112x112 faces: max-pooling only after the first four stages (112 -> 7,
the last stage runs at 7x7), and the face-recognition output head of the IR
ResNets (BN, dropout, flatten, linear to 512, BN) in place of the ImageNet
classifier. 32,877,504 parameters at 512-d (tested).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from npcface_jax.models.layers import (Conv, EmbeddingHead, batch_norm,
                                       channels, check_face_size)

Dtype = Any

_STAGES = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))


class VGG19(nn.Module):
  """``(images NHWC 112x112, train) -> embedding (B, embedding_dim)``."""

  embedding_dim: int = 512
  dropout: float = 0.0
  width: float = 1.0  # multiplies every channel count (reduced nets)
  impl: str = 'auto'
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, images, train: bool):
    check_face_size('VGG19', images)
    x = images.astype(self.dtype or images.dtype)
    for stage, (features, layers) in enumerate(_STAGES):
      features = channels(features, self.width)
      for _ in range(layers):
        x = Conv(features, 3, impl=self.impl, dtype=self.dtype)(x)
        x = nn.relu(batch_norm(train, self.dtype, self.impl)(x))
      if stage < len(_STAGES) - 1:
        x = nn.max_pool(x, (2, 2), (2, 2))
    return EmbeddingHead(self.embedding_dim, self.dropout, self.dtype,
                         self.impl)(x, train)
