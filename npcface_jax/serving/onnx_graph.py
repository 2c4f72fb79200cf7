"""A JAX function as an ONNX graph, built with the onnx package's own
helpers from the function's jaxpr.

The function is traced once with its batch dimension symbolic, so the
graph takes any batch. Everything that depends only on the weights is
computed here, in NumPy, while walking the jaxpr (BatchNorm in inference
mode folds to one scale and shift per channel), and each remaining
primitive becomes one or a few standard operators of opset 17. The
backbones need a small vocabulary: convolutions (grouped and dilated
included), max pooling, matrix products (any dot_general, as Einsum),
elementwise arithmetic, comparisons, select, sigmoid, reshapes and
transposes. A primitive outside it is an ``Unsupported`` error that names
it, so a new layer fails the export loudly rather than exporting wrong.
Tensors stay channels-first between convolutions (``_Chw``), and two
forms are chosen for onnxruntime's sake, each measured: PReLU as PRelu
(its Where was slow) and the logistic as 1 / (1 + exp(-x)) (its Sigmoid
approximates).

Why our own converter and not jax2onnx: benchmarks/RESULTS.md ("Export")
has the measurement; in short, jax2onnx cannot install beside our
orbax-checkpoint, pulls in 156 MB (sympy, netron, huggingface-hub,
equinox), and of five of our backbones it failed on two and was 10% off
on two.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import jax
import jax.extend as jex
import numpy as np
import onnx
from jax import export
from onnx import helper, numpy_helper

OPSET = 17
BATCH = 'batch'  # the name of the dynamic dimension in the graph's shapes
_INT64_MIN, _INT64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max


class Unsupported(ValueError):
  """A primitive (or a use of one) that has no ONNX translation here."""


# Elementwise primitives, as (ONNX operator, NumPy function for folding).
_UNARY = {
    'neg': ('Neg', np.negative), 'exp': ('Exp', np.exp),
    'log': ('Log', np.log), 'abs': ('Abs', np.abs),
    'sqrt': ('Sqrt', np.sqrt), 'tanh': ('Tanh', np.tanh),
    'not': ('Not', np.logical_not),
}
_BINARY = {
    'add': ('Add', np.add), 'sub': ('Sub', np.subtract),
    'mul': ('Mul', np.multiply), 'div': ('Div', np.divide),
    'max': ('Max', np.maximum), 'min': ('Min', np.minimum),
    'pow': ('Pow', np.power),
    'ge': ('GreaterOrEqual', np.greater_equal),
    'gt': ('Greater', np.greater), 'le': ('LessOrEqual', np.less_equal),
    'lt': ('Less', np.less), 'eq': ('Equal', np.equal),
    'and': ('And', np.logical_and), 'or': ('Or', np.logical_or),
}
_FOLD_UNARY = {  # their NumPy forms for folding; translated below
    'rsqrt': lambda x: 1 / np.sqrt(x), 'square': np.square,
    'logistic': lambda x: 1 / (1 + np.exp(-x)),
}
_CALLS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')  # params holding a sub-jaxpr


class _Chw(str):
  """A tensor name whose ONNX tensor holds the jaxpr's NHWC value in NCHW
  order: convolutions and pooling produce it, elementwise operators keep
  it, anything else gets the value back in NHWC by one Transpose. So the
  graph changes layout at its ends, not around every convolution."""


_TO_CHW, _TO_HWC = (0, 3, 1, 2), (0, 2, 3, 1)


class _Graph:
  """The nodes and initializers written so far; tensors are named strings,
  constants are NumPy arrays until an operator needs them as inputs."""

  def __init__(self):
    self.nodes, self.initializers = [], []
    self._names = itertools.count()
    self._consts: dict[tuple, str] = {}
    self._layout: dict[tuple[str, bool], str] = {}  # transposes made
    self.producer: dict[str, Any] = {}  # output name -> its node
    self.values: dict[str, np.ndarray] = {}  # initializer name -> value

  def chw(self, x: str) -> _Chw:
    if isinstance(x, _Chw):
      return x
    if (x, True) not in self._layout:
      self._layout[x, True] = self.node('Transpose', [x], perm=_TO_CHW)
    return _Chw(self._layout[x, True])

  def hwc(self, x):
    if not isinstance(x, _Chw):
      return x
    if (x, False) not in self._layout:
      self._layout[x, False] = self.node('Transpose', [x], perm=_TO_HWC)
    return self._layout[x, False]

  def fresh(self, hint: str) -> str:
    return f'{hint}_{next(self._names)}'

  def const(self, value: np.ndarray) -> str:
    value = np.ascontiguousarray(value)
    key = (value.dtype.str, value.shape, value.tobytes())
    if key not in self._consts:
      name = self.fresh('c')
      self.initializers.append(numpy_helper.from_array(value, name))
      self._consts[key], self.values[name] = name, value
    return self._consts[key]

  def tensor(self, value, dtype=None) -> str:
    if isinstance(value, str):
      return value
    return self.const(np.asarray(value, dtype))

  def node(self, op: str, inputs, **attrs) -> str:
    out = self.fresh(op.lower())
    self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
    self.producer[out] = self.nodes[-1]
    return out

  def used_by(self, *outputs: str) -> tuple[list, list]:
    """(nodes, initializers) that ``outputs`` depend on, in order: a
    rewritten pattern leaves its first form unused."""
    needed, nodes = set(outputs), []
    for node in reversed(self.nodes):
      if needed.intersection(node.output):
        nodes.append(node)
        needed.update(node.input)
    return nodes[::-1], [t for t in self.initializers if t.name in needed]

  def ints(self, values) -> str:
    return self.const(np.asarray(values, np.int64))


def _is_const(value) -> bool:
  return not isinstance(value, str)


def _dims(shape, what: str) -> list[int]:
  """Concrete sizes, the symbolic batch as -1 (at most one)."""
  out = [d if isinstance(d, int) else -1 for d in shape]
  if out.count(-1) > 1:
    raise Unsupported(f'{what} to shape {shape}: more than one symbolic size')
  return out


def _materialize(value: np.ndarray, aval) -> np.ndarray:
  """A constant kept with broadcastable size-1 dimensions, at full size."""
  if value.shape == tuple(aval.shape):
    return np.asarray(value, aval.dtype)
  if not all(isinstance(d, int) for d in aval.shape):
    raise Unsupported(f'a constant of shape {aval.shape} varies with batch')
  return np.broadcast_to(value, aval.shape).astype(aval.dtype)


# --- Translations of the primitives that stay in the graph -------------------

def _conv(g: _Graph, eqn, x, w) -> str:
  p = eqn.params
  if not _is_const(w):
    raise Unsupported('conv_general_dilated with a computed kernel')
  if any(d != 1 for d in p['lhs_dilation']) or p['batch_group_count'] != 1:
    raise Unsupported('transposed or batch-grouped convolution')
  lhs, rhs, out = p['dimension_numbers']
  pads = [lo for lo, _ in p['padding']] + [hi for _, hi in p['padding']]
  kernel = np.transpose(_materialize(w, eqn.invars[1].aval), rhs)
  nhwc = tuple(lhs) == tuple(out) == _TO_CHW
  x = g.chw(x) if nhwc else g.node('Transpose', [g.hwc(x)], perm=list(lhs))
  y = g.node('Conv', [x, g.const(kernel)],
             strides=list(p['window_strides']), pads=pads,
             dilations=list(p['rhs_dilation']),
             group=p['feature_group_count'])
  return _Chw(y) if nhwc else g.node('Transpose', [y],
                                     perm=list(np.argsort(out)))


def _max_pool(g: _Graph, eqn, x) -> str:
  p = eqn.params
  window, strides = p['window_dimensions'], p['window_strides']
  padding = p['padding']
  if (len(window) != 4 or window[0] != 1 or window[3] != 1
      or strides[0] != 1 or strides[3] != 1
      or any(d != 1 for d in p['base_dilation'])
      or padding[0] != (0, 0) or padding[3] != (0, 0)):
    raise Unsupported(f'reduce_window_max other than NHWC spatial pooling: '
                      f'window {window}, strides {strides}')
  y = g.node('MaxPool', [g.chw(x)],
             kernel_shape=list(window[1:3]), strides=list(strides[1:3]),
             pads=[padding[1][0], padding[2][0], padding[1][1],
                   padding[2][1]],
             dilations=list(p['window_dilation'][1:3]))
  return _Chw(y)


def _dot_general(g: _Graph, eqn, a, b) -> str:
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  ranks = [len(v.aval.shape) for v in eqn.invars]
  args = [g.tensor(_materialize(v, var.aval) if _is_const(v) else v)
          for v, var in zip((a, b), eqn.invars)]
  if ranks == [2, 2] and tuple(lc) == (1,) and tuple(rc) == (0,):
    return g.node('MatMul', args)
  letters = iter('abcdefghijklmnopqrstuvwxyz')
  left = [next(letters) for _ in range(ranks[0])]
  right = [next(letters) for _ in range(ranks[1])]
  for i, j in zip(tuple(lc) + tuple(lb), tuple(rc) + tuple(rb)):
    right[j] = left[i]
  out = ([left[i] for i in lb]
         + [s for i, s in enumerate(left) if i not in lc and i not in lb]
         + [s for j, s in enumerate(right) if j not in rc and j not in rb])
  equation = f"{''.join(left)},{''.join(right)}->{''.join(out)}"
  return g.node('Einsum', args, equation=equation)


def _broadcast(g: _Graph, eqn, x) -> str:
  shape, dims = eqn.params['shape'], eqn.params['broadcast_dimensions']
  new = [i for i in range(len(shape)) if i not in dims]
  if new:
    x = g.node('Unsqueeze', [x, g.ints(new)])
  # Expand broadcasts both ways, so a symbolic size given as 1 keeps x's.
  return g.node('Expand', [x, g.ints([d if isinstance(d, int) else 1
                                      for d in shape])])


def _slice(g: _Graph, eqn, x) -> str:
  p = eqn.params
  ends = [e if isinstance(e, int) else _INT64_MAX for e in p['limit_indices']]
  steps = p['strides'] or [1] * len(ends)
  return g.node('Slice', [x, g.ints(p['start_indices']), g.ints(ends),
                          g.ints(range(len(ends))), g.ints(steps)])


def _rev(g: _Graph, eqn, x) -> str:
  axes = list(eqn.params['dimensions'])
  return g.node('Slice', [x, g.ints([-1] * len(axes)),
                          g.ints([_INT64_MIN] * len(axes)), g.ints(axes),
                          g.ints([-1] * len(axes))])


def _pad(g: _Graph, eqn, x, value) -> str:
  config = eqn.params['padding_config']
  if any(interior or lo < 0 or hi < 0 for lo, hi, interior in config):
    raise Unsupported('pad with interior or negative padding')
  pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
  value = np.asarray(value, eqn.invars[1].aval.dtype)
  return g.node('Pad', [x, g.ints(pads), g.const(value)])


def _prelu_slope(g: _Graph, which, below, x) -> str | None:
  """The slope c when the select is where(x >= 0, x, x * c), else None."""
  test, scaled = g.producer.get(which), g.producer.get(below)
  if (test is None or scaled is None or test.op_type != 'GreaterOrEqual'
      or scaled.op_type != 'Mul' or test.input[0] != x
      or x not in scaled.input):
    return None
  zero = g.values.get(test.input[1])
  slope = [i for i in scaled.input if i != x]
  if zero is None or zero.any() or len(slope) != 1:
    return None
  return slope[0] if slope[0] in g.values else None


def _select(g: _Graph, eqn, which, *cases) -> str:
  """Where, or PRelu for where(x >= 0, x, x * c): onnxruntime's Where
  took 60% of MobileFaceNet's time."""
  if len(cases) != 2 or eqn.invars[0].aval.dtype != np.bool_:
    raise Unsupported('select_n other than a two-way select on a boolean')
  if isinstance(cases[1], str):
    slope = _prelu_slope(g, which, cases[0], cases[1])
    if slope is not None:
      return g.node('PRelu', [cases[1], slope])
  return g.node('Where', [g.tensor(which), g.tensor(cases[1]),
                          g.tensor(cases[0])])


def _cast(g: _Graph, eqn, x) -> str:
  to = eqn.params['new_dtype']
  if np.dtype(to) == eqn.invars[0].aval.dtype:
    return x
  return g.node('Cast', [x], to=helper.np_dtype_to_tensor_dtype(np.dtype(to)))


def _reduce(op: str) -> Callable:
  def translate(g: _Graph, eqn, x) -> str:
    axes = list(eqn.params['axes'])
    if op == 'ReduceSum':  # axes an input from opset 13, others from 18
      return g.node(op, [x, g.ints(axes)], keepdims=0)
    return g.node(op, [x], axes=axes, keepdims=0)
  return translate


def _logistic(g: _Graph, eqn, x) -> str:
  """1 / (1 + exp(-x)): onnxruntime's Sigmoid kernel approximates, and
  on SE-ResNet-50 it cost parity (minimum cosine to a float64 reference
  0.99975, against 0.99998 for JAX in float32 and for this form)."""
  one = g.const(np.asarray(1, eqn.invars[0].aval.dtype))
  exp = g.node('Exp', [g.node('Neg', [x])])
  return g.node('Div', [one, g.node('Add', [one, exp])])


def _integer_pow(g: _Graph, eqn, x) -> str:
  y = eqn.params['y']
  if y == 2:
    return g.node('Mul', [x, x])
  power = np.asarray(y, eqn.invars[0].aval.dtype)
  return g.node('Pow', [x, g.const(power)])


_TRANSLATE: dict[str, Callable] = {
    'conv_general_dilated': _conv,
    'reduce_window_max': _max_pool,
    'dot_general': _dot_general,
    'broadcast_in_dim': _broadcast,
    'slice': _slice,
    'rev': _rev,
    'pad': _pad,
    'select_n': _select,
    'convert_element_type': _cast,
    'integer_pow': _integer_pow,
    'logistic': _logistic,
    'reduce_sum': _reduce('ReduceSum'),
    'reduce_max': _reduce('ReduceMax'),
    'reduce_min': _reduce('ReduceMin'),
    'rsqrt': lambda g, eqn, x: g.node('Reciprocal', [g.node('Sqrt', [x])]),
    'square': lambda g, eqn, x: g.node('Mul', [x, x]),
    'copy': lambda g, eqn, x: x,
    'transpose': lambda g, eqn, x: g.node(
        'Transpose', [x], perm=list(eqn.params['permutation'])),
    'squeeze': lambda g, eqn, x: g.node(
        'Squeeze', [x, g.ints(eqn.params['dimensions'])]),
    'reshape': lambda g, eqn, x: g.node(
        'Reshape', [x, g.ints(_dims(eqn.params['new_sizes'], 'reshape'))]),
    'concatenate': lambda g, eqn, *xs: g.node(
        'Concat', [g.tensor(_materialize(x, v.aval) if _is_const(x) else x)
                   for x, v in zip(xs, eqn.invars)],
        axis=eqn.params['dimension']),
}


# --- Walking the jaxpr --------------------------------------------------------

def _fold(eqn, args: list) -> Any:
  """The value of an equation whose inputs are all constants."""
  name, avals = eqn.primitive.name, [v.aval for v in eqn.invars]
  if name in _UNARY or name in _BINARY:
    out = (_UNARY.get(name) or _BINARY[name])[1](*args)
    return np.asarray(out, eqn.outvars[0].aval.dtype)
  if name in _FOLD_UNARY:
    return np.asarray(_FOLD_UNARY[name](args[0]), avals[0].dtype)
  if name == 'broadcast_in_dim':  # keep size-1 dimensions: broadcast later
    shape, dims = eqn.params['shape'], eqn.params['broadcast_dimensions']
    lazy = [1] * len(shape)
    for i, d in enumerate(dims):
      lazy[d] = args[0].shape[i]
    return np.reshape(args[0], lazy)
  if name == 'convert_element_type':
    return np.asarray(args[0], eqn.params['new_dtype'])
  full = [_materialize(a, v) for a, v in zip(args, avals)]
  out = eqn.primitive.bind(*full, **eqn.params)
  return [np.asarray(o) for o in out] if eqn.primitive.multiple_results \
      else np.asarray(out)


def _translate(g: _Graph, eqn, args: list):
  name = eqn.primitive.name
  if name in _UNARY:
    return g.node(_UNARY[name][0], [args[0]])
  if name in _BINARY:
    a, b = args
    if name == 'max' and _is_const(b) and b.size == 1 and not b.any():
      return g.node('Relu', [a])
    dtype = eqn.invars[0].aval.dtype
    return g.node(_BINARY[name][0], [g.tensor(a, dtype), g.tensor(b, dtype)])
  if name not in _TRANSLATE:
    raise Unsupported(f'JAX primitive {name!r} has no ONNX translation here')
  return _TRANSLATE[name](g, eqn, *args)


_ELEMENTWISE = frozenset(_UNARY) | frozenset(_BINARY) | {
    'select_n', 'logistic', 'integer_pow', 'square', 'rsqrt',
    'convert_element_type', 'copy'}


def _in_layout(g: _Graph, eqn, args: list):
  """_translate, elementwise operators on channels-first tensors kept
  channels-first (their rank-4 constants transposed to match), every
  other operator given NHWC; convolutions and pooling choose their own."""
  name = eqn.primitive.name
  if name in ('conv_general_dilated', 'reduce_window_max'):
    return _translate(g, eqn, args)
  if name in _ELEMENTWISE and any(isinstance(a, _Chw) for a in args):
    args = [np.transpose(a, _TO_CHW) if _is_const(a) and a.ndim == 4
            else a if _is_const(a) else g.chw(a) for a in args]
    return _Chw(_translate(g, eqn, args))
  return _translate(g, eqn, [g.hwc(a) for a in args])


def _walk(g: _Graph, closed, args: list) -> list:
  jaxpr, env = closed.jaxpr, {}

  def read(v):
    if isinstance(v, jex.core.Literal):
      return np.asarray(v.val, v.aval.dtype)
    return env[v]

  env.update(zip(jaxpr.constvars, [np.asarray(c) for c in closed.consts]))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    call = next((eqn.params[k] for k in _CALLS if k in eqn.params), None)
    if call is not None:
      outs = _walk(g, call, ins)
    elif all(_is_const(a) for a in ins):
      outs = _fold(eqn, ins)
    else:
      outs = _in_layout(g, eqn, ins)
    if not eqn.primitive.multiple_results and call is None:
      outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def to_onnx(fn: Callable, shape: tuple[int, ...], dtype, *,
            input_name: str = 'images',
            output_name: str | tuple[str, ...] = 'embeddings',
            doc: str = '') -> onnx.ModelProto:
  """``fn`` (one array in; one out, or a tuple of as many as
  ``output_name`` names) as an ONNX model whose input has ``shape`` after
  a dynamic batch dimension; checked by onnx.checker."""
  names = (output_name,) if isinstance(output_name, str) else tuple(
      output_name)
  batch, = export.symbolic_shape(BATCH)
  spec = jax.ShapeDtypeStruct((batch,) + tuple(shape), dtype)
  closed = jax.make_jaxpr(fn)(spec)
  if len(closed.jaxpr.outvars) != len(names):
    raise ValueError(f'the function returns {len(closed.jaxpr.outvars)} '
                     f'arrays but {len(names)} output names were given')
  g = _Graph()
  for out, name in zip(_walk(g, closed, [input_name]), names):
    if _is_const(out):
      raise Unsupported(f'the output {name} does not depend on the input')
    g.node('Identity', [g.hwc(out)])
    g.nodes[-1].output[0] = name
  nodes, initializers = g.used_by(*names)

  def info(name, aval):
    dims = [d if isinstance(d, int) else BATCH for d in aval.shape]
    return helper.make_tensor_value_info(
        name, helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype)), dims)

  graph = helper.make_graph(
      nodes, 'npcface_jax', [info(input_name, spec)],
      [info(name, v.aval) for name, v in zip(names, closed.jaxpr.outvars)],
      initializers)
  model = helper.make_model(graph, producer_name='npcface_jax',
                            opset_imports=[helper.make_opsetid('', OPSET)],
                            doc_string=doc)
  model.ir_version = 8  # readable by every runtime that supports opset 17
  onnx.checker.check_model(model, full_check=True)
  return model
