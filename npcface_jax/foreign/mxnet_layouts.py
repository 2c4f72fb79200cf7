"""insightface's MXNet recognition graphs onto this project's backbones.

A model-zoo model is a ``-symbol.json`` graph and a ``.params`` file
(``mxnet_params``). Two of insightface's symbol files are recognised, by
the layer names they give and then node by node, every node that the
embedding (the node 'fc1') depends on:

- 'insightface fresnet (LResNet-IR)': ``recognition/symbol/fresnet.py``
  with version_input 1 (conv0 3x3/1 + bn0 + relu0, a PReLU), the IR unit
  ``residual_unit_v3`` (stageS_unitU_ bn1, conv1, bn2, relu1, conv2 with
  the stride, bn3; conv1sc + sc on each stage's first unit) and the 'E'
  output (bn1, Dropout, pre_fc1, fc1): the model zoo's LResNet34/50/100E-IR
  and r100/r50 ArcFace models. Onto IResNet (resnet18 ... 200 or resnet50
  with its units), ``bn_epsilon`` from the graph (2e-5).
- 'insightface fmobilefacenet (y1)': ``recognition/symbol/fmobilefacenet.py``
  (conv_1, conv_2_dw, dconv_23 / res_3_blockK / dconv_34 / res_4 / dconv_45
  / res_5, conv_6sep) with the 'GDC' output (conv_6dw7_7, pre_fc1, fc1):
  the model zoo's MobileFaceNet "y1" (128-d). Onto MobileFaceNet with its
  options; MXNet's default BatchNorm eps (1e-3) in the body, fc1's own
  (2e-5) as ``head_bn_epsilon``, ``fc_bias`` for pre_fc1's bias.

Anything else (another first layer, an SE block, ReLU where a PReLU
belongs, a kernel, stride, pad or grouping that is not the source's) is
refused naming the first node that does not fit. The variant (depth,
widths, blocks, embedding size, eps, biases, the input side) is read from
the graph and the params' shapes; the params are renamed to
``torch_layouts``' canonical names (arcface_torch's for the IR,
FaceX-Zoo's for MobileFaceNet) and put onto our variables by
``torch_layouts.to_variables``: every shape checked, errors naming the
MXNet layer and both shapes, every param of the graph used (those outside
it, e.g. the fc7 classifier, listed in ``left_out``). MXNet's conv
weights are OIHW as torch's; FullyConnected flattens NCHW, so the IR's
pre_fc1 rows are permuted as for torch ('dense_nchw'); a BatchNorm with
fix_gamma (fc1) computes with gamma = 1 whatever the file holds, and ones
are loaded.

The graph's own preprocessing (fresnet's ``identity``, then
``_minus_scalar 127.5``, ``_mul_scalar 0.0078125``: any chain of scalar
ops on 'data') becomes the input contract, RGB as MXNet decodes; a graph
without one takes raw pixels (center 0, scale 1), which is what it is
recorded to take. ``Layout.graph`` is the graph with that chain made the
identity, so that the reference (mxnet_graph.run) and our backbone are fed
the same normalised inputs.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from npcface_jax.faces import images
from npcface_jax.foreign import torch_layouts
from npcface_jax.foreign.mxnet_params import Graph, Node

FRESNET = 'insightface fresnet (LResNet-IR)'
FMOBILEFACENET = 'insightface fmobilefacenet (y1)'
_FIRST = {'conv0': FRESNET, 'conv_1_conv2d': FMOBILEFACENET}
_PREPROCESS = ('identity', '_copy', '_minus_scalar', '_plus_scalar',
               '_mul_scalar', '_div_scalar')
# Ops that carry no weights and that our backbones compute implicitly: the
# residual additions, inference-time dropout, flattening before an FC.
_GLUE = ('elemwise_add', '_Plus', '_plus', 'Dropout', 'Flatten', 'flatten',
         'identity', '_copy')
_IR_PRESETS = {(2, 2, 2, 2): 'resnet18', (3, 4, 6, 3): 'resnet34',
               (3, 4, 14, 3): 'resnet50', (3, 13, 30, 3): 'resnet101',
               (6, 26, 60, 6): 'resnet200'}
LayoutError = torch_layouts.LayoutError


class Layout(NamedTuple):
  family: str
  model: str  # models.create's name
  options: dict  # its model_options
  embedding_dim: int
  image_size: int  # the input side the graph's shapes imply
  contract: images.InputContract  # the graph's preprocessing
  input_from: str  # that preprocessing, in words
  tensors: dict  # torch_layouts' canonical name -> array (as stored)
  names: dict  # canonical layer / tensor -> MXNet layer / param name
  fixed_gamma: list  # BatchNorms whose gamma MXNet ignores (fix_gamma)
  left_out: list  # params outside the embedding's graph
  graph: Graph  # the preprocessing made the identity


def _fail(node: Node, what: str) -> LayoutError:
  return LayoutError(f'node {node.name!r} ({node.op}) {what}')


def _ancestry(graph: Graph, target: int) -> list[int]:
  """The nodes ``target`` depends on, itself included, in graph order."""
  seen, stack = set(), [target]
  while stack:
    i = stack.pop()
    if i not in seen:
      seen.add(i)
      stack.extend(j for j, _ in graph.nodes[i].inputs)
  return sorted(seen)


def _affine(node: Node, a: float, b: float) -> tuple[float, float]:
  """y = a * x + b after one more scalar op."""
  s = node.attrs.get('scalar')
  if node.op == '_minus_scalar':
    return a, b - s
  if node.op == '_plus_scalar':
    return a, b + s
  if node.op == '_mul_scalar':
    return a * s, b * s
  if node.op == '_div_scalar':
    if not s:
      raise _fail(node, 'divides by 0')
    return a / s, b / s
  return a, b


def _preprocessing(graph: Graph, needed: list[int]):
  """(contract, in words, the chain's node indices, the first layer's
  index): the chain of scalar ops that 'data' goes through, composed into
  y = a * x + b."""
  data = [i for i in needed if graph.nodes[i].op == 'null' and
          graph.nodes[i].name == 'data']
  if not data:
    raise LayoutError("the embedding fc1 does not depend on a variable "
                      "'data': not an insightface recognition graph")
  a, b, chain, at, words = 1.0, 0.0, [], data[0], []
  while True:
    readers = [i for i in needed if (at, 0) in graph.nodes[i].inputs]
    if len(readers) != 1:
      raise _fail(graph.nodes[at], f'is read by {len(readers)} nodes; an '
                  'insightface graph feeds it to its first layer alone')
    node = graph.nodes[readers[0]]
    if node.op not in _PREPROCESS:
      break
    a, b = _affine(node, a, b)
    chain.append(readers[0])
    words.append(node.op if node.op in ('identity', '_copy') else
                 f'{node.op} {node.attrs["scalar"]:g}')
    at = readers[0]
  if not a > 0:
    raise _fail(node, f'follows an input scaling by {a:g}: not (x - center)'
                ' / scale with a positive scale')
  contract = images.InputContract('RGB', -b / a, 1 / a)
  said = (f'the graph\'s own preprocessing ({", ".join(words)}) on RGB, as '
          'MXNet decodes' if words else 'the graph normalises nothing: raw '
          'RGB pixels 0-255 (as MXNet\'s image iterators feed)')
  return contract, said, chain, readers[0]


def _arrays(graph: Graph, params: dict, node: Node) -> list[tuple[str, object]]:
  """(params key, array) of a node's weights: its variable inputs, and a
  BatchNorm's moving statistics when an old graph does not list them."""
  names = [graph.nodes[j].name for j, _ in node.inputs[1:]]
  if node.op == 'BatchNorm' and len(names) == 2:
    names += [f'{node.name}_moving_mean', f'{node.name}_moving_var']
  out = []
  for name in names:
    key = next((k for k in (f'arg:{name}', f'aux:{name}', name)
                if k in params), None)
    if key is None:
      raise _fail(node, f'reads the variable {name!r}, which the params file '
                  'does not hold: the params are not this graph\'s')
    out.append((key, params[key]))
  return out


def _conv(k: int, stride: int, pad: int, groups=1):
  """A Convolution's attributes; groups 'depthwise': one per filter."""
  return ('Convolution', dict(kernel=(k, k), stride=(stride, stride),
                              pad=(pad, pad), dilate=(1, 1),
                              num_group=groups, no_bias=True))


_BN = ('BatchNorm', dict(axis=1, output_mean_var=False))
_PRELU = ('LeakyReLU', dict(act_type='prelu'))


def _attr(node: Node, key: str):
  value = node.attrs.get(key)
  if key in ('stride', 'dilate'):
    return value or (1, 1)
  if key == 'pad':
    return value or (0, 0)
  if key == 'num_group' and value == node.attrs.get('num_filter') != 1:
    return 'depthwise'
  return value


def _check(node: Node, op: str, want: dict, family: str) -> None:
  if node.op != op:
    raise _fail(node, f'is where {family} has a {op}')
  for key, value in want.items():
    if _attr(node, key) != value:
      raise _fail(node, f'has {key}={_attr(node, key)}; {family} has '
                  f'{value} there')


def _ir_layers(units, fc_bias: bool):
  """(MXNet layer, canonical layer, (op, attributes)), fresnet's order."""
  yield 'conv0', 'conv1', _conv(3, 1, 1)
  yield 'bn0', 'bn1', _BN
  yield 'relu0', 'prelu', _PRELU
  for s, count in enumerate(units, 1):
    for u in range(1, count + 1):
      p, q = f'stage{s}_unit{u}', f'layer{s}.{u - 1}'
      yield f'{p}_bn1', f'{q}.bn1', _BN
      yield f'{p}_conv1', f'{q}.conv1', _conv(3, 1, 1)
      yield f'{p}_bn2', f'{q}.bn2', _BN
      yield f'{p}_relu1', f'{q}.prelu', _PRELU
      yield f'{p}_conv2', f'{q}.conv2', _conv(3, 2 if u == 1 else 1, 1)
      yield f'{p}_bn3', f'{q}.bn3', _BN
      if u == 1:
        yield f'{p}_conv1sc', f'{q}.downsample.0', _conv(1, 2, 0)
        yield f'{p}_sc', f'{q}.downsample.1', _BN
  yield 'bn1', 'bn2', _BN
  yield 'pre_fc1', 'fc', ('FullyConnected', dict(no_bias=not fc_bias,
                                                 flatten=True))
  yield 'fc1', 'features', _BN


def _mfn_conv(name: str, canonical: str, k, stride, pad, groups=1,
              act=True):
  """fmobilefacenet's Conv (act) / Linear: _conv2d, _batchnorm, _relu."""
  yield f'{name}_conv2d', f'{canonical}.conv', _conv(k, stride, pad, groups)
  yield f'{name}_batchnorm', f'{canonical}.bn', _BN
  if act:
    yield f'{name}_relu', f'{canonical}.prelu', _PRELU


def _dresidual(name: str, canonical: str, stride: int):
  yield from _mfn_conv(f'{name}_conv_sep', f'{canonical}.conv', 1, 1, 0)
  yield from _mfn_conv(f'{name}_conv_dw', f'{canonical}.conv_dw', 3, stride,
                       1, 'depthwise')
  yield from _mfn_conv(f'{name}_conv_proj', f'{canonical}.project', 1, 1, 0,
                       act=False)


_MFN_STAGES = (('dconv_23', 'conv_23', 'res_3', 'conv_3'),
               ('dconv_34', 'conv_34', 'res_4', 'conv_4'),
               ('dconv_45', 'conv_45', 'res_5', 'conv_5'))


def _mfn_layers(blocks, stem_groups, gdc: int, fc_bias: bool):
  yield from _mfn_conv('conv_1', 'conv1', 3, 2, 1)
  if blocks[0] == 1:
    yield from _mfn_conv('conv_2_dw', 'conv2_dw', 3, 1, 1,
                         stem_groups or 'depthwise')
  else:
    for k in range(blocks[0]):
      yield from _dresidual(f'res_2_block{k}', f'conv_2.model.{k}', 1)
  for (down, cdown, res, cres), count in zip(_MFN_STAGES, blocks[1:]):
    yield from _dresidual(down, cdown, 2)
    for k in range(count):
      yield from _dresidual(f'{res}_block{k}', f'{cres}.model.{k}', 1)
  yield from _mfn_conv('conv_6sep', 'conv_6_sep', 1, 1, 0)
  yield from _mfn_conv('conv_6dw7_7', 'conv_6_dw', gdc, 1, 0, 'depthwise',
                       act=False)
  yield 'pre_fc1', 'linear', ('FullyConnected', dict(no_bias=not fc_bias))
  yield 'fc1', 'bn', _BN


def _set_eps(family: str, nodes: dict, layers: list, options: dict) -> None:
  """bn_epsilon (and MobileFaceNet's head_bn_epsilon, fc1's) in options."""
  body = layers[:-1] if family == FMOBILEFACENET else layers
  options['bn_epsilon'] = _eps(nodes, body, family)
  if family == FMOBILEFACENET and nodes['fc1'].attrs['eps'] != options[
      'bn_epsilon']:
    options['head_bn_epsilon'] = nodes['fc1'].attrs['eps']


def _eps(nodes: dict, layers: list, family: str) -> float:
  """The one eps of the BatchNorms of ``layers`` (MXNet's default 1e-3
  where a graph leaves it out); a second value is refused by node."""
  found = {}
  for name, _, (op, _) in layers:
    if op == 'BatchNorm':
      found.setdefault(nodes[name].attrs['eps'], name)
  if len(found) > 1:
    first, other = list(found.items())[:2]
    raise _fail(nodes[other[1]], f'has eps {other[0]:g} where {first[1]!r} '
                f'has {first[0]:g}: {family} onto our backbone takes one '
                'BatchNorm eps')
  return next(iter(found), 1e-3)


def _count(nodes: dict, pattern: str) -> dict:
  """{group: count} of the distinct numbered layers a pattern matches."""
  out = {}
  for name in nodes:
    m = re.match(pattern, name)
    if m:
      out.setdefault(int(m[1]), set()).add(int(m[2]))
  return {k: len(v) for k, v in out.items()}


def _ir_variant(nodes: dict):
  """(model, options, embedding size, input side, layers) of fresnet."""
  per_stage = _count(nodes, r'stage(\d+)_unit(\d+)_')
  units = tuple(per_stage.get(s, 0) for s in range(1, 5))
  if sorted(per_stage) != [1, 2, 3, 4] or not all(units):
    raise LayoutError(f'{FRESNET} with units {per_stage} per stage: '
                      'IResNet has four stages')
  layers = list(_ir_layers(units, fc_bias=True))
  options: dict = {}
  width = nodes['conv0'].attrs['num_filter'] / 64
  if width != 1:
    options['width'] = width
  model = _IR_PRESETS.get(units, 'resnet50')
  if model == 'resnet50' and units != (3, 4, 14, 3):
    options['units'] = list(units)
  return model, options, nodes['pre_fc1'].attrs['num_hidden'], 112, layers


def _mfn_variant(nodes: dict):
  """(model, options, embedding size, input side, layers) of
  fmobilefacenet's y1."""
  options: dict = {}
  width = nodes['conv_6sep_conv2d'].attrs['num_filter'] / 512
  if width != 1:
    options['width'] = width
  stem = nodes['conv_1_conv2d'].attrs['num_filter']
  if stem != round(64 * width):
    options['stem'] = round(stem / width)
  stem_groups = None
  if 'conv_2_dw_conv2d' in nodes:
    groups = nodes['conv_2_dw_conv2d'].attrs['num_group']
    stem_groups = None if groups == stem else groups
    first = 1
  else:
    first = _count(nodes, r'res_(2)_block(\d+)_').get(2, 0)
  if stem_groups:
    options['stem_groups'] = stem_groups
  stages = [round(nodes[f'{down}_conv_proj_conv2d'].attrs['num_filter'] /
                  width) for down, *_ in _MFN_STAGES]
  counts = _count(nodes, r'res_(\d)_block(\d+)_')
  blocks = [first] + [counts.get(s, 0) for s in (3, 4, 5)]
  if stages != [64, 128, 128]:
    options['stages'] = stages
  if blocks != [1, 4, 6, 2]:
    options['blocks'] = blocks
  gdc = nodes['conv_6dw7_7_conv2d'].attrs['kernel'][0]
  fc_bias = not nodes['pre_fc1'].attrs['no_bias']
  if fc_bias:
    options['fc_bias'] = True
  layers = list(_mfn_layers(blocks, stem_groups, gdc, fc_bias))
  return ('mobilefacenet', options, nodes['pre_fc1'].attrs['num_hidden'],
          16 * gdc, layers)


def _walk(graph: Graph, needed: list, skip: set, layers: list,
          what: str) -> None:
  """Every node the embedding needs is a layer of ``layers`` with the
  source's op and attributes, or glue; the first that is not is named."""
  expected = {name: spec for name, _, spec in layers}
  present = set()
  for i in needed:
    node = graph.nodes[i]
    if node.op == 'null' or i in skip or node.op in _GLUE:
      continue
    if node.name not in expected:
      raise _fail(node, f'does not fit {what}: it has no such layer')
    _check(node, *expected[node.name], what.split(' onto ')[0])
    present.add(node.name)
  missing = [name for name in expected if name not in present]
  if missing:
    raise LayoutError(f'{what}: the graph lacks the layer {missing[0]!r}')


_LEAVES = {'Convolution': ('weight', 'bias'),
           'BatchNorm': ('weight', 'bias', 'running_mean', 'running_var'),
           'LeakyReLU': ('weight',), 'FullyConnected': ('weight', 'bias')}


def _tensors(graph: Graph, params: dict, nodes: dict, layers: list):
  """(canonical tensors, canonical -> MXNet names, fix_gamma BatchNorms)."""
  tensors, names, fixed = {}, {}, []
  for name, canonical, (op, _) in layers:
    node = nodes[name]
    names[canonical] = name
    for leaf, (key, array) in zip(_LEAVES[op], _arrays(graph, params, node)):
      if op == 'BatchNorm' and leaf == 'weight' and node.attrs['fix_gamma']:
        array = np.ones(array.shape, np.float32)  # what MXNet computes with
        fixed.append(name)
      tensors[f'{canonical}.{leaf}'] = array
      names[f'{canonical}.{leaf}'] = key
  return tensors, names, fixed


def _reference_graph(graph: Graph, chain: list, fc1: int) -> Graph:
  """The graph without its preprocessing (each step a copy), ending at
  fc1."""
  nodes = list(graph.nodes)
  for i in chain:
    nodes[i] = Node('_copy', nodes[i].name, {}, nodes[i].inputs)
  return graph._replace(nodes=tuple(nodes), heads=((fc1, 0),))


def detect(graph: Graph, params: dict) -> Layout:
  """The graph's layout, variant and weights in canonical names;
  LayoutError naming the first node (or layer) that does not fit."""
  ends = [i for i, n in enumerate(graph.nodes)
          if n.name == 'fc1' and n.op != 'null']
  if not ends:
    raise LayoutError("the graph has no node 'fc1', where insightface's "
                      'recognition graphs end the embedding')
  needed = _ancestry(graph, ends[-1])
  contract, said, chain, first = _preprocessing(graph, needed)
  family = _FIRST.get(graph.nodes[first].name)
  if family is None:
    raise _fail(graph.nodes[first], 'is the first layer: neither fresnet\'s '
                "'conv0' nor fmobilefacenet's 'conv_1_conv2d'; known layouts: "
                f'{FRESNET}, {FMOBILEFACENET}')
  nodes = {graph.nodes[i].name: graph.nodes[i] for i in needed
           if graph.nodes[i].op != 'null'}
  try:
    model, options, dim, size, layers = (
        _ir_variant if family == FRESNET else _mfn_variant)(nodes)
  except KeyError as e:
    raise LayoutError(f'{family} without the layer {e.args[0]!r}') from None
  _walk(graph, needed, set(chain), layers,
        f'{family} onto {model} {options}')
  _set_eps(family, nodes, layers, options)
  tensors, names, fixed = _tensors(graph, params, nodes, layers)
  used = {names[n] for n in tensors}
  return Layout(family, model, options, dim, size, contract, said, tensors,
                names, fixed, sorted(set(params) - used),
                _reference_graph(graph, chain, ends[-1]))


def to_variables(layout: Layout, shapes: dict) -> dict:
  """{'params', 'batch_stats'} for the backbone whose eval_shape'd
  variables are ``shapes``: torch_layouts.to_variables on the canonical
  tensors, its errors in the MXNet names."""
  return torch_layouts.to_variables(torch_layouts.Layout(
      layout.family, '', layout.model, layout.options, layout.embedding_dim,
      layout.tensors, layout.left_out, layout.names), shapes)
