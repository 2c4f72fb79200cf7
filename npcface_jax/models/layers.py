"""Layers whose fastest formulation differs by backend.

XLA's CPU grouped (depthwise) convolution is an order of magnitude slower
than the same convolution written as k*k shifted multiply-adds, and a 1x1
convolution runs faster as a matrix product; on GPU, cuDNN's native
convolutions are the fast ones. These modules keep one parameter layout
(flax's conv kernels, so checkpoints move between backends) and pick the
formulation when traced: ``impl='auto'`` follows ``jax.default_backend()``;
'native' and 'matmul' / 'shifted' force one (the tests check they agree).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


def _use_native(impl: str) -> bool:
  if impl == 'auto':
    return jax.default_backend() != 'cpu'
  if impl not in ('native', 'shifted', 'matmul'):
    raise ValueError(f"impl must be 'auto', 'native', 'shifted' or 'matmul', "
                     f'got {impl!r}')
  return impl == 'native'


class PReLU(nn.Module):
  """Per-channel PReLU, slopes initialised to 0.25 as in PyTorch."""

  @nn.compact
  def __call__(self, x):
    alpha = self.param('alpha', nn.initializers.constant(0.25), (x.shape[-1],))
    return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


class Conv(nn.Module):
  """A dense (groups=1) convolution, no bias; 1x1 ones (any stride, no
  padding) run as a matrix product where that is faster."""

  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int | None = None  # None: kernel_size // 2
  impl: str = 'auto'
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.kaiming_normal(),
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if k == 1 and not _use_native(self.impl):
      s = self.stride
      return x[:, ::s, ::s] @ kernel[0, 0]
    pad = k // 2 if self.padding is None else self.padding
    return lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), [(pad, pad), (pad, pad)],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class DepthwiseConv(nn.Module):
  """A depthwise (groups = channels) k x k convolution, no bias.

  padding None means k // 2; padding 0 with a kernel as large as the input
  is the global depthwise convolution (GDC).
  """

  kernel_size: int = 3
  stride: int = 1
  padding: int | None = None
  impl: str = 'auto'
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s, c = self.kernel_size, self.stride, x.shape[-1]
    kernel = self.param('kernel', nn.initializers.kaiming_normal(),
                        (k, k, 1, c), self.param_dtype)
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    pad = k // 2 if self.padding is None else self.padding
    if _use_native(self.impl):
      return lax.conv_general_dilated(
          x, kernel, (s, s), [(pad, pad), (pad, pad)],
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)
    x = jnp.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    h_out = (x.shape[1] - k) // s + 1
    w_out = (x.shape[2] - k) // s + 1
    out = None
    for i in range(k):
      for j in range(k):
        tap = lax.slice(x, (0, i, j, 0),
                        (x.shape[0], i + s * (h_out - 1) + 1,
                         j + s * (w_out - 1) + 1, c), (1, s, s, 1))
        term = tap * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


def batch_norm(train: bool, dtype: Dtype | None = None) -> nn.BatchNorm:
  """BatchNorm as the PyTorch references have it (momentum 0.1, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype)


def check_face_size(model: str, images) -> None:
  if images.shape[1:3] != (112, 112):
    raise ValueError(f'{model} takes 112x112 images, got '
                     f'{images.shape[1]}x{images.shape[2]}')


class EmbeddingHead(nn.Module):
  """The IR ResNets' output: BN, dropout, flatten, linear, BN."""

  embedding_dim: int = 512
  dropout: float = 0.0
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = batch_norm(train, self.dtype)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.embedding_dim, dtype=self.dtype)(
        x.reshape(x.shape[0], -1))
    return batch_norm(train, self.dtype)(x).astype(jnp.float32)
