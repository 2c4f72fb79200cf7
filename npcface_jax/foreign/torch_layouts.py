"""Released PyTorch face networks' state dicts onto this project's backbones.

Four layouts are recognised from their tensors' names, wherever they sit
in the checkpoint (a bare state dict, FaceX-Zoo's ``state_dict`` /
``backbone.``, AdaFace's Lightning ``state_dict`` / ``model.``):

- 'arcface_torch iresnet': insightface arcface_torch's iresnet18..200
  (``layer1.0.bn1.weight``...);
- 'face.evoLVe IR': the IR / IR-SE ResNets of face.evoLVe as FaceX-Zoo
  (no BN before a unit's PReLU) and AdaFace (with it) have them
  (``input_layer.0.weight``, ``body.N.res_layer.M``...);
- 'arcface_torch mbf': arcface_torch's mobilefacenet.py (mbf, mbf_large);
- 'FaceX-Zoo MobileFaceNet' (``conv_23.conv.conv.weight``...).

Each is renamed to one canonical form per architecture (arcface_torch's
names for the IR ResNets, FaceX-Zoo's for MobileFaceNet), which
``reference_nets`` runs in NumPy and ``to_variables`` puts onto our
modules: a layer at a time, every shape checked against the backbone the
names describe (an error names the layer and both shapes), every tensor
used (the training head's weights, outside the backbone, are left out and
reported). The backbone's variant (depth, SE, shortcut, widths, embedding
size, biases) is read from the names and shapes; what weights cannot show
(BatchNorm's eps, the input's channel order and normalisation) is the
source's documented default, which the import command lets the user
override.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

# A name each layout always has, after its prefix.
_MARKERS = {
    'arcface_torch iresnet': 'layer1.0.conv1.weight',
    'face.evoLVe IR': 'input_layer.0.weight',
    'arcface_torch mbf': 'features.layers.0.layers.0.weight',
    'FaceX-Zoo MobileFaceNet': 'conv_23.conv.conv.weight',
}
_IR_PRESETS = {(2, 2, 2, 2): 'resnet18', (3, 4, 6, 3): 'resnet34',
               (3, 4, 14, 3): 'resnet50', (3, 13, 30, 3): 'resnet101',
               (6, 26, 60, 6): 'resnet200'}
_BN = ('weight', 'bias', 'running_mean', 'running_var')


class LayoutError(ValueError):
  """Tensors that do not make a backbone this project has."""


class Layout(NamedTuple):
  family: str
  prefix: str  # stripped from the checkpoint's names
  model: str  # models.create's name
  options: dict  # its model_options
  embedding_dim: int
  tensors: dict  # canonical name -> array (float32 or as stored)
  left_out: list  # checkpoint names outside the backbone
  # canonical layer or tensor -> the source's name, for errors (a layout
  # renamed from another framework's names: mxnet_layouts); None: as is
  names: dict | None = None


def _shown(layout: Layout, name: str) -> str:
  return (layout.names or {}).get(name, name)


def _find_prefix(names) -> tuple[str, str]:
  found = []
  for family, marker in _MARKERS.items():
    for name in names:
      if name.endswith(marker) and (name == marker or name[
          -len(marker) - 1] == '.'):
        found.append((family, name[:-len(marker)]))
  if len(found) != 1:
    what = ('none of ' + ', '.join(f'{f} ({m})' for f, m in _MARKERS.items())
            if not found else ', '.join(f"{f} under '{p}'" for f, p in found))
    raise LayoutError(f'the checkpoint does not hold one backbone this '
                      f'project knows: found {what}')
  return found[0]


def _evolve_unit(sd: dict, old: str, new: str, out: dict) -> None:
  """One face.evoLVe unit's res_layer (BN, conv, [BN], PReLU, conv, BN,
  [SE]) and shortcut_layer, in arcface_torch's names."""
  indices = sorted({int(n[len(old) + 11:].split('.')[0]) for n in sd
                    if n.startswith(f'{old}.res_layer.')})
  kinds = []
  for j in indices:
    p = f'{old}.res_layer.{j}'
    kinds.append('se' if f'{p}.fc1.weight' in sd else
                 'bn' if f'{p}.running_mean' in sd else
                 'conv' if sd.get(f'{p}.weight', np.zeros(0)).ndim == 4 else
                 'prelu')
  names = {('bn', 'conv', 'prelu', 'conv', 'bn'):
           ('bn1', 'conv1', 'prelu', 'conv2', 'bn3'),
           ('bn', 'conv', 'bn', 'prelu', 'conv', 'bn'):
           ('bn1', 'conv1', 'bn2', 'prelu', 'conv2', 'bn3')}
  plain = tuple(k for k in kinds if k != 'se')
  if plain not in names or kinds.count('se') > 1:
    raise LayoutError(f'{old}.res_layer holds {kinds}: not an IR unit '
                      '(BN, conv, [BN], PReLU, conv, BN, [SE])')
  targets = iter(names[plain])
  for j, kind in zip(indices, kinds):
    _move(sd, f'{old}.res_layer.{j}.', f'{new}.' + (
        'se' if kind == 'se' else next(targets)) + '.', out)
  _move(sd, f'{old}.shortcut_layer.0.', f'{new}.downsample.0.', out)
  _move(sd, f'{old}.shortcut_layer.1.', f'{new}.downsample.1.', out)


def _move(sd: dict, old: str, new: str, out: dict) -> None:
  for name in [n for n in sd if n.startswith(old)]:
    out[new + name[len(old):]] = sd.pop(name)


def _canonical_evolve(sd: dict) -> dict:
  sd, out = dict(sd), {}
  for j, name in enumerate(('conv1', 'bn1', 'prelu')):
    _move(sd, f'input_layer.{j}.', f'{name}.', out)
  for j, name in ((0, 'bn2'), (3, 'fc'), (4, 'features')):
    _move(sd, f'output_layer.{j}.', f'{name}.', out)
  units = sorted({int(n.split('.')[1]) for n in sd if n.startswith('body.')})
  stage, i = 1, 0
  for k in units:
    if k and f'body.{k}.shortcut_layer.0.weight' in sd:
      stage, i = stage + 1, 0
    _evolve_unit(sd, f'body.{k}', f'layer{stage}.{i}', out)
    i += 1
  return {**out, **sd}  # anything left is reported as unused


_BLOCK = {'0': 'conv', '1': 'bn', '2': 'prelu'}
_DEPTHWISE = {'0': 'conv', '1': 'conv_dw', '2': 'project'}


def _mbf_name(name: str) -> str:
  """arcface_torch's mobilefacenet.py name -> FaceX-Zoo's."""
  def block(rest):  # ConvBlock / LinearBlock: layers.{0,1,2}.X
    m = re.fullmatch(r'layers\.([012])\.(.+)', rest)
    return f'{_BLOCK[m[1]]}.{m[2]}' if m else rest

  def depthwise(rest):  # DepthWise: layers.{0,1,2}.<block>
    m = re.fullmatch(r'layers\.([012])\.(.+)', rest)
    return f'{_DEPTHWISE[m[1]]}.{block(m[2])}' if m else rest

  def residual(base, rest):  # Residual: layers.i.<depthwise>
    m = re.fullmatch(r'layers\.(\d+)\.(.+)', rest)
    return f'{base}.model.{m[1]}.{depthwise(m[2])}' if m else rest

  m = re.fullmatch(r'layers\.(\d)\.(.+)', name)
  if m:
    k, rest = int(m[1]), m[2]
    if k == 0:
      return 'conv1.' + block(rest)
    if k == 1:
      deep = rest.count('.') > 2  # a Residual's blocks, not a ConvBlock
      return residual('conv_2', rest) if deep else 'conv2_dw.' + block(rest)
    stages = {2: 'conv_23', 4: 'conv_34', 6: 'conv_45'}
    if k in stages:
      return f'{stages[k]}.{depthwise(rest)}'
    return residual({3: 'conv_3', 5: 'conv_4', 7: 'conv_5'}.get(k, name),
                    rest)
  for old, new in (('conv_sep.', 'conv_6_sep.'),
                   ('features.layers.0.', 'conv_6_dw.')):
    if name.startswith(old):
      return new + block(name[len(old):])
  for old, new in (('features.layers.2.', 'linear.'),
                   ('features.layers.3.', 'bn.')):
    if name.startswith(old):
      return new + name[len(old):]
  return name


def _stage_units(sd: dict) -> tuple:
  return tuple(len({n.split('.')[1] for n in sd
                    if n.startswith(f'layer{s}.')}) for s in range(1, 5))


def _ir_variant(sd: dict) -> tuple[str, dict, int]:
  units = _stage_units(sd)
  if not all(units):
    raise LayoutError(f'an IR ResNet needs units in all four stages, found '
                      f'{units}')
  options: dict[str, Any] = {}
  width = sd['conv1.weight'].shape[0] / 64  # reduced nets (tests, demos)
  if width != 1:
    options['width'] = width
  model = _IR_PRESETS.get(units, 'resnet50')
  if model == 'resnet50' and units != (3, 4, 14, 3):
    options['units'] = list(units)
  if any('.se.fc1.' in n for n in sd):
    if model == 'resnet50' and not options:
      model = 'se_resnet50'
    else:
      options['se'] = True
  if 'layer1.0.downsample.0.weight' not in sd:
    options['shortcut'] = 'subsample'
  if 'layer1.0.bn2.running_mean' not in sd:
    options['middle_bn'] = False
  return model, options, int(sd['fc.weight'].shape[0])


def _count(sd: dict, base: str) -> int:
  return len({n.split('.')[2] for n in sd if n.startswith(f'{base}.model.')})


def _mbf_variant(sd: dict) -> tuple[str, dict, int]:
  options: dict[str, Any] = {}
  width = sd['conv_6_sep.conv.weight'].shape[0] / 512  # 512 in every variant
  if width != 1:
    options['width'] = width
  stem = int(sd['conv1.conv.weight'].shape[0])
  if stem != round(64 * width):
    options['stem'] = round(stem / width)
  if 'conv2_dw.conv.weight' in sd:
    per_group = int(sd['conv2_dw.conv.weight'].shape[1])
    if per_group != 1:
      options['stem_groups'] = stem // per_group
    first = 1
  else:
    first = _count(sd, 'conv_2')
  stages = [round(sd[f'{b}.project.conv.weight'].shape[0] / width)
            for b in ('conv_23', 'conv_34', 'conv_45')]
  blocks = [first] + [_count(sd, b) for b in ('conv_3', 'conv_4', 'conv_5')]
  for stage, count in zip(('conv2_dw / conv_2', 'conv_3', 'conv_4', 'conv_5'),
                          blocks):
    if count < 1:
      raise LayoutError(f'a MobileFaceNet without its {stage} layers')
  if stages != [64, 128, 128]:
    options['stages'] = stages
  if blocks != [1, 4, 6, 2]:
    options['blocks'] = blocks
  if 'linear.bias' in sd:
    options['fc_bias'] = True
  return 'mobilefacenet', options, int(sd['linear.weight'].shape[0])


def detect(tensors: dict) -> Layout:
  """The layout, its backbone and the tensors in canonical names."""
  family, prefix = _find_prefix(tensors)
  sd = {n[len(prefix):]: v for n, v in tensors.items()
        if n.startswith(prefix) and not n.endswith('num_batches_tracked')}
  left_out = sorted(n for n in tensors if not n.startswith(prefix))
  try:
    if family == 'face.evoLVe IR':
      sd = _canonical_evolve(sd)
    elif family == 'arcface_torch mbf':
      sd = {_mbf_name(n): v for n, v in sd.items()}
  except (AttributeError, IndexError, ValueError, TypeError) as e:
    raise LayoutError(f'{family} (under prefix {prefix!r}) has a malformed '
                      f'layer name: {type(e).__name__}: {e}') from None
  architecture = ('iresnet' if family in ('arcface_torch iresnet',
                                          'face.evoLVe IR') else
                  'mobilefacenet')
  return canonical_layout(family, architecture, sd, prefix, left_out)


def canonical_layout(family: str, architecture: str, sd: dict,
                     prefix: str = '', left_out=()) -> Layout:
  """The Layout of tensors already in canonical names (``architecture``
  'iresnet': arcface_torch's; 'mobilefacenet': FaceX-Zoo's), its variant
  read from their names and shapes; ``detect`` and the ONNX import
  (onnx_layouts) both end here."""
  try:
    if architecture == 'iresnet':
      model, options, dim = _ir_variant(sd)
    else:
      model, options, dim = _mbf_variant(sd)
  except LayoutError:
    raise
  except KeyError as e:
    raise LayoutError(f'{family} without the layer {e.args[0]!r} (under '
                      f"prefix '{prefix}')") from None
  except (AttributeError, IndexError, ValueError, TypeError) as e:
    raise LayoutError(f'{family} (under prefix {prefix!r}) has a malformed '
                      f'layer: {type(e).__name__}: {e}') from None
  return Layout(family, prefix, model, options, dim, sd, list(left_out))


def _ir_entries(sd: dict, units, options: dict):
  """(canonical module, our module path, kind), the IR ResNet's layers."""
  yield 'conv1', ('Conv_0',), 'conv'
  yield 'bn1', ('BatchNorm_0',), 'bn'
  yield 'prelu', ('PReLU_0',), 'prelu'
  u = 0
  for stage, count in enumerate(units, 1):
    for i in range(count):
      p, q, bn = f'layer{stage}.{i}', f'_Unit_{u}', iter(range(4))
      yield f'{p}.bn1', (q, f'BatchNorm_{next(bn)}'), 'bn'
      yield f'{p}.conv1', (q, 'Conv_0'), 'conv'
      if options.get('middle_bn', True):
        yield f'{p}.bn2', (q, f'BatchNorm_{next(bn)}'), 'bn'
      yield f'{p}.prelu', (q, 'PReLU_0'), 'prelu'
      yield f'{p}.conv2', (q, 'Conv_1'), 'conv'
      yield f'{p}.bn3', (q, f'BatchNorm_{next(bn)}'), 'bn'
      if f'{p}.se.fc1.weight' in sd:
        yield f'{p}.se.fc1', (q, '_SqueezeExcite_0', 'Dense_0'), 'se'
        yield f'{p}.se.fc2', (q, '_SqueezeExcite_0', 'Dense_1'), 'se'
      if f'{p}.downsample.0.weight' in sd:
        yield f'{p}.downsample.0', (q, 'Conv_2'), 'conv'
        yield f'{p}.downsample.1', (q, f'BatchNorm_{next(bn)}'), 'bn'
      u += 1
  yield 'bn2', ('EmbeddingHead_0', 'BatchNorm_0'), 'bn'
  yield 'fc', ('EmbeddingHead_0', 'Dense_0'), 'dense_nchw'
  yield 'features', ('EmbeddingHead_0', 'BatchNorm_1'), 'bn'


def _conv_bn(sd: dict, src: str, path: tuple, depthwise: bool):
  yield (f'{src}.conv', (*path, 'DepthwiseConv_0' if depthwise else 'Conv_0'),
         'conv')
  yield f'{src}.bn', (*path, 'BatchNorm_0'), 'bn'
  if f'{src}.prelu.weight' in sd:
    yield f'{src}.prelu', (*path, 'PReLU_0'), 'prelu'


def _mbf_entries(sd: dict):
  """(canonical module, our module path, kind), MobileFaceNet's layers."""
  blocks, convs = iter(range(10 ** 6)), iter(range(4))
  yield from _conv_bn(sd, 'conv1', (f'_ConvBN_{next(convs)}',), False)
  residuals = ['conv_2', 'conv_23', 'conv_3', 'conv_34', 'conv_4', 'conv_45',
               'conv_5']
  if 'conv2_dw.conv.weight' in sd:
    w = sd['conv2_dw.conv.weight']
    yield from _conv_bn(sd, 'conv2_dw', (f'_ConvBN_{next(convs)}',),
                        w.shape[1] == 1 and w.shape[0] > 1)
  for base in residuals:
    members = ([base] if f'{base}.conv.conv.weight' in sd else
               [f'{base}.model.{i}' for i in range(_count(sd, base))])
    for src in members:
      q = f'_Bottleneck_{next(blocks)}'
      for part, inner, dw in (('conv', '_ConvBN_0', False),
                              ('conv_dw', '_ConvBN_1', True),
                              ('project', '_ConvBN_2', False)):
        yield from _conv_bn(sd, f'{src}.{part}', (q, inner), dw)
  yield from _conv_bn(sd, 'conv_6_sep', (f'_ConvBN_{next(convs)}',), False)
  yield from _conv_bn(sd, 'conv_6_dw', (f'_ConvBN_{next(convs)}',), True)
  yield 'linear', ('Dense_0',), 'dense'
  yield 'bn', ('BatchNorm_0',), 'bn'


def _converted(sd: dict, src: str, kind: str) -> dict:
  """{(collection, leaf): array} of one layer in our layout."""
  f32 = {n: np.asarray(v, np.float32) for n, v in sd.items()
         if n.startswith(src + '.')}
  w = f32.get(f'{src}.weight')
  if kind == 'bn':
    c = f32[f'{src}.running_mean'].shape[0]
    return {('params', 'scale'): f32.get(f'{src}.weight', np.ones(c, 'f4')),
            ('params', 'bias'): f32.get(f'{src}.bias', np.zeros(c, 'f4')),
            ('batch_stats', 'mean'): f32[f'{src}.running_mean'],
            ('batch_stats', 'var'): f32[f'{src}.running_var']}
  if kind == 'conv':
    return {('params', 'kernel'): w.transpose(2, 3, 1, 0)}
  if kind == 'prelu':
    return {('params', 'alpha'): w.reshape(-1)}
  if kind == 'se':
    return {('params', 'kernel'): w[:, :, 0, 0].T}
  out = {}
  if kind == 'dense_nchw':  # torch flattens (C, H, W), we (H, W, C)
    c = sd['bn2.running_mean'].shape[0]
    side = int(round((w.shape[1] // c) ** 0.5))
    w = w.reshape(w.shape[0], c, side, side).transpose(0, 2, 3, 1).reshape(
        w.shape[0], -1)
  out[('params', 'kernel')] = w.T
  if f'{src}.bias' in f32:
    out[('params', 'bias')] = f32[f'{src}.bias']
  return out


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def to_variables(layout: Layout, shapes: dict, label=None) -> dict:
  """{'params', 'batch_stats'} for the backbone whose ``jax.eval_shape``d
  variables are ``shapes``, from ``layout.tensors``; LayoutError naming
  the layer (``label(layer)`` where given: the ONNX import names its
  node) and both shapes where one differs, or what is missing or
  unused."""
  sd = layout.tensors
  label = label or (lambda src: _shown(layout, src))
  entries = (_mbf_entries(sd) if layout.model == 'mobilefacenet' else
             _ir_entries(sd, _stage_units(sd), layout.options))
  out, used = {}, set()
  for src, path, kind in entries:
    if not any(n.startswith(src + '.') for n in sd):
      raise LayoutError(f'{layout.family}: the layer {label(src)!r} is missing '
                        f'(expected by {layout.model} {layout.options})')
    try:
      converted = _converted(sd, src, kind)
    except (KeyError, AttributeError, IndexError, ValueError, TypeError) as e:
      raise LayoutError(f'{layout.family}: the layer {label(src)!r} is '
                        f'incomplete or malformed ({type(e).__name__}: '
                        f'{e})') from None
    for (collection, leaf), value in converted.items():
      node = shapes.get(collection, {})
      for key in (*path, leaf):
        node = node.get(key) if isinstance(node, dict) else None
      if node is None or tuple(node.shape) != value.shape:
        want = 'no such variable' if node is None else tuple(node.shape)
        raise LayoutError(f'{layout.family}: {label(src)} gives {collection} '
                          f'{"/".join((*path, leaf))} the shape '
                          f'{value.shape}; {layout.model} needs {want}')
      _set(out.setdefault(collection, {}), (*path, leaf), value)
    used.update(n for n in sd if n.startswith(src + '.'))
  _check_complete(layout, shapes, out, set(sd) - used)
  return out


def _leaves(tree: dict, prefix=()) -> set:
  if not isinstance(tree, dict):
    return {prefix}
  return set().union(*(_leaves(v, (*prefix, k)) for k, v in tree.items()))


def _check_complete(layout: Layout, shapes: dict, out: dict,
                    unused: set) -> None:
  missing = _leaves(dict(shapes)) - _leaves(out)
  if missing or unused:
    raise LayoutError(
        f'{layout.family} onto {layout.model} {layout.options}: '
        + (f'nothing for {sorted("/".join(m) for m in missing)[:5]} ' if
           missing else '')
        + (f'unused tensors {sorted(_shown(layout, n) for n in unused)[:5]}'
           if unused else ''))
