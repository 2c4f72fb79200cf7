"""Layers whose fastest formulation differs by backend, and BatchNorm.

XLA's CPU grouped (depthwise) convolution is an order of magnitude slower
than the same convolution written as k*k shifted multiply-adds, and a 1x1
convolution runs faster as a matrix product; on GPU, cuDNN's native
convolutions are the fast ones. These modules keep one parameter layout
(flax's conv kernels, so checkpoints move between backends) and pick the
formulation when traced: ``impl='auto'`` follows ``jax.default_backend()``;
'native' and 'matmul' / 'shifted' force one (the tests check they agree).
The CPU formulations, BatchNorm's train mode included, have hand-written
backwards (custom_vjp), written for fewer passes over the activations than
autodiff makes; the tests hold them to autodiff of the native forms.
"""

from __future__ import annotations

import functools
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
  """A convolution without bias; 1x1 ones (any stride, no padding) run as
  a matrix product where that is faster. ``groups`` > 1 splits the
  channels into groups (arcface_torch's mbf has one such conv, 2
  channels per group); DepthwiseConv is the fast groups = channels."""

  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int | None = None  # None: kernel_size // 2
  impl: str = 'auto'
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  groups: int = 1

  @nn.compact
  def __call__(self, x):
    k, g = self.kernel_size, self.groups
    if x.shape[-1] % g or self.features % g:
      raise ValueError(f'{g} groups do not divide {x.shape[-1]} input and '
                       f'{self.features} output channels')
    kernel = self.param('kernel', nn.initializers.kaiming_normal(),
                        (k, k, x.shape[-1] // g, self.features),
                        self.param_dtype)
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if k == 1 and g == 1 and not _use_native(self.impl):
      return pointwise_matmul(x[:, ::self.stride, ::self.stride], kernel[0, 0])
    pad = k // 2 if self.padding is None else self.padding
    return lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), [(pad, pad), (pad, pad)],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=g)


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
    return depthwise_shifted(x, kernel, s, pad)


@jax.custom_vjp
def pointwise_matmul(x, kernel):
  """x (..., C_in) @ kernel (C_in, C_out): a 1x1 convolution as a matrix
  product. The backward materialises g before using it twice: left to
  itself, XLA fuses g's producer (a BatchNorm backward) into a transposed
  copy for the kernel gradient, whose strided writes run ~5x slower."""
  return x @ kernel


def _pointwise_fwd(x, kernel):
  return x @ kernel, (x, kernel)


def _pointwise_bwd(residuals, g):
  x, kernel = residuals
  g = lax.optimization_barrier(g)
  c_in, c_out = kernel.shape
  dkernel = x.reshape(-1, c_in).T @ g.reshape(-1, c_out)
  return g @ kernel.T, dkernel.astype(kernel.dtype)


pointwise_matmul.defvjp(_pointwise_fwd, _pointwise_bwd)


def _tap_sum(x, kernel, stride: int):
  """sum over taps (i, j) of x[:, i + s h, j + s w] * kernel[i, j, 0]."""
  k, s = kernel.shape[0], stride
  h_out, w_out = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
  out = None
  for i in range(k):
    for j in range(k):
      tap = lax.slice(x, (0, i, j, 0),
                      (x.shape[0], i + s * (h_out - 1) + 1,
                       j + s * (w_out - 1) + 1, x.shape[3]), (1, s, s, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _pad_hw(x, rows, cols, interior: int = 0):
  """Pads (low, high) rows and columns, ``interior`` zeros between them."""
  return lax.pad(x, jnp.zeros((), x.dtype),
                 [(0, 0, 0), (*rows, interior), (*cols, interior), (0, 0, 0)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_shifted(x, kernel, stride: int, pad: int):
  """Depthwise convolution (NHWC, kernel (k, k, 1, C)) as k*k shifted
  multiply-adds, with a hand-written backward: autodiff's transposes of
  the shifted slices run 5x slower than these formulations on CPU."""
  return _tap_sum(_pad_hw(x, (pad, pad), (pad, pad)), kernel, stride)


def _depthwise_fwd(x, kernel, stride, pad):
  return depthwise_shifted(x, kernel, stride, pad), (x, kernel)


def _images_per_block(batch: int, image_bytes: int,
                      budget: int = 1 << 21) -> int:
  """The largest divisor of ``batch`` whose images fit in ``budget``."""
  n = max(1, min(batch, budget // image_bytes))
  while batch % n:
    n -= 1
  return n


def _depthwise_bwd(stride, pad, residuals, g):
  x, kernel = residuals
  k, s = kernel.shape[0], stride
  (b, h, w, c), (h_out, w_out) = x.shape, g.shape[1:3]
  # dx: the transposed convolution, the stride-dilated g correlated with
  # the flipped kernel.
  low = k - 1 - pad
  g_dilated = _pad_hw(g, (low, h + pad - s * (h_out - 1) - 1),
                      (low, w + pad - s * (w_out - 1) - 1), s - 1)
  dx = _tap_sum(g_dilated, kernel[::-1, ::-1], 1)
  # dkernel: per tap, the product with g summed over every position. Done
  # a few images at a time so the k*k shifted slices stay in cache: over
  # the whole batch each one is copied out to memory first (3x slower).
  xp = _pad_hw(x, (pad, pad), (pad, pad))
  per_block = _images_per_block(b, xp[0].size * xp.dtype.itemsize)
  xp = xp.reshape(b // per_block, per_block, *xp.shape[1:])
  g_blocks = g.reshape(b // per_block, per_block, *g.shape[1:])

  def block_sums(total, blocks):
    xb, gb = blocks
    sums = [jnp.sum((lax.slice(xb, (0, i, j, 0),
                               (per_block, i + s * (h_out - 1) + 1,
                                j + s * (w_out - 1) + 1, c),
                               (1, s, s, 1)) * gb).reshape(-1, c),
                    axis=0, dtype=jnp.float32)
            for i in range(k) for j in range(k)]
    return total + jnp.stack(sums), None

  dk, _ = lax.scan(block_sums, jnp.zeros((k * k, c), jnp.float32),
                   (xp, g_blocks))
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


depthwise_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, as the PyTorch references have
  it (momentum 0.1, eps 1e-5; biased batch variance), with flax's variable
  layout (params scale, bias; batch_stats mean, var) and running-average
  update. Train mode's backward follows ``impl`` like the convolutions:
  on the CPU a hand-written one (two reductions and one elementwise pass
  each way, where autodiff through the normalisation makes several more
  passes over the activations; measured faster there), with 'native' (the
  default off the CPU) plain autodiff of the same forward."""

  train: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  impl: str = 'auto'
  # The running variance from the unbiased batch variance (n / (n - 1)
  # times the biased one normalisation uses), as torch.nn.BatchNorm's.
  unbiased_running_var: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    dtype = self.dtype or x.dtype
    if not self.train:
      a = scale * lax.rsqrt(ra_var.value + self.epsilon)
      return _scale_shift(x, a, bias - ra_mean.value * a, dtype)
    normalize = (_batch_norm_train if _use_native(self.impl)
                 else batch_norm_train)
    y, mean, var = normalize(x.astype(dtype), scale, bias, self.epsilon)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
      if self.unbiased_running_var:
        n = x.size // c
        var = var * (n / max(n - 1, 1))
      ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var)
    return y


def _scale_shift(x, a, b, dtype):
  """x * a + b in float32 (a bf16 product would lose what survives the
  cancellation against b when the mean is large), cast to ``dtype``."""
  return (x.astype(jnp.float32) * a + b).astype(dtype)


def _batch_stats(x):
  flat = x.reshape(-1, x.shape[-1])
  mean = jnp.mean(flat, axis=0, dtype=jnp.float32)
  mean_sq = jnp.mean(jnp.square(flat.astype(jnp.float32)), axis=0)
  return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


def _batch_norm_train(x, scale, bias, epsilon: float):
  """(x normalised by its batch statistics * scale + bias, batch mean,
  batch variance); statistics over all axes but the last, in float32.
  Differentiated by autodiff ('native'): x is cast once, so that its
  gradient's three parts (through y, the mean and the variance) add up in
  float32 before the one cast back, as the hand-written backward's do."""
  xf = x.astype(jnp.float32)
  mean, var = _batch_stats(xf)
  a = scale * lax.rsqrt(var + epsilon)
  return _scale_shift(xf, a, bias - mean * a, x.dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
  """_batch_norm_train with a hand-written backward (the CPU's default);
  gradients flow through the first output only."""
  return _batch_norm_train(x, scale, bias, epsilon)


def _batch_norm_fwd(x, scale, bias, epsilon):
  out = _batch_norm_train(x, scale, bias, epsilon)
  return out, (x, scale, out[1], lax.rsqrt(out[2] + epsilon))


def _batch_norm_bwd(epsilon, residuals, cotangents):
  x, scale, mean, rstd = residuals
  g = cotangents[0]
  c = x.shape[-1]
  n = x.size // c
  gf, xf = g.reshape(-1, c), x.reshape(-1, c)
  sum_g = jnp.sum(gf, axis=0, dtype=jnp.float32)
  sum_gx = jnp.sum(gf.astype(jnp.float32) * xf.astype(jnp.float32), axis=0)
  dscale = (sum_gx - mean * sum_g) * rstd       # sum of g * x_hat
  a = scale * rstd
  # dx = a (g - mean(g) - x_hat mean(g x_hat)) = a g + c1 x + c0
  c1 = -a * rstd * dscale / n
  c0 = -a * sum_g / n - c1 * mean
  dx = g.astype(jnp.float32) * a + _scale_shift(x, c1, c0, jnp.float32)
  return dx.astype(x.dtype), dscale, sum_g


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm(train: bool, dtype: Dtype | None = None,
               impl: str = 'auto', epsilon: float = 1e-5,
               unbiased_running_var: bool = False) -> BatchNorm:
  return BatchNorm(train, dtype=dtype, impl=impl, epsilon=epsilon,
                   unbiased_running_var=unbiased_running_var)


def channels(n: int, width: float) -> int:
  """n * width to the nearest multiple of 8, at least 8, so that a scaled
  network keeps vector-friendly channel counts (exact at width 1)."""
  if not width > 0:
    raise ValueError(f'width must be positive, got {width}')
  return max(8, int(n * width / 8 + 0.5) * 8)


def check_face_size(model: str, images) -> None:
  if images.shape[1:3] != (112, 112):
    raise ValueError(f'{model} takes 112x112 images, got '
                     f'{images.shape[1]}x{images.shape[2]}')


class EmbeddingHead(nn.Module):
  """The IR ResNets' output: BN, dropout, flatten (in NHWC order: an
  import from NCHW permutes the linear's rows), linear, BN."""

  embedding_dim: int = 512
  dropout: float = 0.0
  dtype: Dtype | None = None
  impl: str = 'auto'
  bn_epsilon: float = 1e-5
  unbiased_running_var: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(batch_norm, train, self.dtype, self.impl,
                           self.bn_epsilon, self.unbiased_running_var)
    x = bn()(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.embedding_dim, dtype=self.dtype)(
        x.reshape(x.shape[0], -1))
    return bn()(x).astype(jnp.float32)
