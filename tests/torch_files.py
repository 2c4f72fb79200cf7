"""PyTorch checkpoints written the way torch.save writes them, without torch:
a pickle opcode emitter of our own (protocol 2, persistent ids,
``_rebuild_tensor_v2``, ``collections.OrderedDict``) and the two layouts,
the zip archive (``<root>/data.pkl``, ``<root>/data/0``, ..., ``version``,
``byteorder``) and the legacy stream. ``checkpoint(...)`` returns the
file's bytes and what a reader must find in it; the torch cross-check in
test_torch_checkpoint loads these files with torch to show that they are
torch's format."""

from __future__ import annotations

import io
import struct
import zipfile
from typing import Any, NamedTuple

import numpy as np

MAGIC = 0x1950a86a20f9469cfc6c
STORAGE_TYPES = {'float32': 'FloatStorage', 'float16': 'HalfStorage',
                 'bfloat16': 'BFloat16Storage', 'float64': 'DoubleStorage',
                 'int64': 'LongStorage', 'int32': 'IntStorage',
                 'int16': 'ShortStorage', 'int8': 'CharStorage',
                 'uint8': 'ByteStorage', 'bool': 'BoolStorage'}


class Global(NamedTuple):
  module: str
  name: str


class Call(NamedTuple):
  """func(*args) (REDUCE), then BUILD with state when it is not None."""
  func: Global
  args: tuple
  state: Any = None


class NewObj(NamedTuple):
  """cls.__new__(cls) (NEWOBJ) with dict items, as a dict subclass or an
  object with a __dict__ pickles at protocol 2."""
  cls: Global
  items: dict
  state: dict | None = None


class Tensor(NamedTuple):
  """A tensor over storage ``key`` (``numel`` elements of ``dtype``)."""
  key: str
  dtype: str
  numel: int
  offset: int
  size: tuple
  stride: tuple


def ordered_dict(items: dict) -> NewObj:
  """collections.OrderedDict as torch pickles a state dict: REDUCE of ()
  then SETITEMS."""
  return NewObj(Global('collections', 'OrderedDict'), items, state=None)


class Emitter:
  """Pickle opcodes for plain values and the placeholders above."""

  def __init__(self, legacy: bool = False):
    self.out = bytearray(b'\x80\x02')
    self.legacy = legacy

  def dumps(self, value) -> bytes:
    self.value(value)
    self.out += b'.'
    return bytes(self.out)

  def value(self, v) -> None:
    out = self.out
    if v is None:
      out += b'N'
    elif type(v) is bool:
      out += b'\x88' if v else b'\x89'
    elif type(v) is int:
      self.integer(v)
    elif type(v) is float:
      out += b'G' + struct.pack('>d', v)
    elif type(v) is str:
      raw = v.encode('utf-8')
      out += b'X' + len(raw).to_bytes(4, 'little') + raw
    elif type(v) is bytes:  # as Python 3 writes bytes at protocol 2
      self.value(Call(Global('_codecs', 'encode'), (v.decode('latin-1'),
                                                     'latin1')))
    elif isinstance(v, Global):
      out += b'c' + f'{v.module}\n{v.name}\n'.encode()
    elif isinstance(v, Tensor):
      self.tensor(v)
    elif isinstance(v, Call):
      self.value(v.func)
      self.value(tuple(v.args))
      out += b'R'
      self.build(v.state)
    elif isinstance(v, NewObj):
      self.new_object(v)
    elif type(v) is tuple:
      self.sequence(v, b'(', b't')
    elif type(v) is list:
      out += b']'
      if v:
        self.sequence(v, b'(', b'e')
    elif type(v) is dict:
      out += b'}'
      self.set_items(v)
    else:
      raise TypeError(f'no opcode for {type(v).__name__}')

  def integer(self, v: int) -> None:
    if 0 <= v < 256:
      self.out += b'K' + bytes([v])
    elif 0 <= v < 65536:
      self.out += b'M' + v.to_bytes(2, 'little')
    elif -2**31 <= v < 2**31:
      self.out += b'J' + v.to_bytes(4, 'little', signed=True)
    else:
      raw = v.to_bytes((v.bit_length() + 8) // 8, 'little', signed=True)
      self.out += b'\x8a' + bytes([len(raw)]) + raw

  def sequence(self, items, start: bytes, end: bytes) -> None:
    self.out += start
    for item in items:
      self.value(item)
    self.out += end

  def set_items(self, items: dict) -> None:
    if items:
      self.out += b'('
      for key, value in items.items():
        self.value(key)
        self.value(value)
      self.out += b'u'

  def build(self, state) -> None:
    if state is not None:
      self.value(state)
      self.out += b'b'

  def new_object(self, v: NewObj) -> None:
    self.value(v.cls)
    if v.cls == Global('collections', 'OrderedDict'):
      self.out += b')R'  # OrderedDict.__reduce__: (cls, ()), then items
    else:
      self.out += b')\x81'
    self.set_items(v.items)
    self.build(v.state)

  def tensor(self, t: Tensor) -> None:
    self.value(Global('torch._utils', '_rebuild_tensor_v2'))
    self.out += b'('
    pid = ('storage', Global('torch', STORAGE_TYPES[t.dtype]), t.key, 'cpu',
           t.numel) + ((None,) if self.legacy else ())
    self.value(pid)
    self.out += b'Q'
    for field in (t.offset, t.size, t.stride, False,
                  Call(Global('collections', 'OrderedDict'), ())):
      self.value(field)
    self.out += b'tR'


def _strides(shape) -> tuple:
  out, step = [], 1
  for n in reversed(shape):
    out.append(step)
    step *= n
  return tuple(reversed(out))


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
  """float32 -> the top 16 bits (x should be exact in bfloat16)."""
  return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(
      np.uint16)


class Plan(NamedTuple):
  obj: Any                      # the object to pickle, with Tensors in it
  storages: dict[str, bytes]    # key -> raw little-endian bytes
  numels: dict[str, int]
  dtypes: dict[str, str]
  expected: dict[str, np.ndarray]
  other: dict[str, Any]


def _layout(arrays: dict, transposed=(), shared=(), bfloat16=()):
  """(name -> Tensor, key -> (raw bytes, numel, dtype)) of a state dict."""
  tensors, storages = {}, {}
  shared_parts = []
  for name, a in arrays.items():
    dtype = 'bfloat16' if name in bfloat16 else a.dtype.name
    data = _bfloat16_bits(a) if name in bfloat16 else np.asarray(a)
    if name in shared:
      shared_parts.append((name, data, dtype))
      continue
    key = str(len(storages))
    if name in transposed:  # stored as a.T, read through swapped strides
      raw = np.ascontiguousarray(data.T)
      stride = tuple(reversed(_strides(raw.shape)))
    else:
      raw, stride = np.ascontiguousarray(data), _strides(data.shape)
    storages[key] = (raw.tobytes(), raw.size, dtype)
    tensors[name] = Tensor(key, dtype, raw.size, 0, a.shape, stride)
  if shared_parts:
    key, offset = str(len(storages)), 0
    total = sum(d.size for _, d, _ in shared_parts)
    for name, data, dtype in shared_parts:
      tensors[name] = Tensor(key, dtype, total, offset, data.shape,
                             _strides(data.shape))
      offset += data.size
    storages[key] = (b''.join(d.tobytes() for _, d, _ in shared_parts), total,
                     shared_parts[0][2])
  return tensors, storages


def _wrap(state: NewObj, wrapper, first: Tensor | None):
  """(the pickled object, the plain values a reader finds, extra tensors)."""
  if wrapper is None:
    return state, {}, {}
  if wrapper == 'facex':
    return {'state_dict': state}, {}, {}
  hparams = NewObj(Global('pytorch_lightning.utilities.parsing',
                          'AttributeDict'),
                   {'lr': 0.1, 'arch': 'ir_101', 'head': 'adaface',
                    'milestones': [12, 20, 24]})
  namespace = NewObj(Global('argparse', 'Namespace'), {},
                     {'batch_size': 512, 'data_root': '/data'})
  obj = {'epoch': 7, 'global_step': 1234,
         'pytorch-lightning_version': '1.8.6', 'state_dict': state,
         'optimizer_states': [{'state': {0: {'momentum_buffer': first}},
                               'param_groups': [{'lr': 0.1, 'params': [0],
                                                 'nesterov': False}]}],
         'lr_schedulers': [{'milestones': Call(Global('collections',
                                                      'Counter'),
                                               ({12: 1, 20: 1},)),
                            'gamma': 0.1}],
         'callbacks': {'ModelCheckpoint': {'best_model_path': ''}},
         'hyper_parameters': hparams, 'namespace': namespace}
  other = {'epoch': 7, 'global_step': 1234,
           'pytorch-lightning_version': '1.8.6',
           'optimizer_states.0.param_groups.0.lr': 0.1,
           'optimizer_states.0.param_groups.0.params.0': 0,
           'optimizer_states.0.param_groups.0.nesterov': False,
           'lr_schedulers.0.milestones.12': 1,
           'lr_schedulers.0.milestones.20': 1, 'lr_schedulers.0.gamma': 0.1,
           'callbacks.ModelCheckpoint.best_model_path': '',
           'hyper_parameters.lr': 0.1, 'hyper_parameters.arch': 'ir_101',
           'hyper_parameters.head': 'adaface',
           **{f'hyper_parameters.milestones.{i}': m
              for i, m in enumerate([12, 20, 24])},
           'namespace.batch_size': 512, 'namespace.data_root': '/data'}
  return obj, other, {'optimizer_states.0.state.0.momentum_buffer': first}


def plan(arrays: dict[str, np.ndarray], *, wrapper=None, transposed=(),
         shared=(), bfloat16=()) -> Plan:
  """What to write for a state dict of ``arrays``; see ``checkpoint``."""
  tensors, storages = _layout(arrays, transposed, shared, bfloat16)
  state = ordered_dict(tensors)
  first = next(iter(tensors.values()), None)
  obj, other, extra = _wrap(state, wrapper, first)
  prefix = {None: '', 'facex': 'state_dict.', 'lightning': 'state_dict.'}
  expected = {}
  for name, a in arrays.items():
    a = np.asarray(a)
    if name in bfloat16:
      a = (_bfloat16_bits(a).astype(np.uint32) << 16).view(np.float32)
    expected[prefix[wrapper] + name] = a
  for name in extra:
    expected[name] = expected[prefix[wrapper] + next(iter(arrays))]
  return Plan(obj, {k: s[0] for k, s in storages.items()},
              {k: s[1] for k, s in storages.items()},
              {k: s[2] for k, s in storages.items()}, expected, other)


def zip_bytes(p: Plan, root: str = 'archive', byteorder: bool = True) -> bytes:
  """The zip layout torch.save writes (entries STORED)."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', zipfile.ZIP_STORED) as z:
    z.writestr(f'{root}/data.pkl', Emitter().dumps(p.obj))
    if byteorder:
      z.writestr(f'{root}/byteorder', 'little')
    for key, raw in p.storages.items():
      z.writestr(f'{root}/data/{key}', raw)
    z.writestr(f'{root}/version', '3\n')
  return buf.getvalue()


def legacy_bytes(p: Plan) -> bytes:
  """The legacy stream: magic, protocol, system info, the main pickle, the
  storage keys, then per storage an int64 element count and its bytes."""
  info = {'protocol_version': 1001, 'little_endian': True,
          'type_sizes': {'short': 2, 'int': 4, 'long': 4}}
  keys = sorted(p.storages)
  out = b''.join(Emitter().dumps(v) for v in (MAGIC, 1001, info))
  out += Emitter(legacy=True).dumps(p.obj) + Emitter().dumps(keys)
  for key in keys:
    out += p.numels[key].to_bytes(8, 'little', signed=True) + p.storages[key]
  return out


def checkpoint(arrays: dict[str, np.ndarray], *, fmt: str = 'zip',
               wrapper: str | None = None, transposed=(), shared=(),
               bfloat16=(), root: str = 'archive') -> tuple[bytes, Plan]:
  """(the file's bytes, its Plan: ``expected`` tensors and ``other``
  values a reader must find). ``wrapper``: None (a bare state dict, as
  insightface's backbone.pth), 'facex' ({'state_dict': ...}) or
  'lightning' (AdaFace's .ckpt: epoch, optimizer_states, hyper_parameters
  as an AttributeDict, ...); ``transposed`` names 2-D arrays stored
  transposed (non-contiguous strides); ``shared`` names arrays stored one
  after another in one storage; ``bfloat16`` names float32 arrays stored
  as bfloat16."""
  p = plan(arrays, wrapper=wrapper, transposed=transposed, shared=shared,
           bfloat16=bfloat16)
  data = zip_bytes(p, root) if fmt == 'zip' else legacy_bytes(p)
  return data, p
