"""An MXNet graph (``mxnet_params.read_symbol``) computed in float64 NumPy,
so that an imported model can be checked against the source's own
computation without MXNet. Written from MXNet's documented operator
semantics (the operator docs of 1.x), op by op, not from a framework:

- Convolution: NCHW, weight (num_filter, C / num_group, kh, kw), bias
  unless no_bias; stride, pad, dilate default to 1, 0, 1.
- BatchNorm at inference: (x - moving_mean) / sqrt(moving_var + eps) *
  gamma + beta over axis 1, eps defaulting to 1e-3 and gamma read as 1
  when fix_gamma (the default); use_global_stats only changes training.
- Pooling: max / avg / sum; 'valid' floors the output size, 'full' rounds
  it up; an average counts the padded window (count_include_pad, the
  default) clipped to the padded input, a max never takes a pad (both as
  apache/mxnet ``src/operator/nn/pool.h``, ``pool_sum_2d_cpu`` at
  01749a7, computes them); global_pool pools all of H x W.
- FullyConnected: x (flattened to (N, -1) unless flatten=False) @ W.T + b.
- LeakyReLU: 'prelu' with a learnt per-channel gamma, 'leaky' with slope.
- Dropout is the identity at inference; scalar ops and additions as named.

Only the nodes the asked outputs need are computed; a needed op that is
not computed here (a loss, the classifier) is refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from npcface_jax.foreign import mxnet_params
from npcface_jax.foreign.mxnet_params import Graph, Node


class MxnetGraphError(ValueError):
  """A graph and its params that cannot be computed as asked."""


def _error(node: Node, what: str) -> MxnetGraphError:
  return MxnetGraphError(f'node {node.name!r} ({node.op}): {what}')


def _pair(node: Node, key: str, default: int) -> tuple[int, int]:
  value = node.attrs[key] or (default, default)
  if len(value) != 2:
    raise _error(node, f'{key}={value}: only 2-D (H, W) windows are computed')
  return value


# The most elements one intermediate array may hold: 512 MiB of float64,
# an r100 feature map for a batch of 64 at 112 x 112; a damaged pad or
# kernel would otherwise size an allocation. Run a bigger batch in parts.
MAX_ELEMENTS = 1 << 26


def _bounded(node: Node, *shapes) -> None:
  for shape in shapes:
    if int(np.prod(shape, dtype=object)) > MAX_ELEMENTS:
      raise _error(node, f'an array of shape {tuple(shape)} is over '
                   f'{MAX_ELEMENTS} elements: a damaged pad or kernel, or '
                   'a batch to run in parts')


def _window(size: int, k: int, s: int, p: int, d: int, full: bool) -> int:
  span = size + 2 * p - d * (k - 1) - 1
  return (-(-span // s) if full else span // s) + 1


def convolution(node: Node, x, w, b=None):
  a = node.attrs
  (kh, kw), (sh, sw) = _pair(node, 'kernel', 0), _pair(node, 'stride', 1)
  (ph, pw), (dh, dw) = _pair(node, 'pad', 0), _pair(node, 'dilate', 1)
  g, f = a['num_group'], a['num_filter']
  if x.ndim != 4 or a['layout'] not in ('None', 'NCHW'):
    raise _error(node, f'input of shape {x.shape}: NCHW 4-D input only')
  n, c, h, wd = x.shape
  if min(kh, kw, sh, sw, dh, dw, g) < 1 or c % g or f % g or (
      w.shape != (f, c // g, kh, kw)):
    raise _error(node, f'weight {w.shape} does not fit {c} input channels, '
                 f'num_filter {f}, num_group {g}, kernel {(kh, kw)}')
  ho = _window(h, kh, sh, ph, dh, False)
  wo = _window(wd, kw, sw, pw, dw, False)
  if ho < 1 or wo < 1:
    raise _error(node, f'kernel {(kh, kw)} is larger than the padded input')
  _bounded(node, (n, c, h + 2 * ph, wd + 2 * pw), (n, f, ho, wo))
  xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  xg = xp.reshape(n, g, c // g, *xp.shape[2:])
  wg = w.reshape(g, f // g, c // g, kh, kw)
  out = np.zeros((n, g, f // g, ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = xg[..., i * dh:i * dh + sh * (ho - 1) + 1:sh,
                 j * dw:j * dw + sw * (wo - 1) + 1:sw]
      out += np.einsum('ngchw,goc->ngohw', patch, wg[..., i, j])
  out = out.reshape(n, f, ho, wo)
  return out if b is None else out + _along_channels(node, b, out, f)


def _along_channels(node: Node, v, x, c: int):
  """A per-channel vector shaped to broadcast over axis 1 of x."""
  if v.shape != (c,):
    raise _error(node, f'a per-channel parameter of shape {v.shape} for {c} '
                 'channels')
  return v.reshape((1, c) + (1,) * (x.ndim - 2))


def batch_norm(node: Node, x, gamma, beta, mean, var):
  a = node.attrs
  if a['axis'] not in (1, -x.ndim + 1) or x.ndim < 2:
    raise _error(node, f'axis {a["axis"]} of input {x.shape}: only the '
                 'channel axis 1 is computed')
  c = x.shape[1]
  gamma, beta, mean, var = (_along_channels(node, v, x, c)
                            for v in (gamma, beta, mean, var))
  scale = 1.0 if a['fix_gamma'] else gamma
  return (x - mean) * (scale / np.sqrt(var + a['eps'])) + beta


def activation(node: Node, x):
  kind = node.attrs['act_type']
  if kind == 'relu':
    return np.maximum(x, 0.0)
  if kind == 'sigmoid':
    return 1.0 / (1.0 + np.exp(-x))
  if kind == 'tanh':
    return np.tanh(x)
  if kind == 'softrelu':
    return np.logaddexp(0.0, x)
  raise _error(node, f'act_type {kind!r} is not computed (relu, sigmoid, '
               'tanh, softrelu)')


def leaky_relu(node: Node, x, gamma=None):
  kind = node.attrs['act_type']
  if kind == 'prelu':
    c = x.shape[1] if x.ndim > 1 else 1
    slope = gamma if gamma.shape == (1,) else _along_channels(
        node, gamma, x, c)
  elif kind == 'leaky':
    slope = node.attrs['slope']
  else:
    raise _error(node, f'act_type {kind!r} is not computed (prelu, leaky)')
  return np.where(x > 0, x, slope * x)


def fully_connected(node: Node, x, w, b=None):
  a = node.attrs
  if a['flatten']:
    x = x.reshape(x.shape[0], -1)
  if w.shape != (a['num_hidden'], x.shape[-1]):
    raise _error(node, f'weight {w.shape} does not fit num_hidden '
                 f'{a["num_hidden"]} and {x.shape[-1]} inputs')
  y = x @ w.T
  if b is not None:
    if b.shape != (a['num_hidden'],):
      raise _error(node, f'bias {b.shape} for {a["num_hidden"]} outputs')
    y = y + b
  return y


def _pool_sizes(size: int, out: int, k: int, s: int, p: int,
                include_pad: bool):
  """Per output position, the count an average divides by: the window
  clipped to the padded input (MXNet's pool_size), or to the input
  itself without count_include_pad."""
  start = np.arange(out) * s - p
  end = np.minimum(start + k, size + p)
  if not include_pad:
    start, end = np.maximum(start, 0), np.minimum(end, size)
  return end - start


def pooling(node: Node, x):
  a = node.attrs
  if x.ndim != 4:
    raise _error(node, f'input of shape {x.shape}: NCHW 4-D input only')
  kind, convention = a['pool_type'], a['pooling_convention']
  if kind not in ('max', 'avg', 'sum') or convention not in ('valid', 'full'):
    raise _error(node, f'pool_type {kind!r} with {convention!r} is not '
                 'computed (max/avg/sum, valid/full)')
  n, c, h, w = x.shape
  if a['global_pool']:
    (kh, kw), (sh, sw), (ph, pw) = (h, w), (1, 1), (0, 0)
  else:
    (kh, kw), (sh, sw) = _pair(node, 'kernel', 0), _pair(node, 'stride', 1)
    ph, pw = _pair(node, 'pad', 0)
  full = convention == 'full' and not a['global_pool']
  if min(kh, kw, sh, sw) < 1:
    raise _error(node, f'kernel {(kh, kw)} and stride {(sh, sw)} must be '
                 'positive')
  ho, wo = (_window(h, kh, sh, ph, 1, full), _window(w, kw, sw, pw, 1, full))
  if ho < 1 or wo < 1:
    raise _error(node, f'kernel {(kh, kw)}, stride {(sh, sw)} do not fit '
                 f'the padded input {(h, w)}')
  # Pad far enough for the last window ('full' may reach past the padding):
  # -inf never wins a max, 0 adds nothing to a sum.
  extra_h = max(0, (ho - 1) * sh + kh - (h + 2 * ph))
  extra_w = max(0, (wo - 1) * sw + kw - (w + 2 * pw))
  _bounded(node, (n, c, h + 2 * ph + extra_h, w + 2 * pw + extra_w))
  fill = -np.inf if kind == 'max' else 0.0
  xp = np.pad(x, ((0, 0), (0, 0), (ph, ph + extra_h), (pw, pw + extra_w)),
              constant_values=fill)
  reduce = np.maximum if kind == 'max' else np.add
  out = None
  for i in range(kh):
    for j in range(kw):
      patch = xp[..., i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
      out = patch.copy() if out is None else reduce(out, patch)
  if kind == 'avg':
    count = np.outer(
        _pool_sizes(h, ho, kh, sh, ph, a['count_include_pad']),
        _pool_sizes(w, wo, kw, sw, pw, a['count_include_pad']))
    out = out / count
  return out


def _add(node: Node, x, y):
  if node.op != 'broadcast_add' and x.shape != y.shape:
    raise _error(node, f'adds shapes {x.shape} and {y.shape}, which differ')
  return _broadcast(node, x, y, np.add)


def _broadcast(node: Node, x, y, fn):
  try:
    np.broadcast_shapes(x.shape, y.shape)
  except ValueError:
    raise _error(node, f'shapes {x.shape} and {y.shape} do not '
                 'broadcast') from None
  return fn(x, y)


_SCALAR_OPS = {'_minus_scalar': np.subtract, '_plus_scalar': np.add,
               '_mul_scalar': np.multiply, '_div_scalar': np.divide}


def _compute(node: Node, args: list):
  """One computed op over its input values."""
  op = node.op
  if op == 'Convolution':
    return convolution(node, *args)
  if op == 'BatchNorm':
    return batch_norm(node, *args)
  if op == 'Activation':
    return activation(node, *args)
  if op == 'LeakyReLU':
    return leaky_relu(node, *args)
  if op == 'FullyConnected':
    return fully_connected(node, *args)
  if op == 'Pooling':
    return pooling(node, *args)
  if op in ('elemwise_add', '_Plus', '_plus', 'broadcast_add'):
    return _add(node, *args)
  if op == 'broadcast_mul':
    return _broadcast(node, *args, np.multiply)
  if op in _SCALAR_OPS:
    return _SCALAR_OPS[op](args[0], node.attrs['scalar'])
  if op in ('Flatten', 'flatten'):
    return args[0].reshape(args[0].shape[0], -1)
  if op in ('Dropout', '_copy', 'identity'):
    return args[0]
  raise _error(node, 'is not computed here')


def _variable(params: dict, name: str, node: Node):
  """A weight by the variable's name, as saved ('arg:' or 'aux:' first,
  then bare), as float64."""
  for key in (f'arg:{name}', f'aux:{name}', name):
    if key in params:
      return np.asarray(params[key], np.float64)
  raise _error(node, f'the variable {name!r} has no array in the params '
               f'(looked for arg:{name}, aux:{name}, {name}): the params file '
               'is not this graph\'s')


def _targets(graph: Graph, outputs: Sequence[str] | None) -> list[int]:
  if outputs is None:
    return [i for i, _ in graph.heads]
  by_name = {graph.output_name(i): i for i in range(len(graph.nodes))}
  missing = [o for o in outputs if o not in by_name]
  if missing:
    heads = [graph.output_name(i) for i, _ in graph.heads]
    raise MxnetGraphError(f'no output named {missing[:3]}; the heads are '
                          f'{heads}')
  return [by_name[o] for o in outputs]


def _needed(graph: Graph, targets: list[int]) -> dict[int, int]:
  """{node: how many needed nodes (or asked outputs) read it}, for every
  node the targets depend on; a needed op not computed here is refused."""
  uses, stack = {t: 0 for t in targets}, list(targets)
  for t in targets:
    uses[t] += 1
  seen = set()
  while stack:
    i = stack.pop()
    if i in seen:
      continue
    seen.add(i)
    node = graph.nodes[i]
    if node.op not in mxnet_params.COMPUTED_OPS:
      raise _error(node, 'is needed for the outputs asked and is not '
                   'computed here (recognition models end at fc1: ask for '
                   "outputs=['fc1_output'])")
    for j, _ in node.inputs:
      uses[j] = uses.get(j, 0) + 1
      stack.append(j)
  return uses


def _inputs(graph: Graph, node: Node, values: dict, params: dict) -> list:
  args = [values[j] for j, _ in node.inputs]
  if node.op == 'BatchNorm' and len(args) == 3:  # aux states not listed
    args += [_variable(params, f'{node.name}_{s}', node)
             for s in ('moving_mean', 'moving_var')]
  return args


def run(graph: Graph, params: dict[str, np.ndarray], images,
        outputs: Sequence[str] | None = None,
        data_name: str = 'data') -> dict[str, np.ndarray]:
  """{output name ('fc1_output'): float64 array} of the graph on images
  (N, C, H, W), as the graph expects them (insightface's graphs take RGB
  0-255 and subtract 127.5 and scale by 1/128 themselves). ``outputs``
  picks nodes by MXNet's output names (internal layers too); default the
  graph's heads."""
  images = np.asarray(images, np.float64)
  if images.ndim != 4:
    raise MxnetGraphError(f'images of shape {images.shape}: NCHW expected')
  try:
    return _run(graph, params, images, _targets(graph, outputs), data_name)
  except MxnetGraphError as e:
    if str(e).startswith(graph.path):
      raise
    raise MxnetGraphError(f'{graph.path}: {e}') from None


def _run(graph: Graph, params: dict, images, targets: list[int],
         data_name: str) -> dict[str, np.ndarray]:
  uses, values = _needed(graph, targets), {}
  for i in sorted(uses):
    node = graph.nodes[i]
    if node.op == 'null':
      values[i] = (images if node.name == data_name else
                   _variable(params, node.name, node))
    else:
      values[i] = _compute(node, _inputs(graph, node, values, params))
    for j, _ in node.inputs:
      uses[j] -= 1
      if not uses[j]:
        del values[j]  # no later node reads it
  return {graph.output_name(i): values[i] for i in targets}
