"""Float64 NumPy forwards of the released networks, written from their
PyTorch code (NCHW, the source's own layer names), so that an import is
checked against the source's computation without torch and without our
Flax backbones: a name read wrongly, a kernel transposed wrongly or a
flatten in the other order makes the two disagree.

Both take state dicts in the canonical names of ``torch_layouts``
(arcface_torch's for the IR ResNets; FaceX-Zoo's for MobileFaceNet, which
arcface_torch's "mbf" renames) and images NCHW, already normalised:

- ``iresnet``: arcface_torch's iresnet.IResNet (and face.evoLVe's IR, as
  FaceX-Zoo and AdaFace have it, once renamed: a unit without ``bn2``
  has no BN before its PReLU, one without ``downsample`` a subsampled
  identity shortcut, one with ``se.fc1`` a squeeze-excitation);
- ``mobilefacenet``: FaceX-Zoo's MobileFaceNets.MobileFaceNet (and
  arcface_torch's, whose stem conv may be grouped and whose first stage
  may be residual blocks, ``conv_2.model.*``).

A unit's or a block's stride is where the source puts it: the first unit
of each of the IR's four stages, the MobileFaceNet's stem and its three
downsampling blocks.
"""

from __future__ import annotations

import numpy as np


def conv2d(x, w, stride: int = 1, pad: int = 0):
  """PyTorch's Conv2d without bias: x (N, C, H, W), w (O, C / g, kh, kw),
  the groups g = C / w.shape[1]."""
  n, c, h, wd = x.shape
  o, cg, kh, kw = w.shape
  g = c // cg
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
  win = win[:, :, ::stride, ::stride]  # (N, C, Ho, Wo, kh, kw)
  win = win.reshape(n, g, cg, *win.shape[2:])
  out = np.einsum('ngchwij,gocij->ngohw', win, w.reshape(g, o // g, cg, kh,
                                                         kw), optimize=True)
  return out.reshape(n, o, *out.shape[3:])


def batch_norm(sd, name: str, x, eps: float):
  """Inference BatchNorm over axis 1; no weight/bias means affine=False."""
  shape = (1, -1) + (1,) * (x.ndim - 2)
  mean = sd[f'{name}.running_mean'].reshape(shape)
  var = sd[f'{name}.running_var'].reshape(shape)
  y = (x - mean) / np.sqrt(var + eps)
  if f'{name}.weight' in sd:
    y = y * sd[f'{name}.weight'].reshape(shape) + sd[f'{name}.bias'].reshape(
        shape)
  return y


def prelu(sd, name: str, x):
  a = sd[f'{name}.weight'].reshape((1, -1) + (1,) * (x.ndim - 2))
  return np.where(x >= 0, x, a * x)


def linear(sd, name: str, x):
  y = x @ sd[f'{name}.weight'].T
  return y + sd[f'{name}.bias'] if f'{name}.bias' in sd else y


def _squeeze_excite(sd, name: str, x):
  s = x.mean(axis=(2, 3), keepdims=True)
  s = np.maximum(conv2d(s, sd[f'{name}.fc1.weight']), 0)
  return x / (1 + np.exp(-conv2d(s, sd[f'{name}.fc2.weight'])))


def _ir_unit(sd, p: str, x, stride: int, eps: float):
  y = conv2d(batch_norm(sd, f'{p}.bn1', x, eps), sd[f'{p}.conv1.weight'],
             1, 1)
  if f'{p}.bn2.running_mean' in sd:
    y = batch_norm(sd, f'{p}.bn2', y, eps)
  y = conv2d(prelu(sd, f'{p}.prelu', y), sd[f'{p}.conv2.weight'], stride, 1)
  y = batch_norm(sd, f'{p}.bn3', y, eps)
  if f'{p}.se.fc1.weight' in sd:
    y = _squeeze_excite(sd, f'{p}.se', y)
  if f'{p}.downsample.0.weight' in sd:
    x = batch_norm(sd, f'{p}.downsample.1',
                   conv2d(x, sd[f'{p}.downsample.0.weight'], stride), eps)
  else:
    x = x[:, :, ::stride, ::stride]
  return x + y


def iresnet(sd, x, eps: float = 1e-5):
  """(N, 3, 112, 112) -> (N, D): stem, the units of layer1..layer4, BN,
  flatten (C, H, W order), fc, features BN."""
  x = prelu(sd, 'prelu', batch_norm(sd, 'bn1', conv2d(
      x, sd['conv1.weight'], 1, 1), eps))
  for stage in range(1, 5):
    i = 0
    while f'layer{stage}.{i}.conv1.weight' in sd:
      x = _ir_unit(sd, f'layer{stage}.{i}', x, 2 if i == 0 else 1, eps)
      i += 1
  x = batch_norm(sd, 'bn2', x, eps).reshape(x.shape[0], -1)
  return batch_norm(sd, 'features', linear(sd, 'fc', x), eps)


def _conv_block(sd, p: str, x, stride: int, eps: float):
  """Conv_block / Linear_block: conv, BN, PReLU when it has one."""
  w = sd[f'{p}.conv.weight']
  pad = w.shape[-1] // 2 if w.shape[-1] == 3 else 0
  x = batch_norm(sd, f'{p}.bn', conv2d(x, w, stride, pad), eps)
  return prelu(sd, f'{p}.prelu', x) if f'{p}.prelu.weight' in sd else x


def _depthwise(sd, p: str, x, stride: int, eps: float, residual: bool):
  y = _conv_block(sd, f'{p}.conv', x, 1, eps)
  y = _conv_block(sd, f'{p}.conv_dw', y, stride, eps)
  y = _conv_block(sd, f'{p}.project', y, 1, eps)
  return x + y if residual else y


def _residual(sd, p: str, x, eps: float):
  i = 0
  while f'{p}.model.{i}.conv.conv.weight' in sd:
    x = _depthwise(sd, f'{p}.model.{i}', x, 1, eps, True)
    i += 1
  return x


def mobilefacenet(sd, x, eps: float = 1e-5):
  """(N, 3, S, S) -> (N, D), FaceX-Zoo's layer sequence."""
  x = _conv_block(sd, 'conv1', x, 2, eps)
  if 'conv2_dw.conv.weight' in sd:
    x = _conv_block(sd, 'conv2_dw', x, 1, eps)
  else:
    x = _residual(sd, 'conv_2', x, eps)
  for down, res in (('conv_23', 'conv_3'), ('conv_34', 'conv_4'),
                    ('conv_45', 'conv_5')):
    x = _residual(sd, res, _depthwise(sd, down, x, 2, eps, False), eps)
  x = _conv_block(sd, 'conv_6_dw', _conv_block(sd, 'conv_6_sep', x, 1, eps),
                  1, eps)
  return batch_norm(sd, 'bn', linear(sd, 'linear', x.reshape(x.shape[0], -1)),
                    eps)
