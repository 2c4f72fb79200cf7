"""ONNX graphs in the structure arcface_torch's torch2onnx.py gives
insightface's released recognisers (w600k_r50.onnx, glintr100.onnx,
w600k_mbf.onnx), written here with onnx.helper from state dicts in torch's
own names (tests/released_nets.py), not from this project's layouts.

What torch.onnx.export with constant folding makes of an eval-mode
network, and so what these graphs hold: a BatchNorm right after a Conv
folded into it (weight * gamma / sqrt(var + eps), bias beta - mean * gamma
/ sqrt(var + eps)); the IR's pre-activation BNs (a unit's bn1, the bn2
before the flatten) and the BatchNorm1d after the linear as
BatchNormalization nodes; PReLU slopes shaped (C, 1, 1); Flatten, then
Gemm (transB=1) or, for a linear without bias, MatMul with the weight
transposed; node names numbered by op ('Conv_0'), tensors numbered
('input.1', '513'). ``fold=False`` keeps every BN a node (an export
without constant folding), ``linear='matmul'`` writes MatMul + Add."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

EPS = 1e-5
INPUT = 'input.1'


class _Builder:
  """Nodes and initializers in the order torch's exporter emits them."""

  def __init__(self, sd: dict, fold: bool):
    self.sd, self.fold = sd, fold
    self.nodes, self.inits, self.channels = [], [], {INPUT: 3}
    self.count = 0

  def _name(self) -> str:
    self.count += 1
    return str(500 + self.count)

  def init(self, array, name=None) -> str:
    name = name or f'onnx::Conv_{self._name()}'
    self.inits.append(numpy_helper.from_array(
        np.ascontiguousarray(array), name))
    return name

  def node(self, op, inputs, channels, **attrs) -> str:
    out = self._name()
    self.nodes.append(helper.make_node(op, inputs, [out],
                                       name=f'{op}_{len(self.nodes)}',
                                       **attrs))
    self.channels[out] = channels
    return out

  def f32(self, name):
    return np.asarray(self.sd[name], np.float32)

  def bn(self, x, name) -> str:
    inputs = [self.init(self.f32(f'{name}.{k}'), f'{name}.{k}') for k in
              ('weight', 'bias', 'running_mean', 'running_var')]
    return self.node('BatchNormalization', [x, *inputs], self.channels[x],
                     epsilon=EPS, momentum=0.9)

  def conv_bn(self, x, conv, bn, stride) -> str:
    w = np.asarray(self.sd[f'{conv}.weight'], np.float64)
    k, cin = w.shape[-1], self.channels[x]
    attrs = {'kernel_shape': [k, k], 'strides': [stride] * 2,
             'pads': [1 if k == 3 else 0] * 4, 'dilations': [1, 1],
             'group': cin // w.shape[1]}
    if not self.fold:
      y = self.node('Conv', [x, self.init(w.astype('f4'), f'{conv}.weight')],
                    w.shape[0], **attrs)
      return self.bn(y, bn)
    s = self.sd[f'{bn}.weight'] / np.sqrt(
        np.asarray(self.sd[f'{bn}.running_var'], np.float64) + EPS)
    b = self.sd[f'{bn}.bias'] - self.sd[f'{bn}.running_mean'] * s
    return self.node('Conv', [x, self.init((w * s[:, None, None, None])
                                           .astype('f4')),
                              self.init(b.astype('f4'))], w.shape[0], **attrs)

  def prelu(self, x, name) -> str:
    slope = self.f32(f'{name}.weight').reshape(-1, 1, 1)
    return self.node('PRelu', [x, self.init(slope)], self.channels[x])

  def add(self, a, b) -> str:
    return self.node('Add', [a, b], self.channels[a])

  def head(self, x, fc, features, linear) -> str:
    x = self.node('Flatten', [x], 0, axis=1)
    w = self.f32(f'{fc}.weight')
    bias = f'{fc}.bias' in self.sd
    if linear == 'gemm' and bias:
      x = self.node('Gemm', [x, self.init(w, f'{fc}.weight'),
                             self.init(self.f32(f'{fc}.bias'), f'{fc}.bias')],
                    w.shape[0], alpha=1.0, beta=1.0, transB=1)
    else:
      x = self.node('MatMul', [x, self.init(np.ascontiguousarray(w.T))],
                    w.shape[0])
      if bias:
        x = self.add(x, self.init(self.f32(f'{fc}.bias'), f'{fc}.bias'))
    return self.bn(x, features)

  def model(self, out, batch, opset) -> onnx.ModelProto:
    dim = out_dim = batch
    graph = helper.make_graph(
        self.nodes, 'main_graph',
        [helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT,
                                       [dim, 3, 112, 112])],
        [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT,
                                       [out_dim, self.channels[out]])],
        self.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid('', opset)],
        producer_name='pytorch', producer_version='1.11.0')
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def iresnet(sd: dict, fold=True, linear='gemm', batch='None',
            opset=11) -> onnx.ModelProto:
  """arcface_torch's IResNet.forward as torch2onnx.py exports it, from
  released_nets.arcface_iresnet's state dict."""
  b = _Builder(sd, fold)
  x = b.prelu(b.conv_bn(INPUT, 'conv1', 'bn1', 1), 'prelu')
  for stage in range(1, 5):
    i = 0
    while f'layer{stage}.{i}.conv1.weight' in sd:
      p = f'layer{stage}.{i}'
      y = b.conv_bn(b.bn(x, f'{p}.bn1'), f'{p}.conv1', f'{p}.bn2', 1)
      y = b.conv_bn(b.prelu(y, f'{p}.prelu'), f'{p}.conv2', f'{p}.bn3',
                    2 if i == 0 else 1)
      if f'{p}.downsample.0.weight' in sd:
        x = b.conv_bn(x, f'{p}.downsample.0', f'{p}.downsample.1',
                      2 if i == 0 else 1)
      x = b.add(y, x)
      i += 1
  x = b.head(b.bn(x, 'bn2'), 'fc', 'features', linear)
  return b.model(x, batch, opset)


def _block(b, x, name, stride, prelu=True):
  """arcface_torch's ConvBlock / LinearBlock: layers.0/1/2."""
  x = b.conv_bn(x, f'{name}.layers.0', f'{name}.layers.1', stride)
  return b.prelu(x, f'{name}.layers.2') if prelu else x


def _depthwise(b, x, name, stride, residual):
  y = _block(b, x, f'{name}.layers.0', 1)
  y = _block(b, y, f'{name}.layers.1', stride)
  y = _block(b, y, f'{name}.layers.2', 1, prelu=False)
  return b.add(x, y) if residual else y


def _residual(b, x, name):
  i = 0
  while f'{name}.layers.{i}.layers.0.layers.0.weight' in b.sd:
    x = _depthwise(b, x, f'{name}.layers.{i}', 1, True)
    i += 1
  return x


def mobilefacenet(sd: dict, fold=True, linear='gemm', batch='None',
                  opset=11) -> onnx.ModelProto:
  """arcface_torch's mobilefacenet.MobileFaceNet.forward as torch2onnx.py
  exports it, from released_nets.mobilefacenet(arcface_torch=True)."""
  b = _Builder(sd, fold)
  x = _block(b, INPUT, 'layers.0', 2)
  if 'layers.1.layers.0.weight' in sd:
    x = _block(b, x, 'layers.1', 1)
  else:
    x = _residual(b, x, 'layers.1')
  for k in (2, 4, 6):
    x = _residual(b, _depthwise(b, x, f'layers.{k}', 2, False),
                  f'layers.{k + 1}')
  x = _block(b, x, 'conv_sep', 1)
  x = _block(b, x, 'features.layers.0', 1, prelu=False)
  x = b.head(x, 'features.layers.2', 'features.layers.3', linear)
  return b.model(x, batch, opset)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
  """onnxruntime on NCHW float32 inputs, one at a time."""
  import onnxruntime  # noqa: PLC0415 (tests that use it need it)
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  return np.concatenate([session.run(None, {INPUT: x[i:i + 1]})[0]
                         for i in range(len(x))])
