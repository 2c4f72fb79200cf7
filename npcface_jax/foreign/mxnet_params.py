"""MXNet checkpoints (``model-symbol.json`` + ``model-0000.params``, as
insightface's model zoo ships them) read without MXNet: the weights as
NumPy arrays, the graph as checked nodes. Nothing the files hold is run or
imported; every length is checked against the bytes left before anything
is allocated, and a damaged file is refused naming the file, the byte
offset (or the node) and what was found.

The params layout, as MXNet writes and reads it (checked against
apache/mxnet ``src/ndarray/ndarray.cc``: ``NDArray::Save``,
``NDArray::Load``, ``LegacyLoad``, ``LegacyTShapeLoad`` and the list form
``NDArray::Save(fo, data, names)`` with ``kMXAPINDArrayListMagic``, both
at commit 004e7ea (V1/V2 only) and at a 1.x revision with
``NDARRAY_V3_MAGIC``; ``mxnet::Tuple::Save`` in ``include/mxnet/tuple.h``
at 002f6f9; ``mx.nd.save`` calls ``MXNDArraySave``, i.e. the list form),
all little-endian:

- the list: uint64 magic 0x112, uint64 reserved, uint64 array count, the
  arrays, uint64 name count (0 or the array count), each name as uint64
  length + bytes ('arg:'/'aux:' prefixes as MXNet wrote them);
- an array, V2 (0xF993fac9) or V3 (0xF993faca, NumPy shape semantics):
  int32 storage type (0 dense; 1 row_sparse and 2 csr would carry a
  storage shape and aux data: refused), the shape as int32 ndim + int64
  dims; V1 (0xF993fac8): the same shape, no storage type; legacy (no
  magic): the first uint32 is ndim, then uint32 dims. Then, unless the
  array is none (ndim 0 before V3, -1 in V3): int32 dev_type + int32
  dev_id, int32 type flag, the raw data. The brief this was written to
  said uint32 dims for V1 as well; MXNet's source says "version 1, with
  int64_t TShape" and reads it with ``TShape::Load``, which is what is
  read here.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

import numpy as np

from npcface_jax.common import jsonfile

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
NDARRAY_V3_MAGIC = 0xF993FACA
# mshadow's type flags (mshadow/base.h TypeFlag); later ones (bool,
# bfloat16) never hold a face model's weights.
DTYPES = {0: '<f4', 1: '<f8', 2: '<f2', 3: 'u1', 4: '<i4', 5: 'i1', 6: '<i8'}
_STORAGE = {1: 'row_sparse', 2: 'csr'}
# MXNet's shapes are at most a few dimensions; a bigger ndim is damage, and
# it would otherwise size a read.
MAX_NDIM = 32
MAX_NAME_BYTES = 1 << 16


class MxnetFileError(ValueError):
  """A params or symbol file that is not what MXNet writes."""


def _fail(path, where: str, what: str) -> MxnetFileError:
  return MxnetFileError(f'{path}: {where}: {what}')


class _Reader:
  """Little-endian fields of ``data``, each read checked against the bytes
  that are left."""

  def __init__(self, path, data: bytes):
    self.path, self.data, self.pos = path, data, 0

  def left(self) -> int:
    return len(self.data) - self.pos

  def fail(self, what: str, at: int | None = None) -> MxnetFileError:
    return _fail(self.path, f'byte {self.pos if at is None else at}', what)

  def take(self, n: int, what: str) -> memoryview:
    if n > self.left():
      raise self.fail(f'{what} needs {n} bytes, {self.left()} are left (the '
                      'file is cut short or a length is damaged)')
    self.pos += n
    return memoryview(self.data)[self.pos - n:self.pos]

  def uint(self, width: int, what: str, signed: bool = False) -> int:
    return int.from_bytes(self.take(width, what), 'little', signed=signed)

  def count(self, what: str, min_bytes: int) -> int:
    """A uint64 count of items of at least min_bytes each: bounded by what
    the rest of the file could hold."""
    at, n = self.pos, self.uint(8, f'the count of {what}')
    if n * min_bytes > self.left():
      raise self.fail(f'{n} {what} cannot fit in the {self.left()} bytes '
                      'that are left (a damaged count)', at)
    return n


def _shape(r: _Reader, magic: int) -> tuple[int, ...] | None:
  """The array's shape; None for a 'none' array (no data follows)."""
  at = r.pos
  if magic in (NDARRAY_V1_MAGIC, NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
    ndim, width = r.uint(4, 'ndim', signed=True), 8
  else:
    ndim, width, at = magic, 4, at - 4  # legacy: the first word was ndim
  if ndim == -1 and magic == NDARRAY_V3_MAGIC:
    return None
  if ndim == 0 and magic != NDARRAY_V3_MAGIC:
    return None
  if not 0 <= ndim <= MAX_NDIM:
    raise r.fail(f'ndim {ndim} (read as {magic:#x} when legacy) is neither '
                 'an NDArray magic nor a shape of at most '
                 f'{MAX_NDIM} dimensions', at)
  dims = tuple(r.uint(width, 'a dimension', signed=width == 8)
               for _ in range(ndim))
  if any(d < 0 for d in dims):
    raise r.fail(f'shape {dims} has a negative (unknown) dimension', at)
  return dims


def _ndarray(r: _Reader, index: int) -> np.ndarray:
  at = r.pos
  magic = r.uint(4, f'array {index}')
  if magic in (NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
    stype = r.uint(4, 'the storage type', signed=True)
    if stype != 0:
      raise r.fail(f'array {index} has {_STORAGE.get(stype, "unknown")} '
                   f'storage (type {stype}); only dense arrays are read: save '
                   "the weights dense (arr.tostype('default'))", at)
  shape = _shape(r, magic)
  if shape is None:
    raise r.fail(f'array {index} is a none (never initialised) NDArray; a '
                 "model's parameters always have a shape", at)
  r.take(8, 'the context (dev_type, dev_id)')
  flag_at, flag = r.pos, r.uint(4, 'the type flag', signed=True)
  if flag not in DTYPES:
    raise r.fail(f'array {index} has type flag {flag}, not one of '
                 f'{sorted(DTYPES)} (float32 ... int64)', flag_at)
  dtype = np.dtype(DTYPES[flag])
  size = int(np.prod(shape, dtype=object)) if shape else 1
  raw = r.take(size * dtype.itemsize, f'array {index} of shape {shape} '
               f'({dtype.name})')
  return np.frombuffer(raw, dtype).reshape(shape).copy()


def _names(r: _Reader, count: int) -> list[str]:
  at = r.pos
  n = r.count('names', 8)
  if n != count:
    raise r.fail(f'{n} names for {count} arrays: a params file names every '
                 'array (mx.nd.save of a dict, or Module.save_checkpoint)',
                 at)
  names = []
  for _ in range(n):
    at, length = r.pos, r.uint(8, 'a name length')
    if length > MAX_NAME_BYTES:
      raise r.fail(f'a name of {length} bytes (at most {MAX_NAME_BYTES})', at)
    try:
      names.append(str(r.take(length, 'a name'), 'utf-8'))
    except UnicodeDecodeError:
      raise r.fail('a name that is not UTF-8 text', at + 8) from None
    if names[-1] in names[:-1]:
      raise r.fail(f'the name {names[-1]!r} twice', at)
  return names


def read_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: array} of an MXNet ``.params`` file (names as saved, with
  their 'arg:' / 'aux:' prefixes), dtypes as stored (float16 stays
  float16); MxnetFileError naming the file and the byte offset otherwise."""
  with open(path, 'rb') as f:
    r = _Reader(path, f.read())
  magic = r.uint(8, 'the list magic')
  if magic != LIST_MAGIC:
    raise r.fail(f'starts with {magic:#x}, not the NDArray list magic '
                 f'{LIST_MAGIC:#x}: not an MXNet .params file', 0)
  r.take(8, 'the reserved word')
  count = r.count('arrays', 4)
  arrays = [_ndarray(r, i) for i in range(count)]
  names = _names(r, count)
  if r.left():
    raise r.fail(f'{r.left()} bytes follow the last name')
  return dict(zip(names, arrays))


# --- The symbol JSON ---------------------------------------------------------

# Ops the interpreter (mxnet_graph.run) computes, and the ops of training
# graphs it recognises but does not (losses, the classifier's norms): a
# graph may hold them, a head that needs one is refused by name.
COMPUTED_OPS = frozenset((
    'null', 'Convolution', 'BatchNorm', 'Activation', 'LeakyReLU',
    'elemwise_add', '_Plus', '_plus', 'broadcast_add', 'broadcast_mul',
    '_minus_scalar', '_plus_scalar', '_mul_scalar', '_div_scalar', '_copy',
    'identity', 'Flatten', 'flatten', 'Dropout', 'FullyConnected', 'Pooling'))
OTHER_OPS = frozenset((
    'SoftmaxOutput', 'softmax', 'log_softmax', 'SoftmaxActivation',
    'L2Normalization', 'norm', 'broadcast_div', 'elemwise_mul', 'pick',
    'one_hot', 'MakeLoss', 'BlockGrad', 'LinearRegressionOutput', 'Reshape',
    'sum', 'mean', 'sqrt', 'tile', 'SliceChannel', 'Concat', 'clip', 'exp',
    'log', 'square', '_mul', '_Mul', '_minus', '_Minus', '_rminus_scalar',
    'zeros_like', 'ones_like', 'arccos', 'cos', 'Embedding'))
MAX_NODES = 200_000
MAX_INPUTS = 64


class Node(NamedTuple):
  op: str
  name: str
  attrs: dict[str, Any]  # the op's parameters parsed, others as strings
  inputs: tuple[tuple[int, int], ...]  # (node index, output index)


class Graph(NamedTuple):
  nodes: tuple[Node, ...]
  arg_nodes: tuple[int, ...]
  heads: tuple[tuple[int, int], ...]
  path: str

  def output_name(self, index: int) -> str:
    """MXNet's name of a node's (first) output: 'fc1' -> 'fc1_output'."""
    node = self.nodes[index]
    return node.name if node.op == 'null' else f'{node.name}_output'


_INT = re.compile(r'-?\d{1,18}L?')
_FLOAT = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d{1,3})?')
_BOOLS = {'True': True, 'true': True, '1': True,
          'False': False, 'false': False, '0': False}
_REQUIRED = object()


def _int(text: str) -> int:
  if not _INT.fullmatch(text.strip()):
    raise ValueError(f'{text!r} is not an integer')
  return int(text.strip().rstrip('L'))


def _float(text: str) -> float:
  if not _FLOAT.fullmatch(text.strip()) or not np.isfinite(float(text)):
    raise ValueError(f'{text!r} is not a finite number')
  return float(text)


def _bool(text: str) -> bool:
  if text.strip() not in _BOOLS:
    raise ValueError(f'{text!r} is not True/False')
  return _BOOLS[text.strip()]


def _tuple(text: str) -> tuple[int, ...]:
  """MXNet's shape strings: '(3, 3)', '[3,3]', '(2L, 2L)', '3', '()'."""
  text = text.strip()
  if text[:1] + text[-1:] in ('()', '[]'):
    text = text[1:-1]
  items = [t for t in text.split(',') if t.strip()] if text.strip() else []
  if len(items) > MAX_NDIM:
    raise ValueError(f'a tuple of {len(items)} items')
  values = tuple(_int(t) for t in items)
  if any(v < 0 for v in values):
    raise ValueError(f'{values} has a negative item')
  return values


def _str(text: str) -> str:
  return text


_WINDOW = dict(kernel=(_tuple, ()), stride=(_tuple, ()), pad=(_tuple, ()))
_SCALAR = dict(scalar=(_float, 1.0))
# The parameters of each op that the interpreter uses, parsed, with MXNet's
# defaults (BatchNorm's eps is 1e-3 and fix_gamma True unless the graph
# says otherwise); any other attribute stays the string MXNet wrote.
SCHEMA = {
    'Convolution': dict(_WINDOW, dilate=(_tuple, ()), num_filter=(
        _int, _REQUIRED), num_group=(_int, 1), no_bias=(_bool, False),
        layout=(_str, 'None')),
    'BatchNorm': dict(eps=(_float, 1e-3), fix_gamma=(_bool, True),
                      use_global_stats=(_bool, False), axis=(_int, 1),
                      output_mean_var=(_bool, False)),
    'Activation': dict(act_type=(_str, _REQUIRED)),
    'LeakyReLU': dict(act_type=(_str, 'leaky'), slope=(_float, 0.25)),
    'FullyConnected': dict(num_hidden=(_int, _REQUIRED),
                           no_bias=(_bool, False), flatten=(_bool, True)),
    'Pooling': dict(_WINDOW, pool_type=(_str, 'max'),
                    global_pool=(_bool, False),
                    pooling_convention=(_str, 'valid'),
                    count_include_pad=(_bool, True)),
    'Dropout': dict(p=(_float, 0.5)),
    '_minus_scalar': _SCALAR, '_plus_scalar': _SCALAR,
    '_mul_scalar': _SCALAR, '_div_scalar': _SCALAR,
}


def _raw_attrs(node: dict, where) -> dict[str, str]:
  """The node's attributes under any of MXNet's three spellings: 'param'
  (0.8), 'attr' (0.9 to 1.0), 'attrs' (1.x); every value a string."""
  merged = {}
  for key in ('param', 'attr', 'attrs'):
    attrs = node.get(key, {})
    if not isinstance(attrs, dict):
      raise where(f"'{key}' is a JSON {type(attrs).__name__}, not an object")
    for name, value in attrs.items():
      if not isinstance(value, str):
        raise where(f'attribute {name!r} is {value!r}, not the string MXNet '
                    'writes')
      merged[name] = value
  return merged


def _attrs(op: str, raw: dict[str, str], where) -> dict[str, Any]:
  parsed = dict(raw)
  for name, (parse, default) in SCHEMA.get(op, {}).items():
    if name not in raw:
      if default is _REQUIRED:
        raise where(f'{op} needs the attribute {name!r}')
      parsed[name] = default
      continue
    try:
      parsed[name] = parse(raw[name])
    except ValueError as e:
      raise where(f'attribute {name}={raw[name][:80]!r}: {e}') from None
  return parsed


def input_count(op: str, attrs: dict) -> tuple[int, ...]:
  """How many inputs a node of ``op`` lists (None: any). BatchNorm lists
  its two aux states in 1.x graphs; the oldest ones may leave them out."""
  if op in ('Convolution', 'FullyConnected'):
    return (2 if attrs['no_bias'] else 3,)
  if op == 'BatchNorm':
    return (5, 3)
  if op == 'LeakyReLU':
    return (2,) if attrs['act_type'] == 'prelu' else (1,)
  if op in ('elemwise_add', '_Plus', '_plus', 'broadcast_add',
            'broadcast_mul'):
    return (2,)
  if op == 'null':
    return (0,)
  return (1,) if op in COMPUTED_OPS else ()


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _entry(value, count: int, before: int, where, what: str):
  """One [node, output(, version)] reference, checked: the node exists and,
  for a node's inputs, comes before it (no cycle, no forward reference)."""
  if (not isinstance(value, list) or len(value) not in (2, 3)
      or not all(_is_int(v) for v in value)):
    raise where(f'{what} {str(value)[:80]} is not [node, output, version]')
  node, output = value[0], value[1]
  if not 0 <= node < min(count, before):
    raise where(f'{what} reads node {node}, which is not a node before it '
                f'(0 to {min(count, before) - 1}): a cycle, a forward '
                'reference or a damaged index')
  if output != 0:
    raise where(f'{what} reads output {output} of node {node}; the ops read '
                'here have one output')
  return node, output


def _node(value, index: int, count: int, path) -> Node:
  def where(what):
    name = value.get('name') if isinstance(value, dict) else None
    shown = f' ({str(name)[:60]!r})' if isinstance(name, str) else ''
    return _fail(path, f'nodes[{index}]{shown}', what)
  if not isinstance(value, dict):
    raise where(f'a JSON {type(value).__name__}, not a node object')
  op, name, inputs = value.get('op'), value.get('name'), value.get('inputs')
  if not isinstance(op, str) or not isinstance(name, str):
    raise where("a node needs the strings 'op' and 'name'")
  if op not in COMPUTED_OPS | OTHER_OPS:
    raise where(f'op {op[:60]!r} is not an MXNet op this reader knows; it '
                f'computes {sorted(COMPUTED_OPS)}')
  if not isinstance(inputs, list) or len(inputs) > MAX_INPUTS:
    raise where(f"'inputs' must be a list of at most {MAX_INPUTS} entries")
  attrs = _attrs(op, _raw_attrs(value, where), where)
  entries = tuple(_entry(e, count, index, where, f'input {k}')
                  for k, e in enumerate(inputs))
  expected = input_count(op, attrs)
  if expected and len(entries) not in expected:
    raise where(f'{op} has {len(entries)} inputs, not '
                f'{" or ".join(map(str, expected))}')
  return Node(op, name, attrs, entries)


def read_symbol(path: str | os.PathLike) -> Graph:
  """The graph of an MXNet ``-symbol.json``: nodes in order (each input an
  earlier node), known ops only, the parameters the interpreter uses
  parsed ('(3, 3)' -> (3, 3), 'True' -> True); MxnetFileError naming the
  file and the node otherwise. Size and depth are bounded by jsonfile."""
  try:
    obj = jsonfile.read_object(path)
  except ValueError as e:
    raise MxnetFileError(str(e)) from None
  nodes = obj.get('nodes')
  if not isinstance(nodes, list) or not 0 < len(nodes) <= MAX_NODES:
    raise _fail(path, "'nodes'", f'must be a list of 1 to {MAX_NODES} nodes')
  graph = tuple(_node(n, i, len(nodes), path) for i, n in enumerate(nodes))
  def where(what):
    return _fail(path, 'the graph', what)
  args, heads = obj.get('arg_nodes', []), obj.get('heads')
  if not isinstance(args, list) or not all(
      _is_int(a) and 0 <= a < len(graph) and graph[a].op == 'null'
      for a in args):
    raise where("'arg_nodes' must list variable (null) nodes")
  if not isinstance(heads, list) or not 0 < len(heads) <= MAX_INPUTS:
    raise where(f"'heads' must list 1 to {MAX_INPUTS} outputs")
  outs = tuple(_entry(h, len(graph), len(graph), where, 'a head')
               for h in heads)
  return Graph(graph, tuple(args), outs, os.fspath(path))
