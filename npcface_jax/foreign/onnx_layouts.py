"""ONNX face recognisers onto this project's backbones, by their structure.

``read`` loads a self-contained ``.onnx`` with the onnx package (the
``[export]`` extra): a file over ``MAX_BYTES``, one whose tensors live in
external data files, or an initializer whose bytes do not match its shape
and type is refused naming the file and the tensor. ``layout`` then walks
the graph from its input by structure (operator types and how tensors
connect; never the names, which torch's exporter numbers) and lays what it
finds out as the canonical state dict of ``torch_layouts`` (arcface_torch's
names for the IR ResNets, FaceX-Zoo's for MobileFaceNet), whose variant
detection and ``to_variables`` put it onto our backbone. What is read:

- insightface's released recognisers exported by arcface_torch's
  torch2onnx.py (``w600k_r50.onnx``, ``glintr100.onnx``: iresnet50/100;
  ``w600k_mbf.onnx``): torch.onnx.export with constant folding, so a
  BatchNorm right after a Conv is folded into the Conv's weight and bias,
  while the IR's pre-activation BNs stay BatchNormalization nodes;
- the same graphs exported without folding (Conv, then BatchNormalization).

A Conv with a folded BN becomes our conv and a BatchNorm with scale 1,
bias b, mean 0 and variance 1 - eps: the identity plus b, exactly. ONNX
kernels are OIHW, ours HWIO (torch_layouts transposes them); the linear
after the IR's flatten has its rows in NCHW order, permuted to our NHWC
flatten ('dense_nchw'). PReLU slopes shaped (C, 1, 1), (1, C, 1, 1) or one
shared value are per channel. Every weight's shape is checked against the
graph around it and then against our backbone, an error naming the node
and both shapes; every node on the way must be one of the structure's,
every other node is refused; initializers no node uses are reported.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np

from npcface_jax.foreign import torch_layouts

INSTALL = 'pip install "npcface_jax[export]"'
MAX_BYTES = 1 << 30  # glintr100.onnx is 261 MB, an iresnet200 about 270 MB
IMAGE_SIZE = 112
EPS = 1e-5  # torch's BatchNorm default, what our backbones default to
# ONNX TensorProto data types this reads: numpy dtype, the typed field.
_TYPES = {1: ('float32', 'float_data'), 10: ('float16', 'int32_data'),
          11: ('float64', 'double_data'), 7: ('int64', 'int64_data'),
          6: ('int32', 'int32_data')}
_PASS = ('Identity', 'Dropout')  # inference no-ops torch may leave (and
# a Cast to float32: every tensor here is float32)
_EXTERNAL = 1  # TensorProto.EXTERNAL
LayoutError = torch_layouts.LayoutError


class MissingExtra(ImportError):
  """The onnx package (the [export] extra) is not installed."""


class OnnxFileError(ValueError):
  """A file that is not an ONNX model this import reads safely."""


def require_onnx():
  """The onnx package, or MissingExtra naming the install line."""
  try:
    import onnx  # noqa: PLC0415 (an optional extra)
  except ImportError as e:
    raise MissingExtra(f'importing an ONNX model needs the onnx package '
                       f'({e}); install it with: {INSTALL}') from None
  return onnx


class OnnxModel(NamedTuple):
  path: str
  data: bytes  # the file, for onnxruntime
  opset: int
  producer: str  # 'pytorch 1.11.0'
  ir_version: int
  input_name: str
  input_shape: tuple  # ints, or the symbolic batch's name
  output_name: str
  nodes: list  # NodeProto, in the file's order
  arrays: dict  # initializer name -> NumPy array, checked
  dtypes: set  # the initializers' stored types


def looks_like_onnx(path: str) -> bool:
  """The extension, or a file that starts as a ModelProto (field 1, the
  IR version, then another of its fields) and that onnx parses; torch's
  files start 'PK' (zip) or 0x80 (pickle)."""
  if path.lower().endswith('.onnx'):
    return True
  with open(path, 'rb') as f:
    head = f.read(3)
  fields = (0x12, 0x1a, 0x22, 0x28, 0x32, 0x3a, 0x42)  # ModelProto 2..8
  if len(head) < 3 or head[0] != 0x08 or not 0 < head[1] < 64 or (
      head[2] not in fields):
    return False
  try:
    onnx = require_onnx()
  except MissingExtra:
    return True  # read() names the extra to install
  try:
    return len(_parse(onnx, path)[0].graph.node) > 0
  except OnnxFileError:
    return False


def _parse(onnx, path: str):
  size = os.path.getsize(path)
  if size > MAX_BYTES:
    raise OnnxFileError(f'{path}: {size} bytes, over the {MAX_BYTES} this '
                        'import reads (MAX_BYTES)')
  with open(path, 'rb') as f:
    data = f.read(MAX_BYTES + 1)
  try:
    model = onnx.ModelProto.FromString(data)
  except Exception as e:  # noqa: BLE001 (protobuf's DecodeError and kin)
    raise OnnxFileError(f'{path}: not an ONNX model (protobuf: '
                        f'{type(e).__name__}: {e})') from None
  return model, data


def tensor_array(tensor, where: str) -> np.ndarray:
  """A TensorProto's values, its storage checked against its shape and
  type first; OnnxFileError naming ``where`` and the tensor."""
  name = f'{where}: the tensor {tensor.name!r}'
  if tensor.data_location == _EXTERNAL or len(tensor.external_data):
    raise OnnxFileError(f'{name} keeps its data in an external file: this '
                        'import reads one self-contained .onnx only')
  if tensor.HasField('segment'):
    raise OnnxFileError(f'{name} is a segment of a tensor: not read')
  if tensor.data_type not in _TYPES:
    raise OnnxFileError(f'{name} has the data type {tensor.data_type}; '
                        'read are float32/16/64 and int32/64')
  dtype, field = _TYPES[tensor.data_type]
  dims = tuple(tensor.dims)
  if any(d < 0 for d in dims):
    raise OnnxFileError(f'{name} has the shape {dims}')
  count, itemsize = math.prod(dims), np.dtype(dtype).itemsize
  if tensor.raw_data or not count:
    if len(tensor.raw_data) != count * itemsize:
      raise OnnxFileError(f'{name}: {len(tensor.raw_data)} bytes for the '
                          f'shape {dims} of {dtype} ({count * itemsize})')
    return np.frombuffer(tensor.raw_data, np.dtype(dtype).newbyteorder(
        '<')).astype(dtype).reshape(dims)
  values = getattr(tensor, field)
  if len(values) != count:
    raise OnnxFileError(f'{name}: {len(values)} values for the shape '
                        f'{dims}')
  if dtype == 'float16':  # stored as uint16 bit patterns in int32_data
    return np.asarray(values, np.uint16).view(np.float16).reshape(dims)
  return np.asarray(values, dtype).reshape(dims)


def _io(model, arrays, path: str) -> tuple:
  """The one float input (N, 3, 112, 112) and the one output."""
  inputs = [i for i in model.graph.input if i.name not in arrays]
  outputs = list(model.graph.output)
  if len(inputs) != 1 or len(outputs) != 1:
    raise OnnxFileError(f'{path}: a face recogniser has one input and one '
                        f'output, this graph {len(inputs)} and '
                        f'{len(outputs)}')
  t = inputs[0].type.tensor_type
  shape = tuple(d.dim_value if d.HasField('dim_value') else
                (d.dim_param or '?') for d in t.shape.dim)
  if t.elem_type != 1 or len(shape) != 4 or shape[1:] != (
      3, IMAGE_SIZE, IMAGE_SIZE):
    raise OnnxFileError(f'{path}: the input {inputs[0].name!r} is '
                        f'{shape} of type {t.elem_type}; read are float32 '
                        f'(N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) NCHW faces')
  return inputs[0].name, shape, outputs[0].name


def read(path: str) -> OnnxModel:
  """The model at ``path``, every initializer's storage checked;
  OnnxFileError naming the file and what is wrong, MissingExtra when the
  onnx package is not installed."""
  model, data = _parse(require_onnx(), path)
  graph = model.graph
  if not graph.node:
    raise OnnxFileError(f'{path}: an ONNX model without a graph')
  if len(model.functions) or len(graph.sparse_initializer):
    raise OnnxFileError(f'{path}: local functions and sparse initializers '
                        'are not read')
  opsets = {o.domain: o.version for o in model.opset_import}
  opset = opsets.get('', opsets.get('ai.onnx'))
  if opset is None:
    raise OnnxFileError(f'{path}: no default-domain opset ({opsets})')
  arrays = {}
  for t in graph.initializer:
    arrays[t.name] = tensor_array(t, path)
  name, shape, output = _io(model, arrays, path)
  producer = ' '.join(filter(None, (model.producer_name,
                                    model.producer_version)))
  return OnnxModel(path, data, int(opset), producer or 'not stated',
                   int(model.ir_version), name, shape, output,
                   list(graph.node), arrays,
                   {str(a.dtype) for a in arrays.values()})


class _Node(NamedTuple):
  index: int
  op: str
  inputs: tuple  # pass-through nodes resolved
  outputs: tuple
  attrs: dict
  label: str  # "node 12 'Conv_12' (Conv)"


# The attribute types the walk reads; a file that declares another type
# for one of them (a damaged or forged file) is refused, not misread.
_ATTR_TYPES = {**dict.fromkeys(('kernel_shape', 'strides', 'pads',
                                'dilations'), 'INTS'),
               **dict.fromkeys(('group', 'axis', 'transA', 'transB', 'to',
                                'spatial'), 'INT'),
               **dict.fromkeys(('epsilon', 'momentum', 'alpha', 'beta'),
                               'FLOAT'),
               'auto_pad': 'STRING', 'value': 'TENSOR'}


def _attrs(onnx, node, label: str) -> dict:
  out = {}
  for a in node.attribute:
    want = _ATTR_TYPES.get(a.name)
    if want is not None and a.type != getattr(onnx.AttributeProto, want):
      raise LayoutError(f'{label}: attribute {a.name!r} declared of type '
                        f'{a.type}, where ONNX has {want}')
    out[a.name] = onnx.helper.get_attribute_value(a)
  return out


class _Graph:
  """The graph as consumers of each tensor; what the walk has taken."""

  def __init__(self, model: OnnxModel):
    onnx = require_onnx()
    self.arrays, self.used, self.origin = dict(model.arrays), set(), {}
    self.consumers, self.nodes = defaultdict(list), []
    alias: dict[str, str] = {}
    for i, proto in enumerate(model.nodes):
      label = f'node {i} {proto.name!r} ({proto.op_type})'
      if proto.domain not in ('', 'ai.onnx'):
        raise LayoutError(f'{label}: operator domain {proto.domain!r}, '
                          'not ONNX\'s own')
      attrs = _attrs(onnx, proto, label)
      if proto.op_type == 'Constant' and 'value' in attrs:
        self.arrays[proto.output[0]] = tensor_array(attrs['value'], label)
        continue
      inputs = tuple(alias.get(x, x) for x in proto.input)
      if proto.op_type in _PASS or (proto.op_type == 'Cast' and
                                    attrs.get('to') == 1):  # to float32
        alias[proto.output[0]] = inputs[0]
        continue
      node = _Node(i, proto.op_type, inputs, tuple(proto.output), attrs,
                   label)
      self.nodes.append(node)
      for x in set(inputs):
        self.consumers[x].append(node)
    self.output = alias.get(model.output_name, model.output_name)
    self.visited: set[int] = set()
    self.eps = self._epsilon()

  def _epsilon(self) -> float:
    """The one BatchNorm epsilon of the graph (torch's 1e-5 if none)."""
    found = {}
    for n in self.nodes:
      if n.op == 'BatchNormalization':
        found.setdefault(float(np.float32(n.attrs.get('epsilon', EPS))),
                         n.label)
    if len(found) > 1:
      raise LayoutError(f'BatchNorm epsilons differ: {found}; our '
                        'backbones have one')
    eps = next(iter(found), EPS)
    return EPS if eps == float(np.float32(EPS)) else eps

  def after(self, x: str) -> list:
    return [n for n in self.consumers.get(x, ()) if n.index not in
            self.visited]

  def fail(self, x: str, want: str):
    found = ', '.join(n.label for n in self.after(x)) or 'nothing'
    raise LayoutError(f'after the tensor {x!r}: expected {want}, found '
                      f'{found}')

  def take(self, x: str, *ops: str, alone: bool = True) -> _Node:
    """The consumer of ``x`` whose op is one of ``ops`` (its only one
    unless ``alone`` is False), marked visited."""
    nodes = self.after(x)
    found = [n for n in nodes if n.op in ops]
    if len(found) != 1 or (alone and len(nodes) != 1):
      self.fail(x, ' or '.join(ops) + (' alone' if alone else ''))
    self.visited.add(found[0].index)
    return found[0]

  def param(self, node: _Node, i: int, what: str, shape=None):
    """The node's constant input ``i`` (None when absent), its shape
    checked against ``shape`` where given."""
    name = node.inputs[i] if i < len(node.inputs) else ''
    if not name:
      return None
    if name not in self.arrays:
      raise LayoutError(f'{node.label}: its {what} {name!r} is computed, '
                        'not a constant: not a structure this import reads')
    self.used.add(name)
    value = self.arrays[name]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise LayoutError(f'{node.label}: its {what} has the shape '
                        f'{tuple(value.shape)}, the graph needs '
                        f'{tuple(shape)}')
    return np.asarray(value, np.float32)

  def put(self, sd: dict, module: str, node: _Node, **arrays) -> None:
    self.origin.setdefault(module, node.label)
    for k, v in arrays.items():
      sd[f'{module}.{k}'] = np.asarray(v, np.float32)

  def conv(self, x: str, cin: int, kernel: int | None, stride: int,
           groups: str = 'none', cout: int | None = None, alone=True):
    """The Conv taking ``x``: (node, weight OIHW, bias or None). ``groups``
    'none', 'depthwise' or 'any'; ``kernel`` None: any square kernel."""
    node = self.take(x, 'Conv', alone=alone)
    if node.inputs[0] != x:
      self.fail(x, 'a Conv of it')
    w = self.param(node, 1, 'weight')
    if w is None or w.ndim != 4:
      raise LayoutError(f'{node.label}: not a 2-d convolution')
    g = int(node.attrs.get('group', 1))
    k = w.shape[2] if kernel is None else kernel
    o = w.shape[0] if cout is None else cout
    want = {'none': 1, 'depthwise': cin}.get(groups, g)
    if g != want or cin % g:
      raise LayoutError(f'{node.label}: groups {g} on {cin} channels, '
                        f'where the structure has {want}')
    self.param(node, 1, 'weight', (o, cin // g, k, k))
    pad = k // 2 if k == 3 else 0
    attrs = {'strides': [stride] * 2, 'pads': [pad] * 4,
             'dilations': [1, 1], 'kernel_shape': [k, k]}
    for name, value in attrs.items():
      if list(node.attrs.get(name, value)) != value:
        raise LayoutError(f'{node.label}: {name} {node.attrs[name]}, '
                          f'where the structure has {value}')
    if node.attrs.get('auto_pad', b'NOTSET') not in (b'NOTSET', 'NOTSET'):
      raise LayoutError(f'{node.label}: auto_pad {node.attrs["auto_pad"]}')
    return node, w, self.param(node, 2, 'bias', (w.shape[0],))

  def conv_bn(self, x: str, cin: int, kernel, stride: int, conv: str,
              bn: str, sd: dict, **kwargs) -> tuple[str, int]:
    """A Conv and its BatchNorm, folded (the Conv's bias) or a
    BatchNormalization node after it: (output, channels)."""
    node, w, b = self.conv(x, cin, kernel, stride, **kwargs)
    self.put(sd, conv, node, weight=w)
    c, y = w.shape[0], node.outputs[0]
    after = self.after(y)
    if len(after) == 1 and after[0].op == 'BatchNormalization':
      return self.bn(y, c, bn, sd, shift=b), c
    zeros = np.zeros(c, np.float32)
    self.put(sd, bn, node, weight=np.ones(c), bias=zeros if b is None else b,
             running_mean=zeros,
             running_var=np.full(c, 1 - self.eps, np.float32))
    return y, c

  def bn(self, x: str, c: int, name: str, sd: dict, shift=None,
         alone=True) -> str:
    """The BatchNormalization taking ``x`` (inference form); ``shift``: a
    bias before it, folded into its mean."""
    node = self.take(x, 'BatchNormalization', alone=alone)
    if node.inputs[0] != x or len(node.inputs) != 5:
      self.fail(x, 'a BatchNormalization of it')
    if (node.attrs.get('spatial', 1) != 1 or node.attrs.get(
        'training_mode', 0) != 0 or any(self.after(o) for o in
                                         node.outputs[1:])):
      raise LayoutError(f'{node.label}: not an inference BatchNorm')
    scale, bias, mean, var = (self.param(node, i, what, (c,)) for i, what in
                              enumerate(('scale', 'bias', 'mean', 'var'), 1))
    if shift is not None:
      mean = mean - shift
    self.put(sd, name, node, weight=scale, bias=bias, running_mean=mean,
             running_var=var)
    return node.outputs[0]

  def prelu(self, x: str, c: int, name: str, sd: dict) -> str:
    node = self.take(x, 'PRelu')
    slope = self.param(node, 1, 'slope')
    s = () if slope is None else tuple(slope.shape)
    s4 = (1,) * (4 - len(s)) + s
    if (slope is None or len(s) > 4 or s4[0] != 1 or s4[2:] != (1, 1)
        or s4[1] not in (1, c)):
      raise LayoutError(f'{node.label}: its slope has the shape {s}, a '
                        f'per-channel PReLU of {c} channels needs ({c}, 1, '
                        '1)')
    self.put(sd, name, node, weight=np.broadcast_to(slope.reshape(-1), (c,)))
    return node.outputs[0]

  def add(self, a: str, b: str) -> str:
    node = self.take(a, 'Add', alone=False)
    if sorted(node.inputs) != sorted((a, b)):
      raise LayoutError(f'{node.label}: adds {list(node.inputs)}, where the '
                        f'structure adds {a!r} and {b!r}')
    return node.outputs[0]

  def flatten(self, x: str, size: int) -> str:
    node = self.take(x, 'Flatten', 'Reshape')
    if node.op == 'Flatten' and node.attrs.get('axis', 1) != 1:
      raise LayoutError(f'{node.label}: axis {node.attrs["axis"]}, where '
                        'the structure flattens from axis 1')
    if node.op == 'Reshape':
      shape = self.param(node, 1, 'shape')
      if shape is None or shape.shape != (2,) or shape[1] not in (-1, size):
        raise LayoutError(f'{node.label}: reshapes to {shape}, where the '
                          f'structure flattens to (N, {size})')
    return node.outputs[0]

  def linear(self, x: str, size: int) -> tuple[_Node, Any, Any, str]:
    """Gemm, or MatMul (+ Add): (node, weight (out, in), bias, output)."""
    node = self.take(x, 'Gemm', 'MatMul')
    w = self.param(node, 1, 'weight')
    if w is None or w.ndim != 2 or node.inputs[0] != x:
      raise LayoutError(f'{node.label}: not a linear layer of {x!r}')
    a = node.attrs
    if node.op == 'Gemm' and (a.get('transA', 0) or a.get('alpha', 1.0) != 1
                              or a.get('beta', 1.0) != 1):
      raise LayoutError(f'{node.label}: transA/alpha/beta {a}, where the '
                        'structure has 0, 1, 1')
    w = w if node.op == 'Gemm' and a.get('transB', 0) else w.T
    if w.shape[1] != size:
      raise LayoutError(f'{node.label}: its weight takes {w.shape[1]} '
                        f'features (weight {w.shape}, out x in), the graph '
                        f'gives it {size}')
    y = node.outputs[0]
    if node.op == 'Gemm':
      b = self.param(node, 2, 'bias')
      if b is not None and b.size != w.shape[0]:
        raise LayoutError(f'{node.label}: its bias has the shape {b.shape}, '
                          f'the graph needs ({w.shape[0]},)')
      return node, w, None if b is None else b.reshape(-1), y
    after = self.after(y)
    if len(after) == 1 and after[0].op == 'Add':
      add = self.take(y, 'Add')
      other = [i for i in add.inputs if i != y]
      b = self.param(add, add.inputs.index(other[0]), 'bias') if len(
          other) == 1 else None
      if b is None or b.size != w.shape[0]:
        self.fail(y, f'a bias of {w.shape[0]} values added')
      return node, w, b.reshape(-1), add.outputs[0]
    return node, w, None, y

  def head(self, x: str, c: int, side: int, sd: dict, names) -> str:
    """[BN,] flatten, linear, [BN]: the embedding; ``names``: the canonical
    (BN before, linear, BN after), the first None where there is none.
    A missing last BN is an identity one holding the linear's bias."""
    before, fc, features = names
    if before:
      x = self.bn(x, c, before, sd)
    x = self.flatten(x, c * side * side)
    node, w, b, x = self.linear(x, c * side * side)
    d = w.shape[0]
    after = self.after(x)
    if len(after) == 1 and after[0].op == 'BatchNormalization':
      self.put(sd, fc, node, weight=w, **({} if b is None else {'bias': b}))
      return self.bn(x, d, features, sd)
    zeros = np.zeros(d, np.float32)
    self.put(sd, fc, node, weight=w)
    self.put(sd, features, node, weight=np.ones(d),
             bias=zeros if b is None else b, running_mean=zeros,
             running_var=np.full(d, 1 - self.eps, np.float32))
    return x


def _ir_unit(g: _Graph, x: str, cin: int, p: str, stride: int,
             sd: dict) -> tuple[str, int]:
  """arcface_torch's IBasicBlock: BN, conv, BN, PReLU, conv (stride), BN,
  plus the shortcut (a 1x1 conv and BN where it downsamples)."""
  kinds = sorted(n.op for n in g.after(x))
  want = sorted(['BatchNormalization', 'Conv' if stride == 2 else 'Add'])
  if kinds != want:
    g.fail(x, f'an IR unit ({" and ".join(want)})')
  y = g.bn(x, cin, f'{p}.bn1', sd, alone=False)
  y, c = g.conv_bn(y, cin, 3, 1, f'{p}.conv1', f'{p}.bn2', sd)
  y = g.prelu(y, c, f'{p}.prelu', sd)
  y, c = g.conv_bn(y, c, 3, stride, f'{p}.conv2', f'{p}.bn3', sd)
  short = x
  if stride == 2:
    short, _ = g.conv_bn(x, cin, 1, 2, f'{p}.downsample.0',
                         f'{p}.downsample.1', sd, cout=c, alone=False)
  return g.add(y, short), c


def _ir_head_next(g: _Graph, x: str) -> bool:
  """Whether ``x`` goes to the embedding head (BN, then the flatten)."""
  after = g.after(x)
  return (len(after) == 1 and after[0].op == 'BatchNormalization' and
          any(n.op in ('Flatten', 'Reshape') for n in g.after(
              after[0].outputs[0])))


def _walk_iresnet(g: _Graph, x: str) -> tuple[dict, str]:
  """arcface_torch's IResNet: conv, BN, PReLU, four stages of units (each
  starting with a downsampling one), BN, flatten, fc, features BN."""
  sd: dict = {}
  x, c = g.conv_bn(x, 3, 3, 1, 'conv1', 'bn1', sd)
  x = g.prelu(x, c, 'prelu', sd)
  side, stage, i = IMAGE_SIZE, 0, 0
  while not _ir_head_next(g, x):
    down = any(n.op == 'Conv' for n in g.after(x))
    if down:
      stage, i, side = stage + 1, 0, side // 2
    if not stage or stage > 4:
      g.fail(x, 'a downsampling IR unit (four stages)' if not stage else
             'the head (BN, flatten) after four stages')
    x, c = _ir_unit(g, x, c, f'layer{stage}.{i}', 2 if down else 1, sd)
    i += 1
  if stage != 4:
    g.fail(x, f'more units: an IR ResNet has four stages, found {stage}')
  out = g.head(x, c, side, sd, ('bn2', 'fc', 'features'))
  sd.setdefault('fc.bias', np.zeros(sd['fc.weight'].shape[0], np.float32))
  return sd, out


def _mbf_block(g: _Graph, x: str, cin: int, base: str, stride: int,
               sd: dict, residual: bool) -> tuple[str, int]:
  """A Depth_Wise block: 1x1 + BN + PReLU, depthwise 3x3 + BN + PReLU, 1x1
  + BN, plus its input where residual."""
  y, e = g.conv_bn(x, cin, 1, 1, f'{base}.conv.conv', f'{base}.conv.bn', sd,
                   alone=not residual)
  y = g.prelu(y, e, f'{base}.conv.prelu', sd)
  y, _ = g.conv_bn(y, e, 3, stride, f'{base}.conv_dw.conv',
                   f'{base}.conv_dw.bn', sd, groups='depthwise', cout=e)
  y = g.prelu(y, e, f'{base}.conv_dw.prelu', sd)
  y, c = g.conv_bn(y, e, 1, 1, f'{base}.project.conv', f'{base}.project.bn',
                   sd, cout=cin if residual else None)
  return (g.add(y, x) if residual else y), c


def _mbf_residuals(g: _Graph, x: str, c: int, base: str, sd: dict) -> str:
  i = 0
  while sorted(n.op for n in g.after(x)) == ['Add', 'Conv']:
    x, c = _mbf_block(g, x, c, f'{base}.model.{i}', 1, sd, True)
    i += 1
  if not i:
    g.fail(x, f'a residual block ({base})')
  return x


def _walk_mobilefacenet(g: _Graph, x: str) -> tuple[dict, str]:
  """MobileFaceNet: conv/2 + PReLU, a (grouped) 3x3 conv or residual
  blocks, three downsampling blocks each with residual ones, 1x1 + PReLU,
  the GDC (depthwise 7x7, BN), flatten, linear, BN."""
  sd: dict = {}
  x, c = g.conv_bn(x, 3, 3, 2, 'conv1.conv', 'conv1.bn', sd)
  x = g.prelu(x, c, 'conv1.prelu', sd)
  first = [n for n in g.after(x) if n.op == 'Conv']
  kernel = first and first[0].inputs[1] in g.arrays and g.arrays[
      first[0].inputs[1]].shape[2:]
  if kernel == (3, 3):
    x, c = g.conv_bn(x, c, 3, 1, 'conv2_dw.conv', 'conv2_dw.bn', sd,
                     groups='any', cout=c)
    x = g.prelu(x, c, 'conv2_dw.prelu', sd)
  else:
    x = _mbf_residuals(g, x, c, 'conv_2', sd)
  for down, res in (('conv_23', 'conv_3'), ('conv_34', 'conv_4'),
                    ('conv_45', 'conv_5')):
    x, c = _mbf_block(g, x, c, down, 2, sd, False)
    x = _mbf_residuals(g, x, c, res, sd)
  x, c = g.conv_bn(x, c, 1, 1, 'conv_6_sep.conv', 'conv_6_sep.bn', sd)
  x = g.prelu(x, c, 'conv_6_sep.prelu', sd)
  side = IMAGE_SIZE // 16
  x, c = g.conv_bn(x, c, side, 1, 'conv_6_dw.conv', 'conv_6_dw.bn', sd,
                   groups='depthwise', cout=c)
  return sd, g.head(x, c, 1, sd, (None, 'linear', 'bn'))


class OnnxLayout(NamedTuple):
  layout: torch_layouts.Layout
  origin: dict  # canonical module -> the ONNX node it came from

  def label(self, module: str) -> str:
    node = self.origin.get(module)
    return f'{node} (as {module})' if node else module


def layout(model: OnnxModel) -> OnnxLayout:
  """The backbone the graph is, from its structure; LayoutError naming
  the node where it is not one this project has."""
  g = _Graph(model)
  stem = g.after(model.input_name)
  if len(stem) != 1 or stem[0].op != 'Conv':
    g.fail(model.input_name, 'the stem Conv alone (no normalisation in '
           'the graph: arcface_torch normalises outside it)')
  stride = list(stem[0].attrs.get('strides', [1, 1]))
  if stride not in ([1, 1], [2, 2]):
    raise LayoutError(f'{stem[0].label}: strides {stride}: neither the IR '
                      "ResNet's stem (1) nor MobileFaceNet's (2)")
  iresnet = stride == [1, 1]
  sd, out = (_walk_iresnet if iresnet else _walk_mobilefacenet)(
      g, model.input_name)
  if out != g.output:
    g.fail(out, f'the graph output {g.output!r}')
  rest = [n.label for n in g.nodes if n.index not in g.visited]
  if rest:
    raise LayoutError(f'{len(rest)} nodes outside the structure: '
                      f'{", ".join(rest[:5])}')
  unused = sorted(set(g.arrays) - g.used)
  family = 'ONNX ' + ('IR ResNet' if iresnet else 'MobileFaceNet')
  found = torch_layouts.canonical_layout(
      family, 'iresnet' if iresnet else 'mobilefacenet', sd, '', unused)
  if g.eps != EPS:
    found = found._replace(options={**found.options, 'bn_epsilon': g.eps})
  return OnnxLayout(found, g.origin)
