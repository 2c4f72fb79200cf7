"""MXNet checkpoints written without MXNet, for the tests of
npcface_jax/foreign/mxnet_params.py and mxnet_graph.py: a ``.params``
file in the NDArray layouts MXNet writes (V2 and V3 records, V1 and the
legacy magic-less form, float16 optionally) and a ``-symbol.json`` in the
1.x 'attrs' spelling or the older 'param'/'attr' one.

The graphs are small random insightface models with insightface's own
layer names and structure, followed from deepinsight/insightface:

- LResNet-IR ('E' output): ``recognition/symbol/fresnet.py`` at
  1a20194 (``resnet()`` with version_input 1: ``identity`` 'id', data -
  127.5, * 0.0078125, conv0 3x3 + bn0 + relu0; ``residual_unit_v3``
  without bottleneck: bn1, conv1, bn2, relu1, conv2 (the stride), bn3,
  conv1sc + sc when the shape changes; units 'stage%d_unit%d') and
  ``recognition/symbol/symbol_utils.py`` at 2b8c037 (``get_fc1`` 'E':
  bn1, Dropout 0.4, pre_fc1, fc1 BatchNorm fix_gamma eps 2e-5).
- MobileFaceNet ('GDC' output, the model zoo's "y1"):
  ``recognition/symbol/fmobilefacenet.py`` at 1813610 (Conv = conv2d +
  batchnorm with MXNet's default eps + relu (prelu); DResidual conv_sep,
  conv_dw, conv_proj; Residual blocks named '%s_block%d') and
  ``symbol_utils.get_fc1`` 'GDC' (conv_6dw7_7 depthwise Linear, pre_fc1,
  fc1). Widths and depths are cut down; names and wiring are kept.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
FLAGS = {np.dtype('float32'): 0, np.dtype('float64'): 1,
         np.dtype('float16'): 2, np.dtype('uint8'): 3, np.dtype('int32'): 4,
         np.dtype('int8'): 5, np.dtype('int64'): 6}


def ndarray_record(array: np.ndarray, version: str = 'v2') -> bytes:
  """One NDArray as NDArray::Save writes it ('v2', 'v3'), or as the older
  versions did ('v1': int64 shape, no storage type; 'legacy': no magic,
  uint32 ndim and dims)."""
  array = np.asarray(array, order='C')  # (ascontiguousarray makes 0-d 1-d)
  shape = array.shape
  if version in ('v2', 'v3'):
    head = struct.pack('<Ii', V2 if version == 'v2' else V3, 0)
    head += struct.pack(f'<i{len(shape)}q', len(shape), *shape)
  elif version == 'v1':
    head = struct.pack(f'<Ii{len(shape)}q', V1, len(shape), *shape)
  else:
    head = struct.pack(f'<I{len(shape)}I', len(shape), *shape)
  context = struct.pack('<ii', 1, 0)  # cpu(0)
  flag = struct.pack('<i', FLAGS[array.dtype])
  return head + context + flag + array.astype(array.dtype.newbyteorder('<'),
                                              copy=False).tobytes()


def params_bytes(arrays: dict[str, np.ndarray], version: str = 'v2',
                 float16: bool = False) -> bytes:
  """A .params file: the NDArray list of mx.nd.save, names included."""
  out = struct.pack('<QQQ', 0x112, 0, len(arrays))
  for array in arrays.values():
    array = array.astype(np.float16) if float16 else array
    out += ndarray_record(array, version)
  out += struct.pack('<Q', len(arrays))
  for name in arrays:
    raw = name.encode()
    out += struct.pack('<Q', len(raw)) + raw
  return out


def _attr(value) -> str:
  """A Python value as MXNet writes it in the JSON."""
  if isinstance(value, bool):
    return str(value)  # 'True' / 'False'
  if isinstance(value, tuple):
    return '(' + ', '.join(map(str, value)) + ')'
  return str(value)


class Builder:
  """A symbol graph built node by node, with random weights: nodes in
  order, each variable's array in ``params`` under 'arg:' or 'aux:'."""

  def __init__(self, rng: np.random.Generator):
    self.rng, self.nodes, self.params = rng, [], {}

  def var(self, name: str, array=None, aux: bool = False,
          dtype=np.float32) -> int:
    """A variable; its array (float32, as MXNet trains) in params."""
    self.nodes.append(dict(op='null', name=name, attrs={}, inputs=[]))
    if array is not None:
      self.params[f'{"aux" if aux else "arg"}:{name}'] = np.asarray(
          array, dtype)
    return len(self.nodes) - 1

  def op(self, op: str, name: str, inputs: list[int], **attrs) -> int:
    self.nodes.append(dict(op=op, name=name, inputs=list(inputs),
                           attrs={k: _attr(v) for k, v in attrs.items()}))
    return len(self.nodes) - 1

  def symbol(self, heads: list[int], spelling: str = 'attrs') -> dict:
    """The JSON object: 'attrs' and [node, 0, 0] entries as MXNet 1.x
    writes; 'param' (the op's parameters), 'attr' and [node, 0] as the
    older versions did."""
    nodes = []
    for n in self.nodes:
      node = dict(op=n['op'], name=n['name'])
      if spelling == 'attrs':
        if n['attrs']:
          node['attrs'] = n['attrs']
        node['inputs'] = [[i, 0, 0] for i in n['inputs']]
      else:
        node['param'], node['attr'] = n['attrs'], {}
        node['inputs'] = [[i, 0] for i in n['inputs']]
        node['backward_source_id'] = -1
      nodes.append(node)
    arg_nodes = [i for i, n in enumerate(self.nodes) if n['op'] == 'null']
    out = dict(nodes=nodes, arg_nodes=arg_nodes,
               heads=[[h, 0, 0] if spelling == 'attrs' else [h, 0]
                      for h in heads])
    if spelling == 'attrs':
      out['node_row_ptr'] = list(range(len(nodes) + 1))
      out['attrs'] = {'mxnet_version': ['int', 10600]}
    return out

  # --- Layers, as insightface's symbol code names them ---------------------

  def conv(self, x, name, c_in, c_out, kernel=3, stride=1, pad=1, group=1):
    w = self.rng.normal(0, (2 / (c_in // group * kernel**2))**0.5,
                        (c_out, c_in // group, kernel, kernel))
    return self.op('Convolution', name, [x, self.var(f'{name}_weight', w)],
                   kernel=(kernel, kernel), stride=(stride, stride),
                   pad=(pad, pad), num_filter=c_out, num_group=group,
                   no_bias=True, workspace=256)

  def bn(self, x, name, c, eps=2e-5, fix_gamma=False):
    """BatchNorm; eps=None leaves it out, as MobileFaceNet's Conv does
    (MXNet's default 1e-3 then applies)."""
    r = self.rng
    inputs = [x, self.var(f'{name}_gamma', r.uniform(0.5, 1.5, c)),
              self.var(f'{name}_beta', r.normal(0, 0.1, c)),
              self.var(f'{name}_moving_mean', r.normal(0, 0.1, c), aux=True),
              self.var(f'{name}_moving_var', r.uniform(0.5, 1.5, c),
                       aux=True)]
    attrs = dict(fix_gamma=fix_gamma, momentum=0.9)
    if eps is not None:
      attrs['eps'] = eps
    return self.op('BatchNorm', name, inputs, **attrs)

  def prelu(self, x, name, c):
    gamma = self.var(f'{name}_gamma', self.rng.uniform(0.1, 0.4, c))
    return self.op('LeakyReLU', name, [x, gamma], act_type='prelu')

  def preprocess(self, x, identity=True):
    if identity:
      x = self.op('identity', 'id', [x])
    x = self.op('_minus_scalar', '_minusscalar0', [x], scalar=127.5)
    return self.op('_mul_scalar', '_mulscalar0', [x], scalar=0.0078125)


def _residual_unit_v3(b: Builder, x, c_in, c_out, stride, name, add_op):
  """fresnet.residual_unit_v3 (no bottleneck): bn3 + shortcut."""
  body = b.bn(x, f'{name}_bn1', c_in)
  body = b.conv(body, f'{name}_conv1', c_in, c_out)
  body = b.bn(body, f'{name}_bn2', c_out)
  body = b.prelu(body, f'{name}_relu1', c_out)
  body = b.conv(body, f'{name}_conv2', c_out, c_out, stride=stride)
  body = b.bn(body, f'{name}_bn3', c_out)
  if c_in == c_out and stride == 1:
    shortcut = x
  else:
    shortcut = b.conv(x, f'{name}_conv1sc', c_in, c_out, kernel=1,
                      stride=stride, pad=0)
    shortcut = b.bn(shortcut, f'{name}_sc', c_out)
  return b.op(add_op, f'_plus{len(b.nodes)}', [body, shortcut])


def _fc1_e(b: Builder, x, c, size, emb):
  """symbol_utils.get_fc1 'E': bn1, Dropout, pre_fc1, fc1 (fix_gamma)."""
  body = b.bn(x, 'bn1', c)
  body = b.op('Dropout', 'dropout0', [body], p=0.4)
  w = b.rng.normal(0, (1 / (c * size * size))**0.5, (emb, c * size * size))
  fc = b.op('FullyConnected', 'pre_fc1',
            [body, b.var('pre_fc1_weight', w),
             b.var('pre_fc1_bias', b.rng.normal(0, 0.1, emb))],
            num_hidden=emb)
  return b.bn(fc, 'fc1', emb, fix_gamma=True)


def lresnet(rng, filters=(8, 8, 16), units=(1, 2), emb=16, spelling='attrs',
            side=4, preprocess=True):
  """(symbol JSON object, params) of a small LResNet-IR ('E' output):
  filters[0] for conv0, filters[i + 1] and units[i] per stage, each
  stage's first unit at stride 2. Input: (N, 3, side * 2**len(units),
  same) RGB 0-255, so the last feature map is side x side (the model
  zoo's: four stages, side 7, 112 x 112 faces); ``preprocess=False``
  leaves out the in-graph normalisation (the graph takes 'data' as is)."""
  b = Builder(rng)
  add_op = 'elemwise_add' if spelling == 'attrs' else '_Plus'
  x = b.var('data')
  x = b.preprocess(x) if preprocess else x
  x = b.conv(x, 'conv0', 3, filters[0])
  x = b.bn(x, 'bn0', filters[0])
  x = b.prelu(x, 'relu0', filters[0])
  c = filters[0]
  for i, count in enumerate(units):
    for j in range(count):
      x = _residual_unit_v3(b, x, c, filters[i + 1], 2 if j == 0 else 1,
                            f'stage{i + 1}_unit{j + 1}', add_op)
      c = filters[i + 1]
  return b.symbol([_fc1_e(b, x, c, side, emb)], spelling), b.params


def _mfn_conv(b, x, name, c_in, c_out, kernel=1, stride=1, pad=0, group=1,
              act=True):
  """fmobilefacenet Conv (act) / Linear (no act): '%s_conv2d',
  '%s_batchnorm' with MXNet's default eps, '%s_relu'."""
  x = b.conv(x, f'{name}_conv2d', c_in, c_out, kernel, stride, pad, group)
  x = b.bn(x, f'{name}_batchnorm', c_out, eps=None)
  return b.prelu(x, f'{name}_relu', c_out) if act else x


def _dresidual(b, x, name, c_in, c_out, group, stride):
  x = _mfn_conv(b, x, f'{name}_conv_sep', c_in, group)
  x = _mfn_conv(b, x, f'{name}_conv_dw', group, group, 3, stride, 1, group)
  return _mfn_conv(b, x, f'{name}_conv_proj', group, c_out, act=False)


def mobilefacenet(rng, width=8, blocks=(1, 1, 1), emb=16, spelling='attrs'):
  """(symbol JSON object, params) of a small MobileFaceNet ('GDC', the
  "y1" output): fmobilefacenet's stages with ``width`` channels for 64
  and blocks per residual stage. Input (N, 3, 32, 32): conv_6dw7_7 is
  then 2 x 2 (7 x 7 at 112)."""
  b = Builder(rng)
  add_op = 'elemwise_add' if spelling == 'attrs' else '_Plus'
  x = b.preprocess(b.var('data'), identity=False)
  x = _mfn_conv(b, x, 'conv_1', 3, width, 3, 2, 1)
  x = _mfn_conv(b, x, 'conv_2_dw', width, width, 3, 1, 1, group=width)
  # (down, residual stage, out channels, down's groups, the stage's).
  stages = (('dconv_23', 'res_3', width, 2 * width, 2 * width),
            ('dconv_34', 'res_4', 2 * width, 4 * width, 4 * width),
            ('dconv_45', 'res_5', 2 * width, 8 * width, 4 * width))
  c = width
  for (down, res, c_out, g_down, g_res), count in zip(stages, blocks):
    x = _dresidual(b, x, down, c, c_out, g_down, 2)
    c = c_out
    for k in range(count):
      y = _dresidual(b, x, f'{res}_block{k}', c, c, g_res, 1)
      x = b.op(add_op, f'_plus{len(b.nodes)}', [y, x])
  x = _mfn_conv(b, x, 'conv_6sep', c, 8 * width)
  x = _mfn_conv(b, x, 'conv_6dw7_7', 8 * width, 8 * width, 2,
                group=8 * width, act=False)
  w = b.rng.normal(0, (1 / (8 * width))**0.5, (emb, 8 * width))
  fc = b.op('FullyConnected', 'pre_fc1',
            [x, b.var('pre_fc1_weight', w),
             b.var('pre_fc1_bias', b.rng.normal(0, 0.1, emb))],
            num_hidden=emb)
  return b.symbol([b.bn(fc, 'fc1', emb, fix_gamma=True)], spelling), b.params


def write_model(folder, symbol: dict, params: dict, prefix: str = 'model',
                epoch: int = 0, **params_options) -> tuple[str, str]:
  """(symbol path, params path): '{prefix}-symbol.json' and
  '{prefix}-{epoch:04d}.params' as Module.save_checkpoint names them."""
  sym = os.path.join(folder, f'{prefix}-symbol.json')
  par = os.path.join(folder, f'{prefix}-{epoch:04d}.params')
  with open(sym, 'w') as f:
    json.dump(symbol, f, indent=2)
  with open(par, 'wb') as f:
    f.write(params_bytes(params, **params_options))
  return sym, par
