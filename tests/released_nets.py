"""Randomly initialised state dicts in the released networks' own names
and shapes, written from their PyTorch code (arcface_torch's iresnet.py
and mobilefacenet.py, FaceX-Zoo's ResNets.py and MobileFaceNets.py,
AdaFace's net.py), not from this project's layouts: the fixtures the
import is tested on. ``width`` scales every channel count as the
backbones' own ``width`` does (multiples of 8), so the tests run small
networks of the released structure."""

from __future__ import annotations

import numpy as np


def _c(n: int, width: float) -> int:
  return max(8, int(n * width / 8 + 0.5) * 8)


class _StateDict(dict):
  """Adds PyTorch modules' tensors under their names."""

  def __init__(self, rng):
    super().__init__()
    self.rng = rng

  def conv(self, name, cin, cout, k, groups=1):
    fan_in = cin // groups * k * k
    self[f'{name}.weight'] = self.rng.normal(
        0, (2 / fan_in) ** 0.5, (cout, cin // groups, k, k)).astype('f4')

  def bn(self, name, c, affine=True):
    r = self.rng
    if affine:
      self[f'{name}.weight'] = r.uniform(0.5, 1.5, c).astype('f4')
      self[f'{name}.bias'] = r.normal(0, 0.1, c).astype('f4')
    self[f'{name}.running_mean'] = r.normal(0, 0.1, c).astype('f4')
    self[f'{name}.running_var'] = r.uniform(0.5, 1.5, c).astype('f4')
    self[f'{name}.num_batches_tracked'] = np.array(1000, np.int64)

  def prelu(self, name, c):
    self[f'{name}.weight'] = self.rng.uniform(0, 0.5, c).astype('f4')

  def linear(self, name, cin, cout, bias=True):
    self[f'{name}.weight'] = self.rng.normal(
        0, cin ** -0.5, (cout, cin)).astype('f4')
    if bias:
      self[f'{name}.bias'] = self.rng.normal(0, 0.1, cout).astype('f4')


def arcface_iresnet(rng, units=(1, 1, 1, 1), dim=64, width=0.125) -> dict:
  """arcface_torch's iresnet.IResNet(IBasicBlock, units)."""
  sd, ch = _StateDict(rng), [_c(n, width) for n in (64, 128, 256, 512)]
  sd.conv('conv1', 3, ch[0], 3)
  sd.bn('bn1', ch[0])
  sd.prelu('prelu', ch[0])
  cin = ch[0]
  for stage, (out, count) in enumerate(zip(ch, units), 1):
    for i in range(count):
      p = f'layer{stage}.{i}'
      sd.bn(f'{p}.bn1', cin)
      sd.conv(f'{p}.conv1', cin, out, 3)
      sd.bn(f'{p}.bn2', out)
      sd.prelu(f'{p}.prelu', out)
      sd.conv(f'{p}.conv2', out, out, 3)
      sd.bn(f'{p}.bn3', out)
      if i == 0:  # stride 2 starts each stage
        sd.conv(f'{p}.downsample.0', cin, out, 1)
        sd.bn(f'{p}.downsample.1', out)
      cin = out
  sd.bn('bn2', cin)
  sd.linear('fc', cin * 49, dim)
  sd.bn('features', dim)
  return dict(sd)


def evolve_ir(rng, units=(1, 1, 1, 1), dim=64, width=0.125,
              middle_bn=False, se=False, output_affine=True) -> dict:
  """face.evoLVe's IR / IR-SE: FaceX-Zoo's Resnet (middle_bn=False),
  AdaFace's IR (middle_bn=True; its last BN without affine)."""
  sd, ch = _StateDict(rng), [_c(n, width) for n in (64, 128, 256, 512)]
  sd.conv('input_layer.0', 3, ch[0], 3)
  sd.bn('input_layer.1', ch[0])
  sd.prelu('input_layer.2', ch[0])
  k, cin = 0, ch[0]
  for out, count in zip(ch, units):
    for _ in range(count):
      p = f'body.{k}'
      if cin != out:
        sd.conv(f'{p}.shortcut_layer.0', cin, out, 1)
        sd.bn(f'{p}.shortcut_layer.1', out)
      layers = [('bn', cin), ('conv', cin, out)]
      layers += [('bn', out)] if middle_bn else []
      layers += [('prelu', out), ('conv', out, out), ('bn', out)]
      layers += [('se', out)] if se else []
      for j, (kind, *args) in enumerate(layers):
        name = f'{p}.res_layer.{j}'
        if kind == 'conv':
          sd.conv(name, *args, 3)
        elif kind == 'se':
          sd.conv(f'{name}.fc1', args[0], args[0] // 16, 1)
          sd.conv(f'{name}.fc2', args[0] // 16, args[0], 1)
        else:
          getattr(sd, kind)(name, *args)
      k, cin = k + 1, out
  sd.bn('output_layer.0', cin)
  sd.linear('output_layer.3', cin * 49, dim)
  sd.bn('output_layer.4', dim, affine=output_affine)
  return dict(sd)


def _block(sd, name, cin, cout, k=1, groups=1, prelu=True, seq=False):
  """ConvBlock / LinearBlock: FaceX-Zoo's conv/bn/prelu, or arcface_torch's
  layers.0/1/2 (seq)."""
  n = (['layers.0', 'layers.1', 'layers.2'] if seq else
       ['conv', 'bn', 'prelu'])
  sd.conv(f'{name}.{n[0]}', cin, cout, k, groups)
  sd.bn(f'{name}.{n[1]}', cout)
  if prelu:
    sd.prelu(f'{name}.{n[2]}', cout)


def _depthwise(sd, name, cin, cout, groups, seq):
  n = (['layers.0', 'layers.1', 'layers.2'] if seq else
       ['conv', 'conv_dw', 'project'])
  _block(sd, f'{name}.{n[0]}', cin, groups, seq=seq)
  _block(sd, f'{name}.{n[1]}', groups, groups, 3, groups, seq=seq)
  _block(sd, f'{name}.{n[2]}', groups, cout, prelu=False, seq=seq)


def mobilefacenet(rng, dim=64, width=0.25, scale=1, blocks=(1, 4, 6, 2),
                  stem_groups=None, fc_bias=False, arcface_torch=False):
  """FaceX-Zoo's MobileFaceNet (scale 1), or arcface_torch's
  get_mbf (scale 2, stem_groups 64) / get_mbf_large (scale 4, blocks
  (2, 8, 12, 4)) with arcface_torch=True."""
  sd, seq = _StateDict(rng), arcface_torch
  c = lambda n: _c(n, width)  # noqa: E731
  names = (['layers.0', 'layers.1', 'layers.2', 'layers.3', 'layers.4',
            'layers.5', 'layers.6', 'layers.7', 'conv_sep'] if seq else
           ['conv1', 'conv2_dw', 'conv_23', 'conv_3', 'conv_34', 'conv_4',
            'conv_45', 'conv_5', 'conv_6_sep'])
  residual = 'layers' if seq else 'model'
  stem = c(64 * scale)
  _block(sd, names[0], 3, stem, 3, seq=seq)
  if blocks[0] == 1:
    groups = stem if stem_groups is None else stem_groups
    _block(sd, names[1], stem, stem, 3, groups, seq=seq)
  else:
    for i in range(blocks[0]):
      _depthwise(sd, f'{names[1]}.{residual}.{i}', stem, stem, c(128), seq)
  cin = stem
  for j, (out, down, expansion) in enumerate(
      ((c(64 * scale), c(128), c(128)), (c(128 * scale), c(256), c(256)),
       (c(128 * scale), c(512), c(256)))):
    _depthwise(sd, names[2 + 2 * j], cin, out, down, seq)
    for i in range(blocks[1 + j]):
      _depthwise(sd, f'{names[3 + 2 * j]}.{residual}.{i}', out, out,
                 expansion, seq)
    cin = out
  _block(sd, names[8], cin, c(512), seq=seq)
  gdc = 'features.layers.0' if seq else 'conv_6_dw'
  _block(sd, gdc, c(512), c(512), 7, c(512), prelu=False, seq=seq)
  sd.linear('features.layers.2' if seq else 'linear', c(512), dim,
            bias=fc_bias)
  sd.bn('features.layers.3' if seq else 'bn', dim)
  return dict(sd)
